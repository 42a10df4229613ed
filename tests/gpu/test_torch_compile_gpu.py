"""torch.compile on GPUs: a tensor-parallel block with two mixcc collectives compiles with
fullgraph=True under inductor, default and "reduce-overhead" (CUDA graphs) modes, and
gives the eager result (issue 16, item 3)."""

from __future__ import annotations

import torch


def compiled_block(rank: int, world: int) -> None:
    import torch.nn.functional as F

    import mixcc

    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh({"dp": 1, "tp": world})
    ar = mixcc.compile("allreduce(tp)", mesh, dtype=torch.float32)
    ag = mixcc.compile("allgather(tp)", mesh, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)  # the same weights on every rank
    w1 = torch.randn(64, 128, generator=gen).div_(8).to(dev)
    w2 = torch.randn(128, 32, generator=gen).div_(8).to(dev)
    gamma = torch.rand(128, generator=gen).add_(0.5).to(dev)

    def block(x):
        h = ar(x @ w1)
        h = F.rms_norm(h, (128,), gamma, 1e-6)
        return ag(h @ w2)

    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        fn = torch.compile(block, fullgraph=True, mode=mode)
        for step, rows in enumerate((16, 16, 16, 8)):  # replays (graphs), then a new shape
            x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(
                100 * rank + step)).to(dev)
            want = block(x)
            got = fn(x).clone()  # reduce-overhead: the next replay reuses its output
            assert got.shape == (rows * world, 32), (mode, got.shape)
            torch.testing.assert_close(got, want, msg=lambda m, mode=mode, rows=rows:
                                       f"rank {rank}, mode {mode}, rows {rows}: {m}")
    torch.cuda.synchronize()


def test_compiled_block_equals_eager_on_two_gpus(spawn_ranks):
    spawn_ranks(compiled_block, 2)
