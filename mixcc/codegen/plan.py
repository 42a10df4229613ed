"""The plan: stages with scope, transport, algorithm and chunking, as printable data."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.nodes import Op
from .linear_map import LinearMap
from .schedule import Schedule


@dataclass(frozen=True)
class Step:
    """One torch.distributed collective over a partition of the world (reference backend),
    or a local block permutation (`perms[rank][p]` = input block feeding output block p)."""

    coll: str  # allreduce | allgather | reducescatter | permute
    groups: tuple[tuple[int, ...], ...] = ()
    redop: str = "sum"
    scope: str = "intra"  # intra | inter | local
    perms: tuple[tuple[int, ...], ...] = ()

    def __str__(self) -> str:
        if self.coll == "permute":
            return f"permute blocks (local), rank 0: {list(self.perms[0])}"
        op = "" if self.redop == "sum" else f", op={self.redop}"
        groups = " ".join(str(list(g)) for g in self.groups[:4])
        more = f" ... ({len(self.groups)} groups)" if len(self.groups) > 4 else ""
        return f"{self.coll}{op} [{self.scope}] over {groups}{more}"


@dataclass(frozen=True)
class Chunking:
    """Fused stages stream each unit through per-block workspace regions."""

    region_bytes: int  # one block's share of one half of the double-buffered workspace
    elem_bytes: int
    units_per_region: int  # input units + result slots kept per block and chunk

    @property
    def elems_per_block(self) -> int:
        """Columns of every unit one block handles per chunk (multiple of 16 bytes)."""
        per = self.region_bytes // (self.units_per_region * self.elem_bytes)
        vec = max(1, 16 // self.elem_bytes)
        return per // vec * vec

    def __str__(self) -> str:
        return (
            f"{self.elems_per_block} elements of every unit per block per chunk "
            f"({self.region_bytes} B regions, {self.units_per_region} unit(s) each), "
            "double-buffered"
        )


@dataclass(frozen=True)
class Stage:
    scope: str  # intra | inter | local
    transport: str  # ipc | nccl | none
    algorithm: str
    ops: tuple[Op, ...]
    steps: tuple[Step, ...]
    lmap: LinearMap | None = None
    schedules: dict[str, Schedule] = field(default_factory=dict)
    chunking: Chunking | None = None

    def describe(self) -> str:
        ops = "; ".join(str(o) for o in self.ops)
        lines = [f"stage [{self.scope}] transport={self.transport} "
                 f"algorithm={self.algorithm}: {ops}"]
        lines += [f"    step: {s}" for s in self.steps]
        if self.chunking is not None:
            lines.append(f"    chunking: {self.chunking}")
        for sched in self.schedules.values():
            lines += ["    " + ln for ln in sched.describe(0).splitlines()]
        return "\n".join(lines)


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    granularity: int
    one_node: bool  # every stage is intra-node: the fused backend can run it

    def describe(self) -> str:
        if not self.stages:
            return "no stage: the program is the identity (output = copy of input)"
        return "\n".join(s.describe() for s in self.stages)
