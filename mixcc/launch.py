"""Local multi-process launch for the CLI and tests: spawn ranks on loopback, or join
an existing torchrun job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Environment every process of ours keeps: NVLink multicast is never used, since on a
# shared host it can take GPUs out of service (docs/DESIGN.md section 5). Set by the
# launcher, never by a library constructor.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class RankError(RuntimeError):
    """A rank failed. `rank` is the root cause: the first rank to fail (its peers then
    fail with connection errors, as torchrun's "first observed failure").

    `summary` is "Type: message"; `traceback` the rank's own traceback text; `expected`
    whether the exception is a usage error (mixcc errors, ValueError, OSError) rather than
    a bug, so that a CLI can print one line for it.
    """

    def __init__(self, rank: int, summary: str, traceback: str = "", expected: bool = False):
        super().__init__(f"rank {rank}: {summary}")
        self.rank, self.summary, self.traceback, self.expected = rank, summary, traceback, expected


class _RankTraceback(Exception):
    """Carries a rank's traceback text as the __cause__ of a RankError."""


def _describe(e: BaseException) -> tuple[str, bool]:
    from .errors import MixccError

    expected = isinstance(e, MixccError | ValueError | OSError)
    if isinstance(e, MixccError | ValueError):
        return str(e), expected
    return f"{type(e).__name__}: {e}", expected


def rank_error(rank: int, e: BaseException) -> RankError:
    """The RankError for exception `e` raised on `rank`, with its traceback attached."""
    summary, expected = _describe(e)
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    err = RankError(rank, summary, tb, expected)
    err.__cause__ = _RankTraceback(tb.rstrip())
    return err


def _report(report_dir: str | None, rank: int, e: BaseException) -> None:
    """Record rank's failure (with the time, to find the first one) for the parent."""
    if not report_dir:
        return
    summary, expected = _describe(e)
    rec = {"rank": rank, "time": time.time(), "summary": summary, "expected": expected,
           "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}
    tmp = Path(report_dir) / f".rank{rank}.json"
    try:
        tmp.write_text(json.dumps(rec))
        tmp.replace(Path(report_dir) / f"rank{rank}.json")
    except OSError:
        pass


def _root_cause(report_dir: str, exc: Exception) -> RankError:
    """The first failure any rank reported, else what torch.multiprocessing saw."""
    recs = []
    for f in Path(report_dir).glob("rank*.json"):
        try:
            recs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    if recs:
        rec = min(recs, key=lambda r: (r["time"], r["rank"]))
        err = RankError(rec["rank"], rec["summary"], rec["traceback"], rec["expected"])
        err.__cause__ = _RankTraceback(rec["traceback"].rstrip())
        return err
    rank = getattr(exc, "error_index", -1)
    if isinstance(exc, mp.ProcessExitedException):
        how = (f"killed by signal {exc.signal_name}" if exc.signal_name
               else f"exit code {exc.exit_code}")
        return RankError(rank, f"the process died ({how}) without a Python exception")
    text = str(exc).strip()
    err = RankError(rank, text.splitlines()[-1] if text else type(exc).__name__, text)
    err.__cause__ = exc
    return err


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


def _entry(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
           report_dir: str | None = None) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        kw: dict[str, Any] = {"timeout": timedelta(seconds=300)}
        if "nccl" in backend:
            kw["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kw)
    except BaseException as e:
        _report(report_dir, rank, e)
        raise
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # nobody tears groups down while a peer still uses them
    except BaseException as e:
        _report(report_dir, rank, e)  # before teardown: peers fail only after this
        raise
    finally:
        _teardown()


def _teardown() -> None:
    from .reference import clear_groups
    from .runtime import close_all

    close_all()
    clear_groups()
    dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any, backend: str | None = None) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes with a process group.

    If a rank fails, raises RankError for the first rank that failed (not a peer that
    merely lost its connection to it).
    """
    os.environ.update(NO_MULTICAST_ENV)
    backend = backend or pick_backend(world_size)
    report_dir = tempfile.mkdtemp(prefix="mixcc-ranks-")
    log = logging.getLogger("torch.multiprocessing.spawn")
    level = log.level
    log.setLevel(logging.ERROR)  # its "Terminating process ..." lines: RankError says more
    try:
        mp.spawn(_entry, args=(world_size, free_port(), backend, fn, args, report_dir),
                 nprocs=world_size, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        err = _root_cause(report_dir, e)
        raise err from err.__cause__
    finally:
        log.setLevel(level)
        shutil.rmtree(report_dir, ignore_errors=True)


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
    except Exception as e:
        err = rank_error(rank, e)
        raise err from err.__cause__
    finally:
        _teardown()
