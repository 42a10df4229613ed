"""Where a benchmarked call's device time goes: `mixcc bench --trace DIR` records one
replay of a row's CUDA graph with the torch profiler (CUPTI) and writes the Chrome trace
and a summary of its GPU activities (kernels, copies, sets) per call: each activity's
time, the span from the first start to the last end, and the time in that span when no
activity of the rank ran (launch gaps, waits on another stream or on a copy engine).
The one-call graph that precedes the timed one is recorded too, so that it, not the
timed calls, waits out the ranks' skew (the profiler starts at different times on
different ranks); the summary leaves its activities out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def slug(*parts: object) -> str:
    """A file name from a row's parts (program, mesh, backend, mode, size, world, rank)."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def record(steps: Callable[[], object], path: str) -> None:
    """Profile the GPU work of `steps` (synchronised) into a Chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)


def _short(name: str) -> str:
    """A kernel's name without its return type, namespaces, template arguments and
    parameters."""
    name = name.strip()
    if name.endswith(")"):  # the parameter list, parentheses inside it included
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i].strip()
                break
    while re.search(r"<[^<>]*>", name):
        name = re.sub(r"<[^<>]*>", "", name)
    return name.split()[-1].split("::")[-1] if name.split() else "?"


def summarize(trace: dict, calls: int, lead: int = 0) -> str:
    """Per-call times (us) of a Chrome trace's GPU activities over `calls` calls that
    follow `lead` others (their activities, the first in time, are left out when every
    call has as many): one line per activity name (count per call, time per call, mean
    duration), then span, busy and idle per call."""
    events = sorted((e for e in trace.get("traceEvents", [])
                     if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES),
                    key=lambda e: float(e.get("ts", 0)))
    note = ""
    if lead and len(events) % (calls + lead) == 0:
        events = events[len(events) // (calls + lead) * lead:]
    elif lead:
        note = f" (the {lead} earlier call(s) could not be told apart: counted in)"
        calls += lead
    if not events:
        return "no GPU activity in the trace (CUPTI saw none)"
    by_name: dict[str, list[float]] = {}
    for e in events:
        name = str(e.get("name", "?"))
        name = _short(name) if e["cat"] == "kernel" else name
        by_name.setdefault(name, []).append(float(e.get("dur", 0)))
    spans = sorted((float(e.get("ts", 0)), float(e.get("ts", 0)) + float(e.get("dur", 0)))
                   for e in events)
    busy, (lo, hi) = 0.0, spans[0]
    for s, t in spans[1:]:  # the union of the intervals, in order of start
        if s > hi:
            busy += hi - lo
            lo, hi = s, t
        else:
            hi = max(hi, t)
    busy += hi - lo
    span = max(t for _, t in spans) - spans[0][0]
    lines = [f"{'activity':<40} {'per call':>8} {'us/call':>9} {'us each':>9}"]
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{name[:40]:<40} {len(durs) / calls:>8.2f} {sum(durs) / calls:>9.2f} "
                     f"{sum(durs) / len(durs):>9.2f}")
    lines.append(f"span {span / calls:.2f} us/call, busy {busy / calls:.2f}, "
                 f"idle {(span - busy) / calls:.2f} ({calls} calls){note}")
    return "\n".join(lines)


def write_summary(path: str, calls: int, lead: int = 0) -> str:
    """Summarize the trace at `path` into `path` with .txt for .json; returns the text."""
    with open(path) as f:
        text = summarize(json.load(f), calls, lead)
    with open(re.sub(r"\.json$", "", path) + ".txt", "w") as f:
        f.write(text + "\n")
    return text
