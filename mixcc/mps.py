"""CUDA MPS (Multi-Process Service) for benchmarks with several ranks on one GPU.

Under MPS the kernels of all ranks run on the GPU at the same time, so device times
measured by CUDA graphs mean what they mean with one GPU per rank; without it the
ranks' contexts are time-sliced. The control daemon listens on
`$CUDA_MPS_PIPE_DIRECTORY/control` (default /tmp/nvidia-mps/control): a UNIX socket in
current drivers, a named pipe in old ones. The socket file outlives a daemon that quit
(observed: every stop then waited 10 s and warned), so a socket counts as running
only while a connect to it is not refused.

`ensure()` uses a running daemon as it is, or starts a private one (its own pipe and log
directories, exported to the processes started inside the block) and stops it at the
end. It never runs in a process that has initialised CUDA: a CUDA client attaches to
MPS when it initialises, so the caller must start its ranks after entering.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
ENV_VARS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


class MpsError(RuntimeError):
    """MPS is needed but could not be started; the message says why and what to run."""


@dataclass(frozen=True)
class State:
    """The daemon the block runs under: `started` is True when ensure() started it (and
    stops it on exit), False when it was already running."""

    started: bool
    pipe_dir: str
    log_dir: str | None


def pipe_dir(env: MutableMapping[str, str] | None = None) -> str:
    """The control pipe directory CUDA clients in `env` (default os.environ) look in."""
    env = os.environ if env is None else env
    return env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR


def running(pipe_dir: str) -> bool:
    """Whether an MPS control daemon listens in `pipe_dir`: its `control` file exists and,
    where that is a socket, a connect is not refused (a refused connect is a stale file; any
    other answer, even the wrong socket type, is a live daemon)."""
    path = os.path.join(pipe_dir, "control")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not stat.S_ISSOCK(mode):
        return True  # a named pipe: no way to ask without talking the protocol
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError as e:
            return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


def manual_commands(pipe: str = "/tmp/mixcc-mps-pipe", log: str = "/tmp/mixcc-mps-log") -> str:
    """The shell lines that start MPS by hand around a command, and stop it after."""
    return (f"  export CUDA_MPS_PIPE_DIRECTORY={pipe} CUDA_MPS_LOG_DIRECTORY={log}\n"
            f"  mkdir -p {pipe} {log} && {CONTROL} -d\n"
            f"  <the same mixcc command, in this shell>\n"
            f"  echo quit | {CONTROL}")


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _log_tail(log_dir: str, lines: int = 5) -> str:
    out = []
    for name in ("control.log", "server.log"):
        p = Path(log_dir) / name
        if p.is_file():
            tail = p.read_text(errors="replace").splitlines()[-lines:]
            out += [f"  {name}: {t}" for t in tail]
    return "\n".join(out)


@contextmanager
def ensure(env: MutableMapping[str, str] | None = None, binary: str = CONTROL,
           timeout_s: float = 10.0) -> Iterator[State]:
    """Run the block under MPS: the daemon of `env` (default os.environ) if running, else
    a private one started here with CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY set
    in `env` for the block (restored after) and stopped (`quit`) when the block ends.

    Raises MpsError, with the commands to run by hand, when `binary` is not on PATH or
    the daemon does not start.
    """
    env = os.environ if env is None else env
    current = pipe_dir(env)
    if running(current):
        yield State(False, current, env.get("CUDA_MPS_LOG_DIRECTORY"))
        return
    exe = shutil.which(binary, path=env.get("PATH"))
    if exe is None:
        raise MpsError(f"ranks share a GPU and MPS is not running ({current}/control does "
                       f"not exist), and {binary} is not on PATH to start it. Start MPS by "
                       f"hand:\n{manual_commands()}")
    pipe = tempfile.mkdtemp(prefix="mixcc-mps-pipe-")
    log = tempfile.mkdtemp(prefix="mixcc-mps-log-")
    daemon_env = {**env, "CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log}

    def cleanup() -> None:
        shutil.rmtree(pipe, ignore_errors=True)
        shutil.rmtree(log, ignore_errors=True)

    try:
        proc = subprocess.run([exe, "-d"], env=daemon_env, capture_output=True, text=True,
                              timeout=timeout_s)
        why = (f"exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
               if proc.returncode else f"no control pipe in {pipe} after {timeout_s:g} s")
        ok = proc.returncode == 0 and _wait(lambda: running(pipe), timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    if not ok:
        _stop(exe, daemon_env, pipe, timeout_s)  # in case it half started
        cleanup()
        raise MpsError(f"ranks share a GPU and MPS is not running; starting it with "
                       f"`{exe} -d` failed ({why}). Start MPS by hand:\n{manual_commands()}")
    saved = {k: env.get(k) for k in ENV_VARS}
    env.update({"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log})
    failed = True
    try:
        yield State(True, pipe, log)
        failed = False
    finally:
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if failed and _log_tail(log):
            print(f"note: the MPS logs ({log}) end with:\n{_log_tail(log)}", file=sys.stderr)
        if _stop(exe, daemon_env, pipe, timeout_s):
            cleanup()
        else:
            print(f"warning: the MPS daemon started for this run did not stop; stop it "
                  f"with: CUDA_MPS_PIPE_DIRECTORY={pipe} sh -c 'echo quit | {CONTROL}'",
                  file=sys.stderr)


def _stop(exe: str, daemon_env: dict[str, str], pipe: str, timeout_s: float) -> bool:
    """`echo quit | nvidia-cuda-mps-control` for the daemon of `pipe`; True once gone."""
    if not running(pipe):
        return True
    try:
        subprocess.run([exe], input="quit\n", env=daemon_env, capture_output=True, text=True,
                       timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return _wait(lambda: not running(pipe), timeout_s)
