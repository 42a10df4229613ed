"""Runtime.close's decisions, without a GPU: the native calls and CUDA are stand-ins and
the ranks meet through a real in-memory store, so what is checked is which memory is
freed, who waits for whom, and that nobody hangs."""

import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mixcc import runtime


class FakeLib:
    def __init__(self):
        self.freed = []

    def mixcc_rt_ipc_close(self, dev, p):
        return 0

    def mixcc_rt_free(self, dev, p):
        self.freed.append(p)
        return 0

    def mixcc_rt_host_free(self, p):
        return 0


@pytest.fixture
def world(monkeypatch):
    """Two simulated ranks sharing one store; returns make(rank, failed, fails_in_sync)."""
    lib, store = FakeLib(), dist.HashStore()
    monkeypatch.setattr(runtime, "native", lambda: lib)
    monkeypatch.setattr(runtime, "_store", lambda: store)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(runtime, "CLOSE_WAIT_S", 0.5)

    def make(rank, failed=False):
        rt = object.__new__(runtime.Runtime)
        rt._closed, rt._key, rt.rank, rt.world, rt.device = False, None, rank, 2, 0
        rt.group = SimpleNamespace(group_name="g")
        rt._opened, rt._ws, rt._err_host = [100 + rank], 200 + rank, 300 + rank
        rt._pool_opened, rt.pool = [], None
        rt._err = runtime._ErrorRecord()
        rt._err.status = int(failed)
        rt._stop = threading.Event()
        rt._watchdog = threading.Thread(target=rt._stop.wait)
        rt._watchdog.start()
        return rt

    def close_both(a, b):  # each rank has its own count of closes: reset between them
        out = {}

        def run(rt):
            runtime._CLOSES.clear()
            out[rt.rank] = rt.close()

        t = threading.Thread(target=run, args=(b,))
        t.start()
        runtime._CLOSES.clear()
        out[a.rank] = a.close()
        t.join(5)
        assert not t.is_alive()
        return out

    monkeypatch.setattr(runtime, "_CLOSES", {})
    return SimpleNamespace(make=make, lib=lib, close_both=close_both)


def test_healthy_ranks_meet_and_free(world):
    out = world.close_both(world.make(0), world.make(1))
    assert out == {0: False, 1: False} and sorted(world.lib.freed) == [200, 201]


def test_a_healthy_straggler_learns_of_the_failure_and_keeps_its_workspace(world):
    out = world.close_both(world.make(0), world.make(1, failed=True))
    assert out == {0: True, 1: True} and world.lib.freed == []


def test_a_failed_rank_waits_for_nobody(world):
    rt = world.make(0, failed=True)  # its peer is dead: it never posts
    assert rt.close() is True and world.lib.freed == []
    assert not rt._watchdog.is_alive()


def test_a_healthy_rank_whose_peer_never_comes_keeps_its_workspace(world):
    rt = world.make(0)
    assert rt.close() is True and world.lib.freed == []


def test_without_barrier_only_the_local_record_decides(world):
    assert world.make(0).close(barrier=False) is False
    assert world.make(1, failed=True).close(barrier=False) is True
    assert world.lib.freed == [200]


def test_without_a_store_a_barrier_skipped_after_a_failure(world, monkeypatch):
    monkeypatch.setattr(runtime, "_store", lambda: None)
    calls = []
    monkeypatch.setattr(runtime.dist, "barrier", lambda group=None: calls.append(1))
    assert world.make(0).close() is False and calls == [1]
    assert world.make(1, failed=True).close() is True and calls == [1]
