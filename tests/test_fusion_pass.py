"""The fusion pass (mixcc.FusionPass): collective chains that torch.compile traces become
mixcc programs on gloo ranks (reference backend); outputs match eager, unmatched sites stay
as they were with their reason, a model without collectives is left untouched."""

import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch._inductor.custom_graph_pass import CustomGraphPass

import mixcc
import mixcc.fusion
from mixcc import Mesh
from mixcc.fusion.groups import axes_of, derive_mesh


@pytest.fixture(scope="module")
def pool4():
    """A world of exactly four gloo ranks: new_group and DeviceMesh need every rank of
    the world, which the shared pool's larger world does not give a four-rank task."""
    from rank_pool import RankPool

    pool = RankPool(4)
    yield pool
    pool.close()


@pytest.fixture
def no_caches():
    """In this process: every compile runs the passes, settings restored after."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        yield
    torch._dynamo.reset()


def _no_caches() -> None:
    """In a worker rank: every compile runs the passes (the FX graph cache would skip
    them)."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.reset()


class Recorder(CustomGraphPass):
    """The fusion pass, then a record of the graph it left (one pass: torch 2.11 takes
    one in post_grad_custom_post_pass)."""

    def __init__(self):
        self.graphs: list[str] = []
        self.fusion: mixcc.FusionPass | None = None

    def __call__(self, graph) -> None:
        self.fusion(graph)
        self.graphs.append(str(graph))

    def uuid(self) -> str:
        return "recorder" + self.fusion.uuid()


def _compile(model, fusion: mixcc.FusionPass, rec: Recorder, **kw):
    rec.fusion = fusion
    return torch.compile(model, options={"post_grad_custom_post_pass": rec}, **kw)


# -- units -----------------------------------------------------------------------------

def test_axes_of_finds_axes_and_products_in_group_order():
    mesh = Mesh({"dp": 2, "tp": 2}, ranks_per_node=4)
    assert axes_of(mesh, 1, (0, 1), ordered=True) == ("tp",)
    assert axes_of(mesh, 1, (1, 3), ordered=True) == ("dp",)
    assert axes_of(mesh, 2, (0, 1, 2, 3), ordered=False) == ("dp", "tp")
    assert axes_of(mesh, 2, (0, 2, 1, 3), ordered=True) == ("tp", "dp")
    assert axes_of(mesh, 0, (0, 3), ordered=False) is None  # a diagonal: no axes
    assert axes_of(mesh, 1, (0, 2), ordered=False) is None  # not this rank's group


def test_derive_mesh_from_strided_groups():
    mesh = derive_mesh([("mesh_tp", (4, 5)), ("mesh_dp", (1, 3, 5, 7))], 8)
    assert (mesh.names, mesh.sizes) == (("dp", "tp"), (4, 2))
    mesh = derive_mesh([("", (0, 2))], 4)
    assert mesh.sizes == (2, 2)
    assert derive_mesh([("", (0, 1, 2))], 4) is None  # 3 does not divide 4
    assert derive_mesh([], 4) is None


def test_pass_arguments_are_checked():
    try:
        mixcc.FusionPass(mesh="tp=2")
        raise AssertionError("a string mesh was accepted")
    except TypeError as e:
        assert "mesh" in str(e)
    try:
        mixcc.FusionPass(backend="nccl")
        raise AssertionError("an unknown backend was accepted")
    except ValueError as e:
        assert "backend" in str(e)
    try:
        mixcc.FusionPass(workspace=1)
        raise AssertionError("an unknown option was accepted")
    except TypeError as e:
        assert "workspace" in str(e)


def test_uuid_is_stable_and_follows_the_settings():
    a = mixcc.FusionPass(Mesh({"tp": 2}, ranks_per_node=2))
    b = mixcc.FusionPass(Mesh({"tp": 2}, ranks_per_node=2))
    c = mixcc.FusionPass(Mesh({"tp": 2}, ranks_per_node=2), backend="reference")
    assert a.uuid() == b.uuid() != c.uuid()
    assert isinstance(a.uuid(), str)


def test_uuid_follows_every_source_file(monkeypatch):
    from pathlib import Path

    from mixcc.fusion import graph_pass

    files = {p.relative_to(Path(mixcc.__file__).parent).as_posix()
             for p in graph_pass._source_files()}
    assert {"ir/build.py", "ir/parser.py", "ir/grammar.lark", "mesh.py", "api.py",
            "fusion/match.py"} <= files
    mesh = Mesh({"tp": 2}, ranks_per_node=2)
    before = mixcc.FusionPass(mesh).uuid()
    assert mixcc.FusionPass(mesh).uuid() == before
    read = graph_pass._read_source

    def edited(path):
        data = read(path)
        return data + b"\n# edited\n" if path.as_posix().endswith("ir/build.py") else data

    monkeypatch.setattr(graph_pass, "_read_source", edited)
    after = mixcc.FusionPass(mesh).uuid()
    assert after != before and mixcc.FusionPass(mesh).uuid() == after
    monkeypatch.setattr(mixcc, "__version__", "0.0.0-test")
    assert mixcc.FusionPass(mesh).uuid() != after


def test_topology_ignores_group_names(monkeypatch):
    """Two ranks whose groups carry other names (DeviceMesh counts them) but the same
    descriptions and layouts hash alike; another layout does not."""
    import types

    import torch.distributed.distributed_c10d as c10d

    from mixcc.fusion import graph_pass

    class PG:
        def __init__(self, desc, ranks):
            self.group_desc, self.ranks = desc, ranks

    def topo(names, tp_ranks):
        groups = {PG("mesh_tp", tp_ranks): names[0], PG("mesh_dp", [0, 2]): names[1]}
        monkeypatch.setattr(c10d, "_world", types.SimpleNamespace(pg_names=groups))
        return graph_pass._topology()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda pg: pg.ranks)
    mine = topo(("3", "4"), [0, 1])
    assert mine == topo(("7", "12"), [2, 3])
    assert mine != topo(("3", "4"), [0, 3])


def test_rms_norm_default_eps_is_the_computation_dtypes():
    """aten.rms_norm with eps=None takes the eps of its computation dtype (fp32 for
    bf16/fp16/fp32, fp64 for fp64; torch/_decomp/decompositions.py _fused_rms_norm): so
    does the matcher, for the whole op and for nn.RMSNorm's default."""
    from mixcc.fusion import match

    f32, f64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    for dt, want in ((torch.bfloat16, f32), (torch.float16, f32), (torch.float32, f32),
                     (torch.float64, f64)):
        assert match.default_rms_eps(dt) == want
        g = torch.fx.Graph()
        h, w = g.placeholder("h"), g.placeholder("w")
        h.meta["val"] = torch.empty(4, 8, dtype=dt, device="meta")
        w.meta["val"] = torch.empty(8, dtype=dt, device="meta")
        n = g.call_function(torch.ops.aten.rms_norm.default, (h, [8], w, None))
        g.output(n)
        norm = match._match_rmsnorm(h)
        assert norm is not None and norm.out is n and norm.eps == want, (dt, norm)
        # nn.RMSNorm without eps: eager agrees with the default
        x = torch.randn(4, 8, dtype=torch.float64).to(dt) * 1e-3
        ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + want)
        got = torch.nn.RMSNorm(8, dtype=dt)(x)
        torch.testing.assert_close(got.double(), ref, atol=1e-2 if dt in
                                   (torch.bfloat16, torch.float16) else 1e-6, rtol=1e-2)


def test_model_without_collectives_is_untouched(no_caches):
    rec, fp = Recorder(), mixcc.FusionPass()

    def f(x, w):
        return torch.nn.functional.rms_norm(x @ w + x, (8,), eps=1e-6)

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    got = _compile(f, fp, rec)(x, w)
    torch.testing.assert_close(got, f(x, w))
    assert fp.sites == [] and "no collective site" in fp.report()
    assert not any("mixcc" in g for g in rec.graphs)


def test_compile_model_takes_mode_and_chains_a_prior_pass(no_caches):
    seen = []

    class Prior(CustomGraphPass):
        def __call__(self, graph) -> None:
            seen.append(len(graph.nodes))

        def uuid(self) -> str:
            return "prior"

    def f(x):
        return torch.relu(x) * 2

    x = torch.randn(3, 5)
    # torch.compile takes mode or options, not both: compile_model turns mode into options
    fn = mixcc.compile_model(f, mode="max-autotune-no-cudagraphs",
                             options={"post_grad_custom_post_pass": Prior()})
    torch.testing.assert_close(fn(x), f(x))
    assert len(seen) == 1 and fn.mixcc_fusion.graphs == 1


# -- two gloo ranks: one allreduce and its epilogue -------------------------------------

class TPBlock(torch.nn.Module):
    """Row-parallel projection, in-place dist.all_reduce, residual add, RMSNorm; then a
    second projection whose allreduce uses op=PRODUCT (not a mixcc reduction)."""

    def __init__(self, hidden: int, group, norm: str):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden)
        self.norm_w = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden, generator=g))
        self.module_norm = torch.nn.RMSNorm(hidden, eps=1e-5)
        self.group, self.norm, self.hidden = group, norm, hidden

    def _norm(self, h):
        if self.norm == "functional":
            return torch.nn.functional.rms_norm(h, (self.hidden,), self.norm_w, eps=1e-6)
        if self.norm == "module":
            return self.module_norm(h)
        hf = h.float()  # the hand-written form, in fp32 (Llama's)
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.norm_w * hf.to(h.dtype)

    def forward(self, x, residual):
        y = x @ self.w1
        dist.all_reduce(y, group=self.group)
        h = y + residual
        z = self._norm(h) @ self.w2
        dist.all_reduce(z, op=dist.ReduceOp.PRODUCT, group=self.group)
        return z, h


def _tol(dtype):
    return {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else \
        {"atol": 1e-5, "rtol": 1e-5}


def tp_block_task(rank: int, world: int, group, norm: str, dtype_name: str) -> str:
    _no_caches()
    dtype = getattr(torch, dtype_name)
    mesh = Mesh({"tp": world}, ranks_per_node=world)
    model = TPBlock(32, group, norm).to(dtype)
    fp, rec = mixcc.FusionPass(mesh, group=group, backend="reference"), Recorder()
    compiled = _compile(model, fp, rec)
    msgs = []
    for rows in (4, 6):
        g = torch.Generator().manual_seed(100 * rank + rows)
        x = torch.randn(rows, 32, generator=g).to(dtype)
        r = torch.randn(rows, 32, generator=g).to(dtype)
        with torch.no_grad():
            want = model(x, r)
            got = compiled(x, r)
        for name, a, b in zip(("z", "h"), got, want, strict=True):
            try:
                torch.testing.assert_close(a, b, **_tol(dtype))
            except AssertionError as e:
                msgs.append(f"rows {rows} {name}: {e}")
    reps = fp.sites
    if len(reps) < 2 or len(reps) != 2 * fp.graphs:
        return f"expected 2 sites a graph, report: {fp.report()}"
    for rep in reps[2:]:  # the recompiled graphs (rows 6: a dynamic row count)
        if rep.replaced == ("product" in (rep.reason or "")):
            msgs.append(f"a recompiled graph's site: {rep}")
    first, second = reps[0], reps[1]
    if not first.replaced or "rmsnorm(weight" not in (first.program or "") \
            or "store(resid_out)" not in first.program or "allreduce(tp)" not in first.program:
        msgs.append(f"site 0 not fused as expected: {first}")
    if second.replaced or "product" not in (second.reason or ""):
        msgs.append(f"site 1 should be left alone for op=product: {second}")
    final = rec.graphs[0]
    if final.count("mixcc.fusion_chain") != 1:
        msgs.append(f"the compiled graph should hold one mixcc op:\n{final}")
    if "all_reduce.default](args = (%" not in final or "product" not in final:
        msgs.append(f"the product allreduce should still be in the graph:\n{final}")
    return "; ".join(msgs)


def test_allreduce_add_store_rmsnorm_fp32(pool4):
    for norm in ("functional", "module", "manual"):
        res = pool4.run(2, tp_block_task, norm, "float32", timeout=600)
        assert res == {0: "", 1: ""}, (norm, res)


def test_allreduce_add_store_rmsnorm_bf16(pool4):
    res = pool4.run(2, tp_block_task, "manual", "bfloat16", timeout=600)
    assert res == {0: "", 1: ""}


def cast_residual_task(rank: int, world: int, group) -> str:
    """A bf16 allreduce seen through .float() before an fp32 residual add: the program
    would run in bf16 and lose the fp32 path's precision; the collective alone is
    replaced, the epilogue stays in the graph in fp32, with the reason in the report."""
    _no_caches()
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(11)) / 8
    nw = 1 + 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(12))

    def f(x, r):
        y = x @ w.bfloat16()
        dist.all_reduce(y, group=group)
        h = y.float() + r
        return torch.nn.functional.rms_norm(h, (32,), nw, eps=1e-6), h

    fp, rec = mixcc.FusionPass(Mesh({"tp": world}, ranks_per_node=world), group=group,
                               backend="reference"), Recorder()
    g = torch.Generator().manual_seed(rank + 20)
    x, r = torch.randn(4, 32, generator=g).bfloat16(), torch.randn(4, 32, generator=g)
    with torch.no_grad():
        got, want = _compile(f, fp, rec)(x, r), f(x, r)
    msgs = []
    for name, a, b in zip(("norm", "h"), got, want, strict=True):
        if a.dtype != torch.float32:
            msgs.append(f"{name} is {a.dtype}")
        try:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        except AssertionError as e:
            msgs.append(f"{name}: {e}")
    (site,) = fp.sites
    if site.replaced and site.program != "allreduce(tp)":
        msgs.append(f"the epilogue was absorbed: {site}")
    if "residual is float32, the collective's dtype bfloat16" not in (site.reason or ""):
        msgs.append(f"no reason given: {site}")

    def f2(x, r):  # all bf16 up to the sum, then a norm with an fp32 weight (fp32 out)
        y = x @ w.bfloat16()
        dist.all_reduce(y, group=group)
        h = y + r
        hf = h.float()
        return nw * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)), h

    torch._dynamo.reset()
    fp2 = mixcc.FusionPass(Mesh({"tp": world}, ranks_per_node=world), group=group,
                           backend="reference")
    rb = r.bfloat16()
    with torch.no_grad():
        got, want = _compile(f2, fp2, Recorder())(x, rb), f2(x, rb)
    for name, a, b in zip(("norm", "h"), got, want, strict=True):
        try:  # mixcc adds to the reduced value before its bf16 rounding: one bf16 step
            torch.testing.assert_close(a.float(), b.float(), **_tol(torch.bfloat16))
        except AssertionError as e:
            msgs.append(f"fp32 weight, {name}: {e}")
    (site,) = fp2.sites
    if not site.replaced or site.program != "allreduce(tp); add(residual)" \
            or "RMSNorm weight is float32" not in (site.reason or ""):
        msgs.append(f"fp32 weight: {site}")
    return "; ".join(msgs)


def test_a_cast_before_the_residual_add_keeps_the_epilogue_out(pool4):
    res = pool4.run(2, cast_residual_task, timeout=600)
    assert res == {0: "", 1: ""}


class QuantBlock(torch.nn.Module):
    """allreduce, residual add, RMSNorm, then a static fp8 quant (x / scale, saturated)."""

    def __init__(self, hidden: int, group):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) / 4)
        self.norm_w = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden, generator=g))
        self.scale = torch.nn.Buffer(torch.tensor([0.02]))
        self.group, self.hidden = group, hidden

    def forward(self, x, residual):
        y = x @ self.w1
        dist.all_reduce(y, group=self.group)
        h = y + residual
        n = torch.nn.functional.rms_norm(h, (self.hidden,), self.norm_w, eps=1e-6)
        return (n / self.scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), h


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


def quant_task(rank: int, world: int, group) -> str:
    _no_caches()
    logger, records = logging.getLogger("mixcc.fusion"), _Records()
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    model = QuantBlock(64, group)
    fp, rec = mixcc.FusionPass(Mesh({"tp": world}, ranks_per_node=world), group=group,
                               backend="reference"), Recorder()
    compiled = _compile(model, fp, rec)
    g = torch.Generator().manual_seed(rank)
    x, r = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    with torch.no_grad():
        want, got = model(x, r), compiled(x, r)
    msgs = []
    if got[0].dtype != torch.float8_e4m3fn:
        msgs.append(f"output dtype {got[0].dtype}")
    # one fp8 step (1/8 relative) where the fp32 norm rounds across a boundary
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=1e-3, rtol=0.13)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    if fp.sites[0].program != ("allreduce(tp); add(residual); store(resid_out); "
                               "rmsnorm(weight, eps=1e-06); quant(fp8_e4m3, scale)"):
        msgs.append(fp.report())
    logger.removeHandler(records)
    if len(records.lines) != 1 or "1 collective site(s), 1 replaced" not in records.lines[0]:
        msgs.append(f"expected one INFO line for the graph, got {records.lines}")
    return "; ".join(msgs)


def test_allreduce_epilogue_with_fp8_quant(pool4):
    res = pool4.run(2, quant_task, timeout=600)
    assert res == {0: "", 1: ""}


def intermediate_use_task(rank: int, world: int, group) -> str:
    """The reduced value is read again after the add: the add cannot join the program
    (mixcc does not return the value before its epilogue); the rest stays correct."""
    _no_caches()
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(9))

    def f(x, r):
        y = x @ w
        dist.all_reduce(y, group=group)
        h = y + r
        return torch.nn.functional.rms_norm(h, (16,), eps=1e-6), y * 2

    fp, rec = mixcc.FusionPass(Mesh({"tp": world}, ranks_per_node=world), group=group,
                               backend="reference"), Recorder()
    g = torch.Generator().manual_seed(rank)
    x, r = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    got, want = _compile(f, fp, rec)(x, r), f(x, r)
    msgs = []
    for a, b in zip(got, want, strict=True):
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
            msgs.append("compiled differs from eager")
    (site,) = fp.sites
    if not site.replaced or site.program != "allreduce(tp)":
        msgs.append(str(site))
    return "; ".join(msgs)


def graph_break_task(rank: int, world: int, group) -> str:
    """A graph break between the allreduce and its add: two graphs, the collective
    replaced alone in the first, the add + RMSNorm compiled as usual in the second."""
    _no_caches()
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(8))

    def f(x, r):
        y = x @ w
        dist.all_reduce(y, group=group)
        torch._dynamo.graph_break()
        return torch.nn.functional.rms_norm(y + r, (16,), eps=1e-6)

    fp, rec = mixcc.FusionPass(Mesh({"tp": world}, ranks_per_node=world), group=group,
                               backend="reference"), Recorder()
    g = torch.Generator().manual_seed(rank + 3)
    x, r = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    got, want = _compile(f, fp, rec)(x, r), f(x, r)
    msgs = [] if torch.allclose(got, want, atol=1e-5, rtol=1e-5) else ["differs from eager"]
    if fp.graphs != 2 or [s.program for s in fp.sites] != ["allreduce(tp)"]:
        msgs.append(fp.report())
    return "; ".join(msgs)


def test_a_graph_break_keeps_each_graph_correct(pool4):
    res = pool4.run(2, graph_break_task, timeout=600)
    assert res == {0: "", 1: ""}


def training_task(rank: int, world: int, group) -> str:
    """Forward and backward graphs (the backward's intermediates kept for it stop the
    epilogue early): gradients equal those of the same model compiled without the pass."""
    _no_caches()
    grads = []
    fp = mixcc.FusionPass(Mesh({"tp": world}, ranks_per_node=world), group=group,
                          backend="reference")
    for with_pass in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        lin, norm, out = (torch.nn.Linear(16, 16), torch.nn.RMSNorm(16, eps=1e-6),
                          torch.nn.Linear(16, 8))

        def model(x, r, lin=lin, norm=norm, out=out):
            y = lin(x)
            dist.all_reduce(y, group=group)
            h = y + r
            return out(norm(h)), h

        opts = {"post_grad_custom_post_pass": fp} if with_pass else {}
        compiled = torch.compile(model, options=opts)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(4, 16, generator=g, requires_grad=True)
        z, h = compiled(x, torch.randn(4, 16, generator=g))
        (z.square().sum() + h.sum()).backward()
        grads.append([x.grad, lin.weight.grad, out.weight.grad, norm.weight.grad])
    msgs = []
    for a, b in zip(*grads, strict=True):
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
            msgs.append("a gradient differs from the model compiled without the pass")
    if not any(s.replaced for s in fp.sites):
        msgs.append(fp.report())
    return "; ".join(msgs)


def test_training_graphs_match_the_model_compiled_without_the_pass(pool4):
    res = pool4.run(2, training_task, timeout=600)
    assert res == {0: "", 1: ""}


def test_a_value_used_outside_shortens_the_match(pool4):
    res = pool4.run(2, intermediate_use_task, timeout=600)
    assert res == {0: "", 1: ""}


# -- four gloo ranks, a TP x DP mesh: chains of two collectives ------------------------

def _tp_dp_groups(rank: int):
    """This rank's tp and dp groups of a dp=2 x tp=2 mesh over a world of 4 (every rank
    creates every group, in the same order, as new_group asks)."""
    tp = [dist.new_group(r) for r in ([0, 1], [2, 3])]
    dp = [dist.new_group(r) for r in ([0, 2], [1, 3])]
    return tp[rank // 2], dp[rank % 2]


def _diagonal_group(rank: int):
    """{0, 3} or {1, 2}: no axis of the dp x tp mesh."""
    diag = [dist.new_group(r) for r in ([0, 3], [1, 2])]
    return diag[0] if rank in (0, 3) else diag[1]


class Chains(torch.nn.Module):
    """reducescatter(dp) -> allreduce(tp) -> add + RMSNorm, then allreduce(tp) ->
    allgather(dp), as the in-place torch.distributed calls and the functional API."""

    def __init__(self, tp, dp, hidden: int = 16, diag=None):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden, generator=g))
        self.tp, self.dp, self.hidden, self.diag = tp, dp, hidden, diag

    def forward(self, x, residual):
        rows = x.shape[0] // 2
        part = x.new_empty(rows, x.shape[1])
        dist.reduce_scatter_tensor(part, x * 2, group=self.dp)
        part = funcol.all_reduce(part, "sum", self.tp)
        h = part + residual
        n = torch.nn.functional.rms_norm(h, (self.hidden,), self.w, eps=1e-6)
        y = funcol.all_reduce(n * 3, "sum", self.tp)
        out = y.new_empty(2 * rows, y.shape[1])
        dist.all_gather_into_tensor(out, y, group=self.dp)
        if self.diag is not None:  # a group that is no axis: left as it is
            h = funcol.all_reduce(h, "sum", self.diag)
        return out, h


def chains_task(rank: int, world: int, group) -> str:
    _no_caches()
    tp, dp = _tp_dp_groups(rank)
    mesh = Mesh({"dp": 2, "tp": 2}, ranks_per_node=4)
    model = Chains(tp, dp, diag=_diagonal_group(rank))
    fp, rec = mixcc.FusionPass(mesh, group=group, backend="reference"), Recorder()
    compiled = _compile(model, fp, rec)
    g = torch.Generator().manual_seed(rank)
    x, r = torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)
    msgs = []
    with torch.no_grad():
        want, got = model(x, r), compiled(x, r)
    for name, a, b in zip(("out", "h"), got, want, strict=True):
        try:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        except AssertionError as e:
            msgs.append(f"{name}: {e}")
    programs = [s.program for s in fp.sites if s.replaced]
    want_p = ["reducescatter(dp); allreduce(tp); add(residual); store(resid_out); "
              "rmsnorm(weight, eps=1e-06)", "allreduce(tp); allgather(dp)"]
    if sorted(set(programs)) != sorted(want_p) or len(fp.sites) != 5:
        msgs.append(f"unexpected programs: {fp.report()}")
    last = fp.sites[-1]
    if last.replaced or "is not an axis" not in (last.reason or ""):
        msgs.append(f"the diagonal allreduce should be left alone: {last}")
    if rec.graphs[0].count("mixcc.fusion_chain") != 2 \
            or rec.graphs[0].count("_c10d_functional.all_reduce.default") != 1:
        msgs.append(f"the graph should hold two mixcc ops and the diagonal allreduce:\n"
                    f"{rec.graphs[0]}")
    return "; ".join(msgs)


def test_chains_over_a_tp_dp_mesh(pool4):
    res = pool4.run(4, chains_task, timeout=600)
    assert res == {r: "" for r in range(4)}


def dp_attention_task(rank: int, world: int, group) -> str:
    """DP-attention order: residual add and RMSNorm on this rank's tokens, then the
    allgather over dp; the norm moves after the gather (row-wise: the same rows), the add
    and its written-back sum stay in the graph."""
    _no_caches()
    tp, dp = _tp_dp_groups(rank)
    w = 1 + 0.1 * torch.randn(16, generator=torch.Generator().manual_seed(2))

    def f(attn, residual):
        h = attn + residual
        n = torch.nn.functional.rms_norm(h, (16,), w, eps=1e-6)
        return funcol.all_gather_tensor(n, 0, dp), h

    fp, rec = mixcc.FusionPass(Mesh({"dp": 2, "tp": 2}, ranks_per_node=4), group=group,
                               backend="reference"), Recorder()
    g = torch.Generator().manual_seed(rank)
    a, r = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    got, want = _compile(f, fp, rec)(a, r), f(a, r)
    msgs = []
    for a_, b_ in zip(got, want, strict=True):
        try:
            torch.testing.assert_close(a_, b_, atol=1e-5, rtol=1e-5)
        except AssertionError as e:
            msgs.append(str(e))
    (site,) = fp.sites
    if not site.replaced or site.program != "allgather(dp); rmsnorm(weight, eps=1e-06)":
        msgs.append(str(site))
    return "; ".join(msgs)


def test_dp_attention_norm_moves_after_the_allgather(pool4):
    res = pool4.run(4, dp_attention_task, timeout=600)
    assert res == {r: "" for r in range(4)}


def derived_mesh_task(rank: int, world: int, group) -> str:
    """No mesh given: derived from the groups."""
    _no_caches()
    tp, dp = _tp_dp_groups(rank)
    model = Chains(tp, dp)
    fp, rec = mixcc.FusionPass(group=group, backend="reference"), Recorder()
    compiled = _compile(model, fp, rec)
    g = torch.Generator().manual_seed(rank + 10)
    x, r = torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)
    with torch.no_grad():
        want, got = model(x, r), compiled(x, r)
    msgs = []
    for a, b in zip(got, want, strict=True):
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
            msgs.append("compiled differs from eager")
    if sum(s.replaced for s in fp.sites) != 4:
        msgs.append(fp.report())
    return "; ".join(msgs)


def test_mesh_derived_from_the_groups(pool4):
    res = pool4.run(4, derived_mesh_task, timeout=600)
    assert res == {r: "" for r in range(4)}


# -- DTensor tensor parallelism (parallelize_module) on a dp x tp DeviceMesh -------------

def _device_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


class ToyMLP(torch.nn.Module):
    """The shape of torch's DTensor tensor-parallel example: in_proj, relu, out_proj."""

    def __init__(self):
        super().__init__()
        self.in_proj = torch.nn.Linear(10, 32)
        self.relu = torch.nn.ReLU()
        self.out_proj = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.out_proj(self.relu(self.in_proj(x)))


def toy_tp_task(rank: int, world: int, group) -> str:
    """Colwise in_proj + Rowwise out_proj: one allreduce over tp, replaced; then the same
    model compiled again through the FX graph cache, with the compiled collectives
    forgotten (as in a new process): the cached graph still runs and matches eager."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    _no_caches()
    dm = _device_mesh()
    torch.manual_seed(0)
    model = ToyMLP()
    parallelize_module(model, dm["tp"], {"in_proj": ColwiseParallel(),
                                         "out_proj": RowwiseParallel()})
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(dm.get_coordinate()[0]))
    with torch.no_grad():
        want = model(x)
    msgs = []
    fp = mixcc.FusionPass(dm, backend="reference")
    torch._inductor.config.fx_graph_cache = True
    from torch._dynamo.utils import counters

    hits = counters["inductor"]["fxgraph_cache_hit"]
    # a cache of its own: an earlier run's entry for the same sources would make the first
    # compile a hit, and the pass would never see the graph
    keep = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mixcc-fx-")
    try:
        for attempt in range(2):
            torch._dynamo.reset()
            mixcc.fusion.clear_compiled()
            compiled = torch.compile(model, options={"post_grad_custom_post_pass": fp})
            with torch.no_grad():
                got = compiled(x)
            if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                msgs.append(f"attempt {attempt}: compiled differs from eager")
    finally:
        torch._inductor.config.fx_graph_cache = False
        if keep is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = keep
    programs = [s.program for s in fp.sites if s.replaced]
    if programs != ["allreduce(tp)"]:  # the second compile came from the cache
        msgs.append(fp.report())
    if counters["inductor"]["fxgraph_cache_hit"] <= hits:
        msgs.append("the second compile did not hit the FX graph cache")
    return "; ".join(msgs)


def test_dtensor_toy_model_and_the_graph_cache(pool4):
    res = pool4.run(4, toy_tp_task, timeout=600)
    assert res == {r: "" for r in range(4)}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), cfg


def llama_task(rank: int, world: int, group, style: str) -> str:
    """A transformers Llama, tensor-parallel over tp by parallelize_module, either with
    explicit Colwise/Rowwise styles per projection (as torchtitan does) or with the
    model's own plan (config.base_model_tp_plan) mapped to them; different tokens on
    each dp replica. Every allreduce (two per layer) is replaced, with the residual add,
    the sum written back and the next RMSNorm; logits match eager."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    _no_caches()
    dm = _device_mesh()
    model, cfg = _tiny_llama()
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {}
    for i in range(cfg.num_hidden_layers):
        if style == "hf_plan":
            for pattern, kind in cfg.base_model_tp_plan.items():
                if kind in styles and pattern.startswith("layers.*."):
                    plan[f"model.layers.{i}." + pattern[len("layers.*."):]] = styles[kind]()
        else:
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "mlp.gate_proj", "mlp.up_proj"):
                plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, dm["tp"], plan)
    if style == "hf_plan":
        compiled = mixcc.compile_model(model, dm, fusion={"backend": "reference"})
        fp = compiled.mixcc_fusion
    else:
        fp = mixcc.FusionPass(backend="reference")  # the mesh derived from the groups
        compiled = torch.compile(model, options={"post_grad_custom_post_pass": fp})
    ids = torch.randint(0, cfg.vocab_size, (2, 8),
                        generator=torch.Generator().manual_seed(dm.get_coordinate()[0]))
    with torch.no_grad():
        want = model(ids).logits
        got = compiled(ids).logits
    msgs = []
    try:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    except AssertionError as e:
        msgs.append(str(e))
    n = 2 * cfg.num_hidden_layers
    if len(fp.sites) != n or sum(s.replaced for s in fp.sites) != n:
        msgs.append(f"expected {n} sites, all replaced: {fp.report()}")
    stored = sum("store(resid_out); rmsnorm(weight" in (s.program or "") for s in fp.sites)
    if stored != n - 1:  # the last sum feeds only the final norm
        msgs.append(f"expected {n - 1} programs with store + rmsnorm: {fp.report()}")
    return "; ".join(msgs)


def test_transformers_llama_tensor_parallel(pool4):
    pytest.importorskip("transformers")
    for style in ("torch", "hf_plan"):
        res = pool4.run(4, llama_task, style, timeout=600)
        assert res == {r: "" for r in range(4)}, (style, res)
