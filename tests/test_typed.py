"""The wheel is typed (PEP 561 marker mixcc/py.typed) and offers the `plot` extra that
`mixcc bench --out` needs for its PNG."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_py_typed_and_the_plot_extra(tmp_path):
    pytest.importorskip("setuptools")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("mixcc-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "mixcc/py.typed" in names
        assert "mixcc/torch_ops.py" in names
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    assert "Provides-Extra: plot" in lines
    assert 'Requires-Dist: matplotlib>=3.5; extra == "plot"' in lines
