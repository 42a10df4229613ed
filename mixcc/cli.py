"""The `mixcc` command: explain, bench, prebuild, tune."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile

import torch

from . import __version__, presets
from .codegen.layout import DEFAULT_SYMMETRIC_BYTES
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
    from .expert import Combine, Dispatch

    if args.hidden is not None:
        if not isinstance(coll, Dispatch | Combine):
            raise UsageError("--hidden applies to dispatch and combine programs (it sizes "
                             "their receive buffer)")
        _positive(args, "hidden")
        print(coll.explain(hidden=args.hidden))
        return 0
    if isinstance(coll, Dispatch | Combine):
        print(coll.explain())
        return 0
    key, tune_arch = _explain_key(args, mesh.world_size)
    print(coll.explain(key, tune_arch))
    return 0


def _explain_key(args: argparse.Namespace, world: int):
    """explain's threshold key and tuning-table arch: from --arch and --topology, else
    this machine's GPUs (none without a GPU: the built-in rule)."""
    from .codegen.build import device_arch
    from .tuning import thresholds

    if (args.arch is None) != (args.topology is None):
        given, other = ("--arch", "--topology") if args.arch else ("--topology", "--arch")
        raise UsageError(f"{given} needs {other} too (both name the table's key)")
    if args.arch is not None:
        if args.topology not in thresholds.TOPOLOGIES:
            raise UsageError(f"--topology {args.topology!r} is not one of "
                             f"{', '.join(thresholds.TOPOLOGIES)}")
        arch = args.arch.strip()
        if not arch.startswith("sm_") or not arch[3:5].isdigit():
            raise UsageError(f"--arch {arch!r} must be a target such as sm_90 or sm_90a")
        return thresholds.Key(thresholds.arch_of(arch), args.topology, world), arch
    key = thresholds.guess_key(world)
    return key, (device_arch() if key is not None else None)


def _bench_worker(rank: int, world: int, cfg: dict) -> None:
    from . import bench

    rows = bench.run(rank, world, cfg)
    if rank != 0 or not rows:
        return
    if cfg.get("rows_path"):  # spawned: the launcher collects every world's rows
        bench.dump_rows(rows, cfg["rows_path"])
        with open(cfg["rows_path"] + ".absent", "w") as f:  # and what was n/a
            json.dump(cfg.get("absent", {}), f)
    else:  # torchrun: nobody else writes them
        _write_rows(rows, cfg.get("out"))


def _write_rows(rows: list, out: str | None) -> None:
    from . import bench

    if not out:
        print("note: nothing written; --out PREFIX writes PREFIX.csv, PREFIX.json and "
              "PREFIX_<program>_w<world>.png", file=sys.stderr)
        return
    for path in bench.write_outputs(rows, out):
        print(f"wrote {path}", file=sys.stderr)
    if not bench.plot_available():
        print(f"note: {out}_<program>_w<world>.png not written: it needs matplotlib "
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


def _world_sizes(text: str | None) -> list[int] | None:
    """--world-size N or a comma list N1,N2,... (one run per world size)."""
    if text is None:
        return None
    worlds = []
    for part in text.split(","):
        try:
            w = int(part.strip())
        except ValueError:
            raise UsageError(f"--world-size {text!r} must be a rank count or a comma list "
                             "such as 2,4,8") from None
        if w < 1:
            raise UsageError(f"--world-size must be >= 1, got {w}")
        if w not in worlds:
            worlds.append(w)
    return worlds


def _byte_sizes(args: argparse.Namespace, row_bytes: int, max_rows: int
                ) -> tuple[int, int] | None:
    """(min, max) input bytes per rank from --min-bytes / --max-bytes, or None (rows)."""
    if args.min_bytes is None and args.max_bytes is None:
        return None
    if args.min_rows is not None or args.max_rows is not None:
        raise UsageError("give sizes in rows (--min-rows/--max-rows) or in bytes "
                         "(--min-bytes/--max-bytes), not both")
    from .bench import parse_size

    got = []
    for flag, text, default in (("--min-bytes", args.min_bytes, row_bytes),
                                ("--max-bytes", args.max_bytes, max_rows * row_bytes)):
        try:
            v = default if text is None else parse_size(text)
        except ValueError as e:
            raise UsageError(f"{flag} {e}") from None
        if v < 1:
            raise UsageError(f"{flag} must be >= 1 byte, got {text!r}")
        got.append(v)
    if got[0] > got[1]:
        raise UsageError(f"--min-bytes {got[0]} is above --max-bytes {got[1]}: no size to run")
    return got[0], got[1]


def _fused_options(args: argparse.Namespace) -> dict:
    """compile()'s workspace and pipeline options from bench's flags (only the ones given:
    the rest keep compile's defaults), checked by compile's own check."""
    from .api import check_fused_options
    from .bench import parse_size

    opts: dict = {}
    for name in ("workspace_bytes", "symmetric_bytes"):
        text = getattr(args, name)
        if text is not None:
            try:
                opts[name] = parse_size(text)
            except ValueError as e:
                raise UsageError(f"--{name.replace('_', '-')} {e}") from None
    if args.pipeline_depth is not None:
        opts["pipeline_depth"] = args.pipeline_depth
    try:
        check_fused_options(**opts)
    except ValueError as e:
        raise UsageError(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None
    return opts


def bench_config(args: argparse.Namespace) -> tuple[list[tuple[int, dict]], list[str]]:
    """Check every `bench` argument without starting a process (nor initialising CUDA);
    returns one (world size, config every rank runs) per world and the skip notes
    (program/backend pairs that cannot run)."""
    from . import baselines, bench, launch, mps
    from .api import compile as mixcc_compile

    _positive(args, "ranks_per_node", "hidden", "min_rows", "max_rows", "iters", "repeats")
    worlds = _world_sizes(args.world_size)
    gpus = bench.gpu_count()
    torchrun = launch.under_torchrun()
    local_world: int | None = None
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if worlds is not None and worlds != [world]:
            raise UsageError(f"--world-size {args.world_size} disagrees with torchrun's "
                             f"WORLD_SIZE={world}")
        worlds = [world]
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    elif worlds is None:
        if args.mesh:  # the world follows from the mesh
            worlds = [Mesh.parse(args.mesh, 1).world_size]
        else:
            worlds = [gpus if gpus > 1 else 4]
    if args.mesh and len(worlds) > 1:
        raise UsageError(f"--mesh {args.mesh} fits one world size; with --world-size "
                         f"{args.world_size} leave --mesh out (each world gets dp=2,tp=N/2)")
    rpn = args.ranks_per_node
    for world in worlds:
        if rpn is not None and world % rpn:
            raise UsageError(f"--ranks-per-node {rpn} must divide the world size {world}")

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
        backends = ["fused", "auto:invariant", "reference"] if gpus else ["reference"]

    hidden = args.hidden or (7168 if gpus else 1024)
    default_max_rows = 4096 if gpus else 256
    byte_sizes = _byte_sizes(args, hidden * dtype.itemsize, default_max_rows)
    min_rows = args.min_rows or 1
    max_rows = args.max_rows or default_max_rows
    if byte_sizes is None and min_rows > max_rows:
        default = "" if args.max_rows else " (the default here)"
        raise UsageError(f"--min-rows {min_rows} is above --max-rows {max_rows}{default}: "
                         "no size to run")
    if args.out:
        _check_out(args.out)

    fused_options = _fused_options(args)
    texts = [_program(p) for p in args.program or list(presets.PRESETS)]
    runs: list[tuple[int, dict]] = []
    skipped: list[str] = []
    first_reason: dict[str, str] = {}
    absent: dict[str, str] = {}  # baselines this machine lacks: n/a, never an error
    ran: set[str] = set()
    for world in worlds:
        if args.mesh:
            size = Mesh.parse(args.mesh, 1).world_size
            if size != world:
                src = "torchrun's WORLD_SIZE" if torchrun else "--world-size"
                raise UsageError(f"--mesh {args.mesh} has {size} ranks but {src} is {world}")
            mesh = Mesh.parse(args.mesh, rpn if rpn is not None or torchrun else world)
        else:  # spawned ranks are all local: one node
            mesh = bench.default_mesh(world, rpn if rpn is not None or torchrun else world)
        for p, text in zip(args.program or list(presets.PRESETS), texts, strict=True):
            try:
                mixcc_compile(text, mesh, dtype=dtype, backend="reference")
            except MixccError as e:
                raise UsageError(f"--program {p!r}: {e}") from None
        # launch.pick_backend's choice, counted without initialising CUDA
        nccl = 0 < (local_world or world) <= gpus
        one_gpu = gpus == 1 and not nccl
        pairs = []
        world_absent: dict[str, str] = {}
        for be in backends:
            na = baselines.machine_refusal(be, nccl=nccl) if be in baselines.BASELINES \
                else None
            if na:
                world_absent[be] = na
                absent.setdefault(be, na)
                continue
            for text in texts:
                if be in bench.FUSED or be == "separate":
                    why = bench.fused_refusal(dtype)
                else:
                    why = None
                if why is None and be in baselines.BASELINES:
                    why = baselines.unavailable_reason(be, text, mesh, dtype, nccl=nccl,
                                                       one_gpu=one_gpu)
                if why:
                    reason = f"{be} cannot run {text!r}: {why}"
                    first_reason.setdefault(be, reason)
                    if reason not in skipped:
                        skipped.append(reason)
                else:
                    pairs.append((text, be))
                    ran.add(be)
        order = {text: i for i, text in enumerate(texts)}
        pairs.sort(key=lambda pb: order[pb[0]])  # program-major, as the table reads
        if not pairs:
            continue
        mps_on = False
        if not nccl and gpus and any(be in bench.GPU_ONLY for _, be in pairs):
            mps_on = not args.no_mps
            if torchrun and mps_on and not mps.running(mps.pipe_dir()):
                raise UsageError(
                    "ranks share a GPU and MPS is not running, so device times would not "
                    "mean anything; start MPS before torchrun:\n" + mps.manual_commands()
                    + "\nor pass --no-mps (GPU rows then report host issue times)")
        runs.append((world, {
            "mesh_axes": list(zip(mesh.names, mesh.sizes, strict=True)),
            "ranks_per_node": mesh.ranks_per_node,
            "pairs": pairs,
            "dtype": dtype_name,
            "hidden": hidden,
            "min_rows": min_rows,
            "max_rows": max_rows,
            "min_bytes": byte_sizes[0] if byte_sizes else None,
            "max_bytes": byte_sizes[1] if byte_sizes else None,
            "iters": args.iters or (20 if gpus else 5),
            "repeats": args.repeats or (10 if gpus else 5),
            "out": args.out,
            "trace": args.trace,
            "row_timeout_s": args.row_timeout,
            "pg": "nccl" if nccl else "gloo",
            "mps": mps_on,
            "fused_options": fused_options,
            "absent": world_absent,
        }))
    if args.backend is not None:
        for be in backends:
            if be not in ran and be not in absent:  # asked for by name and runs nothing:
                raise UsageError(f"--backend {first_reason[be]}")  # say why, not no rows
    if not runs:
        raise UsageError("nothing to run: " + "; ".join(
            skipped + [bench.absent_line(be, why) for be, why in absent.items()]))
    return runs, skipped


def _cmd_bench(args: argparse.Namespace) -> int:
    import contextlib

    from . import bench, bench_ep, launch, mps

    if args.ep or (args.program and any(bench_ep.is_ep(p) for p in args.program)):
        return bench_ep.main(args)  # dispatch + combine against all_to_all_single
    runs, skipped = bench_config(args)
    if args.trace:
        try:
            os.makedirs(args.trace, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--trace {args.trace}: {e}") from None
    if not launch.under_torchrun() or os.environ.get("RANK") == "0":
        for line in skipped:
            print(f"skip: {line}", file=sys.stderr)
    if launch.under_torchrun():
        launch.run_torchrun(_bench_worker, runs[0][1])
        return 0
    need_mps = any(cfg["mps"] for _, cfg in runs)
    rows: list[bench.Row] = []
    absent: dict[str, str] = {}
    try:
        with (mps.ensure() if need_mps else contextlib.nullcontext()) as state, \
                tempfile.TemporaryDirectory(prefix="mixcc-bench-") as tmp:
            if state is not None:
                how = "started for this run" if state.started else "already running"
                print(f"note: MPS {how} (control pipe in {state.pipe_dir})", file=sys.stderr)
            for world, cfg in runs:
                cfg["rows_path"] = os.path.join(tmp, f"rows_w{world}.json")
                # the parent never initialises CUDA: each rank attaches to MPS itself
                launch.spawn(_bench_worker, world, cfg, backend=cfg["pg"])
                rows += bench.read_rows(cfg["rows_path"])
                if os.path.exists(cfg["rows_path"] + ".absent"):
                    with open(cfg["rows_path"] + ".absent") as f:
                        for be, why in json.load(f).items():
                            absent.setdefault(be, why)
    except mps.MpsError as e:
        raise UsageError(f"{e}\nor pass --no-mps (GPU rows then report host issue times, "
                         "not device times)") from None
    bench.add_ratios(rows)
    absent = {be: why for be, why in absent.items() if be not in {r.backend for r in rows}}
    if len({r.backend for r in rows} | set(absent)) > 1:
        print(bench.pivot(rows, absent=absent), flush=True)
    try:
        _write_rows(rows, args.out)
    except OSError as e:
        print(f"mixcc: error: writing the results: {e}", file=sys.stderr)
        return 1
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

    colls = [(p, mixcc_compile(p, mesh, backend="reference")) for p in progs]
    plans = [(p, c.plan, c.ir.epilogue) for p, c in colls]
    for line in fused.prebuild(plans, dtypes, arch=args.arch):
        print(line, flush=True)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    """Measure the fused launch choices of programs on this machine's GPUs and write the
    tuning table that `auto` reads (mixcc/tuning/)."""
    from . import bench, tuning
    from .codegen.build import find_nvcc

    _positive(args, "iters", "repeats", "hidden")
    emit = args.emit_defaults
    if emit and os.path.exists(emit) and not os.path.isdir(emit):
        raise UsageError(f"--emit-defaults {emit!r} must be a directory (it writes "
                         "DIR/<arch>-<topology>-w<world>.json)")
    if bench.gpu_count() == 0:
        raise UsageError("mixcc tune measures fused kernels: it needs a CUDA GPU")
    if find_nvcc() is None:
        raise UsageError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    world = int(args.world_size or max(2, bench.gpu_count()))
    if args.mesh:
        world = Mesh.parse(args.mesh, 1).world_size
    rpn = args.ranks_per_node or world  # the ranks it spawns are local: one node by default
    mesh = Mesh.parse(args.mesh, rpn) if args.mesh else bench.default_mesh(world, rpn)
    if args.world_size and int(args.world_size) != mesh.world_size:
        raise UsageError(f"--world-size {args.world_size} disagrees with --mesh {args.mesh}")
    _dtype(args.dtype)
    from .bench import parse_size

    try:
        lo, hi = parse_size(args.min_bytes), parse_size(args.max_bytes)
    except ValueError as e:
        raise UsageError(f"--min-bytes/--max-bytes: {e}") from None
    if not 1 <= lo <= hi:
        raise UsageError(f"need 1 <= --min-bytes <= --max-bytes, got {lo} and {hi}")
    sizes, n = [], lo
    while n <= hi:
        sizes.append(n)
        n *= 2
    from .api import compile as mixcc_compile

    progs = [_program(p) for p in (args.program or ["allreduce(world)"])]
    for prog in progs:  # parse and fit errors here, before any process starts
        mixcc_compile(prog, mesh, backend="reference")
    tuning.run({"mesh_axes": list(zip(mesh.names, mesh.sizes, strict=True)),
                "ranks_per_node": mesh.ranks_per_node, "world": mesh.world_size,
                "programs": progs, "dtype": args.dtype, "hidden": args.hidden,
                "sizes": sizes, "iters": args.iters, "repeats": args.repeats,
                "emit": emit, "command": "mixcc " + " ".join(sys.argv[1:])})
    return 0


def _language_help() -> str:
    """The grammar and the presets, for `mixcc explain --help`."""
    every = {**presets.PRESETS, **presets.EPILOGUE_PRESETS}
    width = max(map(len, every)) + 2
    rows = "\n".join(f"  {name:<{width}}{prog}" for name, prog in every.items())
    return ("language:\n"
            "  program  := stmt (';' stmt)* [';']          '#' starts a comment\n"
            "  stmt     := coll '(' group [',' 'op' '=' redop] ')' | epilogue\n"
            "  coll     := allreduce | allgather | reducescatter\n"
            "  group    := world | axis ('*' axis)*\n"
            "  redop    := sum | max | min                 (default sum)\n"
            "  epilogue := add(T) | store(T) | rmsnorm(W[, eps=E]) | quant(fp8_e4m3, S)\n"
            "              (after the last collective, quant last; T, W, S: tensors passed\n"
            "              by name to the call)\n"
            "  expert parallelism, each statement a program of its own:\n"
            "    dispatch(group, experts=E, topk=K[, max_tokens=M][, capacity=C]\n"
            "             [, wire=fp8_e4m3[, scale_block=B]])\n"
            "    combine(group)\n"
            f"presets (mesh axes dp, tp):\n{rows}\n"
            "design: docs/DESIGN.md")


def build_parser() -> argparse.ArgumentParser:
    from .bench import BACKENDS, DTYPES
    from .tuning.thresholds import TOPOLOGIES

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
    e.add_argument("--arch", default=None,
                   help="the GPU target whose tables to show, with --topology: the tuning "
                        "table's entries are keyed by the build arch as given (sm_90a on "
                        "Hopper; shown with --dtype), auto's threshold tables by its base "
                        "(sm_90); default: this machine's GPUs, else the built-in rule")
    e.add_argument("--topology", default=None,
                   help="auto's threshold table for this topology, with --arch: one of "
                        f"{', '.join(TOPOLOGIES)}")
    e.add_argument("--hidden", type=int, default=None,
                   help="dispatch/combine: elements per token, to size the receive buffer")
    e.set_defaults(fn=_cmd_explain)

    b = sub.add_parser(
        "bench", help="sweep sizes for programs and backends",
        description="Sweep sizes for programs and backends, nccl-tests style: one process "
                    "group per world size, every backend on the same data; the median of "
                    "the repeats (each the max over ranks) with their min and max, bytes "
                    "moved, bus bandwidth and the ratio to the fastest baseline. Ranks "
                    "sharing one GPU run under MPS (started for the run when it is not "
                    "running) and are timed by CUDA graphs.")
    b.add_argument("--program", action="append", help="program text or preset (repeatable)")
    b.add_argument("--ep", action="store_true",
                   help="dispatch + combine of top-8 of 64 and of 256 experts over an axis "
                        "ep of every rank, with tokens sent in --dtype and as fp8 (a scale "
                        "per 128 elements), against all_to_all_single (mixcc/bench_ep.py; "
                        "--program adds dispatch programs of your own). Rows (--backend): "
                        "auto, a2a, and symm_a2a where each rank has its own GPU. "
                        "Defaults without GPUs: world 2, hidden 512, up to 64 tokens, 3 "
                        "repeats of 3 calls")
    b.add_argument("--mesh", default=None,
                   help="axes, e.g. dp=2,tp=4 (default dp=2,tp=N/2); sets the world size")
    b.add_argument("--ranks-per-node", type=int, default=None,
                   help="simulated node size (default: every local rank is one node)")
    b.add_argument("--world-size", default=None,
                   help="local ranks to spawn, or a comma list such as 2,4,8 (one run each, "
                        "one table); default: the --mesh size, else the GPU count, or 4 "
                        "without GPUs or with one")
    b.add_argument("--backend", default=None,
                   help=f"comma list of {', '.join(BACKENDS)} (fused:ALG: a fixed "
                        "algorithm; reference: the NCCL/gloo composition; nccl1, symm_*, "
                        "separate: baselines; nccl_symm: NCCL's symmetric kernels on registered "
                        "windows, n/a where torch or NCCL lacks them; *_nocopy: input "
                        "already in the symmetric buffer; auto:invariant: auto with "
                        "batch_invariant=True); default fused,auto:invariant,reference on "
                        "GPUs, else reference")
    b.add_argument("--dtype", default=None,
                   help=f"one of {dtypes} (default bfloat16 on GPUs, else float32)")
    b.add_argument("--hidden", type=int, default=None,
                   help="elements per row (default 7168 on GPUs, else 1024)")
    b.add_argument("--min-rows", type=int, default=None, help="default 1")
    b.add_argument("--max-rows", type=int, default=None,
                   help="default 4096 on GPUs, else 256")
    b.add_argument("--min-bytes", default=None,
                   help="smallest input per rank, e.g. 16K (instead of rows; sizes double "
                        "up to --max-bytes, rounded to whole rows of --hidden)")
    b.add_argument("--max-bytes", default=None, help="largest input per rank, e.g. 64M")
    b.add_argument("--iters", type=int, default=None,
                   help="calls per timed repeat (default 20 on GPUs, else 5)")
    b.add_argument("--repeats", type=int, default=None, help="default 10 on GPUs, else 5")
    b.add_argument("--no-mps", action="store_true",
                   help="ranks sharing a GPU: do not start MPS; GPU rows report the host "
                        "time to issue a call instead of device times")
    b.add_argument("--workspace-bytes", default=None,
                   help="fused backends: IPC workspace per rank, e.g. 256M (compile's "
                        "workspace_bytes; default 64M of data)")
    b.add_argument("--symmetric-bytes", default=None,
                   help="fused backends: NVSHMEM workspace per rank, e.g. 128M (compile's "
                        f"symmetric_bytes; default {DEFAULT_SYMMETRIC_BYTES >> 20}M)")
    b.add_argument("--pipeline-depth", type=int, default=None,
                   help="fused backends: chunks in flight in a cross-node stage, 1-3 "
                        "(default 2)")
    b.add_argument("--out", default=None,
                   help="write OUT.csv, OUT.json (and OUT_<program>_w<world>.png with "
                        "mixcc[plot])")
    b.add_argument("--trace", default=None, metavar="DIR",
                   help="GPU rows: record one more replay of each row's CUDA graph with the "
                        "torch profiler into DIR (a Chrome trace and a summary per row and "
                        "rank: each kernel's and copy's time per call, and the idle time)")
    b.add_argument("--row-timeout", type=float, default=None, metavar="S",
                   help="a row still running after S seconds is taken for hung: the rank "
                        "names it and leaves (default 300, mixcc/bench.py ROW_TIMEOUT_S; "
                        "0: no limit)")
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

    t = sub.add_parser(
        "tune", help="measure fused launch choices and write the table auto reads",
        description="Time every candidate launch of each program per size bucket with "
                    "CUDA graphs (max over ranks) and write the fastest per stage into the "
                    "tuning table (the kernel cache's tune/table.json, or "
                    "MIXCC_TUNE_TABLE). Candidates: the intra-node algorithms (one-shot "
                    "and push; two-shot where a stage splits a reduction; LL where every "
                    "intra-node stage can run it), or the hierarchical kernel for a plan "
                    "with no intra-node stage, each at 4 to 128 blocks (up to the block "
                    "cap) and chunk widths of 16384 and 8192 columns or the widest that "
                    "fits (LL: the widest only); and NCCL itself (the reference backend) "
                    "where each rank has its own GPU. auto's own choice is timed beside "
                    "them, and near ties are timed again. Ranks sharing one GPU run under "
                    "MPS.")
    t.add_argument("--program", action="append",
                   help="program or preset (repeatable; default allreduce(world))")
    t.add_argument("--mesh", default=None, help="axes, e.g. dp=2,tp=4 (default dp=2,tp=N/2)")
    t.add_argument("--world-size", default=None, help="ranks (default: the GPU count, min 2)")
    t.add_argument("--ranks-per-node", type=int, default=None)
    t.add_argument("--dtype", default="bfloat16", help=f"one of {dtypes}")
    t.add_argument("--hidden", type=int, default=1024, help="elements per row")
    t.add_argument("--min-bytes", default="16K", help="smallest input per rank")
    t.add_argument("--max-bytes", default="64M", help="largest input per rank")
    t.add_argument("--iters", type=int, default=20, help="calls per CUDA graph")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--emit-defaults", nargs="?", const="", default=None, metavar="DIR",
                   help="also derive auto's thresholds (LL, push, two-shot, NCCL hand-off) "
                        "from the sweep and write them as DIR/<arch>-<topology>-w<world>.json "
                        "(default DIR: defaults/ beside the tuning table, which auto reads "
                        "before the shipped tables)")
    t.set_defaults(fn=_cmd_tune)
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
