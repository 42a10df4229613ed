"""The syntax tree of a mixcc program, with source positions (1-based)."""

from __future__ import annotations

from dataclasses import dataclass

COLLECTIVES = ("allreduce", "allgather", "reducescatter")
REDOPS = ("sum", "max", "min")


@dataclass(frozen=True)
class Pos:
    """A source span: line and column of its first character, and its width."""

    line: int
    column: int
    width: int = 1


@dataclass(frozen=True)
class Axis:
    name: str
    pos: Pos


@dataclass(frozen=True)
class Stmt:
    """One statement: `coll(group, op=redop)`; `axes` is None for `world`."""

    coll: str
    axes: tuple[Axis, ...] | None
    redop: str
    pos: Pos

    def group_text(self) -> str:
        return "world" if self.axes is None else "*".join(a.name for a in self.axes)

    def __str__(self) -> str:
        op = "" if self.redop == "sum" else f", op={self.redop}"
        return f"{self.coll}({self.group_text()}{op})"


@dataclass(frozen=True)
class Epi:
    """One epilogue statement (mixcc/ops.py): `op(name)`, `rmsnorm(name, eps=E)` or
    `quant(fmt, name)`."""

    op: str
    name: str
    pos: Pos
    eps: float | None = None
    fmt: str | None = None

    def __str__(self) -> str:
        if self.op == "quant":
            return f"quant({self.fmt}, {self.name})"
        eps = f", eps={self.eps:g}" if self.eps is not None else ""
        return f"{self.op}({self.name}{eps})"


@dataclass(frozen=True)
class Program:
    stmts: tuple[Stmt, ...]
    text: str
    epilogue: tuple[Epi, ...] = ()

    def __str__(self) -> str:
        return "; ".join(str(s) for s in (*self.stmts, *self.epilogue))
