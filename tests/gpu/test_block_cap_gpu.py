"""The block cap (issue 8, item 5): 8 ranks share one GPU under MPS and run a 1 MiB
float32 `allreduce(tp); allgather(dp)` with the default blocks and with max_blocks=32
asked for; before the cap, 32 blocks per rank deadlocked until the timeout. Every rank's
blocks must fit on the GPU at once, and the result equal a float64 sum."""

from __future__ import annotations

import torch

BLOCK_CAP_PROGRAM = "allreduce(tp); allgather(dp)"


def block_cap_task(rank: int, world: int) -> None:
    import mixcc

    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh({"dp": 2, "tp": world // 2})
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(256, 1024, generator=gen, dtype=torch.float64) for _ in range(world)]
    tp = world // 2
    expect = torch.cat([sum(xs[d * tp + t] for t in range(tp)) for d in range(2)])
    for max_blocks in (None, 32):
        coll = mixcc.compile(BLOCK_CAP_PROGRAM, mesh, dtype=torch.float32,
                             backend="fused", timeout_s=5.0, max_blocks=max_blocks)
        x = xs[rank].to(dev, torch.float32)
        for _ in range(20):
            out = coll(x)
        torch.cuda.synchronize()
        coll.check()
        runner = coll._fused[torch.float32]
        assert runner.max_blocks <= runner.block_cap, (runner.max_blocks, runner.block_cap)
        assert runner.rt.ranks_on_device == world, runner.rt.ranks_on_device
        err = (out.double().cpu() - expect).abs().max().item()
        assert err <= 1e-3, (f"max_blocks={max_blocks}: error {err} (cap {runner.block_cap}, "
                             f"{runner.rt.sms_per_rank} SMs per rank)")


def test_block_cap_with_eight_ranks_on_one_gpu(spawn_ranks):
    spawn_ranks(block_cap_task, 8, gpus=1)
