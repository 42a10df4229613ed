"""Passes over the IR (docs/DESIGN.md section 3, step 3). Each is a pure function.

- drop_trivial: a collective over a group of one rank is the identity.
- merge_adjacent: allreduce(a); allreduce(b) = allreduce(a*b) (disjoint axes, or any
  axes for max/min, which are idempotent); reducescatter(G); allgather(G) = allreduce(G);
  allgather(a); allgather(b) = allgather(b*a); reducescatter(a); reducescatter(b) =
  reducescatter(a*b) (disjoint axes).
- split_nodes: tag each op with how its groups sit on nodes (nodes.SCOPES).
"""

from __future__ import annotations

from ..mesh import Mesh
from .nodes import IR, Op


def drop_trivial(ops: tuple[Op, ...], mesh: Mesh) -> tuple[Op, ...]:
    return tuple(op for op in ops if mesh.group_size(op.axes) > 1)


def _merge_pair(a: Op, b: Op) -> Op | None:
    """The single op equal to `a; b`, or None."""
    disjoint = not set(a.axes) & set(b.axes)
    src = f"{a.source}; {b.source}" if a.source and b.source else ""
    if a.coll == b.coll == "allreduce" and a.redop == b.redop:
        if disjoint:
            return Op("allreduce", a.axes + b.axes, a.redop, a.pos, src)
        if a.redop in ("max", "min"):
            axes = a.axes + tuple(x for x in b.axes if x not in a.axes)
            return Op("allreduce", axes, a.redop, a.pos, src)
    if a.coll == "reducescatter" and b.coll == "allgather" and a.axes == b.axes:
        return Op("allreduce", a.axes, a.redop, a.pos, src)
    if a.coll == b.coll == "allgather" and disjoint:
        return Op("allgather", b.axes + a.axes, "sum", a.pos, src)
    if a.coll == b.coll == "reducescatter" and a.redop == b.redop and disjoint:
        return Op("reducescatter", a.axes + b.axes, a.redop, a.pos, src)
    return None


def merge_adjacent(ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """Merge neighbouring ops that are algebraically one collective, to a fixpoint."""
    out: list[Op] = []
    for op in ops:
        out.append(op)
        while len(out) >= 2:
            merged = _merge_pair(out[-2], out[-1])
            if merged is None:
                break
            out[-2:] = [merged]
    return tuple(out)


def scope_of(axes: tuple[str, ...], mesh: Mesh) -> str:
    """How the groups over `axes` sit on the nodes of `mesh` (see nodes.SCOPES)."""
    groups = mesh.partition(axes)
    part_sizes = set()
    for g in groups:
        per_node: dict[int, int] = {}
        for m in g:
            per_node[mesh.node_of(m)] = per_node.get(mesh.node_of(m), 0) + 1
        part_sizes.add(frozenset(per_node.values()))
    if all(len(s) == 1 for s in part_sizes) and len({next(iter(s)) for s in part_sizes}) == 1:
        k = next(iter(next(iter(part_sizes))))
        size = len(groups[0])
        if k == size:
            return "intra"
        return "inter" if k == 1 else "hier"
    return "flat"


def split_nodes(ops: tuple[Op, ...], mesh: Mesh) -> tuple[Op, ...]:
    return tuple(op.with_(scope=scope_of(op.axes, mesh)) for op in ops)


def optimize(ir: IR, mesh: Mesh) -> IR:
    """All passes in order; the shape facts do not change."""
    ops = split_nodes(merge_adjacent(drop_trivial(ir.ops, mesh)), mesh)
    return IR(ops, ir.granularity, ir.row_factor, ir.epilogue)
