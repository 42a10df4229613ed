"""Block cap on one GPU (issue 8, item 5): 8 ranks share the GPU under MPS and run a 1 MiB
float32 `allreduce(tp); allgather(dp)` with the default options and with max_blocks=32
asked for explicitly. Before the cap, 32 blocks per rank deadlocked until the timeout.
Prints the cap each rank computed and checks the result against a float64 sum."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mixcc  # noqa: E402
from mixcc import launch  # noqa: E402


def worker(rank: int, world: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh({"dp": 2, "tp": world // 2})
    rows, hidden = 256, 1024  # 1 MiB of float32 per rank
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(rows, hidden, generator=gen, dtype=torch.float64) for _ in range(world)]
    tp = world // 2
    expect = torch.cat([sum(xs[dd * tp + t] for t in range(tp)) for dd in range(2)])
    bad = []
    for max_blocks in (None, 32):
        coll = mixcc.compile("allreduce(tp); allgather(dp)", mesh, dtype=torch.float32,
                             backend="fused", timeout_s=5.0, max_blocks=max_blocks)
        x = xs[rank].to(dev, torch.float32)
        t0 = time.time()
        for _ in range(20):
            out = coll(x)
        torch.cuda.synchronize()
        coll.check()
        runner = coll._fused[torch.float32]
        err = (out.double().cpu() - expect).abs().max().item()
        if err > 1e-3:
            bad.append(f"max_blocks={max_blocks}: error {err}")
        if rank == 0:
            print(f"max_blocks={max_blocks}: block cap {runner.block_cap}, launched "
                  f"{runner.max_blocks} blocks per rank ({runner.rt.ranks_on_device} ranks on "
                  f"the GPU, {runner.rt.sms_per_rank} SMs each), 20 calls in "
                  f"{time.time() - t0:.2f} s, max error {err:.2e}", flush=True)
    flags = torch.tensor([len(bad)])
    dist.all_reduce(flags)
    if rank == 0:
        print(f"block_cap_check: {'ok' if flags.item() == 0 else 'FAILED'}", flush=True)
    if bad:
        raise SystemExit("; ".join(bad))


if __name__ == "__main__":
    launch.spawn(worker, 8, backend="gloo")
