"""The `mixcc` command: explain, bench, prebuild."""

from __future__ import annotations

import argparse
import sys

import torch

from . import presets
from .errors import MixccError
from .mesh import Mesh


def _cmd_explain(args: argparse.Namespace) -> int:
    from .api import compile as mixcc_compile

    mesh = Mesh.parse(args.mesh, args.ranks_per_node)
    dtype = None
    if args.dtype:
        from .bench import DTYPES

        dtype = DTYPES[args.dtype]
    coll = mixcc_compile(args.program, mesh, dtype=dtype, backend="reference")
    print(coll.explain())
    return 0


def _bench_worker(rank: int, world: int, cfg: dict) -> None:
    from . import bench

    rows = bench.run(rank, world, cfg)
    if rank == 0 and cfg.get("out") and rows:
        for path in bench.write_outputs(rows, cfg["out"]):
            print(f"wrote {path}", file=sys.stderr)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import launch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world_size or (gpus if gpus > 1 else 4)
    backends = args.backend.split(",") if args.backend else (
        ["fused", "reference"] if gpus else ["reference"])
    cfg = {
        "programs": args.program or list(presets.PRESETS),
        "mesh": args.mesh,
        "ranks_per_node": args.ranks_per_node,
        "backends": backends,
        "dtype": args.dtype or ("bfloat16" if gpus else "float32"),
        "hidden": args.hidden or (7168 if gpus else 1024),
        "min_rows": args.min_rows,
        "max_rows": args.max_rows or (4096 if gpus else 256),
        "iters": args.iters or (20 if gpus else 5),
        "repeats": args.repeats or (10 if gpus else 5),
        "out": args.out,
    }
    if launch.under_torchrun():
        launch.run_torchrun(_bench_worker, cfg)
    else:
        launch.spawn(_bench_worker, world, cfg)
    return 0


def _cmd_prebuild(args: argparse.Namespace) -> int:
    from . import fused

    mesh = Mesh.parse(args.mesh, args.ranks_per_node)
    if args.ranks_per_node is None:  # ahead of time: assume the whole mesh is one node
        mesh = Mesh(list(zip(mesh.names, mesh.sizes, strict=True)), mesh.world_size)
    from .bench import DTYPES

    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    progs = args.program or list(presets.PRESETS)
    for line in fused.prebuild(progs, mesh, dtypes, arch=args.arch):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixcc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("explain", help="print the AST, IR after passes and plan of a program")
    e.add_argument("program", help="program text or preset name")
    e.add_argument("--mesh", required=True, help="axes, e.g. dp=2,tp=4")
    e.add_argument("--ranks-per-node", type=int, default=None)
    e.add_argument("--dtype", default=None, help="fixes the chunking, e.g. bfloat16")
    e.set_defaults(fn=_cmd_explain)

    b = sub.add_parser("bench", help="sweep sizes for programs and backends")
    b.add_argument("--program", action="append", help="program text or preset (repeatable)")
    b.add_argument("--mesh", default=None, help="axes, e.g. dp=2,tp=4 (default dp=2,tp=N/2)")
    b.add_argument("--ranks-per-node", type=int, default=None)
    b.add_argument("--world-size", type=int, default=None,
                   help="local ranks to spawn (default: GPU count, or 4 without GPUs)")
    b.add_argument("--backend", default=None,
                   help="comma list of fused, reference (the NCCL/gloo composition), nccl1, "
                        "symm_one_shot, symm_two_shot")
    b.add_argument("--dtype", default=None)
    b.add_argument("--hidden", type=int, default=None)
    b.add_argument("--min-rows", type=int, default=1)
    b.add_argument("--max-rows", type=int, default=None)
    b.add_argument("--iters", type=int, default=None, help="calls per timed repeat")
    b.add_argument("--repeats", type=int, default=None)
    b.add_argument("--out", default=None, help="write OUT.csv, OUT.json (and OUT.png)")
    b.set_defaults(fn=_cmd_bench)

    pb = sub.add_parser("prebuild", help="compile the fused kernels of programs ahead of time")
    pb.add_argument("--program", action="append", help="program or preset (default: presets)")
    pb.add_argument("--mesh", required=True)
    pb.add_argument("--ranks-per-node", type=int, default=None,
                    help="default: the whole mesh is one node")
    pb.add_argument("--dtype", default="bfloat16", help="comma list")
    pb.add_argument("--arch", default=None, help="e.g. sm_90a (default: this GPU's)")
    pb.set_defaults(fn=_cmd_prebuild)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (MixccError, ValueError) as e:
        print(f"mixcc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
