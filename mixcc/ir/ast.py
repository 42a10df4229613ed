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
class EPArg:
    """One keyword argument of an expert-parallel statement: `name=value` (value as
    written: an integer or a name such as fp8_e4m3)."""

    name: str
    value: int | str
    pos: Pos


@dataclass(frozen=True)
class EPStmt:
    """An expert-parallel statement (mixcc/expert.py): `dispatch(G, experts=E, topk=K,
    ...)` or `combine(G)`; `axes` is None for `world`."""

    kind: str  # "dispatch" | "combine"
    axes: tuple[Axis, ...] | None
    args: tuple[EPArg, ...]
    pos: Pos

    def group_text(self) -> str:
        return "world" if self.axes is None else "*".join(a.name for a in self.axes)

    def arg(self, name: str) -> EPArg | None:
        return next((a for a in self.args if a.name == name), None)

    def __str__(self) -> str:
        args = "".join(f", {a.name}={a.value}" for a in self.args)
        return f"{self.kind}({self.group_text()}{args})"


@dataclass(frozen=True)
class Program:
    stmts: tuple[Stmt, ...]
    text: str
    epilogue: tuple[Epi, ...] = ()
    ep: EPStmt | None = None  # an expert-parallel program: this statement alone

    def __str__(self) -> str:
        if self.ep is not None:
            return str(self.ep)
        return "; ".join(str(s) for s in (*self.stmts, *self.epilogue))
