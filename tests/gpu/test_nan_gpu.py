"""NaN and infinities through the fused kernels (docs/RELIABILITY.md, promise 6): the
programs of tests/test_nan.py in three dtypes, one-shot and two-shot, on data with NaN,
+inf and -inf planted, against torch's semantics in float64."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers.ranks import Placement, env_int

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MESHES = {2: [("dp", 1), ("tp", 2)], 4: [("dp", 2), ("tp", 2)]}
PROGRAMS = [  # as tests/test_nan.py
    "allreduce(tp, op=max)", "allreduce(tp, op=min)", "allreduce(tp)",
    "reducescatter(tp, op=max)", "reducescatter(tp, op=min)", "reducescatter(tp)",
    "allreduce(tp, op=max); allgather(dp)", "allreduce(world, op=min)",
    "reducescatter(dp, op=max); allreduce(tp, op=max)", "reducescatter(dp); allreduce(tp)",
]


def nan_task(rank: int, world: int, seed: int) -> None:
    """Every case on this rank; raises with the failures of every rank."""
    import torch.distributed as dist

    import mixcc

    from oracle import expected_nonfinite, mismatch_nonfinite, planted_input, statements

    axes, dev = MESHES[world], torch.device("cuda", torch.cuda.current_device())
    failed, n = [], 0
    for i, (program, dtype, algo) in enumerate((p, d, a) for p in PROGRAMS for d in DTYPES
                                               for a in ("one_shot", "two_shot")):
        coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=world), dtype=dtype,
                             backend="fused", algorithm=algo, max_blocks=8)
        rows = 16 * coll.ir.granularity  # several units per rank: two-shot splits them
        inputs = [planted_input(seed + i, r, world, rows, 72, dtype) for r in range(world)]
        exp, mag, terms = expected_nonfinite(program, axes, inputs)
        out = coll(inputs[rank].to(dev))
        torch.cuda.synchronize()
        msg = mismatch_nonfinite(out.cpu(), exp[rank], mag[rank], dtype,
                                 len(statements(program)), terms)
        n += 1
        if msg:
            failed.append(f"rank {rank} {program} {dtype} {algo} (seed {seed + i}): {msg}")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, failed)
    bad = [m for fs in everyone for m in fs]
    assert not bad, f"{len(bad)} of {n * world} failed:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("p", [pytest.param(Placement(2, 2), id="w2-2gpu"),
                               pytest.param(Placement(4, 1), id="w4-1gpu-mps")])
def test_nan_and_inf_propagate(spawn_ranks, p: Placement):
    spawn_ranks(nan_task, p.world, env_int("MIXCC_SEED", 1), gpus=p.gpus)
