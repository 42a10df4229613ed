"""The copy-engine mode (docs/DESIGN.md, "Copy engines") on CPU: which stages it may run
(plan.ce_safe), the copies it issues (plan.ce_copies, carried out on CPU tensors and
compared with the float64 oracle), and when auto takes it (FusedRunner._params)."""

from types import SimpleNamespace

import pytest
import torch

import mixcc
from mixcc.codegen import layout
from mixcc.codegen.plan import ce_copies, ce_safe, grid, intra_cols
from mixcc.fused import ALGO_CE, FusedRunner
from mixcc.tuning import thresholds

from oracle import expected, make_input

TH = thresholds.shipped(thresholds.Key("sm_90", "nvlink", 2))  # where they were measured
CE_MIN_BYTES, PUSH_MIN_BYTES = TH.ce_min_bytes, TH.push_min_bytes
COPIES = [("allgather(dp)", [("dp", 2), ("tp", 1)]), ("allgather(dp)", [("dp", 2), ("tp", 2)]),
          ("allgather(dp)", [("dp", 4), ("tp", 2)]), ("allgather(world)", [("w", 3)]),
          ("allgather(tp)", [("dp", 2), ("tp", 4)]),
          ("allgather(dp); allgather(tp)", [("dp", 2), ("tp", 2)]),
          ("allreduce(tp); allgather(dp)", [("dp", 2), ("tp", 1)])]
NOT_COPIES = [("allreduce(tp)", [("dp", 1), ("tp", 2)]),
              ("allreduce(tp); allgather(dp)", [("dp", 1), ("tp", 2)]),
              ("reducescatter(dp)", [("dp", 2), ("tp", 1)]),
              ("reducescatter(dp); allgather(dp)", [("dp", 2), ("tp", 1)])]


def stages(program, axes):
    return mixcc.compile(program, mixcc.Mesh(axes), backend="reference").plan.stages


@pytest.mark.parametrize("program,axes", COPIES + NOT_COPIES)
def test_copy_stages_among_cliques_only(program, axes):
    (stage,) = stages(program, axes)
    assert ce_safe(stage) == ((program, axes) in COPIES)


@pytest.mark.parametrize("program,axes", COPIES)
@pytest.mark.parametrize("rows_per_unit", [1, 3])
def test_copies_and_own_units_give_the_oracles_output(program, axes, rows_per_unit):
    """Every rank's output rebuilt as mixcc_ce_launch makes it: the peers' runs copied
    byte for byte from their inputs (ce_copies), its own units as ce_local_kernel copies
    them (the one-shot table's one-term tasks from itself), on fresh random data."""
    (stage,) = stages(program, axes)
    world, hidden = stage.lmap.world_size, 5
    rows = rows_per_unit * stage.lmap.in_units
    inputs = [make_input(7, r, rows, hidden, torch.float32) for r in range(world)]
    want, _, _ = expected(program, axes, inputs)
    unit_elems = rows_per_unit * hidden
    for r in range(world):
        out = torch.full_like(want[r], float("nan"), dtype=torch.float32).view(-1)
        for task in stage.schedules["one_shot"].ranks[r].reduce:
            ((src, u, _),) = task.terms
            if src == r:
                out[task.dst * unit_elems:(task.dst + 1) * unit_elems] = \
                    inputs[r].view(-1)[u * unit_elems:(u + 1) * unit_elems]
        runs = ce_copies(stage, r, unit_elems * 4)
        assert all(src != r for _, src, _, _ in runs)
        for dst_off, src, src_off, nbytes in runs:
            out.view(torch.uint8)[dst_off:dst_off + nbytes] = \
                inputs[src].view(-1).view(torch.uint8)[src_off:src_off + nbytes]
        assert torch.equal(out.view_as(want[r]), want[r].float()), (program, r)


def test_one_copy_per_unit_a_peer_holds():
    (stage,) = stages("allgather(dp); allgather(tp)", [("dp", 2), ("tp", 2)])
    # rank 0's output: its own unit, then ranks 2, 1, 3 (the dp gather, then the tp one)
    assert ce_copies(stage, 0, 10) == ((10, 2, 0, 10), (20, 1, 0, 10), (30, 3, 0, 10))
    (stage,) = stages("allgather(dp)", [("dp", 2), ("tp", 1)])
    assert ce_copies(stage, 1, 64) == ((0, 0, 0, 64),)


def runner(program, axes, pool=True, algorithm="auto", debug=False, same_size=True):
    (stage,) = stages(program, axes)
    r = object.__new__(FusedRunner)  # bypass the GPU runtime: only the choice is tested
    r.stages, r.algorithm, r.debug = [(stage, None)], algorithm, debug
    r.th = TH
    r.elem, r.vec, r.max_blocks = 2, 8, layout.MAX_BLOCKS
    r.rt = SimpleNamespace(region_bytes=layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES),
                           workspace_bytes=layout.DEFAULT_WORKSPACE_BYTES,
                           pool=object() if pool else None, pool_same_size=same_size)
    r.tuned = {}
    r._stage_facts()
    return r


def test_auto_takes_the_copy_engines_for_copies_in_pool_groups_from_ce_min_bytes():
    r = runner("allgather(dp)", [("dp", 2), ("tp", 1)])
    unit_elems = CE_MIN_BYTES // 2
    region = r.rt.region_bytes
    cols = intra_cols(r.stages[0][0], False, 2, region)
    nblocks, n_chunks, cols = grid(unit_elems, cols, 2, layout.MAX_BLOCKS)
    # on the one-shot's grid: the kernel runs the one-shot in full where the copy
    # engines cannot (a rank whose input is not registered, or offsets that differ)
    assert r._params(0, unit_elems, CE_MIN_BYTES) == (ALGO_CE, cols, n_chunks, nblocks, 1)
    assert r._params(0, unit_elems, PUSH_MIN_BYTES)[0] == ALGO_CE
    assert r._params(0, unit_elems // 2, CE_MIN_BYTES // 2)[0] != ALGO_CE
    for other in (runner("allgather(dp)", [("dp", 2), ("tp", 1)], pool=False),
                  runner("allgather(dp)", [("dp", 2), ("tp", 1)], algorithm="one_shot"),
                  runner("allgather(dp)", [("dp", 2), ("tp", 1)], algorithm="push"),
                  runner("allgather(dp)", [("dp", 2), ("tp", 1)], debug=True),
                  runner("allgather(dp)", [("dp", 2), ("tp", 1)], same_size=False),
                  runner("allreduce(tp)", [("dp", 1), ("tp", 2)])):
        assert other._params(0, unit_elems, CE_MIN_BYTES)[0] != ALGO_CE


def test_only_the_first_stage_whose_input_the_caller_passes():
    """A later stage reads an intermediate buffer, never registered: the mode would only
    add its kernels to the one-shot there."""
    (st,) = stages("allgather(dp)", [("dp", 2), ("tp", 1)])
    r = runner("allgather(dp)", [("dp", 2), ("tp", 1)])
    r.stages = [(st, None), (st, None)]
    r._stage_facts()
    assert r._ce_safe == [True, False]


def test_the_copy_engine_launch_gets_the_pool_and_the_word_at_every_size(monkeypatch):
    """The CE mode's kernels read the registered-input word whatever the size (the
    one-shot's protocol starts at REG_MIN_BYTES); an ordinary input's word is 0."""
    r = runner("allgather(dp)", [("dp", 2), ("tp", 1)])
    base = 1 << 40
    r.rt.pool = SimpleNamespace(base=base, contains=lambda p, n: "in" if p >= base else None)
    r.rt.pool_peers = SimpleNamespace(data_ptr=lambda: 0xABC0)
    r._pools = [r.rt.pool]
    ce = SimpleNamespace(algo=ALGO_CE)
    assert r._pool_args(ce, 0, base + 4096, CE_MIN_BYTES, 0) == (0xABC0, 4096 // 16 + 1)
    monkeypatch.setattr("mixcc.runtime.pool_of", lambda p, n: (None, None))
    assert r._pool_args(ce, 0, 1 << 20, CE_MIN_BYTES, 0) == (0xABC0, 0)


def test_the_launch_passes_the_copies_and_drops_the_word_of_an_overlapping_output(monkeypatch):
    """_launch in the copy-engine mode calls mixcc_ce_launch with the stage's copies (bytes
    of this rank's units) and the input's word; an output overlapping the input gets word
    0, so that the clique runs the one-shot (the copy engines would overwrite what the
    peers still read)."""
    from mixcc import fused

    r = runner("allgather(dp)", [("dp", 2), ("tp", 1)])
    seen = []

    class Lib:
        class mixcc_ce_launch:  # noqa: N801 - stands in for the ctypes function
            def __new__(cls, ref, copies, n, bases):
                a = ref._obj
                seen.append((a.algo, a.in_off, [copies[k] for k in range(4 * n)], bases))
                return 0

    x = torch.zeros(CE_MIN_BYTES // 2 // 1024 + 64, 1024, dtype=torch.bfloat16)
    base = x.data_ptr() - 4096
    r.stages = [(r.stages[0][0], Lib)]
    r.rt = SimpleNamespace(
        region_bytes=layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES), rank=1,
        peers=x, epochs=x, err_dev=0, pool_same_size=True, pool_bases="bases",
        pool_peers=SimpleNamespace(data_ptr=lambda: 0xABC0),
        pool=SimpleNamespace(base=base, contains=lambda p, n: "in" if p >= base else None))
    r._pools, r.timeout_ns, r.device, r._args, r._ce_copies = [r.rt.pool], 1, 0, {}, {}
    monkeypatch.setattr(fused, "_current_stream", lambda device: 0)
    out = torch.empty(2 * x.shape[0], 1024, dtype=torch.bfloat16)
    r._launch(0, x, out, 1024, 0)
    unit = x.numel() * 2
    assert seen[-1] == (ALGO_CE, 4096 // 16 + 1, [0, 0, 0, unit], "bases")  # rank 1 gets r0's
    r._launch(0, x, x.view(-1)[8:], 1024, 0)  # out overlaps x, 16 bytes on
    assert seen[-1][:2] == (ALGO_CE, 0)
