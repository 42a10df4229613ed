"""`mixcc bench` and the CLI around it: bad input is refused in the parent before any
process starts (one line, exit 2); a failing rank is reported as itself; the output
says what was measured, with units; small CLI conveniences (--version, pipes)."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mixcc import bench, cli, launch
from mixcc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _no_spawn(*args, **kw):
    raise AssertionError("a process was spawned for bad input")


@pytest.fixture
def no_spawn(monkeypatch):
    monkeypatch.setattr(launch, "spawn", _no_spawn)
    monkeypatch.setattr(launch, "run_torchrun", _no_spawn)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def _bench_error(capsys, *argv: str) -> str:
    assert main(["bench", *argv]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("mixcc: error: ")
    return lines[0]


@pytest.mark.parametrize("argv,msg", [
    (["--program", "allreduce_allgathr"],
     "is not a preset (one of allreduce, allgather, reducescatter, allreduce_allgather, "
     "reducescatter_allreduce) nor a program such as 'allreduce(tp)'; "
     "did you mean 'allreduce_allgather'?"),
    (["--backend", "bogus"], "--backend 'bogus' is not one of fused, reference, nccl1, "
                             "symm_one_shot, symm_two_shot"),
    (["--backend", "reference,refrence"], "did you mean 'reference'?"),
    (["--ranks-per-node", "3"], "--ranks-per-node 3 must divide the world size 4"),
    (["--mesh", "dp=2,tp=4", "--world-size", "4"], "--mesh dp=2,tp=4 has 8 ranks but "
                                                   "--world-size is 4"),
    (["--min-rows", "64", "--max-rows", "8"], "--min-rows 64 is above --max-rows 8"),
    (["--dtype", "float128"], "--dtype 'float128' is not one of float32, bfloat16, float16, "
                              "float64"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--out", "/nonexistent/dir/x"], "--out '/nonexistent/dir/x': directory /nonexistent/dir "
                                      "does not exist"),
    (["--backend", "nccl1", "--program", "allreduce"],
     "--backend nccl1 cannot run 'allreduce(tp)': one-call composition exists for "
     "allreduce_allgather and reducescatter_allreduce only"),
])
def test_bad_bench_input_is_one_line_and_exit_2_before_spawning(capsys, no_spawn, argv, msg):
    assert msg in _bench_error(capsys, *argv)


def test_bad_program_text_names_the_argument(capsys, no_spawn):
    assert main(["bench", "--program", "allreduce(tq)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcc: error: --program 'allreduce(tq)': line 1, column 11: "
                          "unknown axis 'tq'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_fused_without_gpu_is_refused_before_spawning(capsys, no_spawn, dtype):
    line = _bench_error(capsys, "--backend", "fused", "--dtype", dtype)
    assert line == ("mixcc: error: --backend fused cannot run 'allreduce(tp)': it needs a CUDA "
                    "GPU and torch.cuda.is_available() is False")


def _args(*argv: str):
    return cli.build_parser().parse_args(["bench", *argv])


def test_world_size_follows_the_mesh(no_spawn):
    world, cfg, skipped = cli.bench_config(_args("--mesh", "dp=2,tp=4", "--program",
                                                 "allreduce"))
    assert world == 8
    assert cfg["mesh_axes"] == [("dp", 2), ("tp", 4)]
    assert cfg["ranks_per_node"] == 8  # spawned ranks are local: one node
    assert cfg["pairs"] == [("allreduce(tp)", "reference")] and skipped == []
    world, cfg, _ = cli.bench_config(_args("--world-size", "8", "--ranks-per-node", "4"))
    assert world == 8 and cfg["mesh_axes"] == [("dp", 2), ("tp", 4)]
    assert cfg["ranks_per_node"] == 4


def test_pairs_skip_what_a_baseline_cannot_run(no_spawn):
    _, cfg, skipped = cli.bench_config(_args("--program", "allreduce_allgather", "--program",
                                             "allgather", "--backend", "reference,nccl1"))
    assert cfg["pairs"] == [("allreduce(tp); allgather(dp)", "reference"),
                            ("allreduce(tp); allgather(dp)", "nccl1"),
                            ("allgather(dp)", "reference")]
    assert skipped == ["nccl1 cannot run 'allgather(dp)': one-call composition exists for "
                       "allreduce_allgather and reducescatter_allreduce only"]


def test_float64_is_a_dtype_of_explain(capsys):
    assert main(["explain", "allreduce", "--mesh", "dp=2,tp=2", "--dtype", "float64"]) == 0
    assert "allreduce(tp)" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("mixcc 0.1.0 (torch ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_prebuild_without_arch_or_gpu_says_what_to_pass(capsys):
    assert main(["prebuild", "--mesh", "tp=2"]) == 2
    assert capsys.readouterr().err == ("mixcc: error: --arch is needed on a machine without a "
                                       "CUDA GPU, e.g. --arch sm_90a\n")


def test_prebuild_refuses_dtypes_the_fused_backend_lacks(capsys):
    assert main(["prebuild", "--mesh", "tp=2", "--dtype", "bfloat16,float64"]) == 2
    assert capsys.readouterr().err == ("mixcc: error: --dtype float64: the fused backend "
                                       "builds float32, float16, bfloat16 only\n")


def test_explain_into_a_closed_pipe_is_quiet():
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written, as after `| head -1` exits
    try:
        proc = subprocess.run([sys.executable, "-m", "mixcc", "explain", "allreduce_allgather",
                               "--mesh", "dp=2,tp=4"], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.stderr == ""
    assert proc.returncode == 141


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_updates_one_line_on_a_terminal():
    s = _Tty()
    p = bench.Progress(2, s)
    p.update(1, "a")
    p.update(2, "b")
    p.clear()
    assert s.getvalue() == "\r\033[K[1/2] a\r\033[K[2/2] b\r\033[K"
    assert "\n" not in s.getvalue()
    s = io.StringIO()
    p = bench.Progress(2, s)
    p.update(1, "a")
    p.clear()
    assert s.getvalue() == "[1/2] a\n"  # a log gets plain lines


def _fail_on_rank0(rank: int, world: int) -> None:
    if rank == 0:
        raise OSError("disk full on rank 0")
    dist.barrier()  # the peers wait for rank 0 and lose their connection to it


def test_spawn_reports_the_rank_that_failed_not_a_peer():
    with pytest.raises(launch.RankError) as e:
        launch.spawn(_fail_on_rank0, 3, backend="gloo")
    assert e.value.rank == 0
    assert str(e.value) == "rank 0: OSError: disk full on rank 0"
    assert e.value.expected
    assert "_fail_on_rank0" in e.value.traceback


def _run_bench(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixcc", "bench", "--max-rows", "2",
                           "--iters", "1", "--repeats", "1", *argv],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_error_in_rank_0_is_rank_0s_message(tmp_path):
    (tmp_path / "b.csv").mkdir()  # passes the --out check, fails when rank 0 writes
    proc = _run_bench("--program", "allreduce", "--out", str(tmp_path / "b"),
                      tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"mixcc: error: rank 0: IsADirectoryError: [Errno 21] Is a directory: " \
                   f"'{tmp_path / 'b.csv'}'"
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr


def test_bench_float64_world_from_mesh_header_units_and_files(tmp_path):
    prefix = str(tmp_path / "r")
    proc = _run_bench("--mesh", "dp=1,tp=2", "--dtype", "float64", "--program",
                      "allreduce_allgather", "--backend", "reference,nccl1", "--out", prefix,
                      tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "# mixcc bench: mesh dp=1,tp=2 (ranks_per_node 2), world 2, " \
                       "process group gloo"
    assert lines[1].startswith("# dtype float64, hidden 1024, backends reference,nccl1; ")
    cols = lines[2].split()
    assert cols[:3] == ["program", "backend", "mode"]
    assert {"size(B)", "time(us)", "algbw(GB/s)", "busbw(GB/s)"} <= set(cols)
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(lines) - 3 == 6  # rows 1, 2 x (reference oop/ip, nccl1 oop)
    assert {(r["mesh"], r["ranks_per_node"], r["world"], r["dtype"]) for r in rows} == {
        ("dp=1,tp=2", "2", "2", "float64")}
    assert all(r["errors"] == "0" for r in rows if r["backend"] == "nccl1")
    with open(prefix + ".json") as f:
        assert {r["mesh"] for r in json.load(f)} == {"dp=1,tp=2"}
    assert "[1/6] allreduce(tp); allgather(dp) | reference | oop | rows 1" in proc.stderr
    if bench.plot_available():
        assert Path(prefix + ".png").is_file()
    else:
        assert f"note: {prefix}.png not written: it needs matplotlib " \
               "(pip install 'mixcc[plot]')" in proc.stderr


def test_default_run_says_how_to_write_files(tmp_path):
    proc = _run_bench("--world-size", "2", "--program", "allgather", "--max-rows", "1",
                      tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: nothing written; --out PREFIX writes PREFIX.csv, PREFIX.json and " \
           "PREFIX.png" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_under_torchrun_the_world_is_torchruns_and_rank_0_reports(capsys, no_spawn,
                                                                   monkeypatch, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(["bench", "--mesh", "dp=2,tp=2"]) == 2
    err = capsys.readouterr().err
    expect = "mixcc: error: --mesh dp=2,tp=2 has 4 ranks but torchrun's WORLD_SIZE is 2\n"
    assert err == (expect if printed else "")


def test_every_backend_the_help_lists_is_accepted(capsys, no_spawn):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "comma list of fused, reference, nccl1, symm_one_shot, symm_two_shot" in text
    for b in bench.BACKENDS:
        try:
            cli.bench_config(_args("--backend", b, "--program", "allreduce_allgather"))
        except cli.UsageError as e:  # may not apply here (no GPU), but is a known name
            assert str(e).startswith(f"--backend {b} cannot run "), str(e)
