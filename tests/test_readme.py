"""The README's code blocks run and say what they print; its set-up command is CI's; its
performance table is the data in docs/perf; its links resolve; it stays short."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def blocks(lang: str) -> list[str]:
    """The README's fenced blocks of one language, in order."""
    return [body for kind, body in BLOCK.findall(README) if kind == lang]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_readme_is_short():
    assert len(README.splitlines()) <= 200
    assert len(README.split()) <= 2000


def test_python_blocks_run_under_torchrun_and_print_what_the_readme_says(tmp_path):
    """Every python block is a complete script; the quickstart runs as the README says
    (torchrun, two gloo ranks on CPU) and prints the text block that follows it."""
    scripts = blocks("python")
    assert scripts, "the README has no python block"
    for i, script in enumerate(scripts):
        path = tmp_path / f"block{i}.py"
        path.write_text(script)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(path)] if "init_process_group" in script \
            else [sys.executable, str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(),
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if "quickstart.py" in script:
            after = README[README.index(script) + len(script):]
            printed = BLOCK.search(after)[2]
            assert proc.stdout.split() == printed.split(), (proc.stdout, printed)


def test_explain_example_prints_the_lines_shown():
    (example,) = [b for b in blocks("bash") if b.startswith("mixcc explain")]
    program = re.search(r'"([^"]+)"', example)[1]
    mesh = re.search(r"--mesh (\S+)", example)[1]
    proc = subprocess.run([sys.executable, "-m", "mixcc", "explain", program, "--mesh", mesh],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    shown = [b for k, b in BLOCK.findall(README[README.index(example) + len(example):])
             if k == "text"][0]
    for line in shown.strip().splitlines():
        assert line in proc.stdout, line


def test_setup_commands_are_in_step_with_ci():
    """The install-and-test command is the line .ci/run runs; the bench command installs
    the same torch."""
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [b.strip() for b in blocks("bash") if b.startswith("pip install torch")]
    bench, tests = commands
    assert tests in ci.splitlines()
    assert bench == "pip install torch==2.13.0 && pip install -e . && mixcc bench"


def test_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (ROOT / target).exists(), target
    for path in re.findall(r"\b((?:docs|benchmarks)/[\w./-]+\.(?:md|png|csv|json))", README):
        assert (ROOT / path).exists(), path


def _time(files: list[str], program: str, nbytes: int, backend: str) -> float:
    for name in files:
        with open(ROOT / "docs" / "perf" / "h200x2-nvlink" / name) as f:
            for r in csv.DictReader(f):
                if (r["program"], int(r["bytes"]), r["backend"], r["mode"]) == \
                        (program, nbytes, backend, "oop"):
                    assert r["errors"] in ("0", "-1"), r
                    return float(r["time_us"])
    raise AssertionError(f"no row for {program} {nbytes} {backend}")


@pytest.mark.parametrize("name,program", [
    ("allreduce", "allreduce(tp)"), ("allgather", "allgather(dp)"),
    ("reducescatter", "reducescatter(dp)"),
    ("allreduce_allgather", "allreduce(tp); allgather(dp)"),
    ("reducescatter_allreduce", "reducescatter(dp); allreduce(tp)")])
def test_performance_table_is_the_data(name, program):
    """Each cell (auto / NCCL [/ best torch symmetric memory]) is the dataset's row."""
    (row,) = [ln for ln in README.splitlines() if ln.startswith(f"| {name} |")]
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    sizes = [64 << 10, 1 << 20, 16 << 20, 128 << 20]
    for nbytes, cell in zip(sizes, cells, strict=True):
        small = nbytes <= 1 << 20
        files = (["small_allreduce.csv"] if small else ["allreduce.csv"]) \
            if name == "allreduce" else \
            (["small_collectives_dp2.csv"] if small else ["collectives_dp2.csv"])
        want = [_time(files, program, nbytes, "auto"), _time(files, program, nbytes, "reference")]
        if name == "allreduce":
            want.append(min(_time(files, program, nbytes, b)
                            for b in ("symm_one_shot_nocopy", "symm_two_shot_nocopy")))
        assert [float(v) for v in cell.split("/")] == [round(w, 1) for w in want], (nbytes, cell)
