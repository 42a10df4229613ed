"""GPU tests: each spawns its ranks through a fixture (gpu_helpers.ranks): world size,
GPUs used (ranks beyond one per GPU share it under CUDA MPS, started and stopped here when
no daemon runs), the process group (NCCL for CUDA tensors when each rank has its own GPU,
else gloo), NVSHMEM for simulated nodes. A test skips, with the reason, where the GPUs,
nvcc, NVSHMEM or MPS it needs are missing; a rank's failure fails the test with that
rank's traceback; every spawn is joined with a deadline. Run them on a GPU machine with
`python -m pytest tests/gpu` (environment variables for the long runs: docs/REFERENCE.md;
how to run them on a remote GPU machine: CONTRIBUTING.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from gpu_helpers import ranks


@pytest.fixture
def spawn_ranks() -> Callable[..., None]:
    """spawn_ranks(fn, world, *args, gpus=world, backend=None, nvshmem=False): run
    fn(rank, world, *args) on `world` ranks over `gpus` GPUs (see gpu_helpers.ranks)."""

    def run(fn: Callable, world: int, *args, gpus: int | None = None,
            backend: str | None = None, nvshmem: bool = False) -> None:
        ranks.spawn(fn, ranks.Placement(world, gpus or world, backend), *args, nvshmem=nvshmem)

    return run
