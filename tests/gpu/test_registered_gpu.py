"""Registered buffers on two GPUs (issue 14, item 3): an input from mixcc.empty is read in
place by the one-shot (no staging copy) from REG_MIN_BYTES per rank, staged below it, and
gives the same bits as an ordinary input, with different offsets on the two ranks,
several chunks (with every input in place, the chunks after the first pass no barrier),
one rank's input registered and the other's not, graph replay with new data, inputs
rewritten right after each call, in place; a closed runtime's buffer is refused."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def replay_with_new_data(coll, x: torch.Tensor, out: torch.Tensor, fresh, exact, rank: int
                         ) -> torch.cuda.CUDAGraph:
    """Capture coll(x, out=out) in a CUDA graph, then replay it three times with new data
    in x, each result equal to exact(x); returns the graph."""
    coll(x, out=out)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        coll(x, out=out)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        x.copy_(fresh())
        g.replay()
        assert torch.equal(out, exact(x)), (rank, "graph replay")
    return g


def registered_task(rank: int, world: int) -> None:
    import torch.distributed as dist

    import mixcc
    from mixcc.tuning.thresholds import Key, shipped

    REG_MIN_BYTES = shipped(Key("sm_90", "nvlink", 2)).reg_min_bytes
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

    # one rank's input registered, the other's an ordinary tensor: the chunks after the
    # first keep their barriers on both (a rank reads the other's staged region)
    x = mixcc.empty((big, 1024), torch.bfloat16)
    x.copy_(fresh(big))
    assert torch.equal(coll(x if rank == 0 else x.clone()), exact(x)), (rank, "mixed")

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
    g = replay_with_new_data(coll, x, torch.empty_like(x), lambda: fresh(big), exact, rank)
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


def copy_engine_task(rank: int, world: int) -> None:
    """allgather(dp) of registered inputs from CE_MIN_BYTES (docs/DESIGN.md, "Copy
    engines"): the copy engines move the peer's part when both inputs lie at one offset
    (the CE word is set), the one-shot runs in full when the offsets differ or a rank's
    input is ordinary (the word is 0); the same bits as NCCL's all_gather every time, with
    inputs rewritten right after each call and in a replayed CUDA graph."""
    import torch.distributed as dist

    import mixcc
    from mixcc.codegen import layout
    from mixcc.tuning.thresholds import Key, shipped

    CE_MIN_BYTES = shipped(Key("sm_90", "nvlink", 2)).ce_min_bytes

    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh({"dp": world, "tp": 1})
    coll = mixcc.compile("allgather(dp)", mesh, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(10 + rank)
    rows = CE_MIN_BYTES // 2048 + 3  # rows of 1024 bf16, an odd count: several chunks

    def fresh() -> torch.Tensor:
        return torch.randn(rows, 1024, generator=gen).to(dev, torch.bfloat16)

    def exact(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((world * rows, 1024), dtype=x.dtype, device=dev)
        dist.all_gather_into_tensor(out, x)
        return out

    def ce_word() -> int:
        rt = coll._fused_runner(x).rt
        torch.cuda.synchronize()
        return int(rt.epochs[2 * layout.MAX_BLOCKS].item())

    x = mixcc.empty((rows, 1024), torch.bfloat16, pool_bytes=256 << 20)
    outs, ins = [], []
    for _ in range(4):  # rewritten right after each call
        x.copy_(fresh())
        ins.append(x.clone())
        outs.append(coll(x))
    assert ce_word() == 1, (rank, "the copy engines did not run")
    for i, o in zip(ins, outs, strict=True):
        assert torch.equal(o, exact(i)), (rank, "copy engines")

    # graph capture and replay with new data
    out = torch.empty((world * rows, 1024), dtype=torch.bfloat16, device=dev)
    replay_with_new_data(coll, x, out, fresh, exact, rank)  # the graph goes here
    assert ce_word() == 1

    # offsets that differ: rank 1 allocates a pad first; the one-shot runs in full
    pad = mixcc.empty((rank * 4 + 1, 1024), torch.bfloat16)
    y = mixcc.empty((rows, 1024), torch.bfloat16)
    y.copy_(fresh())
    assert torch.equal(coll(y), exact(y)), (rank, "offsets differ")
    assert ce_word() == 0, (rank, "offsets differ, yet the copy engines ran")
    # an ordinary input on rank 1 only
    z = x if rank == 0 else fresh()
    z.copy_(fresh())
    assert torch.equal(coll(z), exact(z)), (rank, "one input ordinary")
    assert ce_word() == 0
    del pad, y
    torch.cuda.synchronize()


def test_copy_engines_move_registered_allgathers_on_two_gpus(spawn_ranks):
    spawn_ranks(copy_engine_task, 2)
