"""Where the host time of one eager fused call goes (2 ranks sharing one GPU, under MPS).

Times, per call and without waiting for the GPU: a plain torch kernel launch, reading
the current stream, the bare ctypes launch of the fused kernel, and the whole
`coll(x, out=out)`.     python3 scripts/host_overhead.py   (under MPS: scripts/device_env.sh's
start_mps, or `mixcc.mps.ensure`).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mixcc  # noqa: E402
from mixcc import launch  # noqa: E402


def per_call_us(fn, n: int = 200, repeats: int = 7) -> float:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out)


def worker(rank: int, world: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    coll = mixcc.compile(mixcc.presets.ALLREDUCE_ALLGATHER,
                         mixcc.Mesh({"dp": 1, "tp": world}, ranks_per_node=world),
                         dtype=torch.bfloat16, backend="fused")
    x = torch.randn(1, 7168, device=dev, dtype=torch.bfloat16)
    out = torch.empty(coll.output_shape(x.shape), dtype=x.dtype, device=dev)
    coll(x, out=out)
    runner = coll._fused[torch.bfloat16]
    stage, lib = runner.stages[0]
    args = runner._args[(0, 7168)]  # the cached launch arguments of this shape
    args_ref = ctypes.byref(args)

    def bare():
        lib.mixcc_launch(args_ref)

    rows = {
        "torch add_ (one kernel launch)": per_call_us(lambda: out.add_(0)),
        "torch.cuda.current_stream()": per_call_us(lambda: torch.cuda.current_stream()),
        "ctypes mixcc_launch (bare)": per_call_us(bare),
        "coll(x, out=out) (whole call)": per_call_us(lambda: coll(x, out=out)),
        "coll(x) (whole call, allocates out)": per_call_us(lambda: coll(x)),
        "torch.empty_like(out) (one allocation)": per_call_us(lambda: torch.empty_like(out)),
    }
    res = coll(x)
    torch.cuda.synchronize()
    ok = torch.allclose(res.float(), out.float())
    if rank == 0:
        print(f"{'host time per call, 2 ranks on one GPU under MPS':<48} {'us':>8}")
        for k, v in rows.items():
            print(f"{k:<48} {v:>8.2f}")
        ratio = rows["coll(x, out=out) (whole call)"] / rows["torch add_ (one kernel launch)"]
        print(f"{'whole call / plain torch launch (target <= 1.5)':<48} {ratio:>8.2f}")
        print("result consistent:", ok)


if __name__ == "__main__":
    launch.spawn(worker, 2, backend="gloo")
