"""Registered buffers on CPU: the pool's first-fit allocator, and which inputs a one-shot
stage reads in place (the registered-input word) or refuses, with fake pools (no GPU)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from mixcc import runtime
from mixcc.fused import FusedRunner
from mixcc.runtime import Pool
from mixcc.tuning import thresholds


class FakeEvent:
    """Stands in for the CUDA event a release records: done once `done` is set."""

    def __init__(self, done: bool = True):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def fake_pool(base: int, nbytes: int, monkeypatch) -> Pool:
    p = object.__new__(Pool)
    p.device, p.base, p.nbytes = 0, base, nbytes
    p._free, p._pending, p._live = [(0, nbytes)], [], 0
    p._closed, p._kept = False, False
    p._lock = threading.Lock()
    freed = []
    monkeypatch.setattr(p, "_free_memory", lambda: freed.append(p.base))
    p.events = []

    def event():
        p.events.append(FakeEvent())
        return p.events[-1]

    monkeypatch.setattr(p, "_release_event", event)
    p.freed = freed
    monkeypatch.setitem(runtime._POOLS, base, p)
    return p


def test_first_fit_allocation_release_and_coalescing(monkeypatch):
    pool = fake_pool(1 << 30, 4096, monkeypatch)
    a, b, c = pool.allocate(100), pool.allocate(256), pool.allocate(1000)
    assert [blk.offset for blk in (a, b, c)] == [0, 256, 512]
    assert a.__cuda_array_interface__["data"] == ((1 << 30), False)
    assert c.__cuda_array_interface__["shape"] == (1024,)  # 256-byte steps
    with pytest.raises(ValueError, match="no free range of 4096 bytes"):
        pool.allocate(4000)
    del b  # a hole between a and c
    d = pool.allocate(200)
    assert d.offset == 256  # first fit reuses it
    del a, c
    assert pool._live == 1
    pool._settle(wait=False)
    assert pool._free == [(0, 256), (512, 3584)]


def test_a_released_range_waits_for_the_work_queued_before_its_release(monkeypatch):
    pool = fake_pool(1 << 35, 1024, monkeypatch)
    a = pool.allocate(1024)
    del a
    pool.events[-1].done = False  # a kernel queued before the release still reads it
    assert pool._free == [] and len(pool._pending) == 1
    b = pool.allocate(512)  # no other room: waits for that work, then reuses the range
    assert b.offset == 0 and pool.events[0].waited
    del b
    pool.events[-1].done = False
    pool._free.append((512, 512))  # room elsewhere: the busy range is left alone
    c = pool.allocate(256)
    assert c.offset == 512 and not pool.events[-1].waited


def test_a_range_released_during_graph_capture_is_never_reused(monkeypatch):
    pool = fake_pool(1 << 36, 512, monkeypatch)
    monkeypatch.setattr(pool, "_release_event", lambda: None)  # capturing
    a = pool.allocate(512)
    del a
    with pytest.raises(ValueError, match="no free range"):
        pool.allocate(256)


def test_pool_memory_goes_when_closed_and_unused(monkeypatch):
    pool = fake_pool(1 << 31, 1024, monkeypatch)
    blk = pool.allocate(10)
    pool.close(keep=False)
    assert pool.freed == []  # a tensor still uses it
    with pytest.raises(RuntimeError, match="closed"):
        pool.allocate(10)
    del blk
    assert pool.freed == [1 << 31]


def runner_with(pool):
    r = object.__new__(FusedRunner)
    r.rt = SimpleNamespace(pool=pool)
    r.th = thresholds.shipped(thresholds.Key("sm_90", "nvlink", 2))  # where it was measured
    return r


def test_registered_input_word(monkeypatch):
    pool = fake_pool(1 << 32, 1 << 20, monkeypatch)
    r = runner_with(pool)
    base = pool.base
    assert r.reg_word(base + 4096, 8192, 0) == 4096 // 16 + 1  # read in place
    assert r.reg_word(base, 16, 5) == 1  # offset 0 is word 1, never 0
    assert r.reg_word(base + 4096, 8192, base + 4096) == 0  # in place: staged
    assert r.reg_word(base + 8, 64, 0) == 0  # not 16-byte aligned: staged
    assert r.reg_word(base - (1 << 20), 4096, 0) == 0  # an ordinary tensor
    with pytest.raises(ValueError, match="partly inside"):
        r.reg_word(base + (1 << 20) - 64, 128, 0)
    with pytest.raises(ValueError, match="partly inside"):
        r.reg_word(base - 64, 128, 0)


def test_inputs_of_other_pools_are_refused(monkeypatch):
    mine = fake_pool(1 << 33, 1 << 20, monkeypatch)
    other = fake_pool(1 << 34, 1 << 20, monkeypatch)
    r = runner_with(mine)
    with pytest.raises(ValueError, match="another process group"):
        r.reg_word(other.base + 256, 256, 0)
    other._closed = True
    with pytest.raises(ValueError, match="a closed runtime"):
        r.reg_word(other.base + 256, 256, 0)
    with pytest.raises(ValueError, match="partly inside"):  # also with no pool of its own
        runner_with(None).reg_word(other.base - 16, 64, 0)
    assert runner_with(None).reg_word(1 << 20, 64, 0) == 0


def test_registered_protocol_runs_from_reg_min_bytes(monkeypatch):
    """Below REG_MIN_BYTES a registered input is staged and the kernel skips the protocol
    (pool_peers 0), as in a group without a pool; from it the one-shot reads the input in
    place. Inputs are checked at every size; other algorithms never run the protocol."""
    import mixcc
    REG_MIN_BYTES = thresholds.shipped(thresholds.Key("sm_90", "nvlink", 2)).reg_min_bytes

    pool = fake_pool(1 << 35, 1 << 30, monkeypatch)
    r = runner_with(pool)
    peers = SimpleNamespace(data_ptr=lambda: 0xABC0)
    r.rt.pool_peers, r._pools = peers, [pool]
    r.stages = [(mixcc.compile("allreduce(tp)", mixcc.Mesh({"tp": 2}),
                               backend="reference").plan.stages[0], None)]
    one_shot, push = SimpleNamespace(algo=0), SimpleNamespace(algo=2)
    x = pool.base + 4096
    assert r._pool_args(one_shot, 0, x, REG_MIN_BYTES, 0) == (0xABC0, 4096 // 16 + 1)
    assert r._pool_args(one_shot, 0, x, REG_MIN_BYTES - 16, 0) == (0, 0)
    assert r._pool_args(push, 0, x, REG_MIN_BYTES, 0) == (0, 0)
    assert r._pool_args(one_shot, 0, 1 << 20, REG_MIN_BYTES, 0) == (0xABC0, 0)  # staged
    with pytest.raises(ValueError, match="partly inside"):
        r._pool_args(one_shot, 0, pool.base - 64, 128, 0)
    r.rt.pool = None  # another group's pool exists in the process, not this one's
    assert r._pool_args(one_shot, 0, 1 << 20, REG_MIN_BYTES, 0) == (0, 0)
