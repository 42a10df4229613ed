"""mixcc/trace.py: the per-call summary of a recorded replay's GPU activities, and
bench --trace's wiring (the recording itself needs a GPU; no test records one)."""

from __future__ import annotations

import json

import pytest
import torch
from fake_cuda import fake_graph_timing

from mixcc import trace


def _event(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summary_counts_per_call_and_the_idle_time_between_activities():
    events = []
    for call in range(2):  # two calls of: start kernel, a copy beside a kernel, a gap, end
        t = 100.0 * call
        events += [_event("void ce_start_kernel<8>(LaunchArgs)", t, 4),
                   _event("Memcpy PtoP (Device -> Device)", t + 5, 30, "gpu_memcpy"),
                   _event("void (anonymous namespace)::ce_local_kernel<8>(LaunchArgs)",
                          t + 6, 10),
                   _event("stage_kernel", t + 45, 5)]
    events += [{"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0, "dur": 999},
               {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1}]
    lines = trace.summarize({"traceEvents": events}, calls=2).splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[1:-1]}
    assert list(rows) == ["Memcpy", "ce_local_kernel", "stage_kernel", "ce_start_kernel"]
    assert rows["Memcpy"][-3:] == ["1.00", "30.00", "30.00"]
    assert rows["ce_local_kernel"] == ["1.00", "10.00", "10.00"]
    # per call: span 0..50 (the second call's from 100 to 150); busy 4 + 30 + 5 = 39
    assert lines[-1] == "span 75.00 us/call, busy 39.00, idle 36.00 (2 calls)"


def test_summary_leaves_out_the_calls_before_the_timed_ones_when_it_can_tell_them():
    events = [_event("void k<1>(Args (*)(int))", 10.0 * i, 2) for i in range(3)]
    lines = trace.summarize({"traceEvents": events}, calls=2, lead=1).splitlines()
    assert lines[1].split() == ["k", "1.00", "2.00", "2.00"]
    assert lines[-1] == "span 6.00 us/call, busy 2.00, idle 4.00 (2 calls)"
    odd = trace.summarize({"traceEvents": events[:2] + [_event("Memset", 25, 1, "gpu_memset"),
                                                       _event("k", 30, 2)]}, calls=2, lead=1)
    assert odd.splitlines()[-1].endswith(
        "(3 calls) (the 1 earlier call(s) could not be told apart: counted in)")


def test_summary_of_a_trace_without_gpu_activity_says_so(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": []}))
    assert trace.write_summary(str(path), 4) == "no GPU activity in the trace (CUPTI saw none)"
    assert (tmp_path / "t.txt").read_text().startswith("no GPU activity")


def test_slug_is_a_file_name():
    assert trace.slug("allreduce(tp); add(r)", "auto:registered", "oop", 4096, "r1") == \
        "allreduce_tp_add_r_auto_registered_oop_4096_r1"


def test_bench_records_one_replay_after_the_timed_ones(monkeypatch, tmp_path):
    """repeat_times(trace=...) with torch.cuda faked: after the timed repeats, a barrier,
    the one-call graph, then the recorded replay of the timed graph and its summary."""
    from mixcc import bench

    log: list[str] = []
    fn = fake_graph_timing(monkeypatch, log, elapsed_ms=1.0)

    def record(steps, path):
        log.append("record:")
        steps()
        with open(path, "w") as f:  # the one-call graph's kernel, then the timed graph's
            json.dump({"traceEvents": [_event("k", 0, 3), _event("k", 10, 3),
                                       _event("k", 14, 3)]}, f)

    monkeypatch.setattr(bench.tracing, "record", record)
    path = tmp_path / "row.json"
    bench.repeat_times(fn, 2, 1, "graph", trace=str(path))
    assert log[-4:] == ["barrier", "record:", "replay 1", "replay 2"]
    assert (tmp_path / "row.txt").read_text().splitlines()[-1] == \
        "span 3.50 us/call, busy 3.00, idle 0.50 (2 calls)"


@pytest.mark.parametrize("mode", ["host", "cpu"])
def test_rows_not_timed_by_graphs_are_not_recorded(monkeypatch, tmp_path, mode):
    import torch.distributed as dist

    from mixcc import bench

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(bench.tracing, "record", lambda *a: pytest.fail("recorded"))
    assert len(bench.repeat_times(lambda: None, 2, 2, mode, trace=str(tmp_path / "x"))) == 2
