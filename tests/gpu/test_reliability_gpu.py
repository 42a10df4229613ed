"""Reliability on GPUs (issue 10, docs/RELIABILITY.md): dead peers over IPC and NVSHMEM,
the watchdog and its abort, mismatched calls in debug mode, leaks. Each run starts one
subprocess per rank (gpu_helpers.reliability) inside a placement (gpu_helpers.ranks):
two ranks on two GPUs, or four sharing one GPU under MPS.

Counts (defaults short; the issue's runs in brackets): MIXCC_KILL_TRIALS IPC kill trials
(4; 20), MIXCC_NVSHMEM_KILL_TRIALS (2; 5), MIXCC_KILL_PARALLEL trials at once (1),
MIXCC_LEAK_CALLS (5000; 100000), MIXCC_LEAK_CYCLES (5; 100)."""

from __future__ import annotations

import pytest
from gpu_helpers import reliability as rel
from gpu_helpers.ranks import Placement, env_int, placed

PLACEMENTS = [pytest.param(Placement(2, 2, "gloo"), id="w2-2gpu"),
              pytest.param(Placement(4, 1), id="w4-1gpu-mps")]


def parent(p: Placement, tmp_path, **kw) -> rel.Parent:
    return rel.Parent(rel.Options(world=p.world, per_gpu=p.per_gpu, logdir=str(tmp_path), **kw))


@pytest.mark.parametrize("p", PLACEMENTS)
def test_kill_ipc(p: Placement, tmp_path):
    """SIGKILL a rank at a random call: every survivor raises CollectiveTimeout naming it
    within timeout_s + 1 s, closes and exits cleanly."""
    with placed(p):
        P = parent(p, tmp_path)
        rel.assert_passed([rel.check_kill(P, "ipc", env_int("MIXCC_KILL_TRIALS", 4),
                                          env_int("MIXCC_KILL_PARALLEL", 1))])


@pytest.mark.parametrize("p", PLACEMENTS)
def test_kill_nvshmem(p: Placement, tmp_path):
    """The same over two simulated nodes (IPC + NVSHMEM; on two GPUs, one node each)."""
    with placed(p, nvshmem=True):
        P = parent(p, tmp_path)
        rel.assert_passed([rel.check_kill(P, "nvshmem", env_int("MIXCC_NVSHMEM_KILL_TRIALS", 2),
                                          1)])


@pytest.mark.parametrize("p", PLACEMENTS)
def test_watchdog(p: Placement, tmp_path):
    """A skipped call is logged by the watchdog thread; with abort, the ranks SIGABRT."""
    with placed(p):
        rel.assert_passed(rel.check_watchdog(parent(p, tmp_path)))


@pytest.mark.parametrize("p", PLACEMENTS)
def test_mismatch(p: Placement, tmp_path):
    """Debug mode: a different collective or shape raises CollectiveMismatch on every
    rank, and debug calls stay equal to the float64 oracle."""
    with placed(p):
        rel.assert_passed(rel.check_mismatch(parent(p, tmp_path)))


@pytest.mark.parametrize("p", PLACEMENTS)
def test_leaks(p: Placement, tmp_path):
    """MIXCC_LEAK_CALLS calls and MIXCC_LEAK_CYCLES create / close cycles: no growth."""
    calls, cycles = env_int("MIXCC_LEAK_CALLS", 5000), env_int("MIXCC_LEAK_CYCLES", 5)
    with placed(p):
        P = parent(p, tmp_path, calls=calls, cycles=cycles,
                   leak_limit_s=max(240.0, calls / 400 + cycles * 3))
        rel.assert_passed(rel.check_leaks(P))
