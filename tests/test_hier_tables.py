"""The hierarchical kernel tables (mixcc/codegen/hier.py), executed on CPU: a Python
interpreter of what templates/hier_kernel.cu.j2 does with the flat per-rank tables
(per-node parts reduced over IPC, rail-aligned puts to the same local rank of each other
node, combination of the parts into each rank's share of its finals, gathers of the
shares), run on presets and random programs over meshes of several nodes and compared
with the float64 oracle. This checks the hierarchical schedules and the table layout in
CI, without a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixcc
from mixcc.codegen.hier import KIND_COPY, KIND_REDUCE, HierSchedule, hier_schedule, hier_table
from mixcc.codegen.linear_map import LinearMap, linear_map
from mixcc.codegen.lower import phases

from oracle import expected
from strategies import one_node_programs

VEC = 4  # columns move in packs of VEC, as in the kernel's wide path

Slot = tuple[int, int]  # (destination node, part index) of a send area


def _reduce(acc: np.ndarray | None, x: np.ndarray, coef: int, redop: str) -> np.ndarray:
    if acc is None:
        return coef * x if redop == "sum" else x.copy()
    if redop == "sum":
        return acc + coef * x
    return np.maximum(acc, x) if redop == "max" else np.minimum(acc, x)


def parse_rank(flat: list[int], t: int, nodes: int) -> tuple[dict, int]:
    """The table of one rank starting at flat[t], and the index just past it."""
    n_nbrs = flat[t]
    nbrs = flat[t + 1 : t + 1 + n_nbrs]
    t += 1 + n_nbrs
    sends: list[list[tuple]] = []
    for _ in range(nodes):
        row: list[tuple] = []
        n_parts = flat[t]
        t += 1
        for _ in range(n_parts):
            kind = flat[t]
            if kind == KIND_REDUCE:
                nt = flat[t + 1]
                terms = [tuple(flat[t + 2 + 3 * k : t + 5 + 3 * k]) for k in range(nt)]
                row.append((KIND_REDUCE, terms))
                t += 2 + 3 * nt
            else:
                assert kind == KIND_COPY, f"unknown part kind {kind}"
                row.append((KIND_COPY, (flat[t + 1], flat[t + 2])))
                t += 3
        sends.append(row)
    finals = []
    n_finals = flat[t]
    t += 1
    for _ in range(n_finals):
        ns = flat[t]
        finals.append([(flat[t + 1 + 2 * j], flat[t + 2 + 2 * j]) for j in range(ns)])
        t += 1 + 2 * ns
    n_out = flat[t]
    out_finals = flat[t + 1 : t + 1 + n_out]
    t += 1 + n_out
    n_recv = flat[t]
    recv = flat[t + 1 : t + 1 + n_recv]
    t += 1 + n_recv
    return {"nbrs": nbrs, "sends": sends, "finals": finals, "out": out_finals,
            "recv": recv}, t


def run_hier_table(sched: HierSchedule, rank_inputs: list[np.ndarray], cols: int,
                   part=None, final=None) -> list[np.ndarray]:
    """Outputs of every rank (n_out x cols), NaN where the tables never write. Arithmetic
    in the inputs' dtype (float32 inputs: the kernel's fp32 accumulation, term by term);
    `part` and `final`, when given, round each reduced part and each final's share as the
    kernel stores them (its part type, its output dtype)."""
    dt = rank_inputs[0].dtype
    part = part or (lambda a: a)
    final = final or (lambda a: a)
    flat, offsets, max_terms, max_src = hier_table(sched)
    world, nodes, L, redop = len(offsets), sched.nodes, sched.local, sched.redop
    assert world == nodes * L
    nvec = cols // VEC

    def share(i: int) -> tuple[int, int]:
        return nvec * i // L * VEC, nvec * (i + 1) // L * VEC

    tabs = []
    for r in range(world):
        tab, end = parse_rank(flat, offsets[r], nodes)
        assert end == (offsets[r + 1] if r + 1 < world else len(flat)), f"rank {r} table size"
        tabs.append(tab)
    for r, tab in enumerate(tabs):  # neighbours: exactly the other local ranks, symmetric
        n = r // L
        assert sorted(tab["nbrs"]) == [q for q in range(n * L, (n + 1) * L) if q != r], r
        for p in tab["nbrs"]:
            assert r in tabs[p]["nbrs"], f"neighbour lists of {r} and {p} are not symmetric"

    # 1. send phase: each rank reduces its share of every part it sends (or keeps)
    sent: list[dict[Slot, np.ndarray]] = [{} for _ in range(world)]
    for r, tab in enumerate(tabs):
        n, i = divmod(r, L)
        lo, hi = share(i)
        for m, row in enumerate(tab["sends"]):
            assert len(row) <= sched.max_parts, f"rank {r}: too many parts to node {m}"
            for k, (kind, body) in enumerate(row):
                if kind == KIND_COPY:
                    src = tuple(body)
                    assert src < (m, k) and src in sent[r], \
                        f"rank {r} slot {(m, k)} copies unwritten slot {src}"
                    sent[r][(m, k)] = sent[r][src].copy()
                    continue
                assert 0 < len(body) <= max_terms, f"rank {r}: bad term count {len(body)}"
                acc = None
                for s, unit, coef in body:
                    assert s // L == n, f"rank {r} (node {n}) reduces rank {s} of another node"
                    assert s == r or s in tab["nbrs"], f"rank {r} reads rank {s} unsynced"
                    acc = _reduce(acc, rank_inputs[s][unit, lo:hi], coef, redop)
                slot = np.full(cols, np.nan, dtype=dt)
                slot[lo:hi] = part(acc)
                sent[r][(m, k)] = slot

    # 2. transfer: rank (n, i) puts its parts for node m to rank (m, i) (rail-aligned)
    recv: list[dict[int, dict[int, np.ndarray]]] = [{} for _ in range(world)]
    for r, tab in enumerate(tabs):
        n, i = divmod(r, L)
        puts = [m for m, row in enumerate(tab["sends"]) if m != n and row]
        assert tuple(puts) == sched.ranks[r].put_nodes, f"rank {r} put nodes"
        for m in range(nodes):
            if m == n:
                continue
            dst = m * L + i
            assert (m in puts) == (n in tabs[dst]["recv"]), \
                f"rank {r} puts to node {m}: {m in puts}; rank {dst} waits for node {n}: " \
                f"{n in tabs[dst]['recv']}"
            if m in puts:
                recv[dst][n] = {k: sent[r][(m, k)] for k in range(len(tab["sends"][m]))}
    for r, tab in enumerate(tabs):
        assert len(set(tab["recv"])) == len(tab["recv"]), f"rank {r} recv list repeats"
        assert set(tab["recv"]) == set(recv[r]), f"rank {r} waits for {tab['recv']}"

    # 3. combine: rank (n, i) builds share i of every final of its node from the parts
    results: list[list[np.ndarray]] = []
    for r, tab in enumerate(tabs):
        n, i = divmod(r, L)
        lo, hi = share(i)
        assert len(tab["finals"]) <= sched.max_finals, f"rank {r}: too many finals"
        res = []
        for f, srcs in enumerate(tab["finals"]):
            assert 0 < len(srcs) <= max_src, f"rank {r} final {f}: {len(srcs)} sources"
            src_nodes = [nn for nn, _ in srcs]
            assert src_nodes == sorted(src_nodes), \
                f"rank {r} final {f}: sources not in node order: {srcs}"
            assert len(set(srcs)) == len(srcs), f"rank {r} final {f}: a source twice: {srcs}"
            acc = None
            for nn, k in srcs:
                if nn == n:
                    assert (n, k) in sent[r], f"rank {r} final {f} reads unwritten slot {k}"
                    part = sent[r][(n, k)]
                else:
                    assert nn in tab["recv"], f"rank {r} final {f} reads node {nn} unsynced"
                    assert k in recv[r][nn], f"rank {r} final {f} reads missing slot {k}"
                    part = recv[r][nn][k]
                acc = _reduce(acc, part[lo:hi], 1, redop)
            slot = np.full(cols, np.nan, dtype=dt)
            slot[lo:hi] = final(acc)
            res.append(slot)
        results.append(res)

    # 4. gather: every output unit takes share k of its final from local rank k
    outs = []
    for r, tab in enumerate(tabs):
        n = r // L
        out = np.full((len(tab["out"]), cols), np.nan, dtype=dt)
        for j, f in enumerate(tab["out"]):
            for k in range(L):
                peer = n * L + k
                assert peer == r or peer in tab["nbrs"], f"rank {r} gathers from {peer}"
                assert f < len(results[peer]), f"rank {r} unit {j}: rank {peer} lacks final {f}"
                lo, hi = share(k)
                out[j, lo:hi] = results[peer][f][lo:hi]
        outs.append(out)
    return outs


def lmaps(program: str, mesh: mixcc.Mesh) -> list[LinearMap]:
    """The linear map of every reduction phase of the optimised program."""
    coll = mixcc.compile(program, mesh, backend="reference")
    units, out = coll.ir.granularity, []
    for redop, ops in phases(coll.optimized_ir.ops):
        lmap = linear_map(ops, mesh, units, redop)
        out.append(lmap)
        units = len(lmap.out_units[0])
    return out


def check(program: str, axes: list[tuple[str, int]], rpn: int, seed: int = 1,
          cols: int = 24) -> None:
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
    coll = mixcc.compile(program, mesh, backend="reference")
    world = mesh.world_size
    gen = np.random.default_rng(seed)
    inputs = [gen.standard_normal((coll.ir.granularity, cols)) for _ in range(world)]
    exp, _, _ = expected(program, axes, [torch.from_numpy(x) for x in inputs])
    cur = inputs
    for lmap in lmaps(program, mesh):
        sched = hier_schedule(lmap, mesh)
        assert (sched.nodes, sched.local) == (mesh.num_nodes, rpn)
        cur = run_hier_table(sched, cur, cols)
        assert all(c.shape == (len(lmap.out_units[0]), cols) for c in cur)
    where = f"{program!r} on {axes}, ranks_per_node={rpn}, cols={cols}"
    for r in range(world):
        got, want = cur[r].reshape(-1, cols), exp[r].numpy()
        assert got.shape == want.shape, f"rank {r} shape, {where}"
        assert not np.isnan(got).any(), f"rank {r} has unwritten output, {where}"
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"rank {r}, {where}")


DIMS = [(2, 2), (2, 4), (4, 2), (8, 1), (1, 8)]
MESHES = [(d, rpn) for d in DIMS for rpn in (2, 4) if rpn < d[0] * d[1]]
EXTRA = ["allreduce(tp*dp)", "allgather(tp*dp)", "reducescatter(tp*dp)", "allreduce(world)",
         "allgather(world)", "reducescatter(world)",
         "allreduce(tp, op=max); allgather(dp); reducescatter(tp*dp, op=min); allreduce(tp)",
         "reducescatter(dp, op=max); allgather(tp); allreduce(dp*tp, op=min)",
         "allreduce(tp); allreduce(tp); allgather(world)"]


@pytest.mark.parametrize("program", list(mixcc.presets.PRESETS.values()) + EXTRA)
@pytest.mark.parametrize(("dims", "rpn"), MESHES, ids=[f"{d[0]}x{d[1]}/{r}" for d, r in MESHES])
def test_programs(program: str, dims: tuple[int, int], rpn: int) -> None:
    check(program, [("dp", dims[0]), ("tp", dims[1])], rpn)


@pytest.mark.parametrize(("dims", "rpn", "cols"), [
    ((2, 4), 4, 4 * 7), ((4, 2), 4, 4 * 7), ((2, 4), 2, 4 * 3), ((2, 4), 4, 8),
    ((2, 4), 4, 4), ((2, 2), 2, 4), ((1, 8), 4, 4 * 5)])
@pytest.mark.parametrize("program", ["allreduce(world)", "reducescatter(dp); allreduce(tp)",
                                     "allreduce(tp); allgather(dp)",
                                     "reducescatter(world, op=max)"])
def test_odd_columns(program: str, dims: tuple[int, int], rpn: int, cols: int) -> None:
    """Shares of unequal size, and empty shares when cols < VEC * ranks_per_node."""
    check(program, [("dp", dims[0]), ("tp", dims[1])], rpn, seed=5, cols=cols)


def _resolve(sched: HierSchedule, r: int, m: int) -> list[tuple]:
    """The terms of each part rank r sends to node m, copies resolved."""
    sends = sched.ranks[r].sends
    out = []
    for p in sends[m]:
        out.append(sends[p.copy[0]][p.copy[1]].terms if p.copy is not None else p.terms)
    return out


def test_traffic_allreduce_world() -> None:
    """allreduce(world), 2 nodes x 4: each rank puts one part (its 1/4 share) across."""
    mesh = mixcc.Mesh([("dp", 2), ("tp", 4)], ranks_per_node=4)
    (lmap,) = lmaps("allreduce(world)", mesh)
    sched = hier_schedule(lmap, mesh)
    for r in range(8):
        n, other = r // 4, 1 - r // 4
        rs = sched.ranks[r]
        assert rs.put_nodes == (other,) and rs.recv_nodes == (other,)
        assert len(rs.sends[other]) == 1
        assert _resolve(sched, r, other) == [tuple((s, 0, 1) for s in range(4 * n, 4 * n + 4))]
        assert len(rs.finals) == 1 and rs.finals[0] == ((0, 0), (1, 0))


def test_traffic_reducescatter_allreduce() -> None:
    """reducescatter(dp); allreduce(tp) with dp across nodes: node n sends node m only its
    part of m's final (unit m summed over node n), never the finals m does not need."""
    mesh = mixcc.Mesh([("dp", 2), ("tp", 4)], ranks_per_node=4)
    (lmap,) = lmaps("reducescatter(dp); allreduce(tp)", mesh)
    assert lmap.in_units == 2
    sched = hier_schedule(lmap, mesh)
    for r in range(8):
        n = r // 4
        for m in range(2):
            node_final = {u for q in range(4 * m, 4 * m + 4) for u in lmap.out_units[q]}
            assert len(node_final) == 1
            (final,) = node_final
            mine = tuple(t for t in final if t[0] // 4 == n)
            assert all(t[1] == m for t in final)
            assert _resolve(sched, r, m) == [mine], (r, m)
        assert sched.ranks[r].put_nodes == (1 - n,)


@st.composite
def hier_cases(draw: st.DrawFn) -> tuple[str, list[tuple[str, int]], int]:
    program, axes = draw(one_node_programs())
    world = math.prod(s for _, s in axes)
    rpn = draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    return program, axes, rpn


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hier_cases(), seed=st.integers(0, 999), cols=st.sampled_from([4, 12, 24]))
def test_random_programs(case: tuple[str, list[tuple[str, int]], int], seed: int,
                         cols: int) -> None:
    program, axes, rpn = case
    ir = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn), backend="reference").ir
    if ir.granularity * max(1, ir.row_factor) > 256:
        return  # keep the simulated tensors small
    check(program, axes, rpn, seed, cols)
