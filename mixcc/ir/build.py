"""build + verify: AST + mesh -> IR, with shape inference (docs/DESIGN.md section 3, step 2)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..errors import CompileError
from ..mesh import Mesh
from ..ops import QUANT_FORMATS
from .ast import Program
from .nodes import IR, Op

# Which reductions each dtype supports. Integers: max/min only, because the fused
# backend accumulates in fp32, which is not exact for int32 sums beyond 2**24.
_FLOATS = ("sum", "max", "min")
SUPPORTED: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: _FLOATS,
    torch.bfloat16: _FLOATS,
    torch.float16: _FLOATS,
    torch.float64: _FLOATS,
    torch.int32: ("max", "min"),
}


def check_dtype(dtype: torch.dtype, redops: set[str], text: str = "") -> None:
    """Raise CompileError if `dtype` cannot run any of `redops`."""
    if dtype not in SUPPORTED:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED)
        raise CompileError(f"dtype {dtype} is not supported; expected one of {names}", text)
    for op in sorted(redops):
        if op not in SUPPORTED[dtype]:
            raise CompileError(
                f"op={op} is not supported for dtype {dtype}; "
                f"{dtype} supports op={'|'.join(SUPPORTED[dtype])}",
                text,
            )


def shape_facts(ops: tuple[Op, ...], mesh: Mesh) -> tuple[int, Fraction]:
    """(granularity, row_factor): rows must divide by granularity; out = in x factor."""
    frac, gran = Fraction(1), 1
    for op in ops:
        n = mesh.group_size(op.axes)
        if op.coll == "allgather":
            frac *= n
        elif op.coll == "reducescatter":
            frac /= n
            gran = math.lcm(gran, frac.denominator)
    return gran, frac


def group_axes(axes: tuple | None, mesh: Mesh, text: str) -> tuple[str, ...]:
    """A statement's group as mesh axis names (None: world, every axis); CompileError with
    a caret for an unknown axis or one written twice."""
    if axes is None:
        return tuple(mesh.names)
    seen: set[str] = set()
    for ax in axes:
        if ax.name not in mesh.names:
            raise CompileError(f"unknown axis {ax.name!r}; the mesh has axes "
                               f"{list(mesh.names)}", text, ax.pos.line, ax.pos.column,
                               ax.pos.width)
        if ax.name in seen:
            raise CompileError(f"axis {ax.name!r} appears twice in one group", text,
                               ax.pos.line, ax.pos.column, ax.pos.width)
        seen.add(ax.name)
    return tuple(a.name for a in axes)


def build(program: Program, mesh: Mesh, dtype: torch.dtype | None = None) -> IR:
    """Resolve axes against the mesh and verify the program; raise CompileError."""
    text = program.text
    if program.ep is not None:
        raise CompileError(f"{program.ep.kind} is compiled by mixcc.compile (mixcc/expert.py), "
                           "not into a collective's IR", text, program.ep.pos.line,
                           program.ep.pos.column)
    ops = [Op(st.coll, group_axes(st.axes, mesh, text), st.redop, st.pos, str(st))
           for st in program.stmts]
    if dtype is not None:
        check_dtype(dtype, {o.redop for o in ops if o.coll != "allgather"}, text)
        if program.epilogue and not dtype.is_floating_point:
            e = program.epilogue[0]
            raise CompileError(f"epilogue statements need a floating-point dtype, not {dtype}",
                               text, e.pos.line, e.pos.column, e.pos.width)
    for e in program.epilogue:
        if e.eps is not None and not (0.0 <= e.eps < float("inf")):
            raise CompileError(f"{e.op}: eps must be a finite number >= 0, got {e.eps:g}",
                               text, e.pos.line, e.pos.column, e.pos.width)
        if e.op == "quant" and QUANT_FORMATS.get(e.fmt) is None:
            raise CompileError(f"quant({e.fmt}, ...) needs a torch with {e.fmt} tensors",
                               text, e.pos.line, e.pos.column, e.pos.width)
    gran, frac = shape_facts(tuple(ops), mesh)
    return IR(tuple(ops), gran, frac, program.epilogue)


def check_rows(ir: IR, rows: int, text: str = "", what: str = "rows") -> int:
    """Output row count for `rows` input rows; CompileError when they do not divide."""
    if rows % ir.granularity:
        raise CompileError(
            f"{what}={rows} must be divisible by {ir.granularity} "
            "(the reducescatter group sizes of the program)",
            text,
        )
    return int(rows * ir.row_factor)
