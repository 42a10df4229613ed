"""Runtime.close's decisions, without a GPU: the native calls, CUDA and the process group
are stand-ins, so what is checked is which memory is freed and what is agreed."""

import threading

import pytest
import torch

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


def make_runtime(monkeypatch, *, others_failed=False, barrier_raises=False,
                 fails_in_sync=False):
    lib = FakeLib()
    monkeypatch.setattr(runtime, "native", lambda: lib)
    rt = object.__new__(runtime.Runtime)
    rt._closed, rt._key, rt.rank, rt.world, rt.device = False, None, 0, 4, 0
    rt.group, rt._opened, rt._ws, rt._err_host = None, [111], 222, 333
    rt._err = runtime._ErrorRecord()
    rt._stop = threading.Event()
    rt._watchdog = threading.Thread(target=rt._stop.wait)
    rt._watchdog.start()

    def sync(device=None):
        if fails_in_sync:  # the kernels still queued time out while close waits for them
            rt._err.status = 1

    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.dist, "get_backend", lambda group=None: "gloo")
    calls = []

    def barrier(group=None):
        calls.append("barrier")
        if barrier_raises:
            raise RuntimeError("Connection closed by peer")

    def all_reduce(t, op=None, group=None):
        calls.append("all_reduce")
        t.fill_(max(int(t.item()), int(others_failed)))

    monkeypatch.setattr(runtime.dist, "barrier", barrier)
    monkeypatch.setattr(runtime.dist, "all_reduce", all_reduce)
    return rt, lib, calls


def test_clean_close_frees_after_barrier_and_agreement(monkeypatch):
    rt, lib, calls = make_runtime(monkeypatch)
    assert rt.close() is False
    assert lib.freed == [222] and calls == ["barrier", "all_reduce"]
    assert not rt._watchdog.is_alive()


@pytest.mark.parametrize("case", ["others_failed", "barrier_raises", "fails_in_sync"])
def test_a_failure_anywhere_keeps_the_workspace(monkeypatch, case):
    rt, lib, calls = make_runtime(monkeypatch, **{case: True})
    assert rt.close() is True
    assert lib.freed == []  # a surviving peer may still write into it
    assert calls[0] == "barrier"  # every rank takes part, failed or not


def test_a_failed_rank_still_joins_the_closing_barrier(monkeypatch):
    rt, lib, calls = make_runtime(monkeypatch)
    rt._err.status = 1
    assert rt.close() is True
    assert calls == ["barrier", "all_reduce"] and lib.freed == []


def test_without_barrier_only_the_local_record_decides(monkeypatch):
    rt, lib, calls = make_runtime(monkeypatch)
    assert rt.close(barrier=False) is False and lib.freed == [222] and calls == []
    rt, lib, calls = make_runtime(monkeypatch, fails_in_sync=True)
    assert rt.close(barrier=False) is True and lib.freed == [] and calls == []
