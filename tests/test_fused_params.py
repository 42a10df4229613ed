"""Launch parameters of the fused backend, computed on CPU (no GPU needed): every
column of every unit is covered, chunks fit the workspace regions, auto picks the
one-shot (two-shot only for large messages with something to share and several peers
per rank, push for large messages in two-rank stages), push refuses in
place what it cannot run in place, and the tuning table's NCCL entries send auto to the
reference backend."""

from types import SimpleNamespace

import pytest
import torch

import mixcc
from mixcc import tune
from mixcc.codegen import layout
from mixcc.codegen.plan import ll_cols, ll_roles, ll_row_split, row_grid
from mixcc.fused import (
    FusedRunner,
    block_cap,
    hier_nccl_min_bytes,
    push_auto,
    push_safe,
    reduces_across_nodes,
)
from mixcc.tuning import thresholds

PREFIX = "0123456789abcdef|bfloat16|8|sm_90a|"
# the thresholds of the setup where they were measured (two H200s over NVLink)
TH = thresholds.shipped(thresholds.Key("sm_90", "nvlink", 2))
HIER_NCCL_MIN_BYTES = TH.hier_nccl_min_bytes
HIER_STAGED_NCCL_MIN_BYTES = TH.hier_staged_nccl_min_bytes
ONE_SHOT_MAX_BYTES_WIDE = TH.one_shot_max_bytes_wide
POOL_PUSH_MIN_BYTES = TH.pool_push_min_bytes
PUSH_MIN_BYTES = TH.push_min_bytes


def runner(program, axes, dtype, algorithm="auto", workspace=layout.DEFAULT_WORKSPACE_BYTES,
           max_blocks=layout.MAX_BLOCKS, tuned=None):
    coll = mixcc.compile(program, mixcc.Mesh(axes), backend="reference")
    r = object.__new__(FusedRunner)  # bypass the GPU runtime: only the arithmetic is tested
    r.stages = [(st, None) for st in coll.plan.stages]
    r.plan = coll.plan
    r.algorithm, r.elem = algorithm, torch.empty((), dtype=dtype).element_size()
    r.vec, r.max_blocks = 16 // r.elem, max_blocks
    r.rt = SimpleNamespace(region_bytes=layout.region_bytes(workspace),
                           workspace_bytes=workspace, pool=None)
    r.debug = False
    r.th = TH
    r._stage_facts()
    r._nccl = True
    r._nccl_from = hier_nccl_min_bytes(coll.plan, (), TH)
    r.tuned, r._prefixes = tuned or {}, [PREFIX] * len(r.stages)
    return r


@pytest.mark.parametrize("unit_elems", [1, 7, 7168, 7168 * 64, 7168 * 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("workspace", [12 << 20, 16 << 20])
def test_chunks_cover_every_column(unit_elems, dtype, workspace):
    r = runner("reducescatter_allreduce", {"dp": 2, "tp": 4}, dtype, workspace=workspace)
    stage = r.stages[0][0]
    for algorithm in ("auto", "one_shot", "two_shot", "push", "ll"):
        r.algorithm = algorithm
        for nbytes in (unit_elems * 2 * r.elem, 64 << 20):
            algo, cols, n_chunks, nblocks, _ = r._params(0, unit_elems, nbytes)
            assert cols % r.vec == 0 and cols > 0
            assert 1 <= nblocks <= layout.MAX_BLOCKS
            assert n_chunks * nblocks * cols >= unit_elems > (n_chunks - 1) * nblocks * cols
            # spread evenly: no block of a one-chunk launch is left without columns
            assert n_chunks > 1 or (nblocks - 1) * cols < unit_elems
            region = layout.region_bytes(workspace)
            if algo == 2:  # push: slots x cols fit one sender's area of a push region
                area = layout.sender_area_bytes(region, 8)
                assert stage.push_schedule.slots * cols * r.elem <= area
            elif algo == 3:  # LL: slots x cols of lines (two bytes each) fit an LL area
                area = layout.sender_area_bytes(layout.LL_REGION_BYTES, 8)
                assert stage.push_schedule.slots * cols * 2 * r.elem <= area
            else:
                units = 2 + (stage.schedules["two_shot"].slots if algo else 0)
                assert units * cols * r.elem <= region


def test_auto_picks_one_shot_and_two_shot_only_for_wide_large_messages():
    r = runner("allreduce_allgather", {"dp": 2, "tp": 4}, torch.bfloat16)
    assert r._params(0, 7168, 14336)[0] == 0
    assert r._params(0, 7168 * 64, ONE_SHOT_MAX_BYTES_WIDE)[0] == 0
    assert r._params(0, 7168 * 64, ONE_SHOT_MAX_BYTES_WIDE + 1)[0] == 1
    # two ranks: each reads one peer, which moves the least bytes at any size; from
    # PUSH_MIN_BYTES push, whose remote stores overlap the receivers' reduce or copy
    two = runner("allreduce(tp)", {"tp": 2}, torch.bfloat16)
    assert two._params(0, 1 << 23, PUSH_MIN_BYTES - 1)[0] == 0
    assert two._params(0, 1 << 24, PUSH_MIN_BYTES)[0] == 2
    assert two._params(0, 1 << 26, 1 << 27)[0] == 2
    for prog in ("reducescatter(dp)", "allgather(dp)", "allreduce_allgather"):
        r2 = runner(prog, {"dp": 2, "tp": 1}, torch.bfloat16)
        assert r2._params(0, 1 << 24, PUSH_MIN_BYTES - 1)[0] == 0
        assert r2._params(0, 1 << 24, PUSH_MIN_BYTES)[0] == 2
    # in a group with a registered pool the one-shot (inputs read in place) up to
    # POOL_PUSH_MIN_BYTES; the eager fast path steps aside where the pool decides
    pooled = runner("allreduce(tp)", {"tp": 2}, torch.bfloat16)
    x = torch.empty(1 << 24, dtype=torch.bfloat16)
    pooled.rt.pool = object()
    assert pooled._params(0, 1 << 24, PUSH_MIN_BYTES)[0] == 0
    assert pooled._params(0, 1 << 25, POOL_PUSH_MIN_BYTES - 1)[0] == 0
    assert pooled._params(0, 1 << 26, POOL_PUSH_MIN_BYTES)[0] == 2
    assert pooled.fast_call(x.view(-1, 4096), x.view(-1, 4096).shape) is None
    # a workspace too small for push's sender areas: auto (and a table's push) keep the
    # one-shot instead of raising; only algorithm="push" refuses
    tiny = layout.MIN_WORKSPACE_BYTES
    small = runner("allgather(dp)", {"dp": 2, "tp": 16}, torch.bfloat16, workspace=tiny)
    small._push_auto = [True]  # as if the rule allowed push here
    assert small._params(0, 1 << 24, PUSH_MIN_BYTES)[0] == 0
    with pytest.raises(ValueError, match="too small"):
        runner("allgather(dp)", {"dp": 2, "tp": 16}, torch.bfloat16, "push",
               workspace=tiny)._params(0, 1 << 24, PUSH_MIN_BYTES)
    # four ranks: each pushes to three peers, not measured: the heuristic of before
    four = runner("allreduce(tp)", {"tp": 4}, torch.bfloat16)
    assert not push_auto(four.stages[0][0])
    assert four._params(0, 1 << 25, PUSH_MIN_BYTES)[0] == 1
    forced = runner("allreduce_allgather", {"dp": 2, "tp": 4}, torch.bfloat16, "push")
    assert forced._params(0, 7168 * 64, 64 << 20)[0] == 2
    # a plain allgather reduces nothing: two-shot would only double the remote reads
    ag = runner("allgather(dp)", {"dp": 2, "tp": 4}, torch.bfloat16)
    assert ag._params(0, 7168 * 64, PUSH_MIN_BYTES - 1)[0] == 0
    # one peer per rank, but eight ranks: a sender area is 1/7 of a region, not measured
    assert not push_auto(ag.stages[0][0])
    assert ag._params(0, 7168 * 64, PUSH_MIN_BYTES)[0] == 0


def test_ll_up_to_its_size_where_it_can_run():
    """auto takes LL up to LL_MAX_BYTES in two-rank stages outside debug mode; an LL
    chunk's lines fit a sender's LL area; LL refuses what push could not run in place."""
    assert TH.ll_max_bytes == 1 << 18
    for prog in ("allreduce(tp)", "reducescatter(tp)", "allgather(tp)"):
        two = runner(prog, {"tp": 2}, torch.bfloat16)
        assert two._params(0, 4096, 8192)[0] == 3
        algo, cols, n_chunks, nblocks, _ = two._params(0, 1 << 17, 1 << 18)
        assert algo == 3 and n_chunks == 1 and nblocks * cols >= 1 << 17
        assert cols * 2 * two.elem * two.stages[0][0].push_schedule.slots <= \
            layout.sender_area_bytes(layout.LL_CHUNK_BYTES, 2)
        assert two._params(0, 1 << 17, (1 << 18) + 1)[0] == 0
        two.debug = True  # debug mode's fingerprints travel with the barriers: no LL
        two._stage_facts()
        assert two._params(0, 4096, 8192)[0] == 0
        two.tuned = {(0, tune.bucket(8192)): tune.Choice("ll", 8)}  # nor from a table
        assert two._params(0, 4096, 8192)[0] == 0
        two.algorithm = "ll"  # and asked for: refused, saying why
        with pytest.raises(ValueError, match="debug mode's fingerprints"):
            two._params(0, 4096, 8192)
    # a large call on LL takes several chunks of the fixed LL area
    forced = runner("allreduce(tp)", {"tp": 2}, torch.float32, "ll")
    algo, cols, n_chunks, nblocks, _ = forced._params(0, 1 << 24, 1 << 26)
    assert algo == 3 and n_chunks > 1 and cols == ll_cols(forced.stages[0][0], forced.elem) == 1024
    # four ranks: not measured, the one-shot stays; algorithm="ll" runs it
    four = runner("allreduce(tp)", {"tp": 4}, torch.bfloat16)
    assert four._ll_safe == [True] and four._params(0, 4096, 8192)[0] == 0
    prog, axes = "reducescatter(a); allgather(b)", {"a": 2, "b": 2}
    assert runner(prog, axes, torch.float32)._ll_safe == [False]
    with pytest.raises(ValueError, match="algorithm='ll' cannot run stage 0"):
        runner(prog, axes, torch.float32, "ll")._params(0, 4096, 1 << 16)


def test_push_in_place_hazard_falls_back_or_raises():
    # the output keeps the input's shape, but an output unit is written before a later
    # output unit reads it as own input: push cannot run it in place
    prog, axes = "reducescatter(a); allgather(b)", {"a": 2, "b": 2}
    r = runner(prog, axes, torch.float32)
    assert not push_safe(r.stages[0][0])
    assert r._params(0, 4096, 1 << 16)[0] == 0  # auto: the one-shot, in place or not
    r.tuned = {(0, tune.bucket(1 << 16)): tune.Choice("push", 8)}
    assert r._params(0, 4096, 1 << 16)[0] == 0  # a table's push entry too
    forced = runner(prog, axes, torch.float32, "push")  # refused on every rank alike
    with pytest.raises(ValueError, match="could not run in place"):
        forced._params(0, 4096, 1 << 16)
    # a stage whose output has another shape never runs in place: always push-safe
    assert push_safe(runner("allreduce_allgather", {"dp": 2, "tp": 4}, torch.float32)
                     .stages[0][0])


def _two_nodes(program: str, axes: dict | None = None, rpn: int = 1) -> FusedRunner:
    axes = axes or {"dp": 2, "tp": 1}
    r = runner(program, axes, torch.bfloat16)
    r.plan = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn),
                           backend="reference").plan
    r.stages = [(st, None) for st in r.plan.stages]
    r._nccl_from = hier_nccl_min_bytes(r.plan, (), TH)
    assert not r.plan.one_node
    return r


def test_cross_node_reductions_go_to_nccl_from_16_mib_without_a_table():
    assert HIER_NCCL_MIN_BYTES == 16 << 20
    r = _two_nodes("allreduce(dp)")
    assert not r.prefers_reference(HIER_NCCL_MIN_BYTES - 1)
    assert r.prefers_reference(HIER_NCCL_MIN_BYTES)
    r._nccl = False
    assert not r.prefers_reference(HIER_NCCL_MIN_BYTES)
    # a table entry wins over the default, either way
    r._nccl = True
    r.tuned = {(0, tune.bucket(64 << 20)): tune.Choice("hier", 8)}
    assert not r.prefers_reference(64 << 20)
    assert not runner("allreduce(tp)", {"tp": 2}, torch.bfloat16).prefers_reference(1 << 30)
    # copies across nodes (allgather) stay fused at every size; reductions do not
    for program, reduces in (("allgather(dp)", False), ("reducescatter(dp)", True),
                             ("allreduce(tp); allgather(dp)", False),
                             ("reducescatter(dp); allreduce(tp)", True)):
        r = _two_nodes(program)
        assert reduces_across_nodes(r.plan) is reduces, program
        assert r.prefers_reference(1 << 30) is reduces, program
    assert not reduces_across_nodes(runner("allreduce(tp)", {"tp": 2}, torch.bfloat16).plan)
    # nodes of several ranks (the kernel stages its input) and a fused epilogue in the
    # cross-node stage keep the staged kernel's rule: every plan from 4 MiB
    r = _two_nodes("allgather(dp)", {"dp": 2, "tp": 2}, rpn=2)
    assert not r.prefers_reference(HIER_STAGED_NCCL_MIN_BYTES - 1)
    assert r.prefers_reference(HIER_STAGED_NCCL_MIN_BYTES)
    r = _two_nodes("allgather(dp)")
    assert not r.prefers_reference(1 << 30)
    r._nccl_from = hier_nccl_min_bytes(r.plan, ("add(r)",), TH)  # any fused epilogue statement
    assert r.prefers_reference(HIER_STAGED_NCCL_MIN_BYTES)


def test_nccl_entry_sends_auto_to_the_reference_backend():
    nbytes = 64 << 20
    entry = {(0, tune.bucket(nbytes)): tune.Choice("nccl", 0)}
    r = runner("allreduce(tp)", {"tp": 2}, torch.bfloat16, tuned=entry)
    assert r.prefers_reference(nbytes)
    assert not r.prefers_reference(nbytes // 4)  # another bucket: no entry
    r._nccl = False  # a gloo group cannot run CUDA tensors on the reference backend
    assert not r.prefers_reference(nbytes)
    forced = runner("allreduce(tp)", {"tp": 2}, torch.bfloat16, "push", tuned=entry)
    assert not forced.prefers_reference(nbytes)
    # the fused launch itself ignores an NCCL entry (the stage still has a kernel): the
    # heuristic's launch, as without a table
    assert runner("allreduce(tp)", {"tp": 2}, torch.bfloat16, tuned=entry)._params(
        0, nbytes // 2, nbytes) == runner("allreduce(tp)", {"tp": 2}, torch.bfloat16)._params(
        0, nbytes // 2, nbytes)


def test_max_blocks_is_respected():
    r = runner("allreduce(tp)", {"tp": 8}, torch.float32, max_blocks=4)
    assert r._params(0, 1 << 24, 1 << 26)[3] == 4


def test_too_small_workspace_is_refused():
    r = runner("allreduce(tp)", {"tp": 8}, torch.float32)
    r.rt.region_bytes = 8
    with pytest.raises(ValueError, match="workspace_bytes"):
        r._params(0, 1024, 4096)


def test_tuned_entry_decides_algorithm_blocks_and_chunk():
    nbytes = 7168 * 64 * 2
    entry = {(0, tune.bucket(nbytes)): tune.Choice("two_shot", 6, 1024)}
    r = runner("allreduce(tp)", {"tp": 8}, torch.bfloat16, tuned=entry)
    algo, cols, n_chunks, nblocks, _ = r._params(0, 7168 * 64, nbytes)
    assert (algo, nblocks) == (1, 6) and cols <= 1024
    assert n_chunks * nblocks * cols >= 7168 * 64
    # another size bucket has no entry: the heuristic (one-shot for small messages)
    assert r._params(0, 7168, 7168 * 2)[0] == 0
    # a fixed algorithm or block cap still wins over the table
    forced = runner("allreduce(tp)", {"tp": 8}, torch.bfloat16, "one_shot", max_blocks=4,
                    tuned=entry)
    algo, _, _, nblocks, _ = forced._params(0, 7168 * 64, nbytes)
    assert (algo, nblocks) == (0, 4)


def test_block_cap_fits_every_rank_on_the_gpu():
    # 132 SMs shared by 8 ranks, one block of 512 threads per SM: 16 blocks each
    assert block_cap(1, 132 // 8) == 16
    assert block_cap(16, 132 // 8) == layout.MAX_BLOCKS
    assert block_cap(1, 0) == 1


def epi_runner(program, axes, dtype, workspace=layout.DEFAULT_WORKSPACE_BYTES):
    """runner() with the program's epilogue fused into its last stage where the plan
    allows it, as FusedRunner.__init__ decides; calling it records the launch and writes
    known values where the kernel would (out: 7, a stored tensor: 5)."""
    class Recording(FusedRunner):
        def __call__(self, x, out, shape, hidden=0, epi=None):
            self.calls.append((x, out, hidden, epi))
            out.fill_(7)
            for n, t in zip(self._epi_slots, epi or (), strict=False):
                if n == "res":
                    t.fill_(5)
            return out

    r = runner(program, axes, dtype, workspace=workspace)
    r.__class__ = Recording
    r.calls, r.dtype = [], dtype
    ir = mixcc.compile(program, mixcc.Mesh(axes), backend="reference").ir
    r._set_epilogue(r.plan, ir.epilogue)
    return r


LAYER = "allreduce(tp); add(res); store(res); rmsnorm(w)"
BF = torch.bfloat16


def kw(rows=4, hidden=64, dtype=BF):
    return {"res": torch.randn(rows, hidden).to(dtype), "w": torch.ones(hidden, dtype=dtype)}


@pytest.mark.parametrize("dtype,hidden,fused", [
    (BF, 4096, True), (BF, 16384, True), (torch.float32, 16384, True),
    (BF, 16392, False), (BF, 4100, False), (torch.float32, 4100, True),
    (torch.float16, 12, False)])
def test_epilogue_rows_decide_from_the_shape(dtype, hidden, fused):
    r = epi_runner(LAYER, {"dp": 1, "tp": 2}, dtype)
    assert bool(r.epilogue_hidden(torch.Size((5, hidden)), kw(5, hidden, dtype))) == fused
    if fused:  # whole rows: LL where its region holds a row (a small call), else the one-shot
        algo, cols, chunks, blocks, roles = r._params(0, 5 * hidden, 5 * hidden * r.elem, hidden)
        ll = ll_cols(r.stages[0][0], r.elem, True)
        assert algo == (3 if hidden <= ll else 0)
        # whole rows (a block each): rows of 8 KiB and less are not split (ll_row_split)
        assert cols % hidden == 0 and blocks * chunks * cols >= 5 * hidden and blocks <= 5
        assert cols * r.elem <= (ll * r.elem if algo == 3 else
                                 layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES))
        r.algorithm = "one_shot"
        assert r._params(0, 5 * hidden, 5 * hidden * r.elem, hidden)[0] == 0
        r.algorithm = "auto"
    small = epi_runner(LAYER, {"dp": 1, "tp": 2}, dtype, workspace=layout.MIN_WORKSPACE_BYTES)
    assert not small.epilogue_hidden(torch.Size((5, 4096)), kw(5, 4096, dtype))
    other = {**kw(5, hidden, dtype), "w": torch.ones(hidden, dtype=torch.float64)}
    assert not r.epilogue_hidden(torch.Size((5, hidden)), other)  # a named tensor's dtype


@pytest.mark.parametrize("dtype", [BF, torch.float32])
@pytest.mark.parametrize("program,axes", [
    (LAYER, {"dp": 1, "tp": 4}),
    ("allreduce(tp); allgather(dp); add(res); rmsnorm(w)", {"dp": 2, "tp": 2})])
def test_an_epilogue_runs_in_the_two_shot_when_asked_with_fp32_result_slots(dtype, program,
                                                                             axes):
    """algorithm='two_shot' keeps the two-shot for the fused epilogue: its owners keep
    fp32 shares, so a chunk's region holds the staged input units in the dtype and the
    result slots at 4 bytes per element; auto keeps the one-shot."""
    hidden, rows = 1024, 4096
    r = epi_runner(program, axes, dtype)
    last = len(r.stages) - 1
    stage = r.stages[last][0]
    slots = stage.units_per_region(True) - stage.lmap.in_units
    region = layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES)
    unit = rows * hidden // stage.lmap.in_units
    assert r._params(last, unit, unit * r.elem, hidden)[0] == 0
    r.algorithm = "two_shot"
    assert slots > 0 and r.epilogue_hidden(torch.Size((rows, hidden)), kw(rows, hidden, dtype))
    algo, cols, chunks, blocks, roles = r._params(last, unit, unit * r.elem, hidden)
    assert algo == 1 and cols % hidden == 0 and blocks * chunks * cols >= unit
    per_col = stage.lmap.in_units * r.elem + slots * 4
    most = r._epilogue_cols(stage)  # the region's columns: no fewer, no more
    assert cols <= most and most * per_col <= region < (most + r.vec) * per_col
    # a row whose fp32 slots do not fit a region runs the torch ops after the kernels
    wide = region // (stage.lmap.in_units * r.elem + slots * 4) // r.vec * r.vec + r.vec
    if wide <= 16384:
        assert not r.epilogue_hidden(torch.Size((2, wide)), kw(2, wide, dtype))
    # a named tensor of another dtype would make this rank run the plain kernel, whose
    # slots its peers would read as fp32: refused (the one-shot just runs torch ops)
    other = {**kw(rows, hidden, dtype), "w": torch.ones(hidden, dtype=torch.float64)}
    with pytest.raises(ValueError, match="must have x's dtype"):
        r.epilogue_hidden(torch.Size((rows, hidden)), other)
    r.algorithm = "one_shot"
    assert r.epilogue_hidden(torch.Size((rows, hidden)), other) == 0


def test_epilogue_call_stages_what_is_misaligned_or_aliasing():
    r = epi_runner(LAYER, {"dp": 1, "tp": 2}, BF)
    shape = torch.Size((4, 64))
    x, out, t = torch.randn(4, 64).to(BF), torch.empty(4, 64, dtype=BF), kw()
    assert r.epilogue_call(x, out, shape, 64, t) is out
    assert r.calls[-1][3] == [t["res"], t["w"]] and r.calls[-1][0] is x  # nothing staged
    assert (out == 7).all() and (t["res"] == 5).all()
    # a non-contiguous stored tensor and a misaligned x and out go through aligned copies,
    # and what the kernel wrote comes back
    t = kw()
    t["res"] = torch.randn(64, 4).to(BF).t()
    odd = torch.empty(4 * 64 + 1, dtype=BF)[1:].view(4, 64)
    odd_out = torch.zeros(4 * 64 + 1, dtype=BF)[1:].view(4, 64)
    assert r.epilogue_call(odd, odd_out, shape, 64, t) is odd_out
    xs, os, _, epi = r.calls[-1]
    assert xs is not odd and not xs.data_ptr() % 16 and not os.data_ptr() % 16
    assert epi[0] is not t["res"] and (t["res"] == 5).all() and (odd_out == 7).all()
    # in place through a copy: x gets the result
    assert r.epilogue_call(odd, odd, shape, 64, kw()) is odd and (odd == 7).all()
    # aliasing: the kernel writes copies, which come back in the order the statements
    # write (stores, then out), the state that running them one after another leaves
    x = torch.randn(4, 64).to(BF)
    assert r.epilogue_call(x, out, shape, 64, {"res": x, "w": t["w"]}) is out  # stores x
    xs, _, _, epi = r.calls[-1]
    assert xs is x and epi[0] is not x  # the kernel reads x, writes res's copy
    assert (x == 5).all() and (out == 7).all()
    both = torch.randn(4 * 64 + 64).to(BF)
    res2, w2 = both[:256].view(4, 64), both[192:]  # the stored tensor overlaps the weight
    assert r.epilogue_call(x, out, shape, 64, {"res": res2, "w": w2}) is out
    assert r.calls[-1][3][1] is w2 and r.calls[-1][3][0] is not res2 and (res2 == 5).all()
    big = torch.zeros(5 * 64, dtype=BF)
    part = big[64:].view(4, 64)  # res overlaps out partly: out's elements land last
    o = big[:256].view(4, 64)
    assert r.epilogue_call(x, o, shape, 64, {"res": part, "w": t["w"]}) is o
    assert (o == 7).all() and (big[256:] == 5).all()
    n = len(r.calls)  # res that is out itself is fine: each thread reads, then writes
    assert r.epilogue_call(x, part, shape, 64, {"res": part, "w": t["w"]}) is part
    assert len(r.calls) == n + 1 and r.calls[-1][3][0] is part
    # a stored tensor that is out and overlaps x (or another named tensor) goes through a
    # copy: out's copy lands after it, so out holds the output
    x = torch.randn(4, 64).to(BF)
    assert r.epilogue_call(x, x, shape, 64, {"res": x, "w": t["w"]}) is x and (x == 7).all()
    h = torch.randn(4, 64).to(BF)
    assert r.epilogue_call(torch.randn(4, 64).to(BF), h, shape, 64,
                           {"res": h, "w": h[0]}) is h and (h == 7).all()


def test_a_cross_node_epilogue_runs_in_step_d_with_fp32_result_slots(monkeypatch):
    """The hierarchical kernel fuses the epilogue too: its IPC region holds the staged
    units in the dtype and the result slots at 4 bytes per element, and chunks hold whole
    rows."""
    from mixcc import fused
    from mixcc.codegen.plan import hier_cols, share_cap

    coll = mixcc.compile(LAYER, mixcc.Mesh({"dp": 1, "tp": 4}, ranks_per_node=2),
                         backend="reference")
    assert fused.epilogue_refusal(coll.plan, coll.ir.epilogue) is None
    r = epi_runner(LAYER, {"dp": 1, "tp": 4}, BF)  # one node: borrow its recording parts
    seen = recording_launches(r, monkeypatch)
    stage = coll.plan.stages[-1]
    r.stages, r.plan, r._prefixes = [(stage, r.stages[0][1])], coll.plan, [PREFIX]
    r.depth, r.nv = 2, SimpleNamespace(sym=0)
    r._sym_region = 1 << 30  # a large symmetric heap: the IPC region binds the chunk
    h = stage.hier
    region = layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES)
    most = r._epilogue_cols(stage)
    assert most == hier_cols(stage, 2, region, r._sym_region, 4) < \
        hier_cols(stage, 2, region, r._sym_region)

    def ipc(cols):
        return h.in_units * cols * 2 + h.max_finals * share_cap(cols, 2, h.local) * 4

    assert ipc(most) <= region < ipc(most + 8)
    assert r.epilogue_hidden(torch.Size((64, 4096)), kw(64, 4096))
    x, res, w = torch.randn(64, 4096).to(BF), torch.randn(64, 4096).to(BF), torch.ones(4096)
    out = torch.empty_like(x)
    r._launch(0, x, out, 4096, 0, 4096, [res, w.to(BF)])
    ((h1, _, _, cols1, *_),) = seen
    assert h1 == 4096 and cols1 % 4096 == 0


def recording_launches(r, monkeypatch) -> list:
    """Give epi_runner `r` a stage library that records each launch's arguments."""
    from mixcc import fused

    seen = []

    class Lib:
        class mixcc_launch:  # noqa: N801 - stands in for the ctypes function
            def __new__(cls, ref):
                a = ref._obj
                seen.append((a.epi_h, a.epi0, a.algo, a.cols, a.n_chunks, a.nblocks, a.wide))
                return 0

    r.stages = [(r.stages[0][0], Lib)]
    z = torch.zeros(1)
    r.rt = SimpleNamespace(region_bytes=layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES),
                           rank=0, peers=z, epochs=z, err_dev=0, pool=None,
                           _err=SimpleNamespace(status=0), timeout_s=0)
    r._pools, r.timeout_ns, r.device, r._args, r.debug = [], 1, 0, {}, False
    monkeypatch.setattr(fused, "_current_stream", lambda device: 0)
    return seen


def test_the_two_shot_epilogue_keeps_its_grid(monkeypatch):
    """With algorithm='two_shot' the fused epilogue runs the two-shot on whole rows; a
    plain call of the same shape launches the same grid without the statements, and a
    call with no row width the plain two-shot."""
    r = epi_runner(LAYER, {"dp": 1, "tp": 4}, BF)
    r.algorithm = "two_shot"
    seen = recording_launches(r, monkeypatch)
    x, res, w = torch.randn(8, 4096).to(BF), torch.randn(8, 4096).to(BF), torch.ones(4096)
    out = torch.empty_like(x)
    r._launch(0, x, out, 4096, 0, 4096, [res, w.to(BF)])
    r._launch(0, x, out, 4096, 0, 4096)
    r._launch(0, x, out, 4096, 0)
    (h1, _, *grid1), (h2, _, *grid2), (h3, _, *grid3) = seen
    assert (h1, h2, h3) == (4096, 0, 0) and grid1 == grid2 and grid1[0] == grid3[0] == 1


def test_a_plain_launch_after_a_fused_one_clears_the_epilogue(monkeypatch):
    """The launch arguments are cached per (stage, unit_elems, hidden): a rank that falls
    back after a fused call launches the same grid with epi_h = 0."""
    r = epi_runner(LAYER, {"dp": 1, "tp": 2}, BF)
    seen = recording_launches(r, monkeypatch)
    x, res, w = torch.randn(8, 4096).to(BF), torch.randn(8, 4096).to(BF), torch.ones(4096)
    out = torch.empty_like(x)
    r._launch(0, x, out, 4096, 0, 4096, [res, w.to(BF)])
    r._launch(0, x, out, 4096, 0, 4096)  # the fallback: same key, no epilogue
    r._launch(0, x, out, 4096, 0)  # no epilogue at all: auto's own grid
    (h1, p1, *grid1), (h2, p2, *grid2), (h3, _, *grid3) = seen
    assert h1 == 4096 and p1 == res.data_ptr() and h2 == 0 and h3 == 0
    # auto's LL at this size: the fallback runs the plain LL kernel on the same grid
    assert grid1 == grid2 and grid1[0] == 3 and grid1[1] % 4096 == 0
    assert grid3[1] % 8 == 0  # the plain grid need not keep rows whole


def test_an_epilogue_keeps_the_tuning_key_of_its_collective():
    from mixcc import fused, tune
    from mixcc.codegen.render import render_stage

    mesh = mixcc.Mesh({"dp": 1, "tp": 2})
    plain = mixcc.compile("allreduce(tp)", mesh, backend="reference").plan.stages[0]
    coll = mixcc.compile(LAYER, mesh, backend="reference")
    last = coll.plan.stages[-1]
    assert fused.tuning_key(last, BF) == tune.source_hash(render_stage(plain, BF))
    assert render_stage(last, BF, coll.ir.epilogue) != render_stage(plain, BF)


@pytest.mark.parametrize("hidden,elem,rows,blocks,expect", [
    (8192, 2, 1, 128, 2), (8192, 2, 64, 128, 2), (8192, 2, 65, 128, 1),
    (8192, 2, 200, 128, 1), (8192, 2, 5, 8, 1), (4096, 2, 3, 128, 1), (7168, 2, 2, 128, 1),
    (4096, 4, 2, 128, 2), (16384, 2, 1, 128, 2), (8200, 2, 1, 128, 1)])
def test_ll_rows_split_over_the_plain_calls_blocks_while_the_grid_holds_them(
        hidden, elem, rows, blocks, expect):
    """plan.ll_row_split: rows of at least ROW_SPLIT_MIN_BYTES over as many blocks as the
    plain LL call spreads them (2048 bf16 columns per block at two ranks), at most
    ROW_SPLIT_MAX, in equal parts of whole 16-byte packs, every row's blocks within the
    grid; else one block per row."""
    dtype = BF if elem == 2 else torch.float32
    st = epi_runner(LAYER, {"dp": 1, "tp": 2}, dtype).stages[0][0]
    n = ll_row_split(st, rows, hidden, elem, blocks)
    assert n == expect
    vec = 16 // elem
    assert hidden % n == 0 and hidden // n % vec == 0 and (n == 1 or rows * n <= blocks)
    whole = row_grid(rows * hidden, 16384 // elem * 2, hidden, elem, blocks)
    assert row_grid(rows * hidden, 16384 // elem * 2, hidden, elem, blocks, n) == \
        ((rows * n, 1, hidden // n) if n > 1 else whole)


def test_rows_split_only_where_the_row_pass_exchanges_once():
    """The split rows' slots serve one exchange per kernel (stage_kernel.cu.j2,
    ll_epilogue_pass): two output units per rank (allreduce + allgather on dp=2, tp=1) or
    two rmsnorm statements keep whole rows."""
    one = epi_runner(LAYER, {"dp": 1, "tp": 2}, BF)
    assert ll_row_split(one.stages[0][0], 1, 8192, 2, 128) == 2
    assert ll_row_split(one.stages[0][0], 1, 8192, 2, 128, norms=2) == 1
    algo, cols, chunks, blocks, roles = one._params(0, 8192, 8192 * 2, 8192)
    assert (algo, cols, chunks, blocks, roles) == (3, 4096, 1, 2, 1)  # LL, a row over two blocks
    two = epi_runner("allreduce(tp); allgather(dp); add(res); rmsnorm(w)", {"dp": 2, "tp": 1}, BF)
    assert ll_row_split(two.stages[0][0], 1, 8192, 2, 128) == 1  # a block holds both units
    # each output unit on blocks of its own: one unit per block, so its rows split too
    assert ll_row_split(two.stages[0][0], 1, 8192, 2, 128, roles=2) == 2
    assert ll_row_split(two.stages[0][0], 32, 8192, 2, 128, roles=2) == 2
    assert ll_row_split(two.stages[0][0], 33, 8192, 2, 128, roles=2) == 1  # 132 blocks
    assert two._params(0, 8192, 8192 * 2, 8192) == (3, 4096, 1, 4, 2)
    assert two._params(0, 8192 * 3, 8192 * 6, 8192) == (3, 4096, 1, 12, 2)
    norms2 = epi_runner(LAYER + "; rmsnorm(w)", {"dp": 1, "tp": 2}, BF)
    assert norms2._params(0, 8192, 8192 * 2, 8192)[1] >= 8192


def test_output_units_get_blocks_of_their_own_in_one_ll_chunk():
    """plan.ll_roles: allreduce + allgather on dp=2,tp=1 puts each of a rank's two output
    units on blocks of its own (two per row) when the call fits one LL chunk; a grid that
    needs more chunks, the one-shot, and programs of one output unit keep roles 1; the
    role masks close the push table (render.push_table)."""
    from mixcc.codegen.render import push_table
    from mixcc.codegen.schedule import role_sends

    prog = "allreduce(tp); allgather(dp); add(res); rmsnorm(w)"
    two = epi_runner(prog, {"dp": 2, "tp": 1}, BF)
    st = two.stages[0][0]
    assert ll_roles(st) == 2
    for rows in (1, 3, 16):
        assert two._params(0, 4096 * rows, 4096 * rows * 2, 4096)[2:] == (1, 2 * rows, 2)
    # 1024 rows of 128: one chunk still (64 rows per block), 32 blocks per unit
    assert two._params(0, 128 * 1024, 128 * 1024 * 2, 128)[2:] == (1, 64, 2)
    # past LL's size the one-shot: no roles
    assert two._params(0, 8192 * 64, 8192 * 64 * 2, 8192)[::4] == (0, 1)
    # rank 0 sends its unit from its entry-0 block; rank 1 from its entry-1 block
    assert role_sends(st.push_schedule) == (((0,), ()), ((), (0,)))
    flat, offsets, _ = push_table(st.push_schedule)
    assert flat[offsets[1] - 2:offsets[1]] == [1, 0] and flat[-2:] == [0, 1]
    one = epi_runner(LAYER, {"dp": 1, "tp": 2}, BF)
    assert ll_roles(one.stages[0][0]) == 1
    assert one._params(0, 4096, 8192, 4096)[4] == 1


def test_roles_never_split_an_in_place_call_between_blocks():
    """Where input and output units match in number (a call may run in place), no entry's
    block may read the input unit another entry's block writes: two ranks, two units,
    out[j] = in[j] summed over the ranks keeps blocks per unit; out[j] = in[1 - j] (each
    entry's block would read the unit the other's writes) does not."""
    from mixcc.codegen.schedule import TERM_INPUT, TERM_SLOT, PushRank, PushSchedule

    def stage(swap: bool) -> SimpleNamespace:
        ranks = []
        for r in range(2):
            sends = ((1 - r, 0, 0, 0), (1 - r, 1, 0, 1))
            pairs = ((0, 1), (1, 0)) if swap else ((0, 0), (1, 1))  # (out unit, in unit)
            reduce = tuple((j, ((TERM_INPUT, u, 0, 1), (TERM_SLOT, 0, u, 1))) for j, u in pairs)
            ranks.append(PushRank((1 - r,), (1 - r,), sends, reduce, True))
        return SimpleNamespace(push_schedule=PushSchedule(2, 2, tuple(ranks)))

    assert ll_roles(stage(False)) == 2
    assert ll_roles(stage(True)) == 1
