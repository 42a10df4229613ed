"""The precision contract (docs/DESIGN.md, "Precision") on CPU.

- The kernel tables run by the CPU interpreters (tests/test_tables.py for the one-node
  kernels, tests/test_hier_tables.py for the hierarchical one) in fp32, term by term as
  the kernels add, with the roundings the kernels make: every output within one rounding
  of the float64 value, one node and across nodes; with `batch_invariant` the cross-node
  schedule gives the one-node kernels' bits. Each check is shown to fail on a schedule
  that rounds twice or adds in another order.
- The reference backend on gloo: outputs and stored tensors within one rounding of
  float64 at world 4 (one node and two nodes of two), with and without epilogues, and
  bitwise the same rows whatever the row count.
- The option: compile's argument and MIXCC_BATCH_INVARIANT, what it changes in the plan
  and in `explain`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_hier_tables import lmaps, run_hier_table
from test_tables import run_push_table, run_table

import mixcc
from mixcc.codegen.hier import hier_schedule
from mixcc.codegen.plan import HierStage, part_elem
from mixcc.codegen.render import push_table, schedule_table

from oracle import expected

BF16_BITS = 8  # significand bits of bfloat16 (7 stored + 1)


def to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even), kept as float32."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(
        torch.bfloat16).float().numpy()


def rounding_excess(got: np.ndarray, exact: np.ndarray, bits: int, slack: np.ndarray
                    ) -> float:
    """The largest |got - exact| beyond half a unit in the last place of a `bits`-bit
    significand at exact (one correct rounding), in units of that half ulp, after allowing
    `slack` (the fp32 accumulation's own error bound); <= 0 where every element is within
    one rounding."""
    _, e = np.frexp(exact)  # |exact| = m * 2**e, m in [0.5, 1)
    half = np.ldexp(1.0, e - bits - 1)  # half an ulp of the bits-bit significand
    over = (np.abs(got.astype(np.float64) - exact) - slack) / half
    return float(over.max()) - 1.0


def fp32_slack(inputs: list[np.ndarray], world: int) -> float:
    """A bound on fp32 accumulation's error over `world` terms: world * 2^-24 * max|x|
    per term (generous)."""
    big = max(float(np.abs(x).max()) for x in inputs)
    return world * world * big * 2.0 ** -24


def bf16_inputs(world: int, units: int, cols: int, seed: int) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [to_bf16(gen.standard_normal((units, cols)).astype(np.float32))
            for _ in range(world)]


CROSS = [("allreduce(w)", [("w", 4)], 2), ("allreduce(w)", [("w", 8)], 2),
         ("allreduce(w)", [("w", 8)], 4),
         ("allreduce(tp); allgather(dp)", [("dp", 2), ("tp", 2)], 2),
         ("reducescatter(dp); allreduce(tp)", [("dp", 2), ("tp", 2)], 2),
         ("reducescatter(dp); allreduce(tp)", [("dp", 4), ("tp", 2)], 4),
         ("allreduce(tp*dp)", [("dp", 2), ("tp", 4)], 4)]


def hier_outputs(program: str, axes: list, rpn: int, inputs: list[np.ndarray], cols: int,
                 parts: str, split: bool = False) -> list[np.ndarray]:
    """Every rank's output of the hierarchical kernel's tables in fp32 with bf16 outputs;
    `parts`: "kernel" (the part type the renderer picks), "bf16" (parts rounded to bf16)."""
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    cur = inputs
    for lmap in lmaps(program, mesh):
        sched = hier_schedule(lmap, mesh, split)
        stage = HierStage((), lmap, sched)
        fp32_parts = parts == "kernel" and part_elem(stage, 2) == 4
        cur = run_hier_table(sched, cur, cols, part=None if fp32_parts else to_bf16,
                             final=to_bf16)
    return cur


def one_node_outputs(program: str, axes: list, inputs: list[np.ndarray], cols: int,
                     algo: str, rnd=to_bf16) -> list[np.ndarray]:
    """Every rank's output of a one-node kernel's tables in fp32, rounded by `rnd` (to
    bf16 by default)."""
    mesh = mixcc.Mesh(axes, ranks_per_node=math.prod(s for _, s in axes))
    coll = mixcc.compile(program, mesh, backend="reference")
    cur = inputs
    for stage in coll.plan.stages:
        n_out = len(stage.lmap.out_units[0])
        if algo == "push":
            flat, offsets, _ = push_table(stage.push_schedule)
            cur = run_push_table(flat, offsets, cur, n_out, stage.lmap.redop, cols,
                                 stage.push_schedule.slots)
        else:
            flat, offsets, _ = schedule_table(stage.schedules[algo])
            cur = run_table(flat, offsets, cur, n_out, stage.lmap.redop, cols)
        cur = [rnd(c) for c in cur]
    return cur


def excess(program: str, axes: list, outputs: list[np.ndarray], inputs: list[np.ndarray],
           cols: int) -> float:
    exp, _, _ = expected(program, axes, [torch.from_numpy(x.astype(np.float64))
                                         for x in inputs])
    slack = fp32_slack(inputs, len(inputs))
    return max(rounding_excess(o.reshape(-1, cols), exp[r].numpy(), BF16_BITS, slack)
               for r, o in enumerate(outputs))


@pytest.mark.parametrize(("program", "axes", "rpn"), CROSS)
def test_cross_node_outputs_are_rounded_once(program: str, axes: list, rpn: int) -> None:
    """fp32 parts between nodes: every output within one bf16 rounding of float64. The
    same tables with parts rounded to bf16 (what the kernel did with 16-bit parts) fail
    the same check where a part sums several terms."""
    cols = 512
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    coll = mixcc.compile(program, mesh, backend="reference")
    inputs = bf16_inputs(mesh.world_size, coll.ir.granularity, cols, seed=5)
    good = hier_outputs(program, axes, rpn, inputs, cols, "kernel")
    assert excess(program, axes, good, inputs, cols) <= 0
    stages = [st for st in coll.plan.stages if isinstance(st, HierStage)]
    if any(part_elem(st, 2) == 4 for st in stages):
        bad = hier_outputs(program, axes, rpn, inputs, cols, "bf16")
        assert excess(program, axes, bad, inputs, cols) > 0, "bf16 parts went unnoticed"


@pytest.mark.parametrize("program", ["allreduce(tp)", "reducescatter(dp); allreduce(tp)",
                                     "allreduce(tp); allgather(dp)", "reducescatter(tp*dp)"])
@pytest.mark.parametrize("algo", ["one_shot", "two_shot", "push"])
def test_one_node_outputs_are_rounded_once(program: str, algo: str) -> None:
    axes = [("dp", 2), ("tp", 4)]
    cols = 256
    coll = mixcc.compile(program, mixcc.Mesh(axes), backend="reference")
    inputs = bf16_inputs(8, coll.ir.granularity, cols, seed=11)
    got = one_node_outputs(program, axes, inputs, cols, algo)
    assert excess(program, axes, got, inputs, cols) <= 0


def test_the_check_catches_a_double_rounding() -> None:
    """rounding_excess itself: a sum of bf16 values rounded once passes, the same values
    summed in bf16 step by step do not (many elements: some land two roundings away)."""
    gen = np.random.default_rng(3)
    xs = [to_bf16(gen.standard_normal(4096).astype(np.float32)) for _ in range(4)]
    exact = sum(x.astype(np.float64) for x in xs)
    once = to_bf16(sum(xs))
    twice = xs[0]
    for x in xs[1:]:
        twice = to_bf16(twice + x)
    slack = fp32_slack(xs, 4)
    assert rounding_excess(once, exact, BF16_BITS, slack) <= 0
    assert rounding_excess(twice, exact, BF16_BITS, slack) > 0


@pytest.mark.parametrize(("program", "axes", "rpn"), CROSS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_batch_invariant_schedules_give_the_one_node_bits(program: str, axes: list, rpn: int,
                                                          dtype: str) -> None:
    """With split_terms (batch_invariant) the hierarchical tables give bit for bit what the
    one-node kernels give on the same ranks (one-shot, two-shot, push); the default
    schedule, which adds each node's terms first, differs somewhere in fp32."""
    cols = 256
    mesh = mixcc.Mesh(axes)
    coll = mixcc.compile(program, mesh, backend="reference")
    gen = np.random.default_rng(17)
    inputs = [gen.standard_normal((coll.ir.granularity, cols)).astype(np.float32)
              for _ in range(mesh.world_size)]
    rnd = to_bf16 if dtype == "bf16" else (lambda a: a)
    inputs = [rnd(x) for x in inputs]
    mesh_n = mixcc.Mesh(axes, ranks_per_node=rpn)

    def hier(split: bool) -> list[np.ndarray]:
        cur = inputs
        for lmap in lmaps(program, mesh_n):
            sched = hier_schedule(lmap, mesh_n, split)
            keep = dtype == "fp32" or part_elem(HierStage((), lmap, sched), 2) == 4
            cur = run_hier_table(sched, cur, cols, part=None if keep else rnd, final=rnd)
        return cur

    inv = hier(True)
    ref = None
    for algo in ("one_shot", "two_shot", "push"):
        cur = one_node_outputs(program, axes, inputs, cols, algo, rnd)
        for r in range(mesh.world_size):
            assert np.array_equal(inv[r], cur[r]), f"{algo}: rank {r} differs from the " \
                "batch-invariant cross-node schedule"
        ref = cur
    reorders = any(part_elem(HierStage((), lm, hier_schedule(lm, mesh_n)), 2) == 4
                   for lm in lmaps(program, mesh_n))  # node parts of several terms added
    if dtype == "fp32" and reorders:
        default = hier(False)
        assert any(not np.array_equal(default[r], ref[r]) for r in range(mesh.world_size)), \
            "the per-node order went unnoticed"


def test_part_types() -> None:
    """fp32 parts where a part sums (or scales) terms of a 16-bit dtype; the dtype's own
    where parts are single terms (batch_invariant, allgather) or the dtype is fp32."""
    def stage(program: str, axes: list, rpn: int, split: bool = False) -> HierStage:
        mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
        coll = mixcc.compile(program, mesh, backend="reference", batch_invariant=split)
        (st,) = [s for s in coll.plan.stages if isinstance(s, HierStage)]
        return st

    ar = stage("allreduce(w)", [("w", 4)], 2)
    assert part_elem(ar, 2) == 4 and part_elem(ar, 4) == 4
    assert part_elem(stage("allreduce(w)", [("w", 4)], 2, True), 2) == 2
    assert part_elem(stage("allgather(w)", [("w", 4)], 2), 2) == 2
    assert part_elem(stage("allreduce(w, op=max)", [("w", 4)], 2), 2) == 2


def test_the_option_and_its_environment_variable(monkeypatch) -> None:
    mesh = mixcc.Mesh({"w": 4}, ranks_per_node=2)
    prog = "allreduce(w); add(r); store(r); rmsnorm(g)"
    monkeypatch.delenv("MIXCC_BATCH_INVARIANT", raising=False)
    off = mixcc.compile(prog, mesh, backend="reference")
    assert off.options["batch_invariant"] is False
    assert "the bits may depend on the call where" in off.explain()
    assert "a cross-node stage adds each node's terms first" in off.explain()
    monkeypatch.setenv("MIXCC_BATCH_INVARIANT", "1")
    on = mixcc.compile(prog, mesh, backend="reference")
    assert on.options["batch_invariant"] is True
    assert "batch_invariant: a row's bits do not depend" in on.explain()
    (h,) = [s.hier for s in on.plan.stages if isinstance(s, HierStage)]
    assert all(len(p.terms) <= 1 for rs in h.ranks for row in rs.sends for p in row)
    assert mixcc.compile(prog, mesh, backend="reference",
                         batch_invariant=False).options["batch_invariant"] is False
    ag = mixcc.compile("allgather(w)", mesh, backend="reference")
    assert "no sums: every path gives the same bits" in ag.explain()


def reference_precision_task(rank: int, world: int, group, program: str, axes: list,
                             rpn: int, rows: int, hidden: int, break_it: bool) -> str:
    """One rank of the reference backend on gloo, bf16: the output and the stored residual
    within one rounding of float64 (the epilogue's own fp32 error allowed: 2^-20 of the
    value). `break_it`: the collective runs in bf16 (the double rounding the contract
    forbids) and the check must report it."""
    from mixcc import precision

    keep = precision.accumulation_input
    if break_it:
        precision.accumulation_input = lambda x, summed: x
    try:
        return _reference_precision(rank, world, group, program, axes, rpn, rows, hidden)
    finally:
        precision.accumulation_input = keep


def _reference_precision(rank: int, world: int, group, program: str, axes: list, rpn: int,
                         rows: int, hidden: int) -> str:
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    coll = mixcc.compile(program, mesh, dtype=torch.bfloat16, group=group, backend="reference")
    gen = [torch.Generator().manual_seed(100 + r) for r in range(world)]
    inputs = [torch.randn(rows, hidden, generator=g).to(torch.bfloat16) for g in gen]
    colls = program.split("; add(")[0]
    exp, _, _ = expected(colls, axes, [x.double() for x in inputs])
    want = exp[rank].reshape(-1, hidden)
    slack = fp32_slack([x.float().numpy() for x in inputs], world)
    msgs = []
    if "add(r)" not in program:
        got = coll(inputs[rank].clone())
        e = rounding_excess(got.float().numpy(), want.numpy(), BF16_BITS, slack)
        if e > 0:
            msgs.append(f"output off by {e:.2f} half-ulps beyond one rounding")
        return "; ".join(msgs)
    g = torch.Generator().manual_seed(7)
    r = torch.randn(want.shape, generator=g).to(torch.bfloat16)
    w = (torch.rand(hidden, generator=g) + 0.5).to(torch.bfloat16)
    v = want + r.double()
    norm = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-6) * w.double()
    res = r.clone()
    out = coll(inputs[rank].clone(), r=res, g=w)
    e = rounding_excess(res.float().numpy(), v.numpy(), BF16_BITS, slack)
    if e > 0:
        msgs.append(f"stored r off by {e:.2f} half-ulps beyond one rounding")
    e = rounding_excess(out.float().numpy(), norm.numpy(), BF16_BITS,
                        slack + norm.abs().numpy() * 2.0 ** -20)
    if e > 0:
        msgs.append(f"output off by {e:.2f} half-ulps beyond one rounding")
    return "; ".join(msgs)


@pytest.mark.parametrize("rpn", [4, 2], ids=["one-node", "two-nodes"])
@pytest.mark.parametrize("program", ["allreduce(w)", "allreduce(w); add(r); store(r); rmsnorm(g)"])
def test_reference_backend_rounds_once(rank_pool, program: str, rpn: int) -> None:
    """World 4 on gloo, one node and two nodes of two (the reference runs the intra and
    inter steps as two collectives): within one rounding; the same calls reduced in bf16
    fail the check."""
    axes = [("w", 4)]
    res = rank_pool.run(4, reference_precision_task, program, axes, rpn, 16, 512, False)
    assert not any(res.values()), res
    res = rank_pool.run(4, reference_precision_task, program, axes, rpn, 16, 512, True)
    assert any(res.values()), "a bf16 reduction went unnoticed"


def test_a_read_after_a_store_through_another_name_is_refused() -> None:
    """Fused kernels read every named tensor before a statement stores: a statement that
    reads, under another name, what an earlier store wrote is refused before anything
    runs (on every backend alike)."""
    coll = mixcc.compile("allreduce(w); add(r); store(r); rmsnorm(g)", mixcc.Mesh({"w": 1}),
                         backend="reference")
    buf = torch.randn(4 * 64, dtype=torch.bfloat16)
    before = buf.clone()
    r, g = buf.view(4, 64), buf[:64]
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="g .* overlaps r, which store"):
        coll(x, r=r, g=g)
    assert torch.equal(buf, before)  # nothing ran
    coll(x, r=r, g=torch.ones(64, dtype=torch.bfloat16))  # separate tensors: fine


def test_the_bench_runs_auto_with_batch_invariant_beside_auto(monkeypatch) -> None:
    """`mixcc bench --backend auto,auto:invariant` compiles the second with
    batch_invariant=True (its cost side by side); GPU runs default to both."""
    from mixcc import bench

    seen = []

    def spy(program, mesh, **kw):
        seen.append(kw)
        return mixcc.compile(program, mesh, **{**kw, "backend": "reference"})

    monkeypatch.setattr(bench, "mixcc_compile", spy)
    cfg = {"pairs": [("allreduce(w)", "auto"), ("allreduce(w)", "auto:invariant")]}
    out = bench._entries(cfg, mixcc.Mesh({"w": 1}), torch.float32, {}, [])
    assert [be for be, _, _ in out["allreduce(w)"]] == ["auto", "auto:invariant"]
    fused_kw = [kw for kw in seen if kw.get("backend") == "auto"]
    assert [kw["batch_invariant"] for kw in fused_kw] == [False, True]
    assert [c.options["batch_invariant"] for _, c, _ in out["allreduce(w)"]] == [False, True]


@pytest.mark.parametrize(("program", "widened"), [
    ("allreduce(w); add(r); rmsnorm(g)", True),
    ("allgather(w); add(r); rmsnorm(g)", False),
    ("allreduce(w, op=max); add(r); rmsnorm(g)", False)])
def test_an_epilogue_as_torch_ops_starts_from_the_fp32_result(monkeypatch, program: str,
                                                              widened: bool) -> None:
    """Rows the kernel cannot hold (epilogue_hidden 0): the fused backend runs the
    collective on x in fp32 where the program sums 16-bit values, then the statements, and
    rounds once; the output equals the statements applied to the exact fp32 sum."""
    from mixcc import api

    coll = mixcc.compile(program, mixcc.Mesh({"w": 2}), backend="reference")
    calls = []

    class Runner:  # stands in for the kernels: every rank's x the same
        def epilogue_hidden(self, shape, tensors):
            return 0

        def __call__(self, x, out, shape):
            calls.append(x.dtype)
            if "max" in program:
                return x.clone()
            return x.repeat(2, 1) if "allgather" in program else x * 2

    monkeypatch.setattr(api.Collective, "_choose", lambda self, x: "fused")
    monkeypatch.setattr(api.Collective, "_fused_runner", lambda self, x: Runner())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20000, generator=gen).to(torch.bfloat16)
    rows = 6 if "allgather" in program else 3
    r = torch.randn(rows, 20000, generator=gen).to(torch.bfloat16)
    g = (torch.rand(20000, generator=gen) + 0.5).to(torch.bfloat16)
    out = coll(x, r=r, g=g)
    assert calls == [torch.float32 if widened else torch.bfloat16]
    y = x.float().repeat(2, 1) if "allgather" in program else x.float() * (1 if "max" in
                                                                           program else 2)
    v = y + r.float()
    want = (v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-6) * g.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.to(torch.bfloat16))


def test_batch_invariant_warns_where_auto_falls_back_to_nccl(monkeypatch) -> None:
    """auto on a CUDA tensor where the fused backend cannot run: the reference backend
    (NCCL) runs the sum, and batch_invariant says once that it does not hold."""
    from types import SimpleNamespace

    from mixcc import api, fused

    monkeypatch.setattr(fused, "unavailable_reason", lambda *a: "no CUDA device is available")
    monkeypatch.setattr(api, "_WARNED", set())
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    coll = mixcc.compile("allreduce(w)", mixcc.Mesh({"w": 2}), batch_invariant=True)
    with pytest.warns(RuntimeWarning, match="batch_invariant=True does not hold"):
        assert coll._choose(x) == "reference"
    plain = mixcc.compile("allreduce(w)", mixcc.Mesh({"w": 2}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain._choose(x) == "reference"  # no promise, no warning
