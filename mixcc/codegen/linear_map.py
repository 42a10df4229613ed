"""Every program of these collectives is a linear map (or, for max/min, a set map).

For each rank and each output unit (a block of input_rows / granularity rows) we
compute which (source rank, source unit) pairs it combines, with an integer
coefficient for sums (allreduce(a); allreduce(a) doubles every term). Terms are
sorted, so every rank combines the same terms in the same order: replicas are
bitwise identical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..ir.nodes import Op
from ..mesh import Mesh

Term = tuple[int, int, int]  # (source rank, source unit, coefficient)


@dataclass(frozen=True)
class LinearMap:
    """out_units[rank][j] = the sorted terms combined into output unit j of `rank`."""

    in_units: int
    redop: str
    out_units: tuple[tuple[tuple[Term, ...], ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.out_units)


def _combine(parts: list[Counter], redop: str) -> Counter:
    out: Counter = Counter()
    for p in parts:
        out.update(p)
    if redop != "sum":  # max/min are idempotent: each term counts once
        out = Counter(dict.fromkeys(out, 1))
    return out


def linear_map(ops: tuple[Op, ...], mesh: Mesh, in_units: int, redop: str) -> LinearMap:
    """The map of `ops` (all reductions with `redop`) on input cut into `in_units` units."""
    world = mesh.world_size
    state = [[Counter({(r, u): 1}) for u in range(in_units)] for r in range(world)]
    for op in ops:
        new = []
        for r in range(world):
            members = mesh.group_members(r, op.axes)
            if op.coll == "allgather":
                new.append([c for m in members for c in state[m]])
                continue
            length = len(state[r])
            reduced = [_combine([state[m][j] for m in members], redop) for j in range(length)]
            if op.coll == "reducescatter":
                n, i = len(members), members.index(r)
                reduced = reduced[i * length // n : (i + 1) * length // n]
            new.append(reduced)
        state = new
    out = tuple(
        tuple(tuple(sorted((s, u, c) for (s, u), c in unit.items())) for unit in units)
        for units in state
    )
    return LinearMap(in_units, redop, out)
