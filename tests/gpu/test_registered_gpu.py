"""Registered buffers on two GPUs (issue 14, item 3): an input from mixcc.empty is read in
place by the one-shot (no staging copy) from REG_MIN_BYTES per rank, staged below it, and
gives the same bits as an ordinary input, with different offsets on the two ranks,
several chunks, graph replay with new data, inputs rewritten right after each call, in
place; a closed runtime's buffer is refused."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def registered_task(rank: int, world: int) -> None:
    import torch.distributed as dist

    import mixcc
    from mixcc.fused import REG_MIN_BYTES
    from mixcc.runtime import _POOLS

    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh({"dp": 1, "tp": world})
    coll = mixcc.compile("allreduce(tp)", mesh, dtype=torch.bfloat16, algorithm="one_shot")
    keep = [mixcc.empty((rank * 3 + 1, 100), torch.float32, pool_bytes=256 << 20)]
    gen = torch.Generator().manual_seed(rank)

    def fresh(rows: int) -> torch.Tensor:
        return torch.randn(rows, 1024, generator=gen).to(dev, torch.bfloat16)

    def exact(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        acc = parts[0].float()
        for p in parts[1:]:
            acc = acc + p.float()
        return acc.to(torch.bfloat16)  # fp32 accumulation in rank order, as the kernel

    big = REG_MIN_BYTES // 2048 + 1000  # rows of 1024 bf16: read in place, three chunks
    for rows in (1, 8, big):  # 1 and 8 rows: staged (below REG_MIN_BYTES)
        x = mixcc.empty((rows, 1024), torch.bfloat16)
        x.copy_(fresh(rows))
        # the launch reads x in place (the pool's bases and x's word) only from the threshold
        peers, word = coll._fused_runner(x)._pool_args(SimpleNamespace(algo=0), 0,
                                                         x.data_ptr(), x.numel() * 2, 0)
        assert (peers != 0 and word != 0) == (rows == big), (rank, rows, peers, word)
        staged = coll(x.clone())
        got = coll(x)
        assert torch.equal(got, staged), (rank, rows, "registered != staged")
        assert torch.equal(got, exact(x)), (rank, rows)
        y = x.clone()
        assert torch.equal(coll(x, out=x), staged) and torch.equal(x, staged)  # in place
        x.copy_(y)

    # rewritten right after each call: the last barrier keeps peers from reading new data
    x = mixcc.empty((big, 1024), torch.bfloat16)
    outs, ins = [], []
    for _ in range(6):
        x.copy_(fresh(big))
        ins.append(x.clone())
        outs.append(coll(x))
    for i, o in zip(ins, outs, strict=True):
        assert torch.equal(o, exact(i)), (rank, "a peer read rewritten input")

    # CUDA graph: capture with the registered input, replay with new data in place
    out = torch.empty_like(x)
    coll(x, out=out)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        coll(x, out=out)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x.copy_(fresh(big))
        g.replay()
        assert torch.equal(out, exact(x)), (rank, "graph replay")
    torch.cuda.synchronize()

    # the buffer outlives its runtime: refused, never read from freed memory
    old = mixcc.empty((8, 1024), torch.bfloat16)
    del g, keep
    dist.barrier()
    mixcc.close_all()
    coll2 = mixcc.compile("allreduce(tp)", mesh, dtype=torch.bfloat16)
    try:
        coll2(old)
    except ValueError as e:
        assert "closed runtime" in str(e), e
    else:
        raise AssertionError("a closed runtime's buffer was accepted")
    assert coll2(old.clone()).shape == old.shape  # an ordinary copy works
    del old, x
    import gc

    gc.collect()
    assert not [p for p in _POOLS.values() if p._closed], "a closed pool was never freed"


def test_registered_input_is_read_in_place_on_two_gpus(spawn_ranks):
    spawn_ranks(registered_task, 2)
