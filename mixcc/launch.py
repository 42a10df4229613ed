"""Local multi-process launch for the CLI and tests: spawn ranks on loopback, or join
an existing torchrun job."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Environment every process of ours keeps: NVLink multicast is forbidden on the
# lent machines (ARCHITECTURE.md section 5). Set by the launcher, never by a library
# constructor.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def pick_backend(world_size: int) -> str:
    """NCCL when every rank gets its own GPU, else gloo (CPU, or several ranks per GPU)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if n >= world_size and world_size > 0 and n > 0 else "gloo"


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple
           ) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    kw: dict[str, Any] = {"timeout": timedelta(seconds=300)}
    if "nccl" in backend:
        kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, rank=rank, world_size=world_size, **kw)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # nobody tears groups down while a peer still uses them
    finally:
        _teardown()


def _teardown() -> None:
    from .reference import clear_groups
    from .runtime import close_all

    close_all()
    clear_groups()
    dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any, backend: str | None = None) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes with a process group."""
    os.environ.update(NO_MULTICAST_ENV)
    backend = backend or pick_backend(world_size)
    mp.spawn(_entry, args=(world_size, free_port(), backend, fn, args), nprocs=world_size,
             join=True)


def run_torchrun(fn: Callable, *args: Any, backend: str | None = None) -> None:
    """Run fn(rank, world_size, *args) in this torchrun-launched process."""
    os.environ.update(NO_MULTICAST_ENV)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    backend = backend or pick_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        _teardown()
