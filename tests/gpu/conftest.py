"""GPU tests: each spawns its ranks (one process per GPU, NCCL process group) through
mixcc.launch.spawn and skips cleanly where the GPUs, or nvcc, are missing. Run them on a
GPU machine with `python -m pytest tests/gpu` (a rank's failure fails the test with that
rank's traceback; pytest-timeout bounds every test)."""

from __future__ import annotations

import pytest
import torch


def need_gpus(n: int) -> None:
    """Skip the calling test unless `n` GPUs and nvcc are here."""
    from mixcc.codegen.build import find_nvcc

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < n:
        pytest.skip(f"needs {n} GPUs, this machine has {have}")
    if find_nvcc() is None:
        pytest.skip("needs nvcc to build the fused kernels")


@pytest.fixture
def spawn_ranks():
    """spawn_ranks(fn, world, *args): fn(rank, world, *args) on `world` ranks, one per GPU,
    on an NCCL process group; skips without `world` GPUs."""
    from mixcc import launch

    def run(fn, world: int, *args) -> None:
        need_gpus(world)
        launch.spawn(fn, world, *args, backend="nccl")

    return run
