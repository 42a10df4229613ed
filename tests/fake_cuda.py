"""torch.cuda's graphs, streams and events faked for bench.repeat_times on a machine
without a GPU: what its graph mode captures, replays and records, in order."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def fake_graph_timing(monkeypatch, log: list[str], elapsed_ms: float = 2.0):
    """Patch torch.cuda (and dist.barrier) so that a capture counts the calls made in it,
    a replay logs "replay N" (N calls), an event's record logs "record", a barrier logs
    "barrier" and every pair of events is `elapsed_ms` apart; returns the function to
    time (an eager call of it logs "eager")."""
    capturing: list = []

    class Graph:
        def __init__(self):
            self.calls = 0

        def pool(self):
            return "pool"

        def replay(self):
            log.append(f"replay {self.calls}")

    class Capture:
        def __init__(self, g, pool=None, stream=None):
            self.g = g

        def __enter__(self):
            capturing.append(self.g)

        def __exit__(self, *exc):
            capturing.pop()

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            log.append("record")

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return elapsed_ms

    class Stream:
        def wait_stream(self, other):
            pass

    def fn():
        if capturing:
            capturing[-1].calls += 1
        else:
            log.append("eager")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(dist, "barrier", lambda: log.append("barrier"))
    return fn
