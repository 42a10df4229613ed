"""The wheel ships templates/ and runtime/ as mixcc/_templates and mixcc/_runtime, so an
installed mixcc (not only a checkout) can build kernels."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_cuda_sources(tmp_path):
    pytest.importorskip("setuptools")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("mixcc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("mixcc/_templates/stage_kernel.cu.j2", "mixcc/_templates/mixcc_sync.cuh",
                   "mixcc/_templates/mixcc_vec.cuh", "mixcc/_templates/mixcc_check.cuh",
                   "mixcc/_runtime/mixcc_runtime.cu", "mixcc/ir/grammar.lark"):
        assert needed in names, f"{needed} missing from {wheel.name}"
