"""Per-rank test bodies for the rank pool (importable by spawned workers)."""

from __future__ import annotations

import torch
import torch.distributed as dist

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


def check_epilogue(rank: int, world: int, group, program: str, axes: list, rpn: int,
                   rows: int, hidden: int, dtype_name: str, seed: int,
                   backend: str = "reference", graph: bool = False,
                   algorithm: str = "auto") -> str:
    """A program with an epilogue against the float64 oracle: the output and every stored
    tensor, rounding-level tolerances of the dtype. On a CUDA backend the tensors live on
    the current device, and with `graph` the call is also captured in a CUDA graph and
    replayed on new data (inputs and named tensors refilled in place)."""
    dtype = DTYPES[dtype_name]
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    coll = mixcc.compile(program, mesh, dtype=dtype, group=group, backend=backend,
                         algorithm=algorithm)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend != "reference" \
        else torch.device("cpu")
    msgs = []
    x = tensors = None
    for step, s in enumerate((seed, seed + 1) if graph else (seed,)):
        data = _epilogue_case(program, axes, world, rank, rows, hidden, dtype, s)
        if step == 0:
            x = data[0].to(dev)
            tensors = {k: v.to(dev) for k, v in data[1].items()}
            if graph:
                coll(x, **tensors)  # builds the kernels before capture
                for k, v in data[1].items():
                    tensors[k].copy_(v)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    got = coll(x, **tensors)
                g.replay()
            else:
                got = coll(x, **tensors)
        else:  # new data into the captured tensors, then replay
            x.copy_(data[0])
            for k, v in data[1].items():
                tensors[k].copy_(v)
            g.replay()
        m = _judge_epilogue(got, tensors, *data[2:], dtype)
        if m:
            msgs.append(f"{'replay' if step else 'call'}: {m}")
    return "; ".join(msgs)


def _epilogue_case(program: str, axes: list, world: int, rank: int, rows: int, hidden: int,
                   dtype: torch.dtype, seed: int) -> tuple:
    """(x, named tensors, their values before the call, expected output, stored values,
    error bound, whether it ends in fp8) for one rank, on the CPU."""
    from oracle import EPS, epilogue_expected, split_epilogue

    colls, chain = split_epilogue(program)
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(colls, axes, inputs)
    g = torch.Generator().manual_seed(seed * 7 + rank)
    out_rows = exp[rank].shape[0]
    tensors = {}
    for op, name, _ in chain:
        if name in tensors:
            continue
        if op == "rmsnorm":
            tensors[name] = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
        elif op == "quant":
            tensors[name] = torch.rand(1, generator=g) + 0.25
        else:
            tensors[name] = torch.randn(out_rows, hidden, generator=g).to(dtype)
    before = {k: v.clone() for k, v in tensors.items()}
    # the collective's result is rounded to the dtype after its sums; each later step
    # rounds in fp32 or to a stored tensor's dtype (mixcc/ops.py)
    eps = EPS[dtype] * 4
    err0 = EPS[dtype] * mag[rank] * (terms + 2) + 1e-30
    want, stored, err = epilogue_expected(exp[rank], chain, before, err0, eps)
    fp8 = any(op == "quant" for op, _, _ in chain)
    return inputs[rank].clone(), tensors, before, want, stored, err, fp8


def _judge_epilogue(got: torch.Tensor, tensors: dict, before: dict, want: torch.Tensor,
                    stored: dict, err: torch.Tensor, fp8: bool, dtype: torch.dtype) -> str:
    """What is wrong with an epilogue call's output and named tensors ('' if nothing)."""
    got = got.cpu()
    # fp8 e4m3: 3 mantissa bits (relative step 2^-3), subnormal step 2^-9 below 2^-6
    tol = 2 * err + (want.abs() * 2.0**-3 + 2.0**-9 if fp8 else 0)
    bad = (got.double() - want).abs() > tol
    msgs = []
    if got.dtype != (torch.float8_e4m3fn if fp8 else dtype):
        msgs.append(f"output dtype {got.dtype}")
    if bad.any() or torch.isnan(got.double()).any():
        msgs.append(f"output: {int(bad.sum())} of {bad.numel()} elements off")
    for name, (val, val_err) in stored.items():  # within the bound of what it stored
        if ((tensors[name].cpu().double() - val).abs() > 2 * val_err).any():
            msgs.append(f"stored {name} differs")
    for name, val in before.items():
        if name not in stored and not torch.equal(tensors[name].cpu(), val):
            msgs.append(f"{name} was modified but nothing stores into it")
    return "; ".join(msgs)


def bench_registered_group(rank: int, world: int, group) -> str:
    """The bench compiles auto:registered on a group of its own (the same ranks), auto on
    the default group: a registered pool must not change the other rows' protocol."""
    from mixcc import bench
    from mixcc.mesh import Mesh

    assert group is None, "run on the whole pool: the bench's default group is WORLD"
    cfg = {"pairs": [("allreduce", "auto"), ("allreduce", "auto:registered"),
                     ("allgather", "auto:registered")]}
    out = bench._entries(cfg, Mesh({"dp": 1, "tp": world}), torch.float32, {}, [])
    objs = [(be, obj) for prog in ("allreduce", "allgather") for be, obj, _ in out[prog]]
    groups = {be: obj.group for be, obj in objs if be == "auto"}
    reg = [obj.group for be, obj in objs if be == "auto:registered"]
    if groups["auto"] is not None:
        return "auto was compiled on a group of its own"
    if reg[0] is None or reg[0] is not reg[1]:
        return "auto:registered did not get one group of its own, shared by its programs"
    if dist.get_world_size(reg[0]) != world:
        return f"the registered group has {dist.get_world_size(reg[0])} ranks"
    return ""


def bench_separate_oracle(rank: int, world: int, group) -> str:
    """bench.separate_oracle (the `separate` baseline's exact result) against the oracle
    run statement by statement with the rounding to bf16 between: reducescatter(dp) then
    allreduce(tp) on dp=2, tp=4, with one element planted where that rounding matters (a
    partial sum 1000 + 1.5 rounds to 1000, and the partials then cancel)."""
    from mixcc import bench

    assert group is None and world == 8, "run on the whole pool of eight"
    program, axes = "reducescatter(dp); allreduce(tp)", [("dp", 2), ("tp", 4)]
    dtype = torch.bfloat16
    inputs = [make_input(7, r, 16, 64, dtype) for r in range(world)]
    for r, v in {0: 1000.0, 4: 1.5, 1: -1000.0, 5: 0.0, 2: 0.0, 6: 0.0, 3: 0.0, 7: 0.0}.items():
        inputs[r][0, 0] = v  # ranks r and r + 4 pair in dp; row 0 goes to dp 0
    vals = inputs
    for i, (coll, ax, op) in enumerate(statements(program)):
        stmt = f"{coll}({'*'.join(ax)}{'' if op == 'sum' else ', op=' + op})"
        vals = expected(stmt, axes, vals)[0]
        if i + 1 < len(statements(program)):
            vals = [v.to(dtype) for v in vals]
    mine = vals[rank]
    got = bench.separate_oracle(program, mixcc.Mesh(dict(axes)), dtype)(inputs[rank].clone())
    if got.dtype != torch.float64 or not torch.allclose(got, mine, rtol=1e-12, atol=1e-12):
        return f"separate_oracle differs from the stepwise oracle: {(got - mine).abs().max()}"
    once = expected(program, axes, inputs)[0][rank]
    chain = mine.to(dtype)  # what a right chain of calls returns (the last sum rounded once)
    if bench.count_wrong(chain, got) != 0:
        return "a right chain of calls counted wrong against separate_oracle"
    if rank in (0, 1, 2, 3) and bench.count_wrong(chain, once) == 0:
        return "the planted element did not leave one rounding of the exact result"
    return ""
