"""Placements of a GPU test's ranks and their spawning: `world` ranks over the first
`gpus` GPUs (round robin), one process per rank; one rank per GPU runs on an NCCL process
group ("cpu:gloo,cuda:nccl", CPU tensors on gloo), ranks sharing a GPU on gloo under CUDA
MPS (started here when no daemon runs, stopped after). A test skips, with the reason,
where the GPUs, nvcc, NVSHMEM or MPS it needs are missing; every spawn is joined with a
deadline (MIXCC_GPU_TEST_TIMEOUT, default 540 s), so a hung rank fails its test; past the
deadline every live rank first prints its Python stacks (faulthandler, SIGUSR1) to stderr.

Knobs come from the environment (`env_int`): they select the long device runs and keep
the defaults short.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

NVSHMEM_ENV = {"NVSHMEM_REMOTE_TRANSPORT": "none",  # one host: P2P only
               "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}


def env_int(name: str, default: int) -> int:
    """The integer in environment variable `name`, else `default`."""
    value = os.environ.get(name, "").strip()
    return int(float(value)) if value else default


def gpu_count() -> int:
    """GPUs visible here (no CUDA context is created in the test process)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Placement:
    """`world` ranks on the first `gpus` GPUs; `backend` of the process group (None: NCCL
    for CUDA tensors when every rank has its own GPU, else gloo)."""

    world: int
    gpus: int
    backend: str | None = None

    @property
    def per_gpu(self) -> int:
        return -(-self.world // self.gpus)

    @property
    def shared(self) -> bool:
        return self.per_gpu > 1

    @property
    def pg_backend(self) -> str:
        if self.backend:
            return self.backend
        return "gloo" if self.shared else "cpu:gloo,cuda:nccl"

    @property
    def nccl(self) -> bool:
        return "nccl" in self.pg_backend

    def __str__(self) -> str:
        return f"w{self.world}-{self.gpus}gpu" + ("-mps" if self.shared else "")


def skip_reason(p: Placement, nvshmem: bool = False) -> str | None:
    """Why placement `p` cannot run here (None: it can)."""
    from mixcc.codegen.build import find_nvcc

    if p.shared and p.nccl:
        raise ValueError(f"{p}: NCCL cannot run two ranks on one GPU")
    have = gpu_count()
    if have < p.gpus:
        return f"needs {p.gpus} GPU(s), this machine has {have}"
    if find_nvcc() is None:
        return "needs nvcc to build the fused kernels"
    if nvshmem:
        from mixcc import nvshmem as nv

        reason = nv.available()
        if reason:
            return f"needs NVSHMEM: {reason}"
    if p.shared:
        from mixcc import mps

        if not mps.running(mps.pipe_dir()) and shutil.which(mps.CONTROL) is None:
            return f"ranks share a GPU and MPS is neither running nor startable ({mps.CONTROL})"
    return None


def require(p: Placement, nvshmem: bool = False) -> None:
    """Skip the calling test unless placement `p` can run here."""
    reason = skip_reason(p, nvshmem)
    if reason:
        pytest.skip(reason)


@contextmanager
def placed(p: Placement, nvshmem: bool = False) -> Iterator[None]:
    """The environment the ranks of `p` inherit: the first `p.gpus` GPUs visible, MPS
    running when ranks share a GPU, NVSHMEM on loopback for simulated nodes. Skips the
    test where MPS cannot start. Restores the environment after."""
    from mixcc import launch, mps

    require(p, nvshmem)
    keys = ["CUDA_VISIBLE_DEVICES", "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES",
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", *NVSHMEM_ENV, *launch.NO_MULTICAST_ENV]
    saved = {k: os.environ.get(k) for k in keys}
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpu_count())]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:p.gpus])
        os.environ.update(launch.NO_MULTICAST_ENV)
        if nvshmem:
            for k, v in NVSHMEM_ENV.items():
                os.environ.setdefault(k, v)
        if not p.shared:
            yield
            return
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
        if nvshmem:  # several PEs on one GPU: their MPS shares must sum to at most 100
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // p.per_gpu)
        try:
            cm = mps.ensure()
            cm.__enter__()
        except mps.MpsError as e:
            pytest.skip(f"ranks share a GPU and MPS could not start: {e}")
        try:
            yield
        finally:
            cm.__exit__(None, None, None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spawn(fn: Callable, p: Placement, *args: Any, nvshmem: bool = False,
          timeout_s: float | None = None) -> None:
    """Run fn(rank, world, *args) on the ranks of `p` (inside `placed`), each rank on GPU
    rank % gpus. Raises mixcc.launch.RankError for the first rank that failed, and fails
    the test (killing every rank) past `timeout_s`."""
    with placed(p, nvshmem):
        run_ranks(fn, p.world, p.pg_backend, args, timeout_s)


def _with_stacks(rank: int, world: int, fn: Callable, *args: Any) -> None:
    """fn(rank, world, *args) in a rank that prints every thread's Python stack to stderr
    on SIGUSR1 (run_ranks sends it to ranks still alive at the deadline)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    fn(rank, world, *args)


def run_ranks(fn: Callable, world: int, backend: str, args: tuple,
              timeout_s: float | None = None) -> None:
    """mixcc.launch.spawn with a deadline: every rank is joined or killed."""
    import torch.multiprocessing as mp

    from mixcc import launch

    timeout_s = timeout_s or float(env_int("MIXCC_GPU_TEST_TIMEOUT", 540))
    report_dir = tempfile.mkdtemp(prefix="mixcc-ranks-")
    ctx = mp.start_processes(launch._entry, nprocs=world, join=False, start_method="spawn",
                             args=(world, launch.free_port(), backend, _with_stacks,
                                   (fn, *args), report_dir))
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                alive = [i for i, proc in enumerate(ctx.processes) if proc.is_alive()]
                for proc in ctx.processes:  # where each hung rank is, before it dies
                    if proc.is_alive():  # one at a time: the stacks do not interleave
                        os.kill(proc.pid, signal.SIGUSR1)
                        time.sleep(1.0)
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                for proc in ctx.processes:
                    proc.join(10)
                pytest.fail(f"ranks {alive} of {world} still ran after {timeout_s:g} s "
                            f"(MIXCC_GPU_TEST_TIMEOUT) and were killed")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        err = launch._root_cause(report_dir, e)
        raise err from err.__cause__
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
