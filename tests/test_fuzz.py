"""Hypothesis fuzzing: random meshes x programs x shapes x dtypes on gloo, every rank
checked against the float64 oracle (docs/DESIGN.md section 7, step 1)."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixcc import presets

from tasks import check_exact, check_program

EXAMPLES = int(os.environ.get("MIXCC_FUZZ_EXAMPLES", "600"))


@st.composite
def meshes(draw):
    n_axes = draw(st.integers(1, 4))
    names = draw(st.permutations(["a", "b", "c", "d"]))[:n_axes]
    sizes = []
    for _ in names:
        room = 8 // math.prod(sizes or [1])
        sizes.append(draw(st.sampled_from([s for s in (1, 2, 3, 4) if s <= room])))
    world = math.prod(sizes)
    rpn = draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    return list(zip(names, sizes, strict=True)), rpn


@st.composite
def cases(draw):
    axes, rpn = draw(meshes())
    names = [a for a, _ in axes]
    sizes = dict(axes)
    stmts, frac_num, frac_den, gran = [], 1, 1, 1
    for _ in range(draw(st.integers(1, 4))):
        coll = draw(st.sampled_from(["allreduce", "allgather", "reducescatter"]))
        if draw(st.integers(0, 5)) == 0:
            group, n = "world", math.prod(sizes.values())
        else:
            k = draw(st.integers(1, len(names)))
            picked = draw(st.permutations(names))[:k]
            group, n = "*".join(picked), math.prod(sizes[a] for a in picked)
        op = draw(st.sampled_from(["", ", op=sum", ", op=max", ", op=min"]))
        stmts.append(f"{coll}({group}{op})")
        if coll == "allgather":
            frac_num *= n
        elif coll == "reducescatter":
            frac_den *= n
            g = math.gcd(frac_num, frac_den)
            frac_num, frac_den = frac_num // g, frac_den // g
            gran = math.lcm(gran, frac_den)
    rows = gran * draw(st.integers(1, 3))
    if rows * frac_num // frac_den > 384 or rows > 384:
        rows = gran  # keep gathered outputs small
    hidden = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    seed = draw(st.integers(0, 10**6))
    sep = draw(st.sampled_from(["; ", ";", " ;\n", "; # comment\n"]))
    return sep.join(stmts), axes, rpn, rows, hidden, dtype, seed


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_programs_match_oracle(rank_pool, case):
    program, axes, rpn, rows, hidden, dtype, seed = case
    world = math.prod(s for _, s in axes)
    res = rank_pool.run(world, check_program, program, axes, rpn, rows, hidden, dtype, seed)
    bad = {r: m for r, m in res.items() if m}
    assert not bad, f"{program!r} on {axes} rpn={rpn} rows={rows}x{hidden} {dtype}: {bad}"


@pytest.mark.parametrize("name", list(presets.PRESETS))
@pytest.mark.parametrize("dims", [(2, 4), (4, 2), (2, 2), (8, 1)])
@pytest.mark.parametrize("rpn", [None, 2])
def test_presets_match_oracle(rank_pool, name, dims, rpn):
    axes = [("dp", dims[0]), ("tp", dims[1])]
    world = dims[0] * dims[1]
    rpn = rpn or world
    res = rank_pool.run(world, check_program, presets.PRESETS[name], axes, rpn,
                        8, 3, "bfloat16", 7)
    assert not any(res.values()), res


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("program", list(presets.PRESETS.values())
                         + ["allreduce(tp); allreduce(tp)", "allreduce(tp, op=max); "
                            "reducescatter(dp, op=min)", "allgather(tp*dp)",
                            "reducescatter(tp*dp); allgather(dp)"])
@pytest.mark.parametrize("rpn", [8, 2])
def test_small_integers_are_exact(rank_pool, dtype, program, rpn):
    res = rank_pool.run(8, check_exact, program, [("dp", 2), ("tp", 4)], rpn, dtype, 3)
    assert not any(res.values()), res


def test_int32_max_min(rank_pool):
    res = rank_pool.run(4, check_program, "allreduce(tp, op=max); allgather(dp, op=min)",
                        [("dp", 2), ("tp", 2)], 4, 2, 3, "int32", 5)
    assert not any(res.values()), res
