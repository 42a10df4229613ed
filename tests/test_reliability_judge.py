"""The reliability runs of the GPU suite (tests/gpu/gpu_helpers): their pure judges on
fake reports (no GPU, no child processes), and the orchestration end to end on CPU with
the stand-in collective (`Options(fake=True)`)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))

from gpu_helpers import judge as rc  # noqa: E402
from gpu_helpers import reliability  # noqa: E402


def test_the_judges_need_no_torch():
    import subprocess

    code = ("import sys; sys.path.insert(0, 'tests/gpu'); import gpu_helpers.judge, "
            "gpu_helpers.reliability; assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr


def test_stage_names_match_the_runtime():
    from mixcc.runtime import STAGE_NAMES

    assert rc.STAGES == STAGE_NAMES


def _survivor(rank, peer, t_raise, **kw):
    rep = {"error": {"type": "CollectiveTimeout", "rank": rank, "peer": peer, "stage": "input",
                     "msg": "..."}, "t_raise": t_raise, "closed": True}
    rep.update(kw)
    return rep


def test_kill_trial_passes_and_reports_latency():
    reports = {0: _survivor(0, 2, 102.1), 1: _survivor(1, 2, 102.9), 3: _survivor(3, 2, 102.5)}
    codes = {0: 0, 1: 0, 2: -signal.SIGKILL, 3: 0}
    problems, lat = rc.judge_kill_trial(4, 2, 100.0, reports, codes, {}, timeout_s=2.0)
    assert problems == []
    assert lat == pytest.approx({0: 2.1, 1: 2.9, 3: 2.5})


def test_kill_trial_failures_are_named():
    reports = {0: _survivor(0, 1, 103.5),                      # wrong peer, too late
               1: _survivor(1, 2, 102.0, closed=False, close_error="RuntimeError: x"),
               3: {"calls": 99}}                              # raised nothing
    codes = {0: 0, 1: 1, 2: -signal.SIGKILL, 3: None}
    logs = {1: "ok\nmixcc runtime: cudaFree failed: CUDA error 700 (an illegal memory access)\n"}
    problems, _ = rc.judge_kill_trial(4, 2, 100.0, reports, codes, logs, timeout_s=2.0)
    text = "\n".join(problems)
    assert "names peer 1" in text and "3.50 s after the kill" in text
    assert "rank 1: exit code 1" in text and "close_all() did not complete" in text
    assert "'CUDA error'" in text and "'illegal'" in text
    assert "rank 3: hung" in text and "raised nothing" in text
    # a victim that never got to its kill
    problems, _ = rc.judge_kill_trial(2, 1, None, {0: {}}, {0: 0, 1: 1}, {}, timeout_s=2.0)
    assert any("never reached its kill" in p for p in problems)


def _log(t, rank, peer, thread="mixcc-watchdog", level="ERROR"):
    return (f"{t:.3f} {level} mixcc [{thread}] mixcc watchdog (rank {rank}, pid 1): rank {rank} "
            f"waited more than 2 s for rank {peer} at stage 'input' (block 0, epoch 3)")


def test_watchdog_log_and_abort():
    reports = {r: {"watchdog_thread": True, "t_call": 50.0} for r in range(4)}
    reports[3]["t_call"] = None
    logs = {r: "noise\n" + _log(52.05, r, 3) + "\n" for r in range(3)}
    logs[3] = ""
    assert rc.judge_watchdog(4, 3, reports, {0: 0, 1: 0, 2: 0, 3: 0}, logs, 2.0, False) == []
    abort_codes = {0: -6, 1: -6, 2: -6, 3: 0}
    assert rc.judge_watchdog(4, 3, reports, abort_codes, logs, 2.0, True) == []
    # abort run where rank 1 survived, rank 2 logged from the wrong thread, too late
    logs[2] = _log(55.0, 2, 3, thread="MainThread")
    problems = rc.judge_watchdog(4, 3, reports, {0: -6, 1: 0, 2: -6, 3: 0}, logs, 2.0, True)
    text = "\n".join(problems)
    assert "rank 1: exit code 0, expected SIGABRT" in text
    assert "thread 'MainThread'" in text and "5.00 s after its call" in text
    # no line at all, and a line naming the wrong peer, both fail
    logs = {0: "", 1: _log(52.0, 1, 2), 2: _log(52.0, 2, 3)}
    problems = rc.judge_watchdog(4, 3, reports, {0: 0, 1: 0, 2: 0, 3: 0}, logs, 2.0, False)
    assert sum("no ERROR line" in p for p in problems) == 2


def test_failure_message_matching():
    assert rc.names_failure("rank=1 peer=3 stage=result", 1, 3)
    assert not rc.names_failure("rank 1 waited for rank 3", 1, 3)  # no stage
    assert not rc.names_failure("rank 11 waited for rank 3 at stage 'input'", 1, 3)
    recs = rc.parse_log_lines("1.500 ERROR mixcc [t] first line\nsecond line\n\nother")
    assert recs == [{"t": 1.5, "level": "ERROR", "logger": "mixcc", "thread": "t",
                     "msg": "first line\nsecond line"}]


def _mismatch(rank, peer, mine, theirs, seconds=0.2, where="check after synchronize"):
    return {"mismatch": {"error": {"type": "CollectiveMismatch", "rank": rank, "peer": peer,
                                   "mine": mine, "theirs": theirs, "msg": ""},
                         "seconds": seconds, "where": where}}


def test_mismatch_collective_and_shape():
    ar, ag = "'allreduce(tp)', bfloat16, shape (24, 64)", "'allgather(tp)', bfloat16, same"
    reports = {0: _mismatch(0, 1, ar, ag), 1: _mismatch(1, 0, ag, ar),
               2: _mismatch(2, 1, ar, ag), 3: _mismatch(3, 1, ar, ag)}
    codes = dict.fromkeys(range(4), 0)
    assert rc.judge_mismatch(4, 1, reports, codes, {}, "collective", 5.0) == []
    reports[0] = _mismatch(0, 1, ar, ar)                 # theirs does not name allgather
    reports[3] = {"mismatch": {"error": {"type": "CollectiveTimeout", "msg": "late"},
                               "seconds": 10.1, "where": "check after synchronize"}}
    reports[2] = _mismatch(2, 1, ar, ag, seconds=6.0)
    text = "\n".join(rc.judge_mismatch(4, 1, reports, codes, {}, "collective", 5.0))
    assert "do not name ['allgather(tp)']" in text
    assert "rank 3: raised CollectiveTimeout" in text and "6.00 s after the call" in text
    a, b = "'allreduce(tp)', shape (24, 64), call #3", "'allreduce(tp)', shape (40, 64), call #3"
    shape = {0: _mismatch(0, 1, a, b), 1: _mismatch(1, 2, b, a), 2: _mismatch(2, 1, a, b),
             3: _mismatch(3, 1, a, b)}
    assert rc.judge_mismatch(4, 1, shape, codes, {}, "shape", 5.0) == []
    shape[1] = _mismatch(1, 2, a, a)
    text = "\n".join(rc.judge_mismatch(4, 1, shape, codes, {}, "shape", 5.0))
    assert "does not show its 40 rows" in text and "mine == theirs" in text


def test_good_calls():
    reports = {0: {"good": [{"debug": False, "program": "p", "round": 0, "err": None}]},
               1: {"good": [{"debug": True, "program": "p", "round": 1, "err": "NaN"}]}}
    problems, n = rc.judge_good_calls(2, reports)
    assert n == 2 and len(problems) == 1 and "NaN" in problems[0]
    assert rc.judge_good_calls(2, {})[0] == ["no correct call was checked"]


def test_leaks():
    mib = rc.MIB
    start = {"gpu_used": 1000 * mib, "reserved": 20 * mib, "fds": 12, "threads": 3, "tasks": 9,
             "maps": 400}
    same = dict(start, gpu_used=1001 * mib, maps=402, fds=11)  # within tolerance, or lower
    tol = dict(rc.LEAK_TOL)
    assert rc.judge_leaks({0: {"cycles_start": start, "cycles_end": same}}, "cycles", tol) == []
    leaky = dict(start, gpu_used=2600 * mib, fds=112, threads=4)
    problems = rc.judge_leaks({0: {"cycles_start": start, "cycles_end": leaky}}, "cycles", tol)
    assert len(problems) == 3 and any("fds 12 -> 112" in p for p in problems)
    cpu = {k: None for k in ("gpu_used", "reserved")}
    assert rc.judge_leaks({0: {"calls_start": dict(start, **cpu),
                               "calls_end": dict(start, **cpu)}}, "calls", tol) == []
    assert "no calls start/end" in rc.judge_leaks({0: {}}, "calls", tol)[0]


def test_exit_desc_and_scan():
    assert rc.exit_desc(-6) == "killed by SIGABRT (-6)"
    assert rc.exit_desc(None).startswith("hung")
    assert rc.scan_log("all fine\nwarning: foo\n") == []
    found = rc.scan_log("x\nTraceback (most recent call last):\n  File ...\n")
    assert found and "Traceback" in found[0]


def test_fake_runs_end_to_end(tmp_path):
    """Subprocess ranks, store, reports, limits and judges on CPU: a kill trial and the
    leak phases pass with the stand-in collective, and say what they measured."""
    opts = reliability.Options(world=2, fake=True, logdir=str(tmp_path), calls=200, cycles=2,
                               warm_cycles=1, min_call=5, max_call=20)
    P = reliability.Parent(opts)
    checks = [reliability.check_kill(P, "ipc", 1, 1)] + reliability.check_leaks(P)
    text = reliability.report(checks)
    assert [c.name for c in checks] == ["kill-ipc", "leak-calls", "leak-cycles"], text
    assert all(c.ok for c in checks), text
    lat = checks[0].data["max_latency_s"]
    assert opts.timeout_s - 0.1 < lat < opts.timeout_s + opts.slack_s, text
    victim = checks[0].data["trials"][0]["victim"]
    assert checks[0].data["trials"][0]["peers"] == {1 - victim: victim}, text
    assert "fds" in checks[1].summary and "200 eager calls" in checks[1].summary
