"""The typed IR: a list of collectives over concrete axis groups of a mesh."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from .ast import Epi, Pos

# How a group sits on the nodes of the mesh (set by passes.split_nodes):
#   intra - every group lies inside one node
#   inter - every group has at most one member per node
#   hier  - every group is (equal parts on several nodes) x (members per node)
#   flat  - irregular: the group crosses nodes unevenly, run as one inter-node step
# Before split_nodes an op's scope is "" (not known yet) and prints without a label.
SCOPES = ("intra", "inter", "hier", "flat")


@dataclass(frozen=True)
class Op:
    """One collective over the group of `axes` (row-major in that order)."""

    coll: str
    axes: tuple[str, ...]
    redop: str = "sum"
    pos: Pos | None = None
    source: str = ""
    scope: str = ""  # one of SCOPES once passes.split_nodes ran

    def with_(self, **kw: object) -> Op:
        return replace(self, **kw)

    def __str__(self) -> str:
        op = "" if self.redop == "sum" else f", op={self.redop}"
        return f"{self.coll}({'*'.join(self.axes)}{op})"


@dataclass(frozen=True)
class IR:
    """The verified program: ops in order plus shape facts in units of input rows.

    `granularity` is the number of equal row blocks ("units") the input is cut
    into: the rows of every call must divide by it. `row_factor` is output rows
    over input rows.
    """

    ops: tuple[Op, ...]
    granularity: int
    row_factor: Fraction
    epilogue: tuple[Epi, ...] = ()  # row-wise ops on the output (mixcc/ops.py)

    def __str__(self) -> str:
        body = "; ".join(f"{op} [{op.scope}]" if op.scope else str(op) for op in self.ops)
        epi = "".join(f"; {e}" for e in self.epilogue)
        rows = f"rows % {self.granularity} == 0, " if self.granularity > 1 else ""
        return (f"{body or '(identity: copy)'}{epi}  ({rows}out rows = in rows x "
                f"{self.row_factor})")
