"""`mixcc bench`: sweep sizes for programs and backends, nccl-tests style.

Times: CUDA graphs of several calls on GPUs (host timer on CPU), warm-up first,
median over repeats, then the max over ranks. algbw = input bytes per rank / time;
busbw = bus bytes / time with the nccl-tests formulas applied per statement
(allreduce 2(n-1)/n S, allgather (n-1) S, reducescatter (n-1)/n S).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

import torch
import torch.distributed as dist

from . import baselines
from .api import compile as mixcc_compile
from .ir.build import build
from .ir.parser import parse
from .mesh import Mesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
BACKENDS = ("fused", "reference", *baselines.BASELINES)  # what --backend accepts


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
    time_us: float
    algbw_gbs: float
    busbw_gbs: float
    errors: int  # mismatches of the result against the reference backend (-1: not checked)


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


def fused_refusal(dtype: torch.dtype) -> str | None:
    """Why the fused backend cannot run on this machine for `dtype`, checked without a
    process group (whether it applies to a program is fused.check_applicable's call)."""
    from .codegen.build import find_nvcc
    from .codegen.render import CTYPES

    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and torch.cuda.is_available() is False"
    if dtype not in CTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in CTYPES)
        return f"it supports dtypes {names}, not {str(dtype).removeprefix('torch.')}"
    if find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


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


def _time_calls(fn, iters: int, repeats: int, mode: str) -> float:
    """Median seconds per call over `repeats` runs of `iters` calls (see repeat_times)."""
    return statistics.median(repeat_times(fn, iters, repeats, mode))


def repeat_times(fn, iters: int, repeats: int, mode: str) -> list[float]:
    """Seconds per call of each of `repeats` runs of `iters` calls, after a warm-up.

    mode "graph": CUDA graph of `iters` calls timed with events (one rank per GPU);
    "host": host time to issue one eager call, without waiting for the GPU (ranks
    sharing a GPU: their device times are not meaningful); "cpu": host clock.
    """
    for _ in range(3):
        fn()
    if mode == "graph":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(iters):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if mode != "cpu":
            torch.cuda.synchronize()
        dist.barrier()
        if mode == "graph":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
            continue
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    if mode != "cpu":
        torch.cuda.synchronize()
    return times


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sum_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def count_wrong(got: torch.Tensor, expect: torch.Tensor) -> int:
    """Elements outside rounding of each other (backends round 16-bit sums differently)."""
    g, e = got.double().cpu(), expect.double().cpu()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(got.dtype, 2e-2)
    return int(((g - e).abs() > tol * (1 + e.abs())).sum())


def sizes(min_rows: int, max_rows: int, granularity: int) -> list[int]:
    out, r = [], max(min_rows, 1)
    while r <= max_rows:
        rr = -(-r // granularity) * granularity
        if rr not in out:
            out.append(rr)
        r *= 2
    return out


def run(rank: int, world: int, cfg: dict) -> list[Row]:
    """Body run on every rank; rank 0 prints and returns the rows.

    `cfg` is checked by the CLI before any process starts: mesh_axes, ranks_per_node,
    pairs [(program text, backend)], dtype, hidden, min_rows, max_rows, iters, repeats.
    """
    mesh = Mesh(cfg["mesh_axes"], ranks_per_node=cfg["ranks_per_node"])
    dtype = DTYPES[cfg["dtype"]]
    dtype_name = str(dtype).removeprefix("torch.")
    pg = str(dist.get_backend())
    cuda = torch.cuda.is_available() and "nccl" in pg
    gpu_shared = torch.cuda.is_available() and not cuda  # several ranks share GPUs (gloo)
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else cpu

    group_device = gpu if cuda else cpu  # where the group's own collectives run

    def device_for(backend: str) -> torch.device:
        return gpu if cuda or backend == "fused" else cpu

    rows_out: list[Row] = []
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    plan = []
    skipped = []
    refs: dict[str, object] = {}
    for prog, be in cfg["pairs"]:
        ref = refs.get(prog)
        if ref is None:  # compile is collective: every rank walks the same pairs
            ref = refs[prog] = mixcc_compile(prog, mesh, dtype=dtype, backend="reference")
        if be in baselines.BASELINES:
            try:  # probe once with a one-row shape: Unavailable is shape-independent
                baselines.make(be, prog, mesh, torch.Size((ref.ir.granularity, 8)), dtype)
            except baselines.Unavailable as e:
                skipped.append(f"{be} cannot run {prog!r}: {e}")
                continue
            coll, modes = None, ["oop"]
        elif be == "reference":
            coll, modes = ref, ["oop", "ip"] if ref.ir.row_factor == 1 else ["oop"]
        else:
            try:  # the same verdict on every rank: it depends on the program and machine
                coll = mixcc_compile(prog, mesh, dtype=dtype, backend=be)
            except ValueError as e:
                skipped.append(str(e))
                continue
            modes = ["oop", "ip"] if coll.ir.row_factor == 1 else ["oop"]
        for rows in sizes(cfg["min_rows"], cfg["max_rows"], ref.ir.granularity):
            for mode in modes:
                plan.append((prog, be, coll, ref, rows, mode))
    if not plan:
        raise ValueError("nothing to run: " + "; ".join(skipped))
    if rank == 0:
        for line in skipped:
            print(f"skip: {line}", file=sys.stderr)
        if gpu_shared:
            print("note: several ranks share one GPU, so their device times are not "
                  "meaningful; fused rows report the host time to issue one eager call, "
                  "reference rows the gloo time on CPU tensors.", file=sys.stderr)
        backends = ",".join(dict.fromkeys(item[1] for item in plan))
        print(preamble(mesh, world, pg, dtype_name, backends, cfg), flush=True)
        print(header(), flush=True)
    progress = Progress(len(plan))
    for i, (prog, be, coll, ref, rows, mode) in enumerate(plan):
        if rank == 0:
            progress.update(i + 1, f"{prog} | {be} | {mode} | rows {rows}")
        hidden = cfg["hidden"]
        device = device_for(be)
        x = torch.randn((rows, hidden), generator=gen).to(device=device, dtype=dtype)
        out = x if mode == "ip" else torch.empty(ref.output_shape(x.shape), dtype=dtype,
                                                  device=device)
        if coll is None:
            fn = baselines.make(be, prog, mesh, x.shape, dtype)
        else:
            fn = functools.partial(coll.__call__, x, out=out)

        def call(fn=fn, x=x, out=out, baseline=coll is None):
            return fn(x, out) if baseline else fn()

        errors = -1
        if be != "reference":
            expect = ref(x.to(device_for("reference")))
            got = fn(x, torch.empty_like(out)) if coll is None \
                else coll(x.clone() if mode == "ip" else x)
            errors = _sum_over_ranks(count_wrong(got, expect), group_device)
        timing = "graph" if cuda else ("host" if device.type == "cuda" else "cpu")
        t = _time_calls(call, cfg["iters"], cfg["repeats"], timing)
        t = _max_over_ranks(t, group_device)
        nbytes = x.numel() * x.element_size()
        if timing == "host":  # an issue time says nothing about bandwidth
            t_bw = float("nan")
        else:
            t_bw = t
        row = Row(prog, be, mode, timing, dtype_name, world, mesh_spec(mesh),
                  mesh.ranks_per_node, rows, hidden, nbytes, t * 1e6, nbytes / t_bw / 1e9,
                  nbytes * bus_factor(prog, mesh) / t_bw / 1e9, errors)
        rows_out.append(row)
        if rank == 0:
            progress.clear()
            print(format_row(row), flush=True)
    if rank == 0:
        progress.clear()
    return rows_out


def preamble(mesh: Mesh, world: int, pg: str, dtype: str, backends: str, cfg: dict) -> str:
    """The '#' lines above the table: what was measured, and how."""
    return (f"# mixcc bench: mesh {mesh_spec(mesh)} (ranks_per_node {mesh.ranks_per_node}), "
            f"world {world}, process group {pg}\n"
            f"# dtype {dtype}, hidden {cfg['hidden']}, backends {backends}; time: median of "
            f"{cfg['repeats']} repeats of {cfg['iters']} calls, max over ranks")


def header() -> str:
    return (f"{'program':<34} {'backend':<10} {'mode':<4} {'timing':<6} {'dtype':<8} "
            f"{'rows':>6} {'size(B)':>10} {'time(us)':>10} {'algbw(GB/s)':>11} "
            f"{'busbw(GB/s)':>11} {'#wrong':>6}")


def format_row(r: Row) -> str:
    return (f"{r.program:<34} {r.backend:<10} {r.mode:<4} {r.timing:<6} {r.dtype:<8} "
            f"{r.rows:>6} {r.bytes:>10} {r.time_us:>10.2f} {r.algbw_gbs:>11.3f} "
            f"{r.busbw_gbs:>11.3f} {r.errors if r.errors >= 0 else 'n/a':>6}")


def plot_available() -> bool:
    """Whether PREFIX.png can be drawn (matplotlib: the `mixcc[plot]` extra)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_outputs(rows: list[Row], prefix: str) -> list[str]:
    """Write PREFIX.csv, PREFIX.json and (when matplotlib is present) PREFIX.png."""
    written = []
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    written.append(prefix + ".csv")
    with open(prefix + ".json", "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    written.append(prefix + ".json")
    if not plot_available():
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(f"{r.program} | {r.backend} | {r.mode}", []).append(r)
    for label, rs in series.items():
        ax.plot([r.bytes for r in rs], [r.time_us for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input bytes per rank (B)")
    ax.set_ylabel("time per call (us), max over ranks")
    r0 = rows[0]
    ax.set_title(f"mixcc bench: mesh {r0.mesh}, world {r0.world}, {r0.dtype}", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)
    written.append(prefix + ".png")
    return written
