"""Where a benchmarked call's device time goes: `mixcc bench --trace DIR` records one
replay of a row's CUDA graph with the torch profiler (CUPTI) and writes the Chrome trace
and a summary of its GPU activities (kernels, copies, sets) per call: each activity's
time, the span from the first start to the last end, and the time in that span when no
activity of the rank ran (launch gaps, waits on another stream or on a copy engine).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def slug(*parts: object) -> str:
    """A file name from a row's program, backend, mode and size."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def record(replay: Callable[[], None], path: str) -> None:
    """Profile one call of `replay` (its GPU work, synchronised) into a Chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)


def _short(name: str) -> str:
    """A kernel's name without its return type, namespaces, template arguments and
    parameters."""
    while re.search(r"<[^<>]*>", name):
        name = re.sub(r"<[^<>]*>", "", name)
    name = re.sub(r"\([^()]*\)\s*$", "", name).strip()
    return name.split()[-1].split("::")[-1] if name else "?"


def summarize(trace: dict, calls: int) -> str:
    """Per-call times (us) of a Chrome trace's GPU activities: one line per activity name
    (count per call, time per call, mean duration), then span, busy and idle per call."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    if not events:
        return "no GPU activity in the trace (CUPTI saw none)"
    by_name: dict[str, list[float]] = {}
    for e in events:
        name = _short(e["name"]) if e["cat"] == "kernel" else e["name"]
        by_name.setdefault(name, []).append(float(e["dur"]))
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
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
                 f"idle {(span - busy) / calls:.2f} ({calls} calls)")
    return "\n".join(lines)


def write_summary(path: str, calls: int) -> str:
    """Summarize the trace at `path` into `path` with .txt for .json; returns the text."""
    with open(path) as f:
        text = summarize(json.load(f), calls)
    with open(re.sub(r"\.json$", "", path) + ".txt", "w") as f:
        f.write(text + "\n")
    return text
