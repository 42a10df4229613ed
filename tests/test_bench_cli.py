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
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from fake_cuda import fake_graph_timing

import mixcc
from mixcc import baselines, bench, cli, launch
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
    (["--backend", "bogus"], "--backend 'bogus' is not one of auto, auto:registered, "
                             "auto:invariant, fused, fused:one_shot, fused:two_shot, "
                             "fused:push, fused:ll, "
                             "fused:one_shot:registered, reference, nccl1, symm_one_shot, "
                             "symm_two_shot, symm_one_shot_nocopy, symm_two_shot_nocopy, "
                             "nccl_symm, nccl_symm_nocopy, peer_copy, separate"),
    (["--backend", "fused:three_shot"], "did you mean 'fused:two_shot'?"),
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
    (["--world-size", "2,x"], "--world-size '2,x' must be a rank count or a comma list such "
                              "as 2,4,8"),
    (["--world-size", "2,0"], "--world-size must be >= 1, got 0"),
    (["--world-size", "4,8", "--mesh", "dp=2,tp=2"],
     "--mesh dp=2,tp=2 fits one world size; with --world-size 4,8 leave --mesh out"),
    (["--world-size", "4,6", "--ranks-per-node", "4"],
     "--ranks-per-node 4 must divide the world size 6"),
    (["--min-bytes", "16Q"], "--min-bytes '16Q' is not a byte count such as 4096, 16K, 64M"),
    (["--min-bytes", "1M", "--max-bytes", "16K"],
     "--min-bytes 1048576 is above --max-bytes 16384: no size to run"),
    (["--min-bytes", "16K", "--max-rows", "8"],
     "give sizes in rows (--min-rows/--max-rows) or in bytes (--min-bytes/--max-bytes), "
     "not both"),
    (["--backend", "separate", "--program", "allreduce"], "--backend separate cannot run "
                                                          "'allreduce(tp)': "),
    (["--backend", "symm_two_shot_nocopy", "--program", "allreduce_allgather"],
     "--backend symm_two_shot_nocopy cannot run 'allreduce(tp); allgather(dp)': "
     "symmetric-memory baseline: one sum allreduce over the whole world only"),
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
    [(world, cfg)], skipped = cli.bench_config(_args("--mesh", "dp=2,tp=4", "--program",
                                                     "allreduce"))
    assert world == 8
    assert cfg["mesh_axes"] == [("dp", 2), ("tp", 4)]
    assert cfg["ranks_per_node"] == 8  # spawned ranks are local: one node
    assert cfg["pairs"] == [("allreduce(tp)", "reference")] and skipped == []
    assert cfg["pg"] == "gloo" and cfg["mps"] is False
    [(world, cfg)], _ = cli.bench_config(_args("--world-size", "8", "--ranks-per-node", "4"))
    assert world == 8 and cfg["mesh_axes"] == [("dp", 2), ("tp", 4)]
    assert cfg["ranks_per_node"] == 4


def test_a_list_of_world_sizes_is_one_run_each_with_the_default_mesh(no_spawn):
    runs, _ = cli.bench_config(_args("--world-size", "2,4,8,4", "--program", "allreduce(world)"))
    assert [w for w, _ in runs] == [2, 4, 8]  # duplicates dropped, order kept
    assert [cfg["mesh_axes"] for _, cfg in runs] == [
        [("dp", 2), ("tp", 1)], [("dp", 2), ("tp", 2)], [("dp", 2), ("tp", 4)]]
    assert [cfg["ranks_per_node"] for _, cfg in runs] == [2, 4, 8]
    assert all(cfg["pairs"] == [("allreduce(world)", "reference")] for _, cfg in runs)


@pytest.mark.parametrize("argv,expect", [
    (["--min-bytes", "16K", "--max-bytes", "64M"], (16 << 10, 64 << 20)),
    (["--min-bytes", "16KiB", "--max-bytes", "1mb"], (16 << 10, 1 << 20)),
    (["--max-bytes", "4096"], (2048, 4096)),  # min: one row of 1024 float16 elements
    (["--min-bytes", "1G"], None),  # max: the default 256 rows
])
def test_sizes_in_bytes(no_spawn, argv, expect):
    args = _args("--dtype", "float16", "--program", "allreduce", *argv)
    if expect is None:
        assert _bench_error_of(args) == "--min-bytes 1073741824 is above --max-bytes 524288: " \
                                        "no size to run"
        return
    [(_, cfg)], _ = cli.bench_config(args)
    assert (cfg["min_bytes"], cfg["max_bytes"]) == expect


def test_fused_options_reach_compile_and_bad_ones_are_refused(no_spawn, monkeypatch):
    from mixcc.codegen import layout

    [(_, cfg)], _ = cli.bench_config(_args("--program", "allreduce", "--workspace-bytes",
                                           "256M", "--symmetric-bytes", "128MiB",
                                           "--pipeline-depth", "3"))
    opts = {"workspace_bytes": 256 << 20, "symmetric_bytes": 128 << 20, "pipeline_depth": 3}
    assert cfg["fused_options"] == opts
    assert "# fused options: pipeline_depth=3, symmetric_bytes=134217728, " \
           "workspace_bytes=268435456" in bench.preamble(
               mixcc.Mesh([("tp", 2)]), 2, "gloo", "float32", "fused", cfg)
    [(_, plain)], _ = cli.bench_config(_args("--program", "allreduce"))
    assert plain["fused_options"] == {} and "fused options" not in bench.preamble(
        mixcc.Mesh([("tp", 2)]), 2, "gloo", "float32", "fused", plain)
    seen = []  # _entries hands them to every fused compile, never to the reference
    fake = SimpleNamespace(ir=SimpleNamespace(row_factor=1))
    monkeypatch.setattr(bench, "mixcc_compile", lambda *a, **kw: seen.append(kw) or fake)
    cfg["pairs"] = [("allreduce(tp)", "fused:push"), ("allreduce(tp)", "reference")]
    bench._entries(cfg, mixcc.Mesh([("tp", 2)]), torch.float32, {}, [])
    assert [kw.get("workspace_bytes") for kw in seen] == [None, 256 << 20]
    assert {k: seen[1][k] for k in opts} == opts and seen[1]["algorithm"] == "push"
    small = layout.MIN_WORKSPACE_BYTES - 1
    for argv, msg in [(("--workspace-bytes", str(small)), f"--workspace-bytes: "
                       f"workspace_bytes must be >= {small + 1}, got {small}"),
                      (("--symmetric-bytes", "1.5G"), "--symmetric-bytes "),
                      (("--pipeline-depth", "4"), "--pipeline-depth: pipeline_depth must be "
                                                  "1, 2 or 3, got 4")]:
        assert _bench_error_of(_args("--program", "allreduce", *argv)).startswith(msg)


def _bench_error_of(args) -> str:
    with pytest.raises(cli.UsageError) as e:
        cli.bench_config(args)
    return str(e.value)


def test_parse_size_and_byte_sweeps():
    assert [bench.parse_size(t) for t in ("4096", "16K", "16k", "16KiB", "64M", "1G", "2 MB")] \
        == [4096, 16 << 10, 16 << 10, 16 << 10, 64 << 20, 1 << 30, 2 << 20]
    for bad in ("", "K", "1.5M", "-1", "16T"):
        with pytest.raises(ValueError):
            bench.parse_size(bad)
    # 16 KiB .. 64 MiB of bf16 rows of 1024: 2 KiB a row, every size exact, 13 sizes
    rows = bench.sizes_from_bytes(16 << 10, 64 << 20, 2048, 1)
    assert rows[0] == 8 and rows[-1] == 32768 and len(rows) == 13
    assert bench.sizes_from_bytes(16 << 10, 64 << 20, 2048, 2) == rows  # granularity 2 fits
    # rows of 14 KiB (7168 bf16): the nearest multiple of the granularity (2), at least
    # one; 16 and 32 KiB both give 2 rows, which run once
    assert bench.sizes_from_bytes(16 << 10, 256 << 10, 14336, 2) == [2, 4, 10, 18]
    assert bench.sizes_from_bytes(1, 4, 14336, 1) == [1]


def test_pairs_skip_what_a_baseline_cannot_run(no_spawn):
    [(_, cfg)], skipped = cli.bench_config(_args("--program", "allreduce_allgather", "--program",
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


def test_results_that_cannot_be_written_are_one_line_and_exit_1(tmp_path):
    (tmp_path / "b.csv").mkdir()  # passes the --out check, fails when the results are written
    proc = _run_bench("--program", "allreduce", "--out", str(tmp_path / "b"),
                      tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"mixcc: error: writing the results: [Errno 21] Is a directory: " \
                   f"'{tmp_path / 'b.csv'}'"
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr


def test_bench_float64_world_from_mesh_header_units_and_files(tmp_path):
    prefix = str(tmp_path / "r")
    proc = _run_bench("--mesh", "dp=1,tp=2", "--dtype", "float64", "--program",
                      "allreduce_allgather", "--backend", "reference,nccl1", "--out", prefix,
                      tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table, pivot = proc.stdout.split("# oop time (us) per backend", 1)
    lines = table.splitlines()
    # the summary printed last: one line per size, a column per backend and its ratio
    assert pivot.splitlines()[1].split()[3:] == ["reference", "nccl1", "/ref", "nccl1"]
    assert len(pivot.splitlines()) == 2 + 2  # header lines + rows 1 and 2
    assert lines[0] == "# mixcc bench: mesh dp=1,tp=2 (ranks_per_node 2), world 2, " \
                       "process group gloo; CPU"
    assert lines[1].startswith("# dtype float64, hidden 1024, backends reference,nccl1; ")
    cols = lines[2].split()
    assert cols[:3] == ["program", "backend", "mode"]
    assert {"size(B)", "moved(B)", "time(us)", "min(us)", "max(us)", "algbw(GB/s)",
            "busbw(GB/s)", "ratio", "best"} <= set(cols)
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(lines) - 3 == 6  # rows 1, 2 x (reference oop/ip, nccl1 oop)
    assert {(r["mesh"], r["ranks_per_node"], r["world"], r["dtype"]) for r in rows} == {
        ("dp=1,tp=2", "2", "2", "float64")}
    assert all(r["errors"] == "0" for r in rows if r["backend"] == "nccl1")
    for r in rows:  # every row has its spread, bytes moved and a ratio (all on gloo, cpu)
        assert float(r["min_us"]) <= float(r["time_us"]) <= float(r["max_us"])
        assert float(r["bus_bytes"]) == int(r["bytes"])  # (1 + dp - 2/tp) S on dp=1,tp=2
        assert r["timing"] == "cpu" and r["setup"] == "CPU" and r["device"] == "CPU"
        assert r["best"] in ("reference", "nccl1") and float(r["ratio"]) >= 1.0
        assert (r["iters"], r["repeats"]) == ("1", "1")
    with open(prefix + ".json") as f:
        assert {r["mesh"] for r in json.load(f)} == {"dp=1,tp=2"}
    assert "[1/6] allreduce(tp); allgather(dp) | reference | oop | rows 1" in proc.stderr
    if bench.plot_available():
        assert Path(prefix + "_allreduce_allgather_w2.png").is_file()
    else:
        assert f"note: {prefix}_<program>_w<world>.png not written: it needs matplotlib " \
               "(pip install 'mixcc[plot]')" in proc.stderr


def test_default_run_says_how_to_write_files(tmp_path):
    proc = _run_bench("--world-size", "2", "--program", "allgather", "--max-rows", "1",
                      tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: nothing written; --out PREFIX writes PREFIX.csv, PREFIX.json and " \
           "PREFIX_<program>_w<world>.png" in proc.stderr
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
    assert ("comma list of auto, auto:registered, auto:invariant, fused, fused:one_shot, "
            "fused:two_shot, fused:push, fused:ll, fused:one_shot:registered, reference, nccl1, "
            "symm_one_shot, symm_two_shot, "
            "symm_one_shot_nocopy, symm_two_shot_nocopy, nccl_symm, nccl_symm_nocopy, "
            "peer_copy, separate") in text
    for b in bench.BACKENDS:
        try:
            cli.bench_config(_args("--backend", b, "--program", "allreduce_allgather"))
        except cli.UsageError as e:  # may not apply here (no GPU), but is a known name
            assert str(e).startswith((f"--backend {b} cannot run ",
                                      f"nothing to run: n/a: {b}: ")), str(e)


def _row(backend: str, time_us: float, *, bytes_: int = 1024, timing: str = "graph",
         errors: int = 0, program: str = "allreduce(world)", world: int = 4,
         mode: str = "oop") -> bench.Row:
    return bench.Row(program, backend, mode, timing, "bfloat16", world, "dp=2,tp=2", world, 1,
                     bytes_ // 2, bytes_, 1.5 * bytes_, time_us, time_us * 0.9,
                     time_us * 1.2, 1.0, 1.5, errors, device="NVIDIA H100 80GB HBM3",
                     setup="one GPU, MPS")


def test_ratio_is_time_over_the_fastest_baseline_of_the_same_size_and_timing():
    rows = [
        _row("fused", 10.0), _row("fused", 9.0, mode="ip"), _row("fused:two_shot", 30.0),
        _row("symm_one_shot", 20.0), _row("symm_one_shot_nocopy", 15.0),
        _row("symm_two_shot", 12.0, errors=3),  # wrong results never count as best
        _row("reference", 1.0, timing="cpu"),  # gloo on CPU: not compared with graph rows
        _row("fused", 40.0, bytes_=4096), _row("symm_two_shot", 20.0, bytes_=4096),
        _row("fused", 50.0, world=8),  # no baseline ran at world 8
        _row("fused", 5.0, timing="host"), _row("symm_one_shot", 4.0, timing="host"),
    ]
    bench.add_ratios(rows)
    got = [(r.backend, r.bytes, r.world, r.timing, r.ratio, r.best) for r in rows]
    nan = float("nan")
    expect = [
        ("fused", 1024, 4, "graph", 10 / 15, "symm_one_shot_nocopy"),
        ("fused", 1024, 4, "graph", 9 / 15, "symm_one_shot_nocopy"),
        ("fused:two_shot", 1024, 4, "graph", 2.0, "symm_one_shot_nocopy"),
        ("symm_one_shot", 1024, 4, "graph", 20 / 15, "symm_one_shot_nocopy"),
        ("symm_one_shot_nocopy", 1024, 4, "graph", 1.0, "symm_one_shot_nocopy"),
        ("symm_two_shot", 1024, 4, "graph", 12 / 15, "symm_one_shot_nocopy"),
        ("reference", 1024, 4, "cpu", 1.0, "reference"),
        ("fused", 4096, 4, "graph", 2.0, "symm_two_shot"),
        ("symm_two_shot", 4096, 4, "graph", 1.0, "symm_two_shot"),
        ("fused", 1024, 8, "graph", nan, ""),
        ("fused", 1024, 4, "host", nan, ""),  # issue times: no ratio
        ("symm_one_shot", 1024, 4, "host", nan, ""),
    ]
    for g, e in zip(got, expect, strict=True):
        assert g[:4] == e[:4] and g[5] == e[5], (g, e)
        assert (g[4] != g[4] and e[4] != e[4]) or abs(g[4] - e[4]) < 1e-12, (g, e)
    assert bench.add_ratios([]) == []


def test_peer_copy_is_a_bound_never_a_rows_best():
    rows = [_row("fused", 10.0), _row("peer_copy", 6.0), _row("reference", 12.0)]
    bench.add_ratios(rows)
    assert [(r.backend, r.ratio, r.best) for r in rows] == [
        ("fused", 10 / 12, "reference"), ("peer_copy", 0.5, "reference"),
        ("reference", 1.0, "reference")]


def test_peer_copy_runs_at_two_ranks_with_a_gpu_each_only(no_spawn):
    mesh2, mesh4 = mixcc.Mesh([("dp", 1), ("tp", 2)]), mixcc.Mesh([("dp", 2), ("tp", 2)])
    why = "peer_copy: two ranks with a GPU each (NCCL) only"
    assert baselines.unavailable_reason("peer_copy", "allreduce", mesh2, torch.bfloat16,
                                        nccl=True) is None
    assert baselines.unavailable_reason("peer_copy", "allreduce", mesh4, torch.bfloat16,
                                        nccl=True) == why
    assert baselines.unavailable_reason("peer_copy", "allgather", mesh2, torch.bfloat16,
                                        nccl=False, one_gpu=True) == why
    with pytest.raises(cli.UsageError, match="peer_copy: two ranks with a GPU each"):
        cli.bench_config(_args("--world-size", "2", "--backend", "reference,peer_copy"))


def test_combined_presets_compare_with_separate_nccl1_and_reference():
    prog = "allreduce(tp); allgather(dp)"
    rows = [_row("fused", 10.0, program=prog), _row("separate", 16.0, program=prog),
            _row("nccl1", 12.0, program=prog), _row("reference", 20.0, program=prog)]
    bench.add_ratios(rows)
    assert [(r.best, round(r.ratio, 4)) for r in rows] == [
        ("nccl1", 0.8333), ("nccl1", 1.3333), ("nccl1", 1.0), ("nccl1", 1.6667)]
    assert [bench.is_baseline(b) for b in bench.BACKENDS] == [False] * 9 + [True] * 10
    assert bench.BACKENDS[:9] == ("auto", "auto:registered", "auto:invariant", "fused",
                                  "fused:one_shot", "fused:two_shot", "fused:push", "fused:ll",
                                  "fused:one_shot:registered")


def test_rows_round_trip_through_json_and_plot_titles(tmp_path):
    rows = bench.add_ratios([_row("fused", 10.0, timing="host"), _row("symm_one_shot", 8.0)])
    path = str(tmp_path / "rows.json")
    bench.dump_rows(rows, path)
    text = open(path).read()
    assert "NaN" not in text and '"ratio": null' in text  # standard JSON
    back = bench.read_rows(path)
    assert [r.backend for r in back] == ["fused", "symm_one_shot"]
    assert back[0].ratio != back[0].ratio and back[1].ratio == 1.0
    assert back[1] == rows[1]
    assert bench.plot_title(rows) == ("mixcc bench: allreduce(world)\nNVIDIA H100 80GB HBM3, "
                                      "world 4 (mesh dp=2,tp=2), bfloat16, one GPU, MPS")
    assert bench.png_path("out/b", "allreduce(tp); allgather(dp)", 8) == \
        "out/b_allreduce_allgather_w8.png"
    assert bench.png_path("b", "allreduce(world)", 2) == "b_allreduce_world_w2.png"
    assert bench.setup_label(False, 1, True) == "one GPU, MPS"
    assert bench.setup_label(False, 1, False) == "one GPU, no MPS"
    assert bench.setup_label(True, 8, False) == "one GPU per rank"
    assert bench.setup_label(False, 0, False) == "CPU"


def test_outputs_one_png_per_program_and_world(tmp_path):
    prog = "allreduce(tp); allgather(dp)"
    rows = bench.add_ratios([_row(b, t, bytes_=n, world=w, program=p)
                             for p in ("allreduce(world)", prog) for w in (4, 8)
                             for n in (1024, 2048) for b, t in (("fused", 5.0), ("separate", 6.0))])
    written = bench.write_outputs(rows, str(tmp_path / "b"))
    assert written[:2] == [str(tmp_path / "b.csv"), str(tmp_path / "b.json")]
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 16
    if not bench.plot_available():
        assert len(written) == 2
        pytest.skip("matplotlib is not installed: no PNGs to check")
    assert sorted(Path(p).name for p in written[2:]) == [
        "b_allreduce_allgather_w4.png", "b_allreduce_allgather_w8.png",
        "b_allreduce_world_w4.png", "b_allreduce_world_w8.png"]
    assert all(Path(p).stat().st_size > 0 for p in written[2:])


def test_graph_timing_replays_a_one_call_graph_before_each_timed_replay(monkeypatch):
    """repeat_times' graph mode with torch.cuda faked: the order of captures, replays and
    events, and seconds per call from the events (the real thing needs a GPU)."""
    log: list[str] = []
    fn = fake_graph_timing(monkeypatch, log)
    times = bench.repeat_times(fn, 4, 2, "graph")
    assert times == [2.0 / 1e3 / 4] * 2
    assert log == ["eager"] * 3 + ["replay 4", "replay 1"] + [
        "barrier", "replay 1", "record", "replay 4", "record"] * 2


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5),
                                       (torch.float64, 1e-12)])
def test_count_wrong_counts_elements_off_the_exact_result(dtype, tol):
    gen = torch.Generator().manual_seed(5)
    expect = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    got = expect.to(dtype)
    assert bench.count_wrong(got, expect) == 0  # rounding to the dtype is not an error
    bad = got.clone()
    bad[3, 1] += 1.0
    bad[7, 0] = -bad[7, 0] * 3 - 1
    bad[9, 5] = float("nan")
    assert bench.count_wrong(bad, expect) == 3
    # just past the tolerance at one element counts, just inside does not
    e = torch.tensor([2.0], dtype=torch.float64)
    assert bench.count_wrong((e * (1 + 3 * tol)).to(dtype), e) == 1
    assert bench.count_wrong((e * (1 + tol / 4)).to(dtype), e) == 0
    # NaN and infinities where the exact result has them are right
    special = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    assert bench.count_wrong(special.to(dtype), special) == 0
    assert bench.count_wrong(special.flip(0).to(dtype), special) == 2


def test_registered_rows_run_on_a_group_of_their_own(rank_pool):
    from tasks import bench_registered_group

    assert rank_pool.run(rank_pool.size, bench_registered_group) == \
        {r: "" for r in range(rank_pool.size)}


def test_separate_rows_are_judged_with_a_rounding_per_call(rank_pool):
    from tasks import bench_separate_oracle

    assert rank_pool.run(rank_pool.size, bench_separate_oracle) == \
        {r: "" for r in range(rank_pool.size)}


def test_a_row_that_runs_past_its_limit_is_named_and_ends_the_rank(capsys):
    import time

    codes: list[int] = []
    with bench.row_watchdog(0.05, "allreduce(world) | symm_two_shot | oop | rows 8", 3,
                            exit=codes.append):
        time.sleep(0.5)
    assert codes == [3]
    err = capsys.readouterr().err
    assert err.startswith("error: mixcc bench: rank 3: the row 'allreduce(world) | "
                          "symm_two_shot | oop | rows 8' has run for 0 s and is taken for hung")
    for limit in (5.0, 0.0):  # a row that ends in time, and no limit
        with bench.row_watchdog(limit, "r", 0, exit=codes.append):
            time.sleep(0.1)
    time.sleep(0.1)
    assert codes == [3]


def test_bench_with_a_row_limit_too_short_says_which_row_and_fails(tmp_path):
    proc = _run_bench("--program", "allreduce", "--backend", "reference",
                      "--row-timeout", "0.000001", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "the row 'allreduce(tp) | reference | oop | rows 1 | world 4' has run for 0 s " \
           "and is taken for hung" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("the process died (exit code 3) "
                                                         "without a Python exception")
