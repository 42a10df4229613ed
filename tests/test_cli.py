import csv
import json
import subprocess
import sys

from mixcc.cli import main


def test_explain_prints_ast_ir_plan(capsys):
    assert main(["explain", "allreduce_allgather", "--mesh", "dp=2,tp=4",
                 "--ranks-per-node", "8", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "allreduce(tp); allgather(dp)" in out
    assert "IR after passes: allreduce(tp) [intra]; allgather(dp) [intra]" in out
    assert "transport=ipc" in out and "one_shot chunk:" in out and "workspace per rank" in out
    assert "workspace per rank: IPC 72.4 MiB" in out and " B (" not in out  # human units
    assert "auto's thresholds: built-in rule" in out  # no --arch/--topology, no GPU here


def test_explain_tables_auto_per_stage_with_its_source(capsys):
    assert main(["explain", "allreduce(tp)", "--mesh", "tp=2", "--dtype", "bfloat16",
                 "--arch", "sm_90a", "--topology", "nvlink"]) == 0
    out = capsys.readouterr().out
    src = "shipped default sm_90-nvlink-w2"
    assert f"auto's thresholds: {src}" in out
    rows = [ln.split() for ln in out.splitlines() if ln.endswith(src) and ln.startswith(" ")]
    # size range | algorithm | source, no registered pool then with one
    assert [r[:-3] for r in rows[:3]] == [["<=", "256", "KiB", "ll"],
                                          [">", "256", "KiB,", "<", "32", "MiB", "one_shot"],
                                          [">=", "32", "MiB", "push"]]
    assert [">", "256", "KiB,", "<", "128", "MiB", "one_shot"] in [r[:-3] for r in rows]
    assert main(["explain", "allreduce(tp)", "--mesh", "tp=2", "--arch", "sm_90",
                 "--topology", "pcie"]) == 0
    out = capsys.readouterr().out
    assert "every size     one_shot   built-in rule (no table for sm_90-pcie-w2)" in out
    assert main(["explain", "allreduce(dp)", "--mesh", "dp=2,tp=1", "--ranks-per-node", "1",
                 "--arch", "sm_90", "--topology", "nvlink"]) == 0
    out = capsys.readouterr().out
    assert "< 16 MiB       hierarchical kernel" in out
    assert ">= 16 MiB      nccl (reference backend)" in out


def test_explain_names_the_tuning_table_where_it_decides(tmp_path, monkeypatch, capsys):
    import mixcc
    from mixcc import fused, tune

    table = tmp_path / "table.json"
    monkeypatch.setenv(tune.ENV, str(table))
    (stage,) = mixcc.compile("allreduce(tp)", mixcc.Mesh({"tp": 2}),
                             backend="reference").plan.stages
    import torch

    prefix = tune.stage_prefix(fused.tuning_key(stage, torch.bfloat16), "bfloat16", 2, "sm_90a")
    tune.save({prefix + str(tune.bucket(1 << 20)): tune.Choice("two_shot", 8)})
    assert main(["explain", "allreduce(tp)", "--mesh", "tp=2", "--dtype", "bfloat16",
                 "--arch", "sm_90a", "--topology", "nvlink"]) == 0
    out = capsys.readouterr().out
    import re

    assert re.search(r"> 512 KiB, <= 1 MiB +two_shot \(8 blocks\) +tuned table "
                     + re.escape(str(table)), out)
    assert re.search(r"> 256 KiB, <= 512 KiB +one_shot +shipped default", out)
    assert re.search(r"> 1 MiB, < 32 MiB +one_shot +shipped default", out)


def test_explain_key_flags_come_together(capsys):
    assert main(["explain", "allreduce(tp)", "--mesh", "tp=2", "--arch", "sm_90"]) == 2
    assert "--arch needs --topology too" in capsys.readouterr().err
    assert main(["explain", "allreduce(tp)", "--mesh", "tp=2", "--arch", "sm_90",
                 "--topology", "ib"]) == 2
    assert "--topology 'ib' is not one of" in capsys.readouterr().err


def test_explain_reports_errors_with_caret(capsys):
    assert main(["explain", "allreduce(tp*xx)", "--mesh", "dp=2,tp=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown axis 'xx'" in err and "^^" in err


def test_explain_multi_node(capsys):
    assert main(["explain", "allreduce(tp*dp)", "--mesh", "dp=2,tp=4",
                 "--ranks-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "[hier]" in out and "stage 0 [intra+inter] transport=ipc+nvshmem" in out
    assert "pipeline depth 2" in out and "NVSHMEM symmetric heap" in out
    assert "allreduce [inter] (nccl/gloo)" in out  # the reference backend's steps


def test_bench_on_gloo_writes_csv_and_json(tmp_path):
    prefix = str(tmp_path / "b")
    proc = subprocess.run(
        [sys.executable, "-m", "mixcc", "bench", "--world-size", "4", "--max-rows", "4",
         "--iters", "2", "--repeats", "2", "--program", "allreduce_allgather",
         "--program", "reducescatter(dp*tp)", "--program", "reducescatter_allreduce",
         "--backend", "reference,nccl1", "--out", prefix],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].split()[:3] == ["program", "backend", "mode"]
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["program"] for r in rows} == {"allreduce(tp); allgather(dp)",
                                             "reducescatter(dp*tp)",
                                             "reducescatter(dp); allreduce(tp)"}
    # the one-call baseline runs for the two combined presets and agrees with reference
    one = [r for r in rows if r["backend"] == "nccl1"]
    assert {r["program"] for r in one} == {"allreduce(tp); allgather(dp)",
                                           "reducescatter(dp); allreduce(tp)"}
    assert all(r["errors"] == "0" for r in one)
    assert "skip: nccl1 cannot run 'reducescatter(dp*tp)'" in proc.stderr
    assert all(float(r["time_us"]) > 0 and float(r["busbw_gbs"]) > 0 for r in rows)
    # allreduce(tp); allgather(dp) on dp=2,tp=2: bus bytes = (1 + dp - 2/tp) S = 2 S
    r = next(r for r in rows if r["program"].startswith("allreduce")
             and r["backend"] == "reference")
    assert abs(float(r["busbw_gbs"]) / float(r["algbw_gbs"]) - 2.0) < 1e-6
    with open(prefix + ".json") as f:
        assert len(json.load(f)) == len(rows)
    assert "[" in proc.stderr  # progress


def test_explain_ir_before_passes_has_no_scope_label(capsys):
    # the scope is only known after passes: before them no op may claim [intra]
    assert main(["explain", "allreduce(tp); allgather(dp)", "--mesh", "dp=2,tp=4",
                 "--ranks-per-node", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "IR: allreduce(tp); allgather(dp)  (out rows = in rows x 2)" in lines
    assert ("IR after passes: allreduce(tp) [intra]; allgather(dp) [inter]  "
            "(out rows = in rows x 2)") in lines


def test_explain_prints_row_granularity_only_when_it_constrains(capsys):
    assert main(["explain", "reducescatter(dp)", "--mesh", "dp=2,tp=4"]) == 0
    out = capsys.readouterr().out
    assert "IR: reducescatter(dp)  (rows % 2 == 0, out rows = in rows x 1/2)" in out
    assert main(["explain", "allreduce(tp)", "--mesh", "dp=2,tp=4"]) == 0
    assert "rows % 1" not in capsys.readouterr().out


def test_explain_help_lists_grammar_and_presets(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    out = capsys.readouterr().out
    assert "coll     := allreduce | allgather | reducescatter" in out
    assert "epilogue := add(T) | store(T) | rmsnorm(W[, eps=E]) | quant(fp8_e4m3, S)" in out
    assert "dispatch(group, experts=E, topk=K" in out and "combine(group)" in out
    from mixcc import presets

    lines = out.splitlines()
    for name, prog in {**presets.PRESETS, **presets.EPILOGUE_PRESETS}.items():
        assert any(ln.split() == [name, *prog.split()] for ln in lines), name
    from mixcc.tuning.thresholds import TOPOLOGIES

    assert "one of " + ", ".join(TOPOLOGIES) in " ".join(out.split())  # what --topology takes


def test_top_level_help_names_every_command(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "explain, bench, prebuild, tune" in capsys.readouterr().out


def test_prebuild_with_a_cache_others_can_write_is_one_line(tmp_path, monkeypatch, capsys):
    import os
    import shutil

    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        import pytest

        pytest.skip("nvcc is needed to reach the build step")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)  # group and others may write: refused
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(cache))
    assert main(["prebuild", "--mesh", "tp=2", "--program", "allreduce(tp)",
                 "--arch", "sm_90"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixcc: error: ") and str(cache) in err[0]
    assert "Traceback" not in err[0]


def test_close_all_is_public_after_a_plain_import():
    code = ("import mixcc; mixcc.close_all(); mixcc.close_all(barrier=False); "
            "mixcc.runtime.close_all(); print('released')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "released"
