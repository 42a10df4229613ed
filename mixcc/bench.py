"""`mixcc bench`: sweep sizes for programs and backends, nccl-tests style.

Every row of one run uses the same data at a size (one seeded input per program, size
and rank) and the same process group. Times: a warm-up, then `repeats` runs of `iters`
calls each: CUDA graphs of the calls timed with events where device times mean
something (one GPU per rank, or ranks sharing a GPU under MPS), the host time to issue
an eager call on a shared GPU without MPS, the host clock on CPU tensors. Each repeat
is the max over ranks; a row reports the median over repeats with their min and max.
algbw = input bytes per rank / time; bytes moved (bus bytes) = input bytes x the
nccl-tests factor summed over the statements (allreduce 2(n-1)/n, allgather (n-1),
reducescatter (n-1)/n); busbw (effective GB/s) = bytes moved / time. `ratio` = time /
the fastest baseline row (any backend but fused) of the same program, world, mesh,
dtype, size and timing kind with no wrong elements (add_ratios).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TextIO

import torch
import torch.distributed as dist

from . import baselines, presets
from . import trace as tracing
from .api import compile as mixcc_compile
from .ir.build import build
from .ir.parser import parse
from .mesh import Mesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
# mixcc's own rows: backend name -> the `algorithm` compile option. "auto" is the compile
# default (backend="auto": fused kernels, or NCCL where the tuning table measured it
# faster); "auto:registered" the same with the input in a registered buffer
# (mixcc.empty, filled outside the timing); "auto:invariant" with batch_invariant=True
# (docs/DESIGN.md, "Precision"); the others force the fused backend
# ("fused:one_shot:registered": the one-shot on a registered input).
FUSED = {"auto": "auto", "auto:registered": "auto", "auto:invariant": "auto", "fused": "auto",
         "fused:one_shot": "one_shot", "fused:two_shot": "two_shot", "fused:push": "push",
         "fused:ll": "ll", "fused:one_shot:registered": "one_shot"}
BACKENDS = (*FUSED, "reference", *baselines.BASELINES)  # what --backend accepts
# backends that run on CUDA tensors only
GPU_ONLY = (*FUSED, *baselines.SYMM, *baselines.NCCL_SYMM, *baselines.LINK, "separate")
# baselines whose failure to set up in the ranks (registration, rendezvous) is the
# machine's, not the program's: reported as n/a
MACHINE_BOUND = (*baselines.SYMM, *baselines.NCCL_SYMM)


def absent_line(backend: str, why: str) -> str:
    """How `mixcc bench` reports a baseline this machine lacks (printed, never an error)."""
    return f"n/a: {backend}: {why}"


def is_baseline(backend: str) -> bool:
    """Whether rows of `backend` are what mixcc is compared against (all but fused)."""
    return backend not in FUSED


@dataclass
class Row:
    program: str
    backend: str
    mode: str  # oop (out-of-place) | ip (in place)
    timing: str  # graph (CUDA graph + events) | host (issue time of an eager call) | cpu
    dtype: str
    world: int
    mesh: str  # e.g. dp=2,tp=4
    ranks_per_node: int
    rows: int
    hidden: int
    bytes: int  # input bytes per rank
    bus_bytes: float  # bytes moved per rank: input bytes x the nccl-tests bus factor
    time_us: float  # median over repeats of the max over ranks
    min_us: float  # fastest repeat (max over ranks)
    max_us: float  # slowest repeat (max over ranks)
    algbw_gbs: float
    busbw_gbs: float  # effective bandwidth: bus_bytes / time
    errors: int  # mismatches of the result against the reference backend (-1: not checked)
    ratio: float = math.nan  # time / the best baseline's time (add_ratios)
    best: str = ""  # the best baseline's backend
    iters: int = 0
    repeats: int = 0
    device: str = ""  # torch.cuda.get_device_name() or "CPU"
    setup: str = ""  # e.g. "one GPU, MPS", "one GPU per rank", "CPU"


def bus_factor(program: str, mesh: Mesh) -> float:
    """Bus bytes per input byte of one rank, summed over the program's statements."""
    ir = build(parse(program), mesh)
    frac, bus = 1.0, 0.0
    for op in ir.ops:
        n = mesh.group_size(op.axes)
        if op.coll == "allreduce":
            bus += 2 * (n - 1) / n * frac
        elif op.coll == "allgather":
            bus += (n - 1) * frac
            frac *= n
        else:
            bus += (n - 1) / n * frac
            frac /= n
    return bus


def default_mesh(world: int, ranks_per_node: int | None = None) -> Mesh:
    dp = 2 if world % 2 == 0 and world > 1 else 1
    return Mesh({"dp": dp, "tp": world // dp}, ranks_per_node=ranks_per_node)


def mesh_spec(mesh: Mesh) -> str:
    """The CLI form of `mesh`'s axes, e.g. dp=2,tp=4."""
    return ",".join(f"{n}={s}" for n, s in zip(mesh.names, mesh.sizes, strict=True))


def gpu_count() -> int:
    """Visible CUDA devices, counted through NVML where torch can, so that the launching
    process does not initialise CUDA (it may have to start MPS for its ranks first)."""
    return torch.cuda.device_count()


def fused_refusal(dtype: torch.dtype) -> str | None:
    """Why the fused backend cannot run on this machine for `dtype`, checked without a
    process group (whether it applies to a program is fused.check_applicable's call)."""
    from .codegen.build import find_nvcc
    from .codegen.render import CTYPES

    if gpu_count() == 0:
        return "it needs a CUDA GPU and torch.cuda.is_available() is False"
    if dtype not in CTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in CTYPES)
        return f"it supports dtypes {names}, not {str(dtype).removeprefix('torch.')}"
    if find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def setup_label(nccl: bool, gpus: int, mps: bool) -> str:
    """How ranks map to devices, for tables and plot titles."""
    if gpus == 0:
        return "CPU"
    if nccl:
        return "one GPU per rank"
    where = "one GPU" if gpus == 1 else f"{gpus} GPUs shared"
    return f"{where}, {'MPS' if mps else 'no MPS'}"


class Progress:
    """`[i/n] label` on stderr: one line updated in place on a terminal, else one line
    per step (logs; filter them with grep -v '^\\[')."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.shown = False

    def update(self, i: int, label: str) -> None:
        text = f"[{i}/{self.total}] {label}"
        if self.tty:  # cut to the width: a wrapped line could not be redrawn in place
            try:
                cols = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                cols = 0
            width = (cols or 80) - 1  # 0: a terminal that does not tell its size
            self.stream.write(f"\r\033[K{text[:width]}")
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the in-place line (before printing a result line)."""
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def capture_graphs(fn, iters: int) -> tuple[object, object]:
    """(graph, lead): CUDA graphs of `iters` calls of fn and of one call (sharing a memory
    pool), captured on a side stream after three warm-up calls and replayed once each."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph, lead = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(iters):
                fn()
        with torch.cuda.graph(lead, pool=graph.pool(), stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    lead.replay()
    torch.cuda.synchronize()
    return graph, lead


def time_replay(graph, lead, iters: int) -> float:
    """Seconds per call of one replay of `graph` (of `iters` calls), after a barrier and a
    replay of the one-call graph `lead`, so that the ranks leave the barrier's skew behind
    them (a collective returns only once every peer has entered it)."""
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    lead.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def repeat_times(fn, iters: int, repeats: int, mode: str, trace: str | None = None
                 ) -> list[float]:
    """Seconds per call of each of `repeats` runs of `iters` calls, after a warm-up.

    mode "graph": CUDA graph of `iters` calls timed with events (one rank per GPU, or
    ranks sharing a GPU under MPS), each replay as time_replay times it; "host": host time
    to issue one eager call, without waiting for the GPU (ranks sharing a GPU without MPS:
    their device times are not meaningful); "cpu": host clock. Every repeat starts after
    a barrier. `trace` (mode "graph"): then one more replay is recorded there
    (mixcc/trace.py).
    """
    if mode == "graph":
        graph, lead = capture_graphs(fn, iters)
        times = [time_replay(graph, lead, iters) for _ in range(repeats)]
        torch.cuda.synchronize()
        if trace is not None:
            dist.barrier()  # the one-call graph inside the recording takes up the ranks' skew
            tracing.record(lambda: (lead.replay(), graph.replay()), trace)  # (profiler too)
            tracing.write_summary(trace, iters, lead=1)
        return times
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if mode != "cpu":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    if mode != "cpu":
        torch.cuda.synchronize()
    return times


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def _sum_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def separate_oracle(program: str, mesh: Mesh, dtype: torch.dtype
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exact result of `program` run as separate calls (the `separate` baseline): each
    statement in float64 on the reference backend, its result rounded to `dtype` before
    the next, as the intermediate tensors between the calls are. A fused program rounds
    once, at the end; a chain of calls rounds after each, and a sum of rounded partial
    sums can leave `count_wrong`'s one rounding of the exact result (at world 8,
    reducescatter(dp) then allreduce(tp) did, in 2e-5 of the elements). Collective
    (it compiles): call it in the same order on every rank. Returns fn(x) -> float64."""
    colls = [mixcc_compile(str(s), mesh, dtype=torch.float64, backend="reference")
             for s in parse(program).stmts]

    def run(x: torch.Tensor) -> torch.Tensor:
        y = x.double()
        for i, c in enumerate(colls):
            y = c(y)
            if i + 1 < len(colls):
                y = y.to(dtype).double()
        return y

    return run


def count_wrong(got: torch.Tensor, expect: torch.Tensor) -> int:
    """Elements of `got` outside the rounding of its dtype around `expect` (the exact,
    float64 result in `mixcc bench`); a NaN counts unless the exact result is NaN there."""
    g, e = got.double().cpu(), expect.double().cpu()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(got.dtype, 2e-2)
    close = (g - e).abs() <= tol * (1 + e.abs())  # False wherever either side is NaN
    same = (g == e) | (g.isnan() & e.isnan())  # equal infinities, NaN where NaN is exact
    return int((~(close | same)).sum())


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from `4096`, `16K`, `64M`, `1G` (binary units; `KiB`, `MB` spellings too)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a byte count such as 4096, 16K, 64M or 1G")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def sizes(min_rows: int, max_rows: int, granularity: int) -> list[int]:
    out, r = [], max(min_rows, 1)
    while r <= max_rows:
        rr = -(-r // granularity) * granularity
        if rr not in out:
            out.append(rr)
        r *= 2
    return out


def sizes_from_bytes(min_bytes: int, max_bytes: int, row_bytes: int, granularity: int
                     ) -> list[int]:
    """Row counts for input sizes doubling from `min_bytes` to `max_bytes` per rank: the
    nearest multiple of `granularity` rows (at least one), so sizes are exact when
    `row_bytes` x granularity divides them; a row's `bytes` says what ran."""
    out, b = [], max(min_bytes, 1)
    while b <= max_bytes:
        r = max(granularity, round(b / row_bytes / granularity) * granularity)
        if r not in out:
            out.append(r)
        b *= 2
    return out


def _key(r: Row) -> tuple:
    return (r.program, r.world, r.mesh, r.ranks_per_node, r.dtype, r.bytes, r.timing)


def add_ratios(rows: list[Row]) -> list[Row]:
    """Set each row's `ratio` (time / best baseline time) and `best` (its backend).

    The best baseline of a row is the fastest row of a baseline backend (anything but
    the fused variants and peer_copy, a bound: symm_*, separate, nccl1, reference) with
    the same program, world, mesh, dtype, input bytes and timing kind, and no wrong
    elements. Baselines
    get their own ratio (1 for the best). No ratio (nan) for host issue times, nor where
    no baseline ran. Returns `rows`, changed in place.
    """
    best: dict[tuple, Row] = {}
    for r in rows:
        if (is_baseline(r.backend) and r.backend not in baselines.LINK
                and r.timing != "host" and r.errors <= 0
                and math.isfinite(r.time_us) and r.time_us > 0):
            b = best.get(_key(r))
            if b is None or r.time_us < b.time_us:
                best[_key(r)] = r
    for r in rows:
        b = best.get(_key(r)) if r.timing != "host" else None
        r.ratio = r.time_us / b.time_us if b is not None else math.nan
        r.best = b.backend if b is not None else ""
    return rows


def _entries(cfg: dict, mesh: Mesh, dtype: torch.dtype, refs: dict, skipped: list[str],
             absent: dict[str, str] | None = None
             ) -> dict[str, list[tuple[str, object, list[str]]]]:
    """Per program: (backend, compiled collective / shape-free baseline fn / None, modes).
    Compiling is collective: every rank walks the same pairs in the same order. A
    MACHINE_BOUND baseline that cannot be set up lands in `absent` (n/a)."""
    out: dict[str, list[tuple[str, object, list[str]]]] = {}
    # the :registered rows run in a group of their own (the same ranks): a group with a
    # registered pool runs the registered-input protocol on its large one-shot calls, and
    # the other backends' rows must not pay for it
    reg_group = None
    for prog, be in cfg["pairs"]:
        ref = refs.get(prog)
        if ref is None:
            ref = refs[prog] = mixcc_compile(prog, mesh, dtype=dtype, backend="reference")
        modes = ["oop", "ip"] if ref.ir.row_factor == 1 else ["oop"]
        obj: object = None
        if be in baselines.BASELINES:
            try:  # probe with a one-row shape: Unavailable does not depend on the shape
                fn = baselines.make(be, prog, mesh, torch.Size((ref.ir.granularity, 8)), dtype,
                                    bus_factor=bus_factor(prog, mesh))
            except baselines.Unavailable as e:
                if be in MACHINE_BOUND and absent is not None:
                    absent.setdefault(be, str(e))
                else:
                    skipped.append(f"{be} cannot run {prog!r}: {e}")
                continue
            obj, modes = (fn if be in baselines.SHAPE_FREE else None), ["oop"]
            if obj is None:
                _close(fn)  # the probe's buffers: each size makes its own
        elif be == "reference":
            obj = ref
        else:
            if be.endswith(":registered") and reg_group is None:
                reg_group = dist.new_group(list(range(dist.get_world_size())))
            try:  # the same verdict on every rank: it depends on the program and machine
                obj = mixcc_compile(prog, mesh, dtype=dtype,
                                    backend="auto" if be.startswith("auto") else "fused",
                                    algorithm=FUSED[be],
                                    group=reg_group if be.endswith(":registered") else None,
                                    batch_invariant=be.endswith(":invariant"),
                                    **cfg.get("fused_options", {}))
            except ValueError as e:
                skipped.append(f"{be}: {e}")
                continue
        out.setdefault(prog, []).append((be, obj, modes))
    return out


def run(rank: int, world: int, cfg: dict) -> list[Row]:
    """Body run on every rank; rank 0 prints and returns the rows (with ratios).

    `cfg` is checked by the CLI before any process starts: mesh_axes, ranks_per_node,
    pairs [(program text, backend)], dtype, hidden, min_rows, max_rows (or min_bytes,
    max_bytes), iters, repeats, mps (ranks sharing a GPU run under MPS), trace,
    row_timeout_s (None: ROW_TIMEOUT_S).
    """
    mesh = Mesh(cfg["mesh_axes"], ranks_per_node=cfg["ranks_per_node"])
    dtype = DTYPES[cfg["dtype"]]
    dtype_name = str(dtype).removeprefix("torch.")
    pg = str(dist.get_backend())
    has_cuda = torch.cuda.is_available()
    cuda = has_cuda and "nccl" in pg
    gpu_shared = has_cuda and not cuda  # several ranks share GPUs (gloo)
    mps = gpu_shared and bool(cfg.get("mps"))
    row_limit = ROW_TIMEOUT_S if cfg.get("row_timeout_s") is None else cfg["row_timeout_s"]
    if gpu_shared:  # torch symmetric memory refuses peers on one device without it
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    device_times = cuda or mps  # CUDA-graph device times mean something
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", torch.cuda.current_device()) if has_cuda else cpu
    group_device = gpu if cuda else cpu  # where the group's own collectives run
    device_name = torch.cuda.get_device_name() if has_cuda else "CPU"
    setup = setup_label(cuda, torch.cuda.device_count() if has_cuda else 0, mps)

    def device_for(backend: str) -> torch.device:
        return gpu if cuda or backend in GPU_ONLY else cpu

    skipped: list[str] = []
    absent: dict[str, str] = cfg.setdefault("absent", {})  # the launcher's, then the ranks'
    refs: dict[str, object] = {}
    entries = _entries(cfg, mesh, dtype, refs, skipped, absent)
    exact = {prog: mixcc_compile(prog, mesh, dtype=torch.float64, backend="reference")
             for prog in entries}  # compile is collective: the same order on every rank
    stepwise = {prog: separate_oracle(prog, mesh, dtype) for prog, es in entries.items()
                if any(be == "separate" for be, _, _ in es)}
    hidden = cfg["hidden"]
    elem = torch.empty((), dtype=dtype).element_size()
    size_lists = {}
    for prog in entries:
        g = refs[prog].ir.granularity
        if cfg.get("min_bytes") is not None:
            size_lists[prog] = sizes_from_bytes(cfg["min_bytes"], cfg["max_bytes"],
                                                hidden * elem, g)
        else:
            size_lists[prog] = sizes(cfg["min_rows"], cfg["max_rows"], g)
    total = sum(len(size_lists[p]) * sum(len(m) for _, _, m in es) for p, es in entries.items())
    if not total:
        raise ValueError("nothing to run: " + "; ".join(
            skipped + [absent_line(be, why) for be, why in absent.items()]))
    if rank == 0:
        for line in skipped:
            print(f"skip: {line}", file=sys.stderr)
        if gpu_shared and not mps:
            print("note: several ranks share one GPU without MPS, so their device times are "
                  "not meaningful; GPU rows report the host time to issue one eager call, "
                  "reference rows the gloo time on CPU tensors.", file=sys.stderr)
        if cfg.get("trace") and not device_times:
            print("note: --trace records CUDA-graph rows only; none here", file=sys.stderr)
        if mps:
            print("note: ranks share the GPU under MPS: GPU rows are device times of CUDA "
                  "graphs; reference and nccl1 rows time gloo on CPU tensors (timing cpu) "
                  "and are not compared with them.", file=sys.stderr)
        backends = ",".join(dict.fromkeys(be for es in entries.values() for be, _, _ in es))
        where = f"{device_name}, {setup}" if has_cuda else setup
        print(preamble(mesh, world, pg, dtype_name, backends, cfg, where), flush=True)
        for be, why in absent.items():
            print("# " + absent_line(be, why), flush=True)
        print(header(), flush=True)
    progress = Progress(total)
    rows_out: list[Row] = []
    step = 0
    for p_index, (prog, es) in enumerate(entries.items()):
        ref = refs[prog]
        factor = bus_factor(prog, mesh)
        for nrows in size_lists[prog]:
            # one input per (program, size, rank), shared by every backend's rows
            gen = torch.Generator(device="cpu").manual_seed(
                1234 + rank + 1009 * p_index + 7919 * nrows)
            x_host = torch.randn((nrows, hidden), generator=gen).to(dtype)
            inputs: dict[torch.device, torch.Tensor] = {}

            def on(dev: torch.device, x_host=x_host, inputs=inputs) -> torch.Tensor:
                if dev not in inputs:
                    inputs[dev] = x_host.to(dev)
                return inputs[dev]

            expect: torch.Tensor | None = None
            expect_separate: torch.Tensor | None = None
            group_rows: list[Row] = []
            for be, obj, modes in es:
                device = device_for(be)
                x = on(device)
                fn = obj
                if be in baselines.BASELINES and fn is None:
                    try:  # the same verdict on every rank (e.g. out of memory for a size)
                        fn = baselines.make(be, prog, mesh, x.shape, dtype,
                                            bus_factor=factor)
                    except baselines.Unavailable as e:
                        step += len(modes)
                        if rank == 0:
                            progress.clear()
                            print(f"skip: {be} at {nrows} rows: {e}", file=sys.stderr)
                        continue
                for mode in modes:
                    step += 1
                    if rank == 0:
                        progress.update(step, f"{prog} | {be} | {mode} | rows {nrows}")
                    if be != "reference" and expect is None:  # collective, on every rank
                        # the exact result: the reference backend in float64, so that
                        # #wrong counts a backend's own errors, not the reference's roundings
                        expect = exact[prog](on(device_for("reference")).double())
                    want = expect
                    if be == "separate":  # rounded to the dtype between its calls
                        if expect_separate is None:
                            expect_separate = stepwise[prog](on(device_for("reference")))
                        want = expect_separate
                    timing = ("graph" if device_times else "host") \
                        if device.type == "cuda" else "cpu"
                    nbytes = x.numel() * x.element_size()
                    trace = None if not cfg.get("trace") or timing != "graph" else \
                        os.path.join(cfg["trace"],
                                     tracing.slug(prog, mesh_spec(mesh), be, mode, nbytes,
                                                  f"w{world}", f"r{rank}") + ".json")
                    label = f"{prog} | {be} | {mode} | rows {nrows} | world {world}"
                    with row_watchdog(row_limit, label, rank):
                        t_med, t_min, t_max, errors = _measure(be, fn, mode, x, ref, want,
                                                               timing, cfg, group_device,
                                                               trace)
                    t_bw = math.nan if timing == "host" else t_med  # issue time: no bandwidth
                    group_rows.append(Row(
                        prog, be, mode, timing, dtype_name, world, mesh_spec(mesh),
                        mesh.ranks_per_node, nrows, hidden, nbytes, nbytes * factor,
                        t_med * 1e6, t_min * 1e6, t_max * 1e6, nbytes / t_bw / 1e9,
                        nbytes * factor / t_bw / 1e9, errors, iters=cfg["iters"],
                        repeats=cfg["repeats"], device=device_name, setup=setup))
                if be in baselines.BASELINES and obj is None:
                    _close(fn)  # a shape's symmetric buffer goes before the next is made
                    del fn
            add_ratios(group_rows)
            rows_out += group_rows
            if rank == 0:
                progress.clear()
                for r in group_rows:
                    print(format_row(r), flush=True)
    if rank == 0:
        progress.clear()
    return rows_out


def _close(fn: object) -> None:
    """Release a baseline's registered buffers (collective: the same point on every rank)."""
    close = getattr(fn, "close", None)
    if close is not None:
        close()


# A row running this long is taken for hung (a kernel that never ends cannot be stopped from
# Python): the rank names it and leaves. The slowest row measured took well under a minute
# (world 8 under MPS, 64 MiB: docs/perf/h200-1gpu-mps/).
ROW_TIMEOUT_S = 300.0


@contextlib.contextmanager
def row_watchdog(seconds: float, label: str, rank: int, exit=None):
    """Inside it: if the block has not finished after `seconds` (0: never), print which
    row hung and end this process with exit(3) (os._exit by default: the main thread may
    sit in a CUDA call that never returns, so nothing less ends the process)."""
    if seconds <= 0:
        yield
        return

    def fire() -> None:
        print(f"error: mixcc bench: rank {rank}: the row '{label}' has run for {seconds:.0f} s "
              "and is taken for hung (a kernel that never ends, e.g. a baseline whose blocks "
              "do not all fit on a shared GPU); leaving. --row-timeout sets the limit",
              file=sys.stderr, flush=True)
        (exit or os._exit)(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _measure(be: str, fn, mode: str, x: torch.Tensor, ref, expect: torch.Tensor | None,
             timing: str, cfg: dict, group_device: torch.device, trace: str | None = None
             ) -> tuple[float, float, float, int]:
    """(median, min, max) seconds per call over repeats, each the max over ranks, and the
    wrong elements summed over ranks (-1 for the reference itself); `trace`: see
    repeat_times."""
    baseline = be in baselines.BASELINES
    coll = ref if be == "reference" else fn
    if be.endswith(":registered"):  # the same data, inside its group's registered pool
        from .buffers import empty

        x = empty(x.shape, x.dtype, group=fn.group).copy_(x)
    xin = x.clone() if mode == "ip" else x  # in place overwrites: never the shared input
    out = xin if mode == "ip" else torch.empty(ref.output_shape(x.shape), dtype=x.dtype,
                                                device=x.device)
    load = getattr(fn, "load", None) if baseline else None
    errors = -1
    if be != "reference" and be not in baselines.LINK:
        assert expect is not None
        if load is not None:
            load(x)
        if baseline:
            got = fn(x, torch.empty_like(out))
        elif mode == "ip":
            got = x.clone()
            coll(got, out=got)
        else:
            got = coll(x)
        errors = _sum_over_ranks(count_wrong(got, expect), group_device)
        if load is not None:
            load(x)

    def call(fn=fn, coll=coll, xin=xin, out=out):
        return fn(xin, out) if baseline else coll(xin, out=out)

    times = _max_over_ranks(repeat_times(call, cfg["iters"], cfg["repeats"], timing, trace),
                            group_device)
    return statistics.median(times), min(times), max(times), errors


def preamble(mesh: Mesh, world: int, pg: str, dtype: str, backends: str, cfg: dict,
             where: str = "") -> str:
    """The '#' lines above the table: what was measured, and how."""
    return (f"# mixcc bench: mesh {mesh_spec(mesh)} (ranks_per_node {mesh.ranks_per_node}), "
            f"world {world}, process group {pg}{'; ' + where if where else ''}\n"
            f"# dtype {dtype}, hidden {cfg['hidden']}, backends {backends}; time: median of "
            f"{cfg['repeats']} repeats of {cfg['iters']} calls (min, max: fastest and slowest "
            f"repeat), each the max over ranks; moved: bus bytes per rank; ratio: time / the "
            f"best baseline's" + _options_line(cfg.get("fused_options")))


def _options_line(opts: dict | None) -> str:
    """The compile options every fused row ran with, when not compile's defaults."""
    if not opts:
        return ""
    return "\n# fused options: " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))


def header() -> str:
    return (f"{'program':<34} {'backend':<20} {'mode':<4} {'timing':<6} {'rows':>6} "
            f"{'size(B)':>10} {'moved(B)':>10} {'time(us)':>10} {'min(us)':>10} "
            f"{'max(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'ratio':>6} "
            f"{'best':<20} {'#wrong':>6}")


def format_row(r: Row) -> str:
    ratio = f"{r.ratio:>6.2f}" if math.isfinite(r.ratio) else f"{'-':>6}"
    return (f"{r.program:<34} {r.backend:<20} {r.mode:<4} {r.timing:<6} {r.rows:>6} "
            f"{r.bytes:>10} {r.bus_bytes:>10.0f} {r.time_us:>10.2f} {r.min_us:>10.2f} "
            f"{r.max_us:>10.2f} {r.algbw_gbs:>11.3f} {r.busbw_gbs:>11.3f} {ratio} "
            f"{r.best or '-':<20} {r.errors if r.errors >= 0 else 'n/a':>6}")


def pivot(rows: list[Row], mode: str = "oop", absent: dict[str, str] | None = None) -> str:
    """A compact table of `mode` rows: one line per (program, world, mesh, size), time in
    us per backend, and, where the reference backend ran (NCCL on GPUs), each other
    backend's time over its. `absent`: baselines this machine lacks, a column of n/a and
    a line with the reason each. The last thing `mixcc bench` prints."""
    keys: dict[tuple, dict[str, Row]] = {}
    backends: list[str] = []
    absent = {be: why for be, why in (absent or {}).items()
              if not any(r.backend == be for r in rows)}
    for r in rows:
        if r.mode != mode:
            continue
        keys.setdefault((r.program, r.world, r.mesh, r.ranks_per_node, r.bytes), {})[
            r.backend] = r
        if r.backend not in backends:
            backends.append(r.backend)
    if not keys:
        return ""
    backends += list(absent)
    lines = [f"# {mode} time (us) per backend; /ref: time / the reference backend's"]
    lines += ["# " + absent_line(be, why) for be, why in absent.items()]
    head = f"{'program':<28} {'mesh':<10} {'bytes':>10} " + " ".join(
        f"{b[:14]:>14}" for b in backends)
    if "reference" in backends:
        head += "  " + " ".join(f"{('/ref ' + b)[:14]:>14}" for b in backends
                                if b != "reference")
    lines.append(head)
    for (prog, world, mesh, rpn, nbytes), by in keys.items():
        cells = [f"{by[b].time_us:>14.2f}" if b in by else
                 f"{'n/a' if b in absent else '-':>14}" for b in backends]
        nodes = f"/{rpn}" if rpn < world else ""  # simulated nodes of rpn ranks
        line = f"{prog[:28]:<28} {mesh + nodes:<10} {nbytes:>10} "
        line += " ".join(cells)
        ref = by.get("reference")
        if ref is not None and "reference" in backends:
            line += "  " + " ".join(
                f"{by[b].time_us / ref.time_us:>14.2f}" if b in by else
                f"{'n/a' if b in absent else '-':>14}"
                for b in backends if b != "reference")
        lines.append(line)
    return "\n".join(lines)


def plot_available() -> bool:
    """Whether the PNGs can be drawn (matplotlib: the `mixcc[plot]` extra)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _finite(v: object) -> object:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def dump_rows(rows: list[Row], path: str) -> None:
    """Rows as a JSON list of objects (nan and inf as null)."""
    with open(path, "w") as f:
        json.dump([{k: _finite(v) for k, v in asdict(r).items()} for r in rows], f, indent=1)


def read_rows(path: str) -> list[Row]:
    """The rows of a JSON file written by dump_rows / write_outputs (null back to nan)."""
    floats = {f.name for f in fields(Row) if f.type in ("float", float)}
    with open(path) as f:
        data = json.load(f)
    return [Row(**{k: (math.nan if v is None and k in floats else v) for k, v in d.items()})
            for d in data]


def read_log(path: str) -> list[Row]:
    """Rebuild the rows of a bench log (the printed tables with their '#' preambles), e.g.
    of a run cut short before it wrote its files. Ratios are left to add_ratios."""
    import re

    head = re.compile(r"# mixcc bench: mesh (\S+) \(ranks_per_node (\d+)\), world (\d+), "
                      r"process group \S+?(?:; (.*?), (one GPU.*|one GPU per rank|CPU))?$")
    times = re.compile(r"# dtype (\S+), hidden (\d+), .*median of (\d+) repeats of (\d+) calls")
    ctx: dict = {}
    rows = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if m := head.match(line):
                ctx.update(mesh=m[1], ranks_per_node=int(m[2]), world=int(m[3]),
                           device=m[4] or "", setup=m[5] or "")
            elif m := times.match(line):
                ctx.update(dtype=m[1], hidden=int(m[2]), repeats=int(m[3]), iters=int(m[4]))
            elif ctx.get("dtype") and len(line) > 35 and not line.startswith(("#", "program")):
                f_ = line[35:].split()
                if len(f_) != 14 or f_[2] not in ("graph", "host", "cpu"):
                    continue
                rows.append(Row(
                    line[:34].strip(), f_[0], f_[1], f_[2], ctx["dtype"], ctx["world"],
                    ctx["mesh"], ctx["ranks_per_node"], int(f_[3]), ctx["hidden"], int(f_[4]),
                    float(f_[5]), float(f_[6]), float(f_[7]), float(f_[8]), float(f_[9]),
                    float(f_[10]), -1 if f_[13] == "n/a" else int(f_[13]),
                    iters=ctx["iters"], repeats=ctx["repeats"], device=ctx["device"],
                    setup=ctx["setup"]))
    return rows


def plot_groups(rows: list[Row]) -> dict[tuple[str, int], list[Row]]:
    """Rows by (program, world): one PNG each."""
    out: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        out.setdefault((r.program, r.world), []).append(r)
    return out


def png_path(prefix: str, program: str, world: int) -> str:
    """PREFIX_<preset name or program>_w<world>.png."""
    name = next((n for n, p in presets.PRESETS.items() if p == program), program)
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_w{world}.png"


def plot_title(rows: list[Row]) -> str:
    """What a plot shows: program, device, world and mesh, dtype and setup."""
    r = rows[0]
    return (f"mixcc bench: {r.program}\n{r.device or 'unknown device'}, world {r.world} "
            f"(mesh {r.mesh}), {r.dtype}, {r.setup or 'unknown setup'}")


def write_outputs(rows: list[Row], prefix: str) -> list[str]:
    """Write PREFIX.csv, PREFIX.json and (with matplotlib) one PNG per (program, world)."""
    written = []
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    written.append(prefix + ".csv")
    dump_rows(rows, prefix + ".json")
    written.append(prefix + ".json")
    if not plot_available():
        return written
    for (program, world), rs in plot_groups(rows).items():
        path = png_path(prefix, program, world)
        _plot(rs, path)
        written.append(path)
    return written


def _human(nbytes: float) -> str:
    """16K, 64M: binary units for axis ticks."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g}{unit}"
    return f"{nbytes:g}"


def _plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.FuncFormatter below

    fig, (ax, axr) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(f"{r.backend} | {r.mode} | {r.timing}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r.bytes)
        xs = [r.bytes for r in rs]
        style = "-" if not is_baseline(rs[0].backend) else "--"
        (line,) = ax.plot(xs, [r.time_us for r in rs], style, marker="o", ms=3, label=label)
        ax.fill_between(xs, [r.min_us for r in rs], [r.max_us for r in rs],
                        color=line.get_color(), alpha=0.2, linewidth=0)
        if any(math.isfinite(r.ratio) for r in rs):
            axr.plot(xs, [r.ratio for r in rs], style, marker="o", ms=3,
                     color=line.get_color(), label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _human(v)))
    ax.set_yscale("log")
    ax.set_ylabel("time per call (us): median, band min-max over repeats")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6)
    axr.axhline(1.0, color="gray", linewidth=0.8)
    axr.grid(True, alpha=0.3)
    axr.set_xlabel("input bytes per rank")
    axr.set_ylabel("time / best baseline (< 1: faster)")
    ax.set_title(plot_title(rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
