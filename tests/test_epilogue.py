"""Epilogue statements (add, store, rmsnorm, quant after the last collective): the
grammar and its errors, the call's keyword tensors and their errors, the reference
backend against the float64 oracle (hypothesis over programs x meshes x chains on
gloo), and torch.compile with the residual written in place."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixcc
from mixcc import CompileError, Mesh, ParseError, fused, ops
from mixcc.codegen.build import build_module, find_nvcc
from mixcc.codegen.plan import row_grid
from mixcc.codegen.render import render_stage
from mixcc.ops import EPILOGUES

from strategies import one_node_programs
from tasks import check_epilogue

ONE = Mesh({"dp": 1, "tp": 1})
LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight, eps=1e-5)"


def test_every_op_has_one_registry_entry_and_parses():
    assert set(EPILOGUES) == {"add", "store", "rmsnorm", "quant"}
    p = mixcc.ir.parser.parse(LAYER + "; quant(fp8_e4m3, scale)")
    assert [str(e) for e in p.epilogue] == ["add(residual)", "store(residual)",
                                            "rmsnorm(weight, eps=1e-05)",
                                            "quant(fp8_e4m3, scale)"]
    assert str(p).startswith("allreduce(tp); add(residual)")


@pytest.mark.parametrize("text,msg,col", [
    ("add(r); allreduce(tp)", "before any collective", 1),
    ("allreduce(tp); add(r); allgather(dp)", "collective after the epilogue", 24),
    ("allreduce(tp); quant(fp8_e4m3, s); add(r)", "must be the last statement", 16),
    ("allreduce(tp); relu(r)", "expected one of: add, allreduce|allgather|reducescatter", 16),
    ("allreduce(tp); quant(fp8_e5m2, s)", "expected one of: fp8_e4m3", 22),
    ("allreduce(tp); rmsnorm(w, eps=)", "number", 31),
])
def test_grammar_errors_name_the_place(text, msg, col):
    with pytest.raises(ParseError, match=msg) as e:
        mixcc.compile(text, Mesh({"dp": 2, "tp": 2}), backend="reference")
    assert e.value.column == col and "^" in str(e.value)


def test_epilogue_presets():
    coll = mixcc.compile("allreduce_allgather_add_rmsnorm", Mesh({"dp": 2, "tp": 2}),
                         backend="reference")
    assert [str(e) for e in coll.ir.epilogue] == ["add(residual)", "store(residual)",
                                                  "rmsnorm(weight)"]
    assert coll.epilogue_names() == (("residual",), ("weight",))


@pytest.mark.parametrize("eps", ["1e400", "1e999"])
def test_eps_must_be_finite_and_not_negative(eps):
    with pytest.raises(CompileError, match="eps must be a finite number"):
        mixcc.compile(f"allreduce(tp); rmsnorm(w, eps={eps})", Mesh({"dp": 1, "tp": 2}),
                      backend="reference")


def test_epilogue_needs_a_floating_dtype():
    with pytest.raises(CompileError, match="floating-point"):
        mixcc.compile("allreduce(tp, op=max); add(r)", ONE, dtype=torch.int32)


def test_explain_prints_the_epilogue():
    text = mixcc.compile(LAYER, Mesh({"dp": 2, "tp": 2}), backend="reference").explain()
    assert "add(residual); store(residual); rmsnorm(weight, eps=1e-05)" in text
    assert "  store(residual)  @ line 1, column 31" in text  # in the AST section
    assert "epilogue: add(residual)" in text
    assert "inside the last stage's one-shot kernel" in text and "fp32 shares" not in text
    two = mixcc.compile(LAYER, Mesh({"dp": 2, "tp": 2}), backend="reference",
                        algorithm="two_shot").explain()
    assert "inside the last stage's two-shot kernel (in its gather, from the owners' fp32" in two
    nodes = mixcc.compile(LAYER, Mesh({"dp": 1, "tp": 4}, ranks_per_node=2),
                          backend="reference").explain()
    assert "inside the last stage's hierarchical kernel (in its step D, from the local " \
        "owners' fp32 shares" in nodes


def test_fusion_refusals():
    one = mixcc.compile(LAYER, Mesh({"dp": 2, "tp": 2}), backend="reference")
    assert fused.epilogue_refusal(one.plan, one.ir.epilogue) is None
    ident = mixcc.compile(LAYER, ONE, backend="reference")
    assert "no stage" in fused.epilogue_refusal(ident.plan, ident.ir.epilogue)
    many = "allreduce(tp); " + "; ".join(f"add(t{i})" for i in range(7))
    coll = mixcc.compile(many, Mesh({"dp": 1, "tp": 2}), backend="reference")
    assert "more than 6 tensors" in fused.epilogue_refusal(coll.plan, coll.ir.epilogue)


def test_epilogue_cuda_names_slots_in_first_use_order():
    coll = mixcc.compile("allreduce(tp); add(r); store(r); rmsnorm(w, eps=1e-3); add(q); "
                         "quant(fp8_e4m3, s)", Mesh({"dp": 1, "tp": 2}), backend="reference")
    assert ops.epilogue_slots(coll.ir.epilogue) == ("r", "w", "q", "s")
    hoisted, body = ops.epilogue_cuda(coll.ir.epilogue)
    # r is read before the store: its load is hoisted; q and s are never stored
    assert hoisted == [
        "mixcc::Pack<T, VEC_WIDE> pre0[EPI_PACKS]; mixcc::epi_load<true>(row, a.epi0, pre0);",
        "mixcc::Pack<T, VEC_WIDE> pre2[EPI_PACKS]; mixcc::epi_load<false>(row, a.epi1, pre2);",
        "mixcc::Pack<T, VEC_WIDE> pre3[EPI_PACKS]; mixcc::epi_load<true>(row, a.epi2, pre3);",
        "const float pre4 = *static_cast<const float*>(a.epi3);"]
    assert body == ["mixcc::epi_add(row, pre0);", "mixcc::epi_store(row, a.epi0);",
                    "mixcc::epi_rmsnorm<THREADS>(row, pre2, 0.001f, red);",
                    "mixcc::epi_add(row, pre3);", "mixcc::epi_quant(row, pre4);"]
    # a read after a store of the same tensor loads in place, after the store
    again = mixcc.compile("allreduce(tp); store(r); add(r)", Mesh({"dp": 1, "tp": 2}),
                          backend="reference")
    hoisted, body = ops.epilogue_cuda(again.ir.epilogue)
    assert hoisted == [] and body[0] == "mixcc::epi_store(row, a.epi0);"
    assert "epi_load<true>(row, a.epi0, pre1)" in body[1] and body[2] == \
        "mixcc::epi_add(row, pre1);"
    default = mixcc.compile("allreduce(tp); rmsnorm(w)", Mesh({"dp": 1, "tp": 2}),
                            backend="reference")
    assert "1e-06f" in ops.epilogue_cuda(default.ir.epilogue)[1][0]


@given(rows=st.integers(1, 5000), hidden=st.sampled_from([8, 128, 4096, 7168, 16384, 4104]),
       region_rows=st.integers(1, 8), blocks=st.integers(1, 128))
def test_row_grid_keeps_rows_whole(rows, hidden, region_rows, blocks):
    cols_cap = region_rows * hidden + 8  # a region that holds region_rows whole rows
    nblocks, chunks, cols = row_grid(rows * hidden, cols_cap, hidden, 2, blocks)
    assert cols % hidden == 0 and hidden <= cols <= cols_cap
    assert 1 <= nblocks <= blocks
    assert nblocks * chunks * cols >= rows * hidden  # every row is some block's
    assert (chunks - 1) * nblocks * cols < rows * hidden  # no chunk left empty everywhere


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_fused_epilogue_kernels_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    for program, axes in ((LAYER + "; quant(fp8_e4m3, s)", {"dp": 1, "tp": 2}),
                          ("allreduce(tp); allgather(dp); add(r); rmsnorm(w)",
                           {"dp": 2, "tp": 2})):
        coll = mixcc.compile(program, Mesh(axes), backend="reference")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            src = render_stage(coll.plan.stages[-1], dtype, coll.ir.epilogue)
            assert "epilogue_pass<MAX_TERMS, EPI>" in src and "mixcc::epi_rmsnorm" in src
            assert build_module(src, "stage", "sm_90").path.exists()
    plain = mixcc.compile("allreduce(tp)", Mesh({"dp": 1, "tp": 2}), backend="reference")
    assert "epilogue_pass" not in render_stage(plain.plan.stages[0], torch.float32)


@pytest.fixture
def layer():
    return mixcc.compile(LAYER, ONE, dtype=torch.float32, backend="reference")


def good(rows=4, hidden=8):
    return torch.randn(rows, hidden), torch.randn(rows, hidden), torch.rand(hidden) + 0.5


def test_world_of_one_layer_matches_the_formula(layer):
    x, r, w = good()
    r0 = r.clone()
    y = layer(x, residual=r, weight=w)
    v = x.double() + r0.double()
    want = v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.double(), v, rtol=1e-6, atol=1e-6)
    out = torch.full_like(x, float("nan"))
    assert layer(x, out=out, residual=r0.clone(), weight=w) is out
    torch.testing.assert_close(out, y)


@pytest.mark.parametrize("kw,exc,msg", [
    (lambda x, r, w: dict(residual=r), TypeError, "missing keyword tensor 'weight'"),
    (lambda x, r, w: dict(residual=r, weight=w, bias=w), TypeError, r"unexpected .*\['bias'\]"),
    (lambda x, r, w: dict(residual=r[:2], weight=w), ValueError,
     r"residual.shape must be \(4, 8\)"),
    (lambda x, r, w: dict(residual=r, weight=w[:4]), ValueError, r"weight.shape must be \(8,\)"),
    (lambda x, r, w: dict(residual=r.long(), weight=w), TypeError, "floating-point"),
    (lambda x, r, w: dict(residual=r, weight=w.to("meta")), ValueError, "weight.device"),
    (lambda x, r, w: dict(residual=[1.0], weight=w), TypeError, "must be a torch.Tensor"),
])
def test_bad_keyword_tensors(layer, kw, exc, msg):
    x, r, w = good()
    with pytest.raises(exc, match=msg):
        layer(x, **kw(x, r, w))


def test_store_must_not_overlap_x_or_out_partially(layer):
    buf = torch.randn(8, 8)
    x, w = buf[0:4], torch.rand(8) + 0.5
    with pytest.raises(ValueError, match="overlaps x partially"):
        layer(x, residual=buf[2:6], weight=w)
    out = torch.empty(8, 8)
    with pytest.raises(ValueError, match="overlaps out partially"):
        layer(x, out=out[0:4], residual=out[2:6], weight=w)
    layer(x.clone(), residual=x, weight=w)  # x itself is allowed


def test_rmsnorm_needs_a_2d_output():
    coll = mixcc.compile("allreduce(tp); rmsnorm(w)", ONE, backend="reference")
    with pytest.raises(ValueError, match="needs a 2-D output"):
        coll(torch.randn(2, 3, 4), w=torch.ones(4))


def test_quant_scale_and_output_dtype():
    coll = mixcc.compile("allreduce(tp); add(r); quant(fp8_e4m3, s)", ONE, backend="reference")
    x, r, _ = good()
    with pytest.raises(ValueError, match="float32 tensor of one element"):
        coll(x, r=r, s=torch.ones(2))
    with pytest.raises(TypeError, match=r"out.dtype must be torch.float8_e4m3fn"):
        coll(x, out=torch.empty(4, 8), r=r, s=torch.ones(1))
    y = coll(x * 1000, r=r, s=torch.tensor([0.5]))
    assert y.dtype == torch.float8_e4m3fn
    want = ((x * 1000 + r) / 0.5).clamp(-448, 448)
    torch.testing.assert_close(y.float(), want.to(torch.float8_e4m3fn).float())


def test_keyword_tensors_without_an_epilogue_are_refused():
    coll = mixcc.compile("allreduce(tp)", ONE, backend="reference")
    with pytest.raises(TypeError, match="has no epilogue"):
        coll(torch.ones(2, 2), residual=torch.ones(2, 2))


def test_torch_compile_keeps_one_op_and_writes_the_residual(layer):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, r, w):
        return layer(x, residual=r, weight=w) * 2

    x, r, w = good()
    r_eager, r_comp = r.clone(), r.clone()
    want = f(x, r_eager, w)
    got = torch.compile(f, fullgraph=True, backend=backend)(x, r_comp, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(r_comp, r_eager)
    ops = [n for n in graphs[0].graph.nodes if n.op == "call_function"
           and "run_epilogue" in str(n.target)]
    assert len(ops) == 1
    r_ind = r.clone()
    got = torch.compile(f, fullgraph=True, backend="inductor")(x, r_ind, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(r_ind, r_eager)


CHAINS = ["add(r0)", "store(r0)", "rmsnorm(w0)", "add(r1)", "store(s0)",
          "rmsnorm(w1, eps=1e-3)"]


@st.composite
def epilogue_cases(draw):
    program, axes = draw(one_node_programs(max_statements=3))
    chain = draw(st.lists(st.sampled_from(CHAINS), min_size=1, max_size=4))
    if draw(st.booleans()):
        chain.append("quant(fp8_e4m3, scale)")
    return f"{program}; {'; '.join(chain)}", axes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=epilogue_cases(), seed=st.integers(0, 10_000),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       hidden=st.integers(1, 9), mult=st.integers(1, 3))
def test_reference_backend_against_the_oracle(rank_pool, case, seed, dtype, hidden, mult):
    program, axes = case
    world = math.prod(s for _, s in axes)
    coll = mixcc.compile(program, Mesh(axes), backend="reference")
    rows = coll.ir.granularity * mult
    if rows * coll.ir.row_factor > 256:
        rows = coll.ir.granularity
    res = rank_pool.run(world, check_epilogue, program, axes, world, rows, hidden, dtype, seed)
    assert res == {r: "" for r in range(world)}, (program, axes, dtype, res)


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("rpn", [2, 1], ids=["one-node", "two-nodes"])
def test_prebuild_builds_the_module_the_fused_epilogue_loads(tmp_path, monkeypatch, rpn):
    from mixcc.codegen.build import build
    from mixcc.codegen.spec import find_nvshmem

    if rpn == 1 and find_nvshmem() is None:
        pytest.skip("nvidia-nvshmem wheel not installed (the hierarchical kernel links it)")
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    coll = mixcc.compile(LAYER, Mesh({"dp": 1, "tp": 2}, ranks_per_node=rpn),
                         backend="reference")
    lines = list(fused.prebuild([(LAYER, coll.plan, coll.ir.epilogue)], [torch.bfloat16],
                                arch="sm_90"))
    assert any("built" in ln for ln in lines[1:])
    spec = fused.stage_spec(coll.plan.stages[-1], torch.bfloat16, "sm_90", coll.ir.epilogue)
    assert build(spec).cached  # what FusedRunner renders for the last stage


def test_epilogue_bench_reports_ratios(tmp_path, capsys):
    from mixcc import bench_epilogue

    rows = [{"case": "ar_add_rmsnorm", "hidden": 4096, "rows": 8, "fused_kernel": True,
             "fused us": 9.0, "mixcc+compiled us": 12.0, "nccl+compiled us": 18.0,
             "mixcc alone us": 7.5}]
    bench_epilogue._report(rows, str(tmp_path / "epi"))
    line = "| ar_add_rmsnorm | 4096 | 8 | 9.0 | 12.0 | 18.0 | 7.5 | 0.75 | 0.50 | yes |"
    assert line in capsys.readouterr().out
    assert line in (tmp_path / "epi.md").read_text()
    assert '"fused us": 9.0' in (tmp_path / "epi.json").read_text()
