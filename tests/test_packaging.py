"""The wheel ships templates/ and runtime/ as mixcc/_templates and mixcc/_runtime, so an
installed mixcc (not only a checkout) can build kernels; it is typed and offers the
`plot` extra."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built once for the tests of this module."""
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("mixcc-*.whl")
    return built


def test_wheel_contains_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("mixcc/_templates/stage_kernel.cu.j2", "mixcc/_templates/mixcc_sync.cuh",
                   "mixcc/_templates/mixcc_vec.cuh", "mixcc/_templates/mixcc_check.cuh",
                   "mixcc/_templates/hier_kernel.cu.j2",
                   "mixcc/_templates/transport_nvshmem.cuh", "mixcc/_templates/transport_ipc.cuh",
                   "mixcc/_templates/mixcc_epilogue.cuh",
                   "mixcc/_templates/nvshmem_init.cuh", "mixcc/_runtime/mixcc_nvshmem.cu",
                   "mixcc/_runtime/mixcc_runtime.cu", "mixcc/ir/grammar.lark",
                   "mixcc/tuning/__init__.py", "mixcc/tuning/thresholds.py",
                   "mixcc/tuning/defaults/sm_90-nvlink-w2.json",
                   "mixcc/tuning/defaults/sm_90-mps-w2.json"):
        assert needed in names, f"{needed} missing from {wheel.name}"


def test_wheel_ships_py_typed_and_the_plot_extra(wheel):
    """PEP 561 marker mixcc/py.typed, and the `plot` extra `mixcc bench --out` needs."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "mixcc/py.typed" in names
        assert "mixcc/torch_ops.py" in names
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    assert "Provides-Extra: plot" in lines
    assert 'Requires-Dist: matplotlib>=3.5; extra == "plot"' in lines


def test_repository_stands_alone():
    """Code cites docs/DESIGN.md, never design files outside the repository, and
    docs/REFERENCE.md documents every environment variable the package reads."""
    import re

    assert (ROOT / "docs" / "DESIGN.md").exists()
    sources = [p for d in ("mixcc", "templates", "runtime", "scripts", "tests")
               for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in
               (".py", ".cuh", ".cu", ".j2", ".sh", ".lark")]
    outside = [str(p) for p in sources
               if re.search(r"ARCHITECTURE\.md|PRIOR_ART\.md", p.read_text(errors="ignore"))]
    assert not outside, outside
    reference = (ROOT / "docs" / "REFERENCE.md").read_text()
    read = set()
    for p in (ROOT / "mixcc").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get|\.setdefault)?\(\s*\"([A-Z_]+)\"",
                               p.read_text()))
        read |= set(re.findall(r"environ\[\"([A-Z_]+)\"\]", p.read_text()))
    read -= {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"}  # torchrun's
    missing = sorted(v for v in read if f"`{v}`" not in reference)
    assert not missing, f"docs/REFERENCE.md does not document {missing}"


def test_cited_design_sections_exist():
    """Every docs/DESIGN.md section that code, templates, tests or scripts cite, by title
    (`docs/DESIGN.md, "Title"`) or number (`docs/DESIGN.md section N`), is a heading there."""
    import re

    headings = [re.sub(r"^#+\s*(\d+\.\s*)?", "", h).strip() for h in
                re.findall(r"^#+ .*$", (ROOT / "docs" / "DESIGN.md").read_text(), re.M)]
    numbers = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    titles, sections = set(), set()
    for d in ("mixcc", "templates", "runtime", "scripts", "tests"):
        for p in (ROOT / d).rglob("*"):
            if not p.is_file() or p.suffix not in (".py", ".cuh", ".cu", ".j2", ".sh", ".lark"):
                continue
            if p.name == "test_packaging.py":
                continue
            text = re.sub(r"\s*\n\s*(?:#|//|\*)?\s*", " ", p.read_text(errors="ignore"))
            text = text.replace('" "', "")  # adjacent string literals, joined
            titles |= set(re.findall(r'DESIGN\.md, \\?"([^"\\]+)\\?"', text))
            sections |= set(re.findall(r"DESIGN\.md,? section (\d+)", text))
    assert titles, "no cited section found: the pattern is stale"
    missing = sorted(t for t in titles if t not in headings)
    assert not missing, f"docs/DESIGN.md has no heading {missing}"
    assert sections <= numbers, sorted(sections - numbers)
