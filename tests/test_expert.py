"""dispatch / combine (docs/DESIGN.md, "Expert parallelism"): the language and its compile
checks, then the reference backend on gloo ranks against the float64 oracle
(tests/oracle_ep.py, which imports nothing of mixcc), with hypothesis drawing routing
(random, skewed, every token to one expert, all -1), ranks with no tokens, T below
max_tokens, capacities, fp8 wires, and groups that are a whole world of 2 or 4 ranks or
one axis, both axes or both axes reversed of a 2x2 mesh, and b*a of a 2x3 mesh (its
backend ranks sorted by a 4-cycle of the group order); then the errors every rank
raises together, combine's handle checks and the dead-peer timeout."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle_ep import MODES, group, make_case, routed
from tasks_ep import (
    BAD_INPUTS,
    check_bad_input,
    check_dead_peer,
    check_ep,
    check_handles,
    check_other_dispatch,
    check_overflow,
    check_tokens_differ,
)

import mixcc
from mixcc import CompileError, ParseError

EXAMPLES = int(os.environ.get("MIXCC_EP_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def ep_pool():
    from rank_pool import RankPool

    pool = RankPool(6)
    yield pool
    pool.close()


# -- the language -----------------------------------------------------------------------
def test_compile_checks_against_the_mesh():
    mesh = mixcc.Mesh({"dp": 2, "ep": 4})
    d = mixcc.compile("dispatch(ep, experts=64, topk=8, max_tokens=128)", mesh,
                      dtype=torch.bfloat16)
    assert (d.spec.experts, d.spec.topk, d.spec.max_tokens, d.spec.local_experts) == \
        (64, 8, 128, 16)
    assert d.output_shapes(128, 7168) == {"recv_x": (16, 512, 7168), "recv_count": (16,)}
    cases = [
        ("dispatch(ep, experts=6, topk=2)", "experts=6 must be divisible by the size 4", 14),
        ("dispatch(ep, experts=8, topk=9)", "topk=9 must be at most experts=8", 25),
        ("dispatch(xx, experts=8, topk=2)", "unknown axis 'xx'", 10),
        ("dispatch(ep*ep, experts=8, topk=2)", "axis 'ep' appears twice", 13),
        ("combine(tp)", "unknown axis 'tp'", 9),
    ]
    for text, words, col in cases:
        with pytest.raises(CompileError) as ei:
            mixcc.compile(text, mesh)
        assert words in str(ei.value) and ei.value.column == col, str(ei.value)
    with pytest.raises(CompileError, match="dtype must be one of"):
        mixcc.compile("combine(ep)", mesh, dtype=torch.int32)
    with pytest.raises(ValueError, match="fused dispatch/combine kernels are not built"):
        mixcc.compile("combine(ep)", mesh, backend="fused")
    g = mixcc.compile("dispatch(dp*ep, experts=16, topk=2, capacity=5, wire=fp8_e4m3, "
                      "scale_block=128)", mesh)
    assert g.spec.group_size == 8 and g.output_shapes(3, 256)["recv_scale"] == (2, 5, 2)


@pytest.mark.parametrize("text,words", [
    ("dispatch(ep, experts=8, topk=2); combine(ep)", "must be the only statement"),
    ("allreduce(tp); combine(ep)", "must be the only statement"),
    ("combine(ep); add(r)", "must be the only statement"),
    ("dispatch(ep, experts=8)", "dispatch needs topk=N"),
    ("dispatch(ep, topk=8, experts=0)", "experts must be a positive integer, got 0"),
    ("dispatch(ep, experts=8, topk=2.5)", "topk must be a positive integer"),
    ("dispatch(ep, experts=8, topk=2, topk=2)", "given twice"),
    ("dispatch(ep, experts=8, topk=2, wire=fp16)", "wire must be one of fp8_e4m3"),
    ("dispatch(ep, experts=8, topk=2, scale_block=128)", "applies to an fp8 wire only"),
    ("dispatch(ep, experts=8, topk=2, top_k=2)", "unknown keyword 'top_k'"),
    ("combine(ep, handle=h)", "combine takes no keyword arguments"),
])
def test_parse_errors(text, words):
    with pytest.raises(ParseError) as ei:
        mixcc.compile(text, mixcc.Mesh({"ep": 2, "tp": 2}))
    assert words in str(ei.value), str(ei.value)
    assert "^" in str(ei.value).splitlines()[-1]


def test_one_rank_without_a_process_group():
    """A group of one: every routed token stays, in slot order, and combine sums it."""
    mesh = mixcc.Mesh({"ep": 1})
    d = mixcc.compile("dispatch(ep, experts=3, topk=2)", mesh)
    c = mixcc.compile("combine(ep)", mesh)
    x = torch.arange(8.0).view(4, 2)
    idx = torch.tensor([[2, 0], [-1, -1], [0, 1], [2, -1]])
    w = torch.tensor([[0.5, 2.0], [9.0, 9.0], [1.0, -1.0], [3.0, 7.0]])
    recv_x, count, h = d(x, topk_idx=idx, topk_weights=w)
    assert count.tolist() == [2, 1, 2] and recv_x.shape == (3, 4, 2)
    assert torch.equal(recv_x[0, :2], x[[0, 2]]) and torch.equal(recv_x[2, :2], x[[0, 3]])
    y = c(recv_x * 10, handle=h)
    want = torch.stack([25 * x[0], torch.zeros(2), 0 * x[2], 30 * x[3]])
    assert torch.equal(y, want)
    assert "exchange" in d.explain() and "combine" in c.explain()


def test_fp8_scales_of_tiny_blocks():
    """Blocks whose amax / 448 underflows float32 (to 0, or to a subnormal that rounds q
    past 448): the scale stays a normal float32 and q * scale is within the oracle's
    bound, no NaN; beside them an all-zero block (scale 1) and ordinary ones."""
    from oracle_ep import fp8_expected

    from mixcc.expert import quantize_fp8

    g = torch.Generator().manual_seed(5)
    x = torch.randn((3, 8 * 4), generator=g)
    x[0, :8] = 0.0
    x[0, 1] = 1e-44  # amax / 448 underflows to 0: 0 / 0 gave NaN
    x[0, 8:16] *= 1e-42  # amax / 448 a subnormal of one or two bits
    x[1, 16:24] = 0.0  # all zero
    x[2, :8] *= 1e-30  # a normal scale of a small block
    q, scale = quantize_fp8(x, 8)
    assert scale.dtype == torch.float32 and scale.shape == (3, 4)
    assert bool((scale >= torch.finfo(torch.float32).tiny).all())
    for t in range(3):
        want_s, tol = fp8_expected(x[t], 8)
        assert torch.allclose(scale[t].double(), want_s, rtol=2.0**-20, atol=0), t
        deq = (q[t].double().view(-1, 8) * scale[t].double()[:, None]).view(-1)
        assert not deq.isnan().any() and bool(((deq - x[t].double()).abs() <= tol).all()), t


# -- the reference backend against the oracle ------------------------------------------
LAYOUTS = [  # (mesh axes, group axes): the group is the world, one axis, or both
    ([("ep", 2)], ["ep"]), ([("ep", 4)], ["ep"]), ([("ep", 4)], None),
    ([("a", 2), ("b", 2)], ["a"]), ([("a", 2), ("b", 2)], ["b"]),
    ([("a", 2), ("b", 2)], ["b", "a"]), ([("a", 2), ("b", 2)], ["a", "b"]),
    # 2x3: the order b*a ([0, 3, 1, 4, 2, 5]) sorts by a 4-cycle, not by swaps
    ([("a", 2), ("b", 3)], ["b", "a"]), ([("a", 2), ("b", 3)], ["b"]),
]


@st.composite
def ep_cases(draw):
    mesh_axes, gaxes = draw(st.sampled_from(LAYOUTS))
    world = 1
    for _, s in mesh_axes:
        world *= s
    n = len(group(mesh_axes, 0, gaxes))
    experts = n * draw(st.sampled_from([1, 2, 3, 4, 8]))
    topk = draw(st.integers(1, min(experts, 4)))
    mode = draw(st.sampled_from(MODES))
    hidden = draw(st.sampled_from([1, 3, 8, 16]))
    wire = draw(st.sampled_from([None, None, 0, 2]))
    if wire == 2 and hidden % 2:
        wire = 0
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    seeds = [draw(st.integers(0, 10**6)) for _ in range(2)]
    fixed = draw(st.booleans())  # max_tokens given (T may differ and stay below it)
    if fixed:
        max_tokens = draw(st.integers(1, 6))
        tokens = [[draw(st.integers(0, max_tokens)) for _ in range(world)] for _ in seeds]
    else:
        max_tokens = None
        tokens = [[draw(st.integers(0, 5))] * world for _ in seeds]
    capacity = None
    if draw(st.booleans()):  # a capacity every call fits in, sometimes exactly
        need = 0
        for s, ts in zip(seeds, tokens, strict=True):
            for r in range(world):
                members = group(mesh_axes, r, gaxes)
                inputs = [make_case(s, m, mode, ts[m], hidden, experts, topk, torch.float32)
                          for m in members]
                need = max(need, max(len(v) for v in routed(inputs, experts).values()))
        capacity = max(1, need + draw(st.integers(0, 2)))
    return (mesh_axes, gaxes, experts, topk, max_tokens, capacity, wire, dtype, seeds, mode,
            tokens, hidden)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=ep_cases())
def test_dispatch_combine_match_oracle(ep_pool, case):
    world = 1
    for _, s in case[0]:
        world *= s
    res = ep_pool.run(world, check_ep, *case)
    bad = {r: m for r, m in res.items() if m}
    assert not bad, f"{case}: {bad}"


@pytest.mark.parametrize("world,gaxes,mesh_axes,experts", [
    (4, ["b", "a"], [("a", 2), ("b", 2)], 16), (2, ["ep"], [("ep", 2)], 16),
    (6, ["b", "a"], [("a", 2), ("b", 3)], 18)])
def test_prefill_like_case(ep_pool, world, gaxes, mesh_axes, experts):
    """More tokens, wider rows: 64 tokens per rank (48 or 0 on some), hidden 256, top-4.
    The 2x3 mesh's group b*a orders its backend ranks by a 4-cycle."""
    tokens = [[64, 48, 64, 0, 64, 48][:world], [64] * world]
    res = ep_pool.run(world, check_ep, mesh_axes, gaxes, experts, 4, 64, None, None,
                      "bfloat16", [11, 12], "skewed", tokens, 256, "cpu", "auto", 60)
    assert not any(res.values()), res


def test_fp8_per_128_block(ep_pool):
    res = ep_pool.run(2, check_ep, [("ep", 2)], ["ep"], 8, 2, 16, None, 128, "bfloat16",
                      [3, 4], "random", [[16, 9], [0, 16]], 384)
    assert not any(res.values()), res


# -- errors every rank raises together ---------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_capacity_overflow_raises_on_every_rank(ep_pool, world):
    res = ep_pool.run(world, check_overflow, 8, 6 if world == 2 else 12, 13)
    assert not any(res.values()), res


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_on_one_rank(ep_pool, name):
    res = ep_pool.run(4, check_bad_input, name, 2)
    assert not any(res.values()), res


def test_tokens_differ_without_max_tokens(ep_pool):
    res = ep_pool.run(4, check_tokens_differ)
    assert not any(res.values()), res


@pytest.mark.parametrize("world", [2, 4])
def test_combine_checks_its_handle(ep_pool, world):
    res = ep_pool.run(world, check_handles)
    assert not any(res.values()), res


@pytest.mark.parametrize("world", [2, 3])
def test_combine_refuses_a_handle_of_another_dispatch_object(ep_pool, world):
    """Dispatch objects compiled from the same text have their own tags."""
    res = ep_pool.run(world, check_other_dispatch)
    assert not any(res.values()), res


def test_dead_peer_times_out_naming_it():
    """On a pool of its own: the timed-out process group is not reused."""
    from rank_pool import RankPool

    pool = RankPool(2)
    try:
        res = pool.run(2, check_dead_peer, 2.0, timeout=60)
        assert not any(res.values()), res
    finally:
        for p in pool.procs:  # rank 0's group holds a dead collective: do not join it
            p.kill()


def test_explain_cli(capsys):
    from mixcc.cli import main

    assert main(["explain", "dispatch(ep, experts=64, topk=8, max_tokens=4096)", "--mesh",
                 "ep=8", "--dtype", "bfloat16", "--hidden", "7168"]) == 0
    out = capsys.readouterr().out
    assert "8 per rank" in out and "8 x 32768 slots x 14336 B = 3.5 GiB per rank" in out
    assert "all_to_all_single with splits" in out
    assert main(["explain", "combine(a*b)", "--mesh", "a=2,b=2"]) == 0
    assert "reversed" in capsys.readouterr().out
    assert main(["explain", "allreduce(a)", "--mesh", "a=2", "--hidden", "8"]) == 2
    assert "--hidden applies to dispatch" in capsys.readouterr().err


def test_bench_dispatch_rows(tmp_path, capsys):
    """`mixcc bench` with a dispatch program: mixcc's rows and the all_to_all_single
    baseline on gloo, both checked against the identity experts' float64 result."""
    import json

    from mixcc.cli import main

    out = str(tmp_path / "ep")
    assert main(["bench", "--program", "dispatch(ep, experts=4, topk=2, wire=fp8_e4m3)",
                 "--program", "dispatch(ep, experts=8, topk=3, max_tokens=2)",
                 "--world-size", "2", "--max-rows", "4", "--hidden", "32", "--iters", "1",
                 "--repeats", "1", "--out", out]) == 0
    rows = json.load(open(out + ".json"))
    got = {(r["program"], r["backend"], r["rows"]) for r in rows}
    assert ("dispatch(ep, experts=8, topk=3, max_tokens=2)", "a2a", 2) in got
    assert not any(r["rows"] > 2 and "max_tokens" in r["program"] for r in rows)
    assert len(got) == 3 * 2 + 2 * 2 and all(r["errors"] == 0 for r in rows), rows
    assert all(r["ratio"] is not None for r in rows if r["backend"] == "auto")


@pytest.mark.parametrize("argv,words", [
    (["--program", "dispatch(ep, experts=4, topk=2)", "--program", "allreduce(ep)"],
     "dispatch programs only"),
    (["--program", "dispatch(ep, experts=3, topk=2)"], "divisible"),
    (["--program", "dispatch(ep, experts=4, topk=2)", "--backend", "nccl1"], "run auto, a2a"),
    (["--program", "dispatch(ep, experts=4, topk=2)", "--backend", "symm_a2a"],
     "one GPU per rank"),
])
def test_bench_dispatch_flags(capsys, argv, words):
    from mixcc.cli import main

    assert main(["bench", "--world-size", "2", *argv]) == 2
    assert words in capsys.readouterr().err


def test_bench_ep_flag_config():
    """--ep: top-8 of 64 and 256 experts with both wires, plus any --program given."""
    from mixcc import bench_ep
    from mixcc.cli import build_parser

    args = build_parser().parse_args(["bench", "--ep", "--world-size", "4", "--program",
                                      "dispatch(ep, experts=8, topk=1)"])
    world, cfg = bench_ep.config(args)
    assert world == 4 and cfg["mesh_axes"] == [("ep", 4)]
    assert cfg["programs"] == [*bench_ep.EP_PROGRAMS, "dispatch(ep, experts=8, topk=1)"]
    assert len(bench_ep.EP_PROGRAMS) == 4 and cfg["backends"] == ["auto", "a2a"]
