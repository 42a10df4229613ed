"""scripts/perf_results.py (mixcc/results.py): the setup's name from the hardware, the
commands it plans per placement (which backends, which are n/a or left out, and why),
and a real run on CPU (gloo, the reference backend, a tiny sweep) whose files and
RESULTS.md fields are checked."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixcc import baselines, bench, results

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpus,link,name", [
    (["NVIDIA H200"] * 2, "nvlink", "h200x2-nvlink"),
    (["NVIDIA H100 80GB HBM3"] * 8, "nvlink", "h100x8-nvlink"),
    (["NVIDIA H100 80GB HBM3"], "", "h100-1gpu-mps"),
    (["NVIDIA A100-SXM4-80GB"] * 4, "pcie", "a100x4-pcie"),
    (["Some Board"] * 2, "", "some-boardx2-pcie"),
    ([], "", "cpu-gloo"),
])
def test_setup_name_from_the_hardware(gpus, link, name):
    assert results.setup_name(gpus, link) == name


def _machine(gpus: int) -> results.Machine:
    return results.Machine(gpus=["NVIDIA H200"] * gpus, driver="580.1", link="nvlink",
                           cuda="13.0", nvcc="V13.0", torch="2.11.0+cu130", nccl="2.27.7",
                           mixcc="0.1.0", commit="abc")


def _plans(monkeypatch, gpus: int, *argv: str, nccl_symm: str | None = None):
    monkeypatch.setattr(bench, "fused_refusal", lambda dtype: None)
    monkeypatch.setattr(baselines, "nccl_symm_support", lambda: nccl_symm)
    args = results.parse_args(list(argv))
    return {p.name: p for p in results.plan(args, _machine(gpus), Path("/o/s"))}


def _backends(p: results.Plan) -> list[str]:
    assert p.command is not None
    return p.command[p.command.index("--backend") + 1].split(",")


def test_two_gpus_run_every_benchmark_with_nccl_symm_beside_nccl(monkeypatch):
    plans = _plans(monkeypatch, 2)
    assert list(plans) == list(results.BENCHMARKS)
    ar = plans["allreduce"]
    assert ar.command[:9] == ["python3", "-m", "mixcc", "bench", "--mesh", "dp=1,tp=2",
                              "--program", "allreduce", "--backend"]
    assert {"reference", "nccl_symm", "nccl_symm_nocopy", "symm_one_shot", "symm_two_shot",
            "peer_copy", "auto"} <= set(_backends(ar))
    assert ar.command[-2:] == ["--out", "/o/s/allreduce"] and not ar.absent
    assert "--dtype bfloat16 --hidden 4096 --min-bytes 16K --max-bytes 64M --iters 20 " \
           "--repeats 5" in " ".join(ar.command)
    for name in ("allgather", "reducescatter"):
        assert plans[name].command[5] == "dp=2,tp=1"
        assert {"nccl_symm", "nccl_symm_nocopy", "reference"} <= set(_backends(plans[name]))
    # at world 2 the presets' mesh is dp=2,tp=1: one collective over the world, NCCL's too
    for name in ("allreduce_allgather", "reducescatter_allreduce"):
        assert {"nccl1", "separate", "nccl_symm"} <= set(_backends(plans[name]))
    epi = plans["epilogue"]
    assert epi.command[:5] == ["python3", "-m", "mixcc.bench_epilogue", "--world-size", "2"]
    pre = [" ".join(c) for c in results.prebuild_commands(list(plans.values()))]
    assert pre[0] == "python3 -m mixcc prebuild --mesh dp=1,tp=2 --dtype bfloat16 " \
                     "--program allreduce(tp)"
    assert pre[3] == ("python3 -m mixcc prebuild --mesh dp=2,tp=1 --dtype bfloat16 "
                      "--program allreduce(tp); allgather(dp) --program allreduce(tp) "
                      "--program allgather(dp)")  # separate's statements too
    assert len(pre) == 5  # the epilogue bench builds its own


def test_four_gpus_leave_out_what_cannot_run_the_program(monkeypatch):
    plans = _plans(monkeypatch, 4, "--quick")
    ar = plans["allreduce"]
    assert "peer_copy" not in _backends(ar)
    assert "peer_copy: two ranks with a GPU each (NCCL) only" in ar.left_out
    pre = plans["allreduce_allgather"]
    assert pre.command[5] == "dp=2,tp=2" and "nccl_symm" not in _backends(pre)
    assert "nccl_symm: NCCL symmetric-kernel baseline: one collective over the whole world " \
           "only" in pre.left_out
    assert "--max-bytes 1M --iters 5 --repeats 3" in " ".join(ar.command)


def test_an_absent_nccl_symm_is_passed_on_and_reported(monkeypatch):
    why = "NCCL 2.21.5 has no symmetric kernels (they came with NCCL 2.27.0)"
    plans = _plans(monkeypatch, 2, "--only", "allreduce,allgather", nccl_symm=why)
    assert list(plans) == ["allreduce", "allgather"]
    for p in plans.values():
        assert "nccl_symm" in _backends(p)  # the bench prints its n/a line and column
        assert f"n/a: nccl_symm: {why}" in p.absent
    plans = _plans(monkeypatch, 1)  # one GPU: ranks share it under MPS
    ar = plans["allreduce"]
    assert ar.command[5] == "dp=1,tp=2" and "reference" not in _backends(ar)
    assert "n/a: nccl_symm: NCCL symmetric kernels need one GPU per rank (here ranks share " \
           "GPUs)" in ar.absent
    assert plans["epilogue"].command is None
    assert "one process per GPU on NCCL" in plans["epilogue"].why


@pytest.mark.parametrize("argv,msg", [
    (["--only", "allreduce,bogus"], "--only bogus: expected names from allreduce,"),
    (["--dtype", "float8"], "--dtype 'float8' is not one of"),
    (["--setup", "../x"], "--setup '../x': a folder name"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--max-bytes", "1T"], "--max-bytes '1T' is not a byte count"),
])
def test_bad_arguments_are_refused_before_anything_runs(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        results.parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_a_spent_budget_runs_nothing_and_says_so(tmp_path, capsys):
    rc = results.main(["--out-root", str(tmp_path), "--setup", "s", "--only", "allreduce",
                       "--budget-s", "0", "--commit", "c0ffee"])
    assert rc == 1  # nothing measured: not a complete folder
    md = (tmp_path / "s" / "RESULTS.md").read_text()
    assert "Status: not run." in md and "Not run: the time budget (--budget-s) was spent." in md
    assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["allreduce", "not"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU placement (gloo)")
def test_cpu_run_writes_each_benchmarks_files_and_results_md(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "perf_results.py"), "--out-root",
         str(tmp_path), "--only", "allreduce,allreduce_allgather,epilogue", "--min-bytes",
         "4K", "--max-bytes", "4K", "--iters", "1", "--repeats", "1", "--commit", "t35t"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "cpu-gloo"
    for name in ("allreduce", "allreduce_allgather"):
        for suffix in (".csv", ".json", ".log") + ((".png",) if bench.plot_available() else ()):
            assert (out / f"{name}{suffix}").is_file(), (name, suffix)
        with open(out / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(float(r["time_us"]) > 0 and r["timing"] == "cpu" for r in rows)
        assert {r["backend"] for r in rows} == (
            {"reference"} if name == "allreduce" else {"reference", "nccl1"})
        assert all(r["errors"] == "0" for r in rows if r["backend"] == "nccl1")
        assert len(json.loads((out / f"{name}.json").read_text())) == len(rows)
    assert not list(out.glob("*_w2.png"))  # each benchmark's one plot is <name>.png
    assert not (out / "epilogue.csv").exists()
    md = (out / "RESULTS.md").read_text()
    for field in ("| device | CPU only |", f"| torch | {torch.__version__} |",
                  "| NCCL | none |", "| mixcc | 0.1.0, commit t35t |", "| driver | none |",
                  "| CUDA | torch built with none", "| placement | ranks on CPU tensors, gloo",
                  "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                  "NVSHMEM_DISABLE_NVLS=1",
                  "| nccl_symm: NCCL's symmetric kernels (buffers registered as NCCL windows)"
                  f" | no | torch {torch.__version__} is built without NCCL |",
                  "| symm_*: torch symmetric memory one-shot / two-shot allreduce | no | needs "
                  "CUDA",
                  "    python3 -m mixcc bench --mesh dp=1,tp=2 --program allreduce --backend "
                  "reference,nccl_symm --dtype float32 --hidden 1024 --min-bytes 4K "
                  "--max-bytes 4K --iters 1 --repeats 1 --out DIR/allreduce",
                  "--program allreduce_allgather --backend reference,nccl1,nccl_symm",
                  f"- n/a: nccl_symm: torch {torch.__version__} is built without NCCL",
                  "Files: [allreduce.csv](allreduce.csv), [allreduce.json](allreduce.json)",
                  "## epilogue\n\nNot run: the epilogue bench runs one process per GPU on NCCL",
                  "Status: ok ("):
        assert field in md, field
    assert md.startswith("# mixcc performance: cpu-gloo\n\nMade by `python3 "
                         "scripts/perf_results.py --out-root ")
    last = proc.stdout.strip().splitlines()
    assert last[-4].startswith("benchmark ") and last[-3].split()[:3] == ["allreduce", "ok",
                                                                          "2"]
    assert last[-1].startswith("epilogue                 not run")


@pytest.mark.parametrize("log,rc,verdict", [
    ("h:1:1 [0] NCCL INFO AllReduce: 1048576 Bytes -> [Symmetric] kernel AllReduce_RSxLD\n",
     0, "NCCL's log names symmetric kernels or windows in 1 lines, e.g. `h:1:1 [0] NCCL INFO "
        "AllReduce: 1048576 Bytes -> [Symmetric] kernel AllReduce_RSxLD` "
        "(nccl_symm_probe.log)"),
    ("h:1:1 [0] NCCL INFO AllReduce: 1048576 Bytes -> Algo RING proto LL128\n", 0,
     "NCCL's tuning log names no symmetric kernel for a 1 MiB bfloat16 allreduce on "
     "registered windows, so the nccl_symm rows may be its regular kernels "
     "(nccl_symm_probe.log)"),
    ("symmetric in a traceback, not NCCL's line\n", 1,
     "the probe failed (exit 1; nccl_symm_probe.log)"),
])
def test_the_nccl_log_probe_reads_what_nccl_says(monkeypatch, tmp_path, log, rc, verdict):
    seen = {}

    def run(cmd, env, **kw):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, rc, stdout="", stderr=log)

    monkeypatch.setattr(results.subprocess, "run", run)
    assert results._probe(2, tmp_path) == verdict
    assert (tmp_path / "nccl_symm_probe.log").read_text() == log
    assert seen["cmd"][1:4] == ["-m", "mixcc", "bench"] and "nccl_symm_nocopy" in seen["cmd"]
    assert seen["env"]["NCCL_DEBUG"] == "INFO" and seen["env"]["NCCL_NVLS_ENABLE"] == "0"
