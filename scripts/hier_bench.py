"""Cross-node fused programs with chunk pipelining vs the same with pipeline depth 1, on
nodes simulated by ranks_per_node (several processes sharing one GPU under MPS, or one
process per GPU). Device time by CUDA graphs of several calls, median of repeats, max
over ranks, every depth in the same run; the ratio is the measured gain of overlapping
inter-node puts with intra-node work (one-GPU absolute times mean little).

    [OUT=DIR] python3 scripts/hier_bench.py --world 4 --rpn 2 [--dtype bfloat16]

With OUT set, rank 0 also writes DIR/hier_bench_w<world>_rpn<rpn>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mixcc  # noqa: E402
from mixcc import launch, presets  # noqa: E402
from mixcc.bench import repeat_times  # noqa: E402

PROGRAMS = [presets.ALLREDUCE_ALLGATHER, presets.REDUCESCATTER_ALLREDUCE, "allreduce(world)"]


def time_graph(fn, iters: int, repeats: int) -> tuple[float, float]:
    """(median, max - min) seconds per call of a CUDA graph of `iters` calls, each the max
    over ranks."""
    times = repeat_times(fn, iters, repeats, "graph")
    t = torch.tensor([statistics.median(times), max(times) - min(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), float(t[1])


def worker(rank: int, world: int, cfg: dict) -> None:
    dtype = getattr(torch, cfg["dtype"])
    dev = torch.device("cuda", torch.cuda.current_device())
    mesh_axes = [("dp", 2), ("tp", world // 2)]
    rows_out = []
    for prog in PROGRAMS:
        axes = mesh_axes if "world" not in prog else [("w", world)]
        mesh = mixcc.Mesh(axes, ranks_per_node=cfg["rpn"])
        colls = {d: mixcc.compile(prog, mesh, dtype=dtype, backend="fused", pipeline_depth=d,
                                  max_blocks=cfg["max_blocks"]) for d in (1, 2, 3)}
        g = colls[1].ir.granularity
        for kib in cfg["sizes"]:
            rows = max(g, (kib << 10) // (cfg["hidden"] * dtype.itemsize) // g * g)
            x = torch.randn(rows, cfg["hidden"], device=dev).to(dtype)
            out = torch.empty(colls[1].output_shape(x.shape), dtype=dtype, device=dev)
            ref = colls[1](x)
            base = None
            for d, coll in colls.items():
                same = torch.equal(coll(x), ref)  # same kernel tables: bitwise equal
                t, spread = time_graph(lambda c=coll, x=x, o=out: c(x, out=o), cfg["iters"],
                                       cfg["repeats"])
                base = base or t
                row = {"program": prog, "bytes": x.numel() * x.element_size(), "depth": d,
                       "time_us": t * 1e6, "spread_us": spread * 1e6, "ratio_to_depth1": t / base,
                       "equal_to_depth1": same}
                rows_out.append(row)
                if rank == 0:
                    print(f"{prog:<36} {row['bytes']:>10} {d:>5} {row['time_us']:>10.1f} "
                          f"{row['spread_us']:>9.1f} {row['ratio_to_depth1']:>7.3f} "
                          f"{'yes' if same else 'NO'}", flush=True)
    if rank == 0 and cfg["out"]:
        with open(os.path.join(cfg["out"], f"hier_bench_w{world}_rpn{cfg['rpn']}.json"),
                  "w") as f:
            json.dump({"world": world, "rpn": cfg["rpn"], "dtype": cfg["dtype"],
                       "device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--rpn", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--sizes", default="64,512,4096,16384", help="KiB per rank")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-blocks", type=int, default=8)
    args = ap.parse_args()
    cfg = {"rpn": args.rpn, "dtype": args.dtype, "hidden": args.hidden, "iters": args.iters,
           "repeats": args.repeats, "max_blocks": args.max_blocks, "out": os.environ.get("OUT"),
           "sizes": [int(s) for s in args.sizes.split(",")]}
    print(f"device {torch.cuda.get_device_name()}, world {args.world}, ranks_per_node "
          f"{args.rpn}, {args.dtype}, hidden {args.hidden}; CUDA graphs of {args.iters} calls, "
          f"median of {args.repeats}, max over ranks")
    print(f"{'program':<36} {'bytes/rank':>10} {'depth':>5} {'time_us':>10} {'spread':>9} "
          f"{'ratio':>7} equal")
    launch.spawn(worker, args.world, cfg, backend="gloo")


if __name__ == "__main__":
    main()
