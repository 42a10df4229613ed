"""NaN and infinities on the reference backend (gloo, CPU), against torch's semantics:
max/min give NaN wherever any term is NaN (torch.amax/amin; gloo alone keeps or drops
a NaN depending on where it meets the other values), sums follow IEEE (inf + -inf =
NaN), infinities keep their sign. Fresh data every run; a failure names its seed
(MIXCC_NAN_SEED=<seed> repeats it)."""

from __future__ import annotations

import os
import random

import pytest
import torch

import mixcc

from oracle import expected_nonfinite, mismatch_nonfinite, planted_input, statements

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MESHES = {2: [("dp", 1), ("tp", 2)], 4: [("dp", 2), ("tp", 2)]}
PROGRAMS = [
    "allreduce(tp, op=max)", "allreduce(tp, op=min)", "allreduce(tp)",
    "reducescatter(tp, op=max)", "reducescatter(tp, op=min)", "reducescatter(tp)",
    "allreduce(tp, op=max); allgather(dp)", "allreduce(world, op=min)",
    "reducescatter(dp, op=max); allreduce(tp, op=max)", "reducescatter(dp); allreduce(tp)",
]


def check_nonfinite(rank: int, world: int, group, program: str, axes: list, dtype_name: str,
                    seed: int) -> str:
    """This rank's output (out-of-place, and in place where the shape allows) against the
    float64 oracle, NaN positions and infinities exactly."""
    dtype = DTYPES[dtype_name]
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=world), dtype=dtype,
                         group=group, backend="reference")
    rows = 4 * coll.ir.granularity
    inputs = [planted_input(seed, r, world, rows, 24, dtype) for r in range(world)]
    exp, mag, terms = expected_nonfinite(program, axes, inputs)
    nst = len(statements(program))
    x = inputs[rank].clone()
    msgs = []
    m = mismatch_nonfinite(coll(x), exp[rank], mag[rank], dtype, nst, terms)
    if m:
        msgs.append(f"out-of-place: {m}")
    if not torch.equal(x.view(torch.uint8), inputs[rank].view(torch.uint8)):  # bitwise
        msgs.append("input was modified")
    if tuple(coll.output_shape(x.shape)) == tuple(x.shape):
        coll(x, out=x)
        m = mismatch_nonfinite(x, exp[rank], mag[rank], dtype, nst, terms)
        if m:
            msgs.append(f"in place: {m}")
    return f"seed {seed}: " + "; ".join(msgs) if msgs else ""


def _seed() -> int:
    return int(os.environ.get("MIXCC_NAN_SEED") or random.SystemRandom().randrange(1 << 30))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("program", PROGRAMS)
def test_nan_and_inf_match_torch(rank_pool, world, program):
    seed = _seed()
    for dtype_name in DTYPES:
        res = rank_pool.run(world, check_nonfinite, program, MESHES[world], dtype_name, seed)
        bad = {r: m for r, m in res.items() if m}
        assert not bad, f"{program} {dtype_name}: {bad}"


def test_planted_data_has_the_hard_cases():
    """Every world gets, somewhere, NaN on one rank only (each rank), +inf against -inf
    and infinities on every rank; and about 1 element in 12 non-finite at random."""
    seed = _seed()
    for world in (2, 4):
        xs = torch.stack([planted_input(seed, r, world, 8, 24, torch.float32)
                          for r in range(world)])
        nan_count = xs.isnan().sum(0)
        for r in range(world):
            assert (xs[r].isnan() & (nan_count == 1)).any(), (seed, world, r)
        assert ((xs == float("inf")).any(0) & (xs == float("-inf")).any(0)).any(), seed
        assert (xs == float("inf")).all(0).any() and (xs == float("-inf")).all(0).any()
        assert 0.03 < (~xs.isfinite()).double().mean() < 0.2, seed
