"""Where the shipped CUDA sources live: mixcc/_templates and mixcc/_runtime of an
installed wheel (package data), else templates/ and runtime/ of a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str, marker: str) -> Path:
    """The wheel's mixcc/_<name> if it holds `marker`, else the checkout's <name>/."""
    installed = _PACKAGE / f"_{name}"
    return installed if (installed / marker).exists() else _PACKAGE.parent / name


def templates_dir() -> Path:
    return data_dir("templates", "stage_kernel.cu.j2")


def runtime_source_dir() -> Path:
    return data_dir("runtime", "mixcc_runtime.cu")
