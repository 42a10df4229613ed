"""The kernel tables, executed on CPU: a Python interpreter of exactly what
templates/stage_kernel.cu.j2 does with the flat per-rank tables (reduce shares, result
slots, gathers, neighbour barriers), run on random programs and meshes and compared with
the float64 oracle. This checks the schedules and the table layout in CI, without a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixcc
from mixcc.codegen.render import push_table, schedule_table
from mixcc.codegen.schedule import DST_OUT, TERM_INPUT

from oracle import expected
from strategies import one_node_programs

VEC = 4  # columns move in packs of VEC, as in the kernel's wide path


def run_table(flat, offsets, rank_inputs, n_out, redop, cols):
    """Outputs of every rank (n_out x cols), NaN where the tables never write."""
    world = len(offsets)
    nvec = cols // VEC
    outs = [np.full((n_out, cols), np.nan, dtype=rank_inputs[0].dtype) for _ in range(world)]
    slots = [dict() for _ in range(world)]
    gathers, nbrs = [], []

    def share(i, n):
        return nvec * i // n * VEC, nvec * (i + 1) // n * VEC

    for r in range(world):  # phase 1: reduce tasks (after the first barrier)
        t = offsets[r]
        n_nbrs = flat[t]
        nbrs.append(set(flat[t + 1 : t + 1 + n_nbrs]))
        t += 1 + n_nbrs
        n_reduce = flat[t]
        t += 1
        for _ in range(n_reduce):
            kind, dst, oi, no, nt = flat[t : t + 5]
            terms = [flat[t + 5 + 3 * k : t + 8 + 3 * k] for k in range(nt)]
            t += 5 + 3 * nt
            lo, hi = share(oi, no)
            acc = None
            for src, unit, coef in terms:
                assert src == r or src in nbrs[r], f"rank {r} reads rank {src} without a barrier"
                x = rank_inputs[src][unit, lo:hi]
                if acc is None:
                    acc = coef * x if redop == "sum" else x.copy()
                else:
                    acc = {"sum": acc + coef * x, "max": np.maximum(acc, x),
                           "min": np.minimum(acc, x)}[redop]
            if kind == DST_OUT:
                outs[r][dst, lo:hi] = acc
            else:
                slots[r].setdefault(dst, np.full(cols, np.nan, dtype=acc.dtype))[lo:hi] = acc
        gathers.append(t)
    for r in range(world):  # phase 2: gathers (after the second barrier)
        t = gathers[r]
        for _ in range(flat[t]):
            dst, ns = flat[t + 1], flat[t + 2]
            srcs = [flat[t + 3 + 2 * j : t + 5 + 2 * j] for j in range(ns)]
            t += 2 + 2 * ns
            for j, (peer, slot) in enumerate(srcs):
                assert peer == r or peer in nbrs[r], f"rank {r} gathers from {peer} unsynced"
                lo, hi = share(j, ns)
                outs[r][dst, lo:hi] = slots[peer][slot][lo:hi]
    for r in range(world):  # barriers are symmetric: whoever I wait for waits for me
        for p in nbrs[r]:
            assert r in nbrs[p], f"neighbour lists of {r} and {p} are not symmetric"
    return outs


def run_push_table(flat, offsets, rank_inputs, n_out, redop, cols, slots):
    """What the push kernel does with its flat tables: every rank stores the units its
    consumers need into its own area of their push regions, then every rank reduces its
    input and received slots in table order. NaN where nothing was written."""
    world = len(offsets)
    parsed = []
    for r in range(world):
        t = offsets[r]
        dsts = flat[t + 1 : t + 1 + flat[t]]
        t += 1 + flat[t]
        srcs = flat[t + 1 : t + 1 + flat[t]]
        t += 1 + flat[t]
        sends = [flat[t + 1 + 4 * i : t + 5 + 4 * i] for i in range(flat[t])]
        t += 1 + 4 * flat[t]
        tasks = []
        n_reduce = flat[t]
        t += 1
        for _ in range(n_reduce):
            j, nt = flat[t], flat[t + 1]
            tasks.append((j, [flat[t + 2 + 4 * k : t + 6 + 4 * k] for k in range(nt)]))
            t += 2 + 4 * nt
        parsed.append((dsts, srcs, sends, tasks))
    regions = [np.full((world - 1, slots, cols), np.nan, dtype=rank_inputs[0].dtype)
               for _ in range(world)]
    writer: list[dict[int, int]] = [{} for _ in range(world)]
    for r, (dsts, _, sends, _) in enumerate(parsed):  # phase 1: pushes
        for dst, unit, area, slot in sends:
            assert dst in dsts and dst != r, f"rank {r} pushes to {dst} without a credit"
            assert 0 <= area < world - 1 and 0 <= slot < slots
            # one writer per area of a consumer's region, whatever the program
            assert writer[dst].setdefault(area, r) == r, f"area {area} of {dst}: two writers"
            regions[dst][area, slot] = rank_inputs[r][unit]
    for r, (dsts, srcs, _, _) in enumerate(parsed):  # signals and credits pair up
        for p in dsts:
            assert r in parsed[p][1], f"{r} pushes to {p}, which does not wait for it"
        for p in srcs:
            assert r in parsed[p][0], f"{r} waits for {p}, which does not push to it"
    outs = [np.full((n_out, cols), np.nan, dtype=rank_inputs[0].dtype) for _ in range(world)]
    for r, (_, srcs, _, tasks) in enumerate(parsed):  # phase 2: reduce from local memory
        src_of = writer[r]
        for j, terms in tasks:
            acc = None
            for kind, a, b, coef in terms:
                if kind == TERM_INPUT:
                    x = rank_inputs[r][a]
                else:
                    assert src_of[a] in srcs, f"rank {r} reads area {a} of an unsynced rank"
                    x = regions[r][a, b]
                if acc is None:
                    acc = coef * x if redop == "sum" else x.copy()
                else:
                    acc = {"sum": acc + coef * x, "max": np.maximum(acc, x),
                           "min": np.minimum(acc, x)}[redop]
            outs[r][j] = acc
    return outs


def check(program, axes, seed, cols=24):
    mesh = mixcc.Mesh(axes, ranks_per_node=math.prod(s for _, s in axes))
    coll = mixcc.compile(program, mesh, backend="reference")
    world = mesh.world_size
    gen = np.random.default_rng(seed)
    units = coll.ir.granularity
    inputs = [gen.standard_normal((units, cols)) for _ in range(world)]
    exp, _, _ = expected(program, axes, [torch.from_numpy(x) for x in inputs])
    for algo in ("one_shot", "two_shot", "push"):
        cur = inputs
        for stage in coll.plan.stages:
            n_out = len(stage.lmap.out_units[0])
            if algo == "push":
                sched = stage.push_schedule
                flat, offsets, _ = push_table(sched)
                cur = run_push_table(flat, offsets, cur, n_out, stage.lmap.redop, cols,
                                     sched.slots)
                continue
            flat, offsets, _ = schedule_table(stage.schedules[algo])
            cur = run_table(flat, offsets, cur, n_out, stage.lmap.redop, cols)
        for r in range(world):
            got = cur[r].reshape(-1, cols)
            want = exp[r].numpy()
            assert got.shape == want.shape, (algo, r)
            assert not np.isnan(got).any(), f"{algo}: rank {r} has unwritten output"
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{algo} rank {r} {program} {axes}")


@pytest.mark.parametrize("name", list(mixcc.presets.PRESETS))
@pytest.mark.parametrize("dims", [(2, 4), (4, 2), (8, 1), (1, 8), (2, 2)])
def test_presets(name, dims):
    check(mixcc.presets.PRESETS[name], [("dp", dims[0]), ("tp", dims[1])], 1)


def test_mixed_reductions_and_repeated_sums():
    check("allreduce(tp, op=max); allgather(dp); reducescatter(tp*dp, op=min); allreduce(tp)",
          [("dp", 2), ("tp", 2)], 2)
    check("allreduce(tp); allreduce(tp); allgather(world)", [("dp", 2), ("tp", 2)], 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=one_node_programs(), seed=st.integers(0, 999))
def test_random_programs(case, seed):
    program, axes = case
    mesh = mixcc.Mesh(axes, ranks_per_node=math.prod(s for _, s in axes))
    coll = mixcc.compile(program, mesh, backend="reference")
    if coll.ir.granularity * max(1, coll.ir.row_factor) > 256:
        return  # keep the simulated tensors small
    check(program, axes, seed)
