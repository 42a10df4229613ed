"""Per-rank test bodies for the rank pool (importable by spawned workers)."""

from __future__ import annotations

import torch

import mixcc

from oracle import expected, make_input, mismatch, statements

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int32": torch.int32}


def check_program(rank: int, world: int, group, program: str, axes: list, rpn: int,
                  rows: int, hidden: int, dtype_name: str, seed: int,
                  backend: str = "reference") -> str:
    """Compile and run `program`, compare this rank's output with the float64 oracle."""
    dtype = DTYPES[dtype_name]
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    coll = mixcc.compile(program, mesh, dtype=dtype, group=group, backend=backend)
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(program, axes, inputs)
    msgs = []
    x = inputs[rank].clone()
    out = coll(x)
    if not torch.equal(x, inputs[rank]):
        msgs.append("input was modified")
    m = mismatch(out, exp[rank], mag[rank], dtype, len(statements(program)), terms)
    if m:
        msgs.append(f"out-of-place: {m}")
    buf = torch.full(tuple(coll.output_shape(x.shape)), float("nan")).to(dtype) \
        if dtype.is_floating_point else torch.empty(tuple(coll.output_shape(x.shape)), dtype=dtype)
    res = coll(x, out=buf)
    if res is not buf:
        msgs.append("call with out= did not return out")
    m = mismatch(buf, exp[rank], mag[rank], dtype, len(statements(program)), terms)
    if m:
        msgs.append(f"out=: {m}")
    if tuple(buf.shape) == tuple(x.shape):
        coll(x, out=x)
        m = mismatch(x, exp[rank], mag[rank], dtype, len(statements(program)), terms)
        if m:
            msgs.append(f"in place: {m}")
    return "; ".join(msgs)


def check_exact(rank: int, world: int, group, program: str, axes: list, rpn: int,
                dtype_name: str, seed: int) -> str:
    """Small-integer data: sums are exact in every dtype, so results must be equal."""
    dtype = DTYPES[dtype_name]
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    coll = mixcc.compile(program, mesh, dtype=dtype, group=group, backend="reference")
    rows = 4 * coll.ir.granularity
    gens = [torch.Generator().manual_seed(seed * 100 + r) for r in range(world)]
    inputs = [torch.randint(-3, 4, (rows, 5), generator=g).to(dtype) for g in gens]
    exp, _, _ = expected(program, axes, inputs)
    out = coll(inputs[rank])
    if not torch.equal(out.double(), exp[rank]):
        return f"not exact: max error {(out.double() - exp[rank]).abs().max().item()}"
    return ""
