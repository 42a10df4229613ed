"""Regenerate one results folder, docs/perf/<setup>/, in one go: `mixcc bench` for each
benchmark (allreduce, allgather, reducescatter, the presets allreduce_allgather and
reducescatter_allreduce) and the epilogue bench (one GPU per rank only), one CSV, JSON
and PNG each, and RESULTS.md with the environment (device, driver, CUDA, torch, NCCL,
mixcc version and commit), the exact commands, which baselines this machine has, and a
table per benchmark. The last thing printed is a short summary table.

The setup follows from the hardware (h200x2-nvlink: one rank per GPU on NCCL;
h100-1gpu-mps: two ranks sharing the one GPU under MPS; cpu-gloo: the reference backend
on gloo) unless --setup names it. Every process it starts keeps NVLink multicast off
(launch.NO_MULTICAST_ENV). Entry point: scripts/perf_results.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, baselines, bench, presets
from .launch import NO_MULTICAST_ENV
from .mesh import Mesh

BENCHMARKS = ("allreduce", "allgather", "reducescatter", "allreduce_allgather",
              "reducescatter_allreduce", "epilogue")

# backends per benchmark and placement ("nccl": one GPU per rank; "mps": ranks sharing
# one GPU; "cpu": gloo). A backend that cannot run a program here is left out of the
# command and listed with the reason; one this machine lacks is passed on, so that the
# bench itself reports it as n/a.
_AR = {"nccl": ["auto", "auto:invariant", "auto:registered", "fused:one_shot",
                "fused:two_shot", "reference", "symm_one_shot", "symm_two_shot",
                "symm_two_shot_nocopy", "nccl_symm", "nccl_symm_nocopy", "peer_copy"],
       "mps": ["auto", "auto:invariant", "fused:one_shot", "fused:two_shot", "symm_one_shot",
               "symm_two_shot", "symm_one_shot_nocopy", "symm_two_shot_nocopy", "nccl_symm"],
       "cpu": ["reference", "nccl_symm"]}
_COLL = {"nccl": ["auto", "auto:registered", "fused:one_shot", "fused:push", "reference",
                  "nccl_symm", "nccl_symm_nocopy", "peer_copy"],
         "mps": ["auto", "fused:one_shot", "fused:push", "nccl_symm"],
         "cpu": ["reference", "nccl_symm"]}
_PRESET = {"nccl": ["auto", "auto:invariant", "fused:one_shot", "reference", "nccl1",
                    "separate", "nccl_symm"],
           "mps": ["auto", "auto:invariant", "fused:one_shot", "separate", "nccl_symm"],
           "cpu": ["reference", "nccl1", "nccl_symm"]}


@dataclass
class Plan:
    """One benchmark: its command (None: not run, `why`), where its files go."""

    name: str
    command: list[str] | None
    files: list[str] = field(default_factory=list)
    why: str = ""  # not run: the reason
    left_out: list[str] = field(default_factory=list)  # backends refused, with the reason
    absent: list[str] = field(default_factory=list)  # baselines this machine lacks (n/a)
    status: str = "not run"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # n/a and skip lines of the run
    table: str = ""  # the bench's summary (pivot) or the epilogue table


@dataclass
class Machine:
    """What RESULTS.md says of the machine (read without creating a CUDA context: the
    benches' ranks may have to attach to MPS first)."""

    gpus: list[str]
    driver: str
    link: str  # nvlink | pcie | "" (one GPU or none)
    cuda: str
    nvcc: str
    torch: str
    nccl: str
    mixcc: str
    commit: str


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_names() -> tuple[list[str], str]:
    """(one name per visible GPU, the driver version), from nvidia-smi, else torch."""
    out = _run_text(["nvidia-smi", "--query-gpu=name,driver_version",
                     "--format=csv,noheader"]) if shutil.which("nvidia-smi") else ""
    rows = [[c.strip() for c in ln.split(",")] for ln in out.splitlines() if "," in ln]
    n = bench.gpu_count()  # what torch sees (CUDA_VISIBLE_DEVICES), through NVML
    if not n:
        return [], rows[0][1] if rows else ""
    if rows:  # nvidia-smi lists every GPU: the first n stand for the visible ones
        return [r[0] for r in rows[:n]] + ["GPU"] * (n - len(rows)), rows[0][1]
    return ["GPU"] * n, "unknown"


def link_kind(gpus: int) -> str:
    """nvlink where nvidia-smi's topology matrix links GPU0 to a peer by NVLink, else
    pcie; "" for fewer than two GPUs."""
    if gpus < 2:
        return ""
    out = _run_text(["nvidia-smi", "topo", "-m"]) if shutil.which("nvidia-smi") else ""
    for line in out.splitlines():
        if line.startswith("GPU0"):
            return "nvlink" if re.search(r"\bNV\d+\b", line) else "pcie"
    return "pcie"


def short_model(name: str) -> str:
    """h200 from "NVIDIA H200", h100 from "NVIDIA H100 80GB HBM3", else a slug."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def setup_name(gpus: list[str], link: str) -> str:
    """The folder name of a setup: <model>x<n>-<link>, <model>-1gpu-mps or cpu-gloo."""
    if not gpus:
        return "cpu-gloo"
    if len(gpus) == 1:
        return f"{short_model(gpus[0])}-1gpu-mps"
    return f"{short_model(gpus[0])}x{len(gpus)}-{link or 'pcie'}"


def git_commit(root: Path) -> str:
    """HEAD's hash (+ "-dirty" with uncommitted changes), or "" outside a git checkout."""
    head = _run_text(["git", "-C", str(root), "rev-parse", "HEAD"]).strip()
    if not head:
        return ""
    dirty = _run_text(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty.strip() else "")


def machine(root: Path, commit: str | None) -> Machine:
    from .codegen.build import find_nvcc

    names, driver = gpu_names()
    nvcc = find_nvcc()
    nvcc_text = _run_text([nvcc, "--version"]).strip().splitlines()[-1:] if nvcc else []
    v = baselines.nccl_version()
    return Machine(
        gpus=names, driver=driver, link=link_kind(len(names)),
        cuda=torch.version.cuda or "none (CPU build of torch)",
        nvcc=nvcc_text[0] if nvcc_text else "not found",
        torch=torch.__version__, nccl=".".join(map(str, v)) if v else "none",
        mixcc=__version__,
        commit=commit or git_commit(root) or "unknown (no git checkout here: pass --commit)")


def placement(m: Machine) -> str:
    """nccl: one rank per GPU; mps: ranks sharing the one GPU; cpu: gloo on CPU tensors."""
    if not m.gpus:
        return "cpu"
    return "mps" if len(m.gpus) == 1 else "nccl"


def _mesh_text(name: str, world: int) -> str:
    if name == "allreduce":
        return f"dp=1,tp={world}"
    if name in ("allgather", "reducescatter"):
        return f"dp={world},tp=1"
    dp = 2 if world % 2 == 0 and world > 1 else 1
    return f"dp={dp},tp={world // dp}"


def _default_backends(name: str, where: str) -> list[str]:
    if name == "allreduce":
        return list(_AR[where])
    if name in ("allgather", "reducescatter"):
        return list(_COLL[where])
    return list(_PRESET[where])


def _refusal(be: str, text: str, mesh: Mesh, dtype: torch.dtype, where: str) -> str | None:
    """Why `be` cannot run `text` here (the checks `mixcc bench` makes before spawning)."""
    if be in bench.FUSED or be == "separate":
        why = bench.fused_refusal(dtype)
        if why:
            return why
    if be in baselines.BASELINES:
        return baselines.unavailable_reason(be, text, mesh, dtype, nccl=where == "nccl",
                                            one_gpu=where == "mps")
    return None


def plan(args: argparse.Namespace, m: Machine, out_dir: Path) -> list[Plan]:
    """The commands of this setup (mixcc bench's arguments fixed here, in the open)."""
    where = placement(m)
    world = args.world_size or (len(m.gpus) if where == "nccl" else 2)
    dtype_name = args.dtype or ("bfloat16" if m.gpus else "float32")
    dtype = bench.DTYPES[dtype_name]
    hidden = args.hidden or (4096 if m.gpus else 1024)
    quick = args.quick
    sizes = ["--min-bytes", args.min_bytes or ("16K" if m.gpus else "4K"),
             "--max-bytes", args.max_bytes or ("16K" if not m.gpus else "1M" if quick
                                               else "64M")]
    times = ["--iters", str(args.iters or (5 if quick or not m.gpus else 20)),
             "--repeats", str(args.repeats or (3 if quick or not m.gpus else 5))]
    plans = []
    for name in args.only or BENCHMARKS:
        prefix = str(out_dir / name)
        if name == "epilogue":
            plans.append(_epilogue_plan(args, where, world, prefix))
            continue
        mesh_text = _mesh_text(name, world)
        mesh = Mesh.parse(mesh_text, world)
        text = presets.resolve(name)
        p = Plan(name, None)
        keep = []
        for be in _default_backends(name, where):
            na = baselines.machine_refusal(be, nccl=where == "nccl") \
                if be in baselines.BASELINES else None
            if na:
                p.absent.append(bench.absent_line(be, na))
                keep.append(be)  # the bench reports it as n/a
                continue
            why = _refusal(be, text, mesh, dtype, where)
            if why:
                p.left_out.append(why if why.startswith(f"{be}:") else f"{be}: {why}")
            else:
                keep.append(be)
        runnable = [be for be in keep if not any(a.startswith(f"n/a: {be}:") for a in p.absent)]
        if not runnable:
            p.why = "no backend can run it here"
            plans.append(p)
            continue
        p.command = ["python3", "-m", "mixcc", "bench", "--mesh", mesh_text, "--program", name,
                     "--backend", ",".join(keep), "--dtype", dtype_name, "--hidden",
                     str(hidden), *sizes, *times, "--out", prefix]
        if args.row_timeout is not None:
            p.command += ["--row-timeout", str(args.row_timeout)]
        plans.append(p)
    return plans


def _epilogue_plan(args: argparse.Namespace, where: str, world: int, prefix: str) -> Plan:
    p = Plan("epilogue", None)
    if where != "nccl":
        p.why = "the epilogue bench runs one process per GPU on NCCL (two GPUs or more)"
        return p
    p.command = ["python3", "-m", "mixcc.bench_epilogue", "--world-size", str(world),
                 "--hidden", str(args.hidden or 4096), "--max-rows",
                 "64" if args.quick else "512", "--iters", str(args.iters or 20),
                 "--repeats", str(args.repeats or (3 if args.quick else 5)), "--out", prefix]
    return p


def prebuild_commands(plans: list[Plan]) -> list[list[str]]:
    """`mixcc prebuild` for the fused kernels of each planned bench (the program and, for
    the separate-calls baseline, its statements), run in parallel before the timings."""
    from .ir.parser import parse

    out = []
    for p in plans:
        if p.command is None or p.command[:4] != ["python3", "-m", "mixcc", "bench"]:
            continue
        backends = _backends_of(p.command)
        if not any(be in bench.FUSED or be == "separate" for be in backends):
            continue
        flag = p.command.index
        mesh, dtype = p.command[flag("--mesh") + 1], p.command[flag("--dtype") + 1]
        progs = [presets.resolve(p.command[flag("--program") + 1])]
        if "separate" in backends:
            progs += [str(st) for st in parse(progs[0]).stmts if str(st) not in progs]
        cmd = ["python3", "-m", "mixcc", "prebuild", "--mesh", mesh, "--dtype", dtype]
        for prog in progs:
            cmd += ["--program", prog]
        out.append(cmd)
    return out


def _backends_of(command: list[str]) -> list[str]:
    return command[command.index("--backend") + 1].split(",")


def _prebuild(cmds: list[list[str]], out_dir: Path, deadline: float | None) -> str:
    """Run the prebuild commands at once (output to prebuild.log); a one-line verdict."""
    env = {**os.environ, **NO_MULTICAST_ENV}
    t0 = time.monotonic()
    with open(out_dir / "prebuild.log", "w") as log:
        procs = [subprocess.Popen([sys.executable, *c[1:]], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
                 for c in cmds]
        codes = []
        for proc in procs:
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            try:
                codes.append(proc.wait(timeout=left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                codes.append(None)
    failed = sum(c != 0 for c in codes)
    return (f"{len(cmds)} prebuild commands in {time.monotonic() - t0:.0f} s"
            + (f", {failed} failed or cut (prebuild.log; the benches build what is "
               "missing)" if failed else ""))


def probe_command(world: int) -> list[str]:
    """One small allreduce on registered windows with NCCL's tuning log on: whether NCCL
    names symmetric kernels for it (it falls back to its regular ones silently)."""
    return ["python3", "-m", "mixcc", "bench", "--mesh", f"dp=1,tp={world}", "--program",
            "allreduce", "--backend", "nccl_symm_nocopy", "--dtype", "bfloat16",
            "--hidden", "4096", "--min-bytes", "1M", "--max-bytes", "1M", "--iters", "1",
            "--repeats", "1"]


def _probe(world: int, out_dir: Path) -> str:
    """Run probe_command with NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=TUNING (its log in
    nccl_symm_probe.log); what the log says, in one sentence."""
    env = {**os.environ, **NO_MULTICAST_ENV, "NCCL_DEBUG": "INFO",
           "NCCL_DEBUG_SUBSYS": "INIT,TUNING"}
    try:
        proc = subprocess.run([sys.executable, *probe_command(world)[1:]], env=env,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "the probe did not finish in 180 s"
    text = proc.stdout + proc.stderr
    (out_dir / "nccl_symm_probe.log").write_text(text)
    seen = [ln.strip() for ln in text.splitlines()
            if "NCCL INFO" in ln and re.search(r"symm|symk", ln, re.IGNORECASE)]
    if proc.returncode != 0:
        return f"the probe failed (exit {proc.returncode}; nccl_symm_probe.log)"
    if seen:
        return (f"NCCL's log names symmetric kernels or windows in {len(seen)} lines, e.g. "
                f"`{seen[-1][-160:]}` (nccl_symm_probe.log)")
    return ("NCCL's tuning log names no symmetric kernel for a 1 MiB bfloat16 allreduce on "
            "registered windows, so the nccl_symm rows may be its regular kernels "
            "(nccl_symm_probe.log)")


def _execute(p: Plan, out_dir: Path, deadline: float | None) -> None:
    """Run one plan's command (its log to <name>.log), then collect its files."""
    assert p.command is not None
    log = out_dir / f"{p.name}.log"
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left < 5:
        p.status, p.why = "not run", "the time budget (--budget-s) was spent"
        return
    env = {**os.environ, **NO_MULTICAST_ENV}
    here = str(Path(__file__).resolve().parents[1])  # this mixcc, in the benches too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (here, env.get("PYTHONPATH"))))
    cmd = [sys.executable, *p.command[1:]]
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the bench and the ranks it spawned
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    p.seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if not ln.startswith("[")]  # progress lines
    log.write_text("\n".join(lines) + "\n")
    p.notes = list(dict.fromkeys(ln.removeprefix("# ") for ln in lines
                                 if ln.startswith(("# n/a:", "skip:"))))
    if rc is None:
        p.status = f"cut at the time budget after {p.seconds:.0f} s"
    elif rc != 0:
        last = next((ln for ln in reversed(lines) if ln.strip()), "")
        p.status = f"failed (exit {rc}): {last}"
    else:
        p.status = "ok"
    if p.name == "epilogue":
        p.table = "\n".join(ln for ln in lines if ln.startswith("|"))
        _epilogue_files(p, out_dir)
    else:
        marker = "# oop time (us) per backend"
        if marker in text:
            p.table = "\n".join(ln for ln in text[text.index(marker):].splitlines()
                                if ln.strip() and not ln.startswith(("wrote ", "note:", "[")))
        _bench_files(p, out_dir)


def _bench_files(p: Plan, out_dir: Path) -> None:
    """<name>.csv and .json as written; its one PNG renamed <name>.png."""
    pngs = sorted(out_dir.glob(f"{p.name}_*_w*.png"))
    if len(pngs) == 1:
        pngs[0].replace(out_dir / f"{p.name}.png")
    for suffix in (".csv", ".json", ".png", ".log"):
        if (out_dir / f"{p.name}{suffix}").exists():
            p.files.append(p.name + suffix)
    p.files += [q.name for q in pngs[1:]] if len(pngs) > 1 else []


def _epilogue_files(p: Plan, out_dir: Path) -> None:
    """The epilogue bench writes JSON and a markdown table: add the CSV and a PNG."""
    src = out_dir / "epilogue.json"
    if src.exists():
        rows = json.loads(src.read_text())
        if rows:
            with open(out_dir / "epilogue.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            if bench.plot_available():
                _plot_epilogue(rows, out_dir / "epilogue.png")
    (out_dir / "epilogue.md").unlink(missing_ok=True)  # RESULTS.md holds the table
    for suffix in (".csv", ".json", ".png", ".log"):
        if (out_dir / f"epilogue{suffix}").exists():
            p.files.append("epilogue" + suffix)


def _plot_epilogue(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["case"], r["hidden"]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), squeeze=False)
    for ax, (case, hidden) in zip(axes[0], cases, strict=True):
        rs = [r for r in rows if (r["case"], r["hidden"]) == (case, hidden)]
        for col in ("fused", "mixcc+compiled", "nccl+compiled", "mixcc alone"):
            ax.plot([r["rows"] for r in rs], [r[f"{col} us"] for r in rs], marker="o", ms=3,
                    label=col, linestyle="-" if col == "fused" else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{case}, hidden {hidden}", fontsize=8)
        ax.set_xlabel("rows per rank")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("time per call (us)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def baseline_table(m: Machine) -> list[tuple[str, str, str]]:
    """(baseline, available here: yes / no, why not) for RESULTS.md."""
    where = placement(m)
    nccl = where == "nccl"
    rows = [("reference: the program as NCCL calls" if m.gpus and nccl else
             "reference: the program as torch.distributed calls (gloo)", "yes", "")]
    why = baselines.machine_refusal("nccl_symm", nccl=nccl)
    rows.append(("nccl_symm: NCCL's symmetric kernels (buffers registered as NCCL windows)",
                 "no" if why else "yes", why or ""))
    why = baselines.symm_mem_support() or (
        None if m.gpus else "needs CUDA: one GPU per rank, or ranks sharing one GPU")
    rows.append(("symm_*: torch symmetric memory one-shot / two-shot allreduce",
                 "no" if why else "yes", why or ""))
    rows.append(("nccl1: the presets as one world collective + a local sum", "yes", ""))
    why = bench.fused_refusal(torch.bfloat16 if m.gpus else torch.float32)
    rows.append(("separate: the presets as one mixcc call per statement",
                 "no" if why else "yes", why or ""))
    return rows


def results_md(m: Machine, setup: str, argv: list[str], plans: list[Plan], started: str,
               out_dir: Path, prebuilt: list[list[str]] | None = None, built: str = "",
               probe: tuple[list[str], str] | None = None) -> str:
    where = placement(m)
    devices = (f"{len(m.gpus)} x {m.gpus[0]}" if m.gpus else "CPU only")
    how = {"nccl": "one process per GPU, NCCL process group",
           "mps": "ranks sharing the one GPU under CUDA MPS (gloo process group; GPU rows "
                  "are device times of CUDA graphs, reference rows gloo on CPU tensors)",
           "cpu": "ranks on CPU tensors, gloo process group (host clock)"}[where]
    env = " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items())
    out = [f"# mixcc performance: {setup}", "",
           f"Made by `python3 scripts/perf_results.py {shlex.join(argv)}` ({started} UTC), "
           "which ran the commands below one after the other (DIR: this folder, written "
           f"as {out_dir}); each benchmark's files are named after it. Times: the median of "
           "the repeats, each the max over ranks, with CUDA graphs on GPUs "
           "(`mixcc bench --help`).", "",
           "## Environment", "", "| | |", "|---|---|",
           f"| device | {devices} |", f"| driver | {m.driver or 'none'} |",
           f"| link | {m.link or '-'} |",
           f"| CUDA | torch built with {m.cuda}; nvcc: {m.nvcc} |",
           f"| torch | {m.torch} |", f"| NCCL | {m.nccl} |",
           f"| mixcc | {m.mixcc}, commit {m.commit} |",
           f"| placement | {how} |",
           f"| environment | {env} (NVLink multicast off in every process) |", "",
           "## Baselines on this machine", "", "| baseline | available | why not |",
           "|---|---|---|"]
    out += [f"| {b} | {a} | {w or '-'} |" for b, a, w in baseline_table(m)]
    out += ["", "NCCL runs its regular kernels, silently, where its symmetric ones do not "
                "apply to a call (and with NVLS off, only its symmetric kernels without "
                "multicast can); `NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=TUNING` shows which ran.",
            ""]
    if probe:
        out += ["Checked after the benchmarks with NCCL's log on (NCCL_DEBUG=INFO "
                "NCCL_DEBUG_SUBSYS=INIT,TUNING):", "",
                "    " + shlex.join(probe[0]), "", probe[1] + ".", ""]
    if prebuilt:
        out += ["Kernels compiled before the benchmarks, at once (" + built + "):", ""]
        out += ["    " + shlex.join(c) for c in prebuilt] + [""]
    for p in plans:
        out += [f"## {p.name}", ""]
        if p.command is None:
            out += [f"Not run: {p.why}.", ""]
            continue
        out += ["    " + shlex.join(p.command).replace(str(out_dir), "DIR"), "",
                f"Status: {p.status}" + (f" ({p.seconds:.0f} s)." if p.seconds else "."),
                ""]
        if p.status == "not run" and p.why:
            out += [f"Not run: {p.why}.", ""]
        if p.files:
            out += ["Files: " + ", ".join(f"[{f}]({f})" for f in p.files) + ".", ""]
        notes = list(dict.fromkeys(p.absent + p.notes))
        if notes or p.left_out:
            out += [f"- {n}" for n in notes] + [f"- left out: {n}" for n in p.left_out] + [""]
        if p.table:
            out += (["```", p.table, "```", ""] if not p.table.startswith("|")
                    else [p.table, ""])
    return "\n".join(out)


def summary(plans: list[Plan], out_dir: Path) -> str:
    """One line per benchmark: status, rows, and each mixcc backend's time / the best
    baseline's (oop rows, min..max over sizes, wrong elements)."""
    lines = [f"{'benchmark':<24} {'status':<10} {'rows':>5}  mixcc / best baseline (oop, "
             "min..max over sizes)"]
    for p in plans:
        status = p.status if len(p.status) <= 10 else p.status.split()[0]
        path = out_dir / f"{p.name}.json"
        rows = bench.read_rows(str(path)) if p.name != "epilogue" and path.exists() else []
        parts = []
        for be in dict.fromkeys(r.backend for r in rows if not bench.is_baseline(r.backend)):
            ratios = [r.ratio for r in rows if r.backend == be and r.mode == "oop"
                      and math.isfinite(r.ratio)]
            wrong = sum(max(r.errors, 0) for r in rows if r.backend == be)
            if ratios:
                parts.append(f"{be} {min(ratios):.2f}..{max(ratios):.2f}"
                             + (f" ({wrong} wrong)" if wrong else ""))
        if p.name == "epilogue" and p.table:
            parts.append(f"{len(p.table.splitlines()) - 2} rows in RESULTS.md")
        na = [n.split(":")[1].strip() for n in p.absent]
        if na:
            parts.append("n/a: " + ",".join(na))
        lines.append(f"{p.name:<24} {status:<10} {len(rows):>5}  "
                     + ("; ".join(parts) or p.why or "-"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="perf_results.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", default=None,
                    help="folder name under --out-root (default: from the hardware, e.g. "
                         "h200x2-nvlink, h100-1gpu-mps, cpu-gloo)")
    ap.add_argument("--out-root", default="docs/perf", help="default docs/perf")
    ap.add_argument("--only", default=None,
                    help=f"comma list of benchmarks (default all: {','.join(BENCHMARKS)})")
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks (default: the GPU count with two GPUs or more, else 2)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPUs, else float32")
    ap.add_argument("--hidden", type=int, default=None, help="default 4096 on GPUs, else 1024")
    ap.add_argument("--min-bytes", default=None, help="default 16K on GPUs, else 4K")
    ap.add_argument("--max-bytes", default=None,
                    help="default 64M on GPUs (1M with --quick), else 16K")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--row-timeout", type=float, default=None, help="mixcc bench's")
    ap.add_argument("--quick", action="store_true",
                    help="a short sweep (to 1 MiB, 5 calls x 3 repeats)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting benchmarks after this many seconds; a running one "
                         "is cut there (RESULTS.md says which)")
    ap.add_argument("--commit", default=None,
                    help="mixcc's commit, where this copy has no git checkout")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    if a.only is not None:
        a.only = [n.strip() for n in a.only.split(",") if n.strip()]
        bad = [n for n in a.only if n not in BENCHMARKS]
        if bad or not a.only:
            ap.error(f"--only {','.join(bad) or '(empty)'}: expected names from "
                     f"{','.join(BENCHMARKS)}")
    if a.dtype is not None and a.dtype not in bench.DTYPES:
        ap.error(f"--dtype {a.dtype!r} is not one of {', '.join(bench.DTYPES)}")
    if a.setup is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", a.setup):
        ap.error(f"--setup {a.setup!r}: a folder name of letters, digits, '.', '_', '-'")
    for flag in ("world_size", "hidden", "iters", "repeats"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    for flag in ("min_bytes", "max_bytes"):
        v = getattr(a, flag)
        if v is not None:
            try:
                bench.parse_size(v)
            except ValueError as e:
                ap.error(f"--{flag.replace('_', '-')} {e}")
    return a


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.update(NO_MULTICAST_ENV)  # this process and all it starts
    root = root or Path.cwd()
    m = machine(root, args.commit)
    setup = args.setup or setup_name(m.gpus, m.link)
    out_dir = Path(args.out_root) / setup
    if placement(m) == "nccl" and args.world_size and args.world_size > len(m.gpus):
        print(f"perf_results: --world-size {args.world_size} needs as many GPUs; "
              f"{len(m.gpus)} here", file=sys.stderr)
        return 2
    if not args.dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
    plans = plan(args, m, out_dir)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    print(f"perf_results: setup {setup} -> {out_dir}", flush=True)
    built = ""
    pre = prebuild_commands(plans) if m.gpus else []
    for c in pre:
        print(shlex.join(c), flush=True)
    if pre and not args.dry_run:
        built = _prebuild(pre, out_dir, deadline)
        print(built, flush=True)
    for p in plans:
        if p.command is None:
            print(f"{p.name}: not run: {p.why}", flush=True)
            continue
        print(shlex.join(p.command), flush=True)
        if args.dry_run:
            continue
        _execute(p, out_dir, deadline)
        print(f"{p.name}: {p.status} ({p.seconds:.0f} s)", flush=True)
    if args.dry_run:
        return 0
    probe = None
    if placement(m) == "nccl" and baselines.nccl_symm_support() is None and (
            deadline is None or deadline - time.monotonic() > 60):
        world = args.world_size or len(m.gpus)
        print(shlex.join(probe_command(world)) + "  # NCCL_DEBUG=INFO", flush=True)
        probe = (probe_command(world), _probe(world, out_dir))
        print(f"nccl_symm probe: {probe[1]}", flush=True)
    text = results_md(m, setup, argv, plans, started, out_dir, pre, built, probe)
    (out_dir / "RESULTS.md").write_text(text)
    print(f"wrote {out_dir / 'RESULTS.md'}\n\n{summary(plans, out_dir)}", flush=True)
    return 0 if all(p.status == "ok" or p.command is None for p in plans) else 1


if __name__ == "__main__":
    raise SystemExit(main())
