"""The `mixcc` command: explain, bench, prebuild."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile

import torch

from . import __version__, presets
from .errors import MixccError
from .mesh import Mesh


class UsageError(ValueError):
    """A bad command-line argument, found before anything runs."""


def _dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    from .bench import DTYPES

    try:
        return DTYPES[name.strip()]
    except KeyError:
        raise UsageError(f"{flag} {name!r} is not one of {', '.join(DTYPES)}") from None


def _program(p: str) -> str:
    """The program text of `p`; a bare word must be a preset (programs need parentheses)."""
    text = presets.resolve(p)
    if text == p and p.strip().isidentifier():
        close = difflib.get_close_matches(p.strip(), list(presets.PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"program {p!r} is not a preset (one of "
                         f"{', '.join(presets.PRESETS)}) nor a program such as 'allreduce(tp)'"
                         f"{hint}")
    return text


def _cmd_explain(args: argparse.Namespace) -> int:
    from .api import compile as mixcc_compile

    mesh = Mesh.parse(args.mesh, args.ranks_per_node)
    dtype = _dtype(args.dtype) if args.dtype else None
    coll = mixcc_compile(_program(args.program), mesh, dtype=dtype, backend="reference")
    print(coll.explain())
    return 0


def _bench_worker(rank: int, world: int, cfg: dict) -> None:
    from . import bench

    rows = bench.run(rank, world, cfg)
    if rank != 0 or not rows:
        return
    out = cfg.get("out")
    if not out:
        print("note: nothing written; --out PREFIX writes PREFIX.csv, PREFIX.json and "
              "PREFIX.png", file=sys.stderr)
        return
    for path in bench.write_outputs(rows, out):
        print(f"wrote {path}", file=sys.stderr)
    if not bench.plot_available():
        print(f"note: {out}.png not written: it needs matplotlib "
              "(pip install 'mixcc[plot]')", file=sys.stderr)


def _check_out(prefix: str) -> None:
    """--out PREFIX: its directory must exist and take new files (checked before the run)."""
    if not prefix or prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise UsageError(f"--out {prefix!r} must be a file prefix such as results/bench "
                         "(it writes PREFIX.csv, PREFIX.json, PREFIX.png)")
    d = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(d):
        raise UsageError(f"--out {prefix!r}: directory {d} does not exist")
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise UsageError(f"--out {prefix!r}: cannot write in {d}: {e.strerror}") from None


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def bench_config(args: argparse.Namespace) -> tuple[int, dict, list[str]]:
    """Check every `bench` argument without starting a process; returns the world size,
    the config every rank runs and the skip notes (program/backend pairs that cannot run)."""
    from . import baselines, bench, launch
    from .api import compile as mixcc_compile

    _positive(args, "world_size", "ranks_per_node", "hidden", "min_rows", "max_rows",
              "iters", "repeats")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    torchrun = launch.under_torchrun()
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != world:
            raise UsageError(f"--world-size {args.world_size} disagrees with torchrun's "
                             f"WORLD_SIZE={world}")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        if args.world_size is not None:
            world = args.world_size
        elif args.mesh:  # the world follows from the mesh
            world = Mesh.parse(args.mesh, None).world_size
        else:
            world = gpus if gpus > 1 else 4
        local_world = world
    rpn = args.ranks_per_node
    if rpn is not None and world % rpn:
        raise UsageError(f"--ranks-per-node {rpn} must divide the world size {world}")
    if rpn is None and not torchrun:
        rpn = world  # spawned ranks are all local: one node
    if args.mesh:
        size = Mesh.parse(args.mesh, None).world_size
        if size != world:
            src = "torchrun's WORLD_SIZE" if torchrun else "--world-size"
            raise UsageError(f"--mesh {args.mesh} has {size} ranks but {src} is {world}")
        mesh = Mesh.parse(args.mesh, rpn)
    else:
        mesh = bench.default_mesh(world, rpn)

    dtype_name = args.dtype or ("bfloat16" if gpus else "float32")
    dtype = _dtype(dtype_name)
    if args.backend is not None:
        backends = list(dict.fromkeys(b.strip() for b in args.backend.split(",")))
        for b in backends:
            if b not in bench.BACKENDS:
                close = difflib.get_close_matches(b, bench.BACKENDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UsageError(f"--backend {b!r} is not one of {', '.join(bench.BACKENDS)}"
                                 f"{hint}")
    else:
        backends = ["fused", "reference"] if gpus else ["reference"]

    max_rows = args.max_rows or (4096 if gpus else 256)
    if args.min_rows > max_rows:
        default = "" if args.max_rows else " (the default here)"
        raise UsageError(f"--min-rows {args.min_rows} is above --max-rows {max_rows}{default}: "
                         "no size to run")
    if args.out:
        _check_out(args.out)

    programs = []
    for p in args.program or list(presets.PRESETS):
        text = _program(p)
        try:
            ref = mixcc_compile(text, mesh, dtype=dtype, backend="reference")
        except MixccError as e:
            raise UsageError(f"--program {p!r}: {e}") from None
        programs.append((text, ref))

    nccl = launch.pick_backend(local_world) == "nccl"
    pairs, skipped = [], []
    for be in backends:
        reasons = []
        for text, _ in programs:
            if be == "fused":
                why = bench.fused_refusal(dtype)
            elif be in baselines.BASELINES:
                why = baselines.unavailable_reason(be, text, mesh, dtype, nccl=nccl)
            else:
                why = None
            if why:
                reasons.append(f"{be} cannot run {text!r}: {why}")
            else:
                pairs.append((text, be))
        if reasons and len(reasons) == len(programs) and args.backend is not None:
            # asked for by name and runs nothing: say why instead of printing no rows
            raise UsageError(f"--backend {reasons[0]}")
        skipped += reasons
    order = {text: i for i, (text, _) in enumerate(programs)}
    pairs.sort(key=lambda pb: order[pb[0]])  # program-major, as the table reads
    if not pairs:
        raise UsageError("nothing to run: " + "; ".join(skipped))
    cfg = {
        "mesh_axes": list(zip(mesh.names, mesh.sizes, strict=True)),
        "ranks_per_node": mesh.ranks_per_node,
        "pairs": pairs,
        "dtype": dtype_name,
        "hidden": args.hidden or (7168 if gpus else 1024),
        "min_rows": args.min_rows,
        "max_rows": max_rows,
        "iters": args.iters or (20 if gpus else 5),
        "repeats": args.repeats or (10 if gpus else 5),
        "out": args.out,
    }
    return world, cfg, skipped


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import launch

    world, cfg, skipped = bench_config(args)
    if not launch.under_torchrun() or os.environ.get("RANK") == "0":
        for line in skipped:
            print(f"skip: {line}", file=sys.stderr)
    if launch.under_torchrun():
        launch.run_torchrun(_bench_worker, cfg)
    else:
        launch.spawn(_bench_worker, world, cfg)
    return 0


def _cmd_prebuild(args: argparse.Namespace) -> int:
    from . import fused
    from .codegen.build import find_nvcc
    from .codegen.render import CTYPES

    mesh = Mesh.parse(args.mesh, args.ranks_per_node)
    if args.ranks_per_node is None:  # ahead of time: assume the whole mesh is one node
        mesh = Mesh(list(zip(mesh.names, mesh.sizes, strict=True)), mesh.world_size)
    dtypes = [_dtype(d) for d in args.dtype.split(",")]
    for d in dtypes:
        if d not in CTYPES:
            names = ", ".join(str(t).removeprefix("torch.") for t in CTYPES)
            raise UsageError(f"--dtype {str(d).removeprefix('torch.')}: the fused backend "
                             f"builds {names} only")
    progs = [_program(p) for p in args.program or list(presets.PRESETS)]
    if args.arch is None and not torch.cuda.is_available():
        raise UsageError("--arch is needed on a machine without a CUDA GPU, e.g. --arch sm_90a")
    if find_nvcc() is None:
        raise UsageError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    from .api import compile as mixcc_compile

    plans = [(p, mixcc_compile(p, mesh, backend="reference").plan) for p in progs]
    for line in fused.prebuild(plans, dtypes, arch=args.arch):
        print(line, flush=True)
    return 0


def _language_help() -> str:
    """The grammar and the presets, for `mixcc explain --help`."""
    rows = "\n".join(f"  {name:<24} {prog}" for name, prog in presets.PRESETS.items())
    return ("language:\n"
            "  program  := stmt (';' stmt)* [';']          '#' starts a comment\n"
            "  stmt     := coll '(' group [',' 'op' '=' redop] ')'\n"
            "  coll     := allreduce | allgather | reducescatter\n"
            "  group    := world | axis ('*' axis)*\n"
            "  redop    := sum | max | min                 (default sum)\n"
            f"presets (mesh axes dp, tp):\n{rows}\n"
            "design: docs/DESIGN.md")


def build_parser() -> argparse.ArgumentParser:
    from .bench import BACKENDS, DTYPES

    p = argparse.ArgumentParser(prog="mixcc", description=__doc__)
    p.add_argument("--version", action="version",
                   version=f"mixcc {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", required=True)
    dtypes = ", ".join(DTYPES)

    e = sub.add_parser("explain", help="print the AST, IR after passes and plan of a program",
                       epilog=_language_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("program", help="program text or preset name")
    e.add_argument("--mesh", required=True, help="axes, e.g. dp=2,tp=4")
    e.add_argument("--ranks-per-node", type=int, default=None)
    e.add_argument("--dtype", default=None, help=f"fixes the chunking: one of {dtypes}")
    e.set_defaults(fn=_cmd_explain)

    b = sub.add_parser("bench", help="sweep sizes for programs and backends")
    b.add_argument("--program", action="append", help="program text or preset (repeatable)")
    b.add_argument("--mesh", default=None,
                   help="axes, e.g. dp=2,tp=4 (default dp=2,tp=N/2); sets the world size")
    b.add_argument("--ranks-per-node", type=int, default=None,
                   help="simulated node size (default: every local rank is one node)")
    b.add_argument("--world-size", type=int, default=None,
                   help="local ranks to spawn (default: the --mesh size, else the GPU count, "
                        "or 4 without GPUs)")
    b.add_argument("--backend", default=None,
                   help=f"comma list of {', '.join(BACKENDS)} (reference: the NCCL/gloo "
                        "composition; nccl1, symm_*: baselines); default fused,reference on "
                        "GPUs, else reference")
    b.add_argument("--dtype", default=None,
                   help=f"one of {dtypes} (default bfloat16 on GPUs, else float32)")
    b.add_argument("--hidden", type=int, default=None, help="elements per row")
    b.add_argument("--min-rows", type=int, default=1)
    b.add_argument("--max-rows", type=int, default=None)
    b.add_argument("--iters", type=int, default=None, help="calls per timed repeat")
    b.add_argument("--repeats", type=int, default=None)
    b.add_argument("--out", default=None,
                   help="write OUT.csv, OUT.json (and OUT.png with mixcc[plot])")
    b.set_defaults(fn=_cmd_bench)

    pb = sub.add_parser("prebuild", help="compile the fused kernels of programs ahead of time")
    pb.add_argument("--program", action="append", help="program or preset (default: presets)")
    pb.add_argument("--mesh", required=True)
    pb.add_argument("--ranks-per-node", type=int, default=None,
                    help="default: the whole mesh is one node")
    pb.add_argument("--dtype", default="bfloat16", help="comma list")
    pb.add_argument("--arch", default=None,
                    help="e.g. sm_90a (default: this GPU's; needed without a GPU)")
    pb.set_defaults(fn=_cmd_prebuild)
    return p


def _stdout_closed() -> int:
    """stdout's reader went away (`mixcc explain ... | head -1`): stop quietly."""
    try:  # later flushes (at exit too) must not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what the shell reports for a writer killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .launch import RankError, under_torchrun

    try:
        code = args.fn(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except RankError as e:
        if not e.expected and e.traceback:
            print(e.traceback.rstrip(), file=sys.stderr)
        print(f"mixcc: error: {e}", file=sys.stderr)
        return 1
    except (MixccError, ValueError) as e:
        if not under_torchrun() or os.environ["RANK"] == "0":  # every rank checks; one says
            print(f"mixcc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
