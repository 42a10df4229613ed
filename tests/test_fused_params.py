"""Launch parameters of the fused backend, computed on CPU (no GPU needed): every
column of every unit is covered, chunks fit the workspace regions, and auto picks
two-shot only for large messages with something to share."""

from types import SimpleNamespace

import pytest
import torch

import mixcc
from mixcc import tune
from mixcc.codegen import layout
from mixcc.fused import TWO_SHOT_MIN_BYTES, FusedRunner, block_cap, shares_reduction

PREFIX = "0123456789abcdef|bfloat16|8|sm_90a|"


def runner(program, axes, dtype, algorithm="auto", workspace=layout.DEFAULT_WORKSPACE_BYTES,
           max_blocks=layout.MAX_BLOCKS, tuned=None):
    coll = mixcc.compile(program, mixcc.Mesh(axes), backend="reference")
    r = object.__new__(FusedRunner)  # bypass the GPU runtime: only the arithmetic is tested
    r.stages = [(st, None) for st in coll.plan.stages]
    r.algorithm, r.elem = algorithm, torch.empty((), dtype=dtype).element_size()
    r.vec, r.max_blocks = 16 // r.elem, max_blocks
    r.rt = SimpleNamespace(region_bytes=layout.region_bytes(workspace),
                           workspace_bytes=workspace)
    r._shares_reduction = [shares_reduction(st) for st, _ in r.stages]
    r.tuned, r._prefixes = tuned or {}, [PREFIX] * len(r.stages)
    return r


@pytest.mark.parametrize("unit_elems", [1, 7, 7168, 7168 * 64, 7168 * 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("workspace", [256 << 10, 8 << 20])
def test_chunks_cover_every_column(unit_elems, dtype, workspace):
    r = runner("reducescatter_allreduce", {"dp": 2, "tp": 4}, dtype, workspace=workspace)
    for nbytes in (unit_elems * 2 * r.elem, 64 << 20):
        algo, cols, n_chunks, nblocks = r._params(0, unit_elems, nbytes)
        assert cols % r.vec == 0 and cols > 0
        assert 1 <= nblocks <= layout.MAX_BLOCKS
        assert n_chunks * nblocks * cols >= unit_elems > (n_chunks - 1) * nblocks * cols
        # spread evenly: no block of a one-chunk launch is left without columns
        assert n_chunks > 1 or (nblocks - 1) * cols < unit_elems
        units = 2 + (r.stages[0][0].schedules["two_shot"].slots if algo else 0)
        assert units * cols * r.elem <= layout.region_bytes(workspace)


def test_auto_switches_to_two_shot_for_large_messages():
    r = runner("allreduce_allgather", {"dp": 2, "tp": 4}, torch.bfloat16)
    assert r._params(0, 7168, 14336)[0] == 0
    assert r._params(0, 7168 * 64, TWO_SHOT_MIN_BYTES)[0] == 1
    forced = runner("allreduce_allgather", {"dp": 2, "tp": 4}, torch.bfloat16, "one_shot")
    assert forced._params(0, 7168 * 64, 64 << 20)[0] == 0
    # a plain allgather reduces nothing: two-shot would only double the remote reads
    ag = runner("allgather(dp)", {"dp": 2, "tp": 4}, torch.bfloat16)
    assert ag._params(0, 7168 * 64, 64 << 20)[0] == 0


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
    algo, cols, n_chunks, nblocks = r._params(0, 7168 * 64, nbytes)
    assert (algo, nblocks) == (1, 6) and cols <= 1024
    assert n_chunks * nblocks * cols >= 7168 * 64
    # another size bucket has no entry: the heuristic (one-shot for small messages)
    assert r._params(0, 7168, 7168 * 2)[0] == 0
    # a fixed algorithm or block cap still wins over the table
    forced = runner("allreduce(tp)", {"tp": 8}, torch.bfloat16, "one_shot", max_blocks=4,
                    tuned=entry)
    algo, _, _, nblocks = forced._params(0, 7168 * 64, nbytes)
    assert (algo, nblocks) == (0, 4)


def test_block_cap_fits_every_rank_on_the_gpu():
    # 132 SMs shared by 8 ranks, one block of 512 threads per SM: 16 blocks each
    assert block_cap(1, 132 // 8) == 16
    assert block_cap(2, 132 // 8) == layout.MAX_BLOCKS
    assert block_cap(1, 0) == 1
