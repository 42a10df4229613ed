"""Pure judges of the reliability runs (gpu_helpers.reliability): each takes the ranks'
reports, exit codes and logs of one run and returns what went wrong (empty: passed).
No torch import: the CPU tests (tests/test_reliability_judge.py) feed them fake data."""

from __future__ import annotations

import re
import signal

# Stage names of the device error record (mixcc.runtime.STAGE_NAMES; a CPU test keeps
# the two equal).
STAGES = ("input", "result", "inter-node data", "inter-node credit", "push data",
          "push credit", "LL data", "copy-engine words", "epilogue row sum")
# What must never appear in a rank's log (stderr and stdout together).
BAD_LOG = (("CUDA error", re.compile(r"CUDA error")),
           ("illegal", re.compile(r"illegal", re.I)),
           ("Traceback", re.compile(r"Traceback \(most recent call last\)")),
           ("segfault", re.compile(r"Segmentation fault|SIGSEGV")),
           ("core dumped", re.compile(r"core dumped", re.I)))
LOG_FORMAT = "%(created).3f %(levelname)s %(name)s [%(threadName)s] %(message)s"
_LOG_LINE = re.compile(r"^(\d+\.\d+) (\w+) (\S+) \[([^\]]*)\] (.*)$")
MIB = 1 << 20
# Leak tolerances, end minus warm start (a decrease is never a leak):
#  gpu_used  device-wide used bytes (torch.cuda.mem_get_info; every rank of the run shares
#            the GPU, so it moves with all of them): 2 MiB per rank, the granularity in
#            which the driver backs allocations; a leaked workspace is 16 MiB per cycle.
#  reserved  torch's caching allocator: one 2 MiB segment (its smallest).
#  maps      4 lines: glibc malloc and Python's allocator map and unmap arenas on their
#            own schedule; a leak of one mapping per cycle (or per 1000 calls) is >= 100.
#  fds, threads, tasks: none.
LEAK_TOL = {"gpu_used": 2 * MIB, "reserved": 2 * MIB, "fds": 0, "threads": 0, "tasks": 0,
            "maps": 4}
MIS_ROWS, MIS_ROWS_BAD, MIS_HIDDEN = 24, 40, 64  # shapes of the mismatch check
PEER_PROBLEM = "CollectiveTimeout names peer"


def exit_problems(r: int, code: int | None, rep: dict) -> list[str]:
    """Rank r's exit code other than 0 and the failure its report records, as problems."""
    out = [f"rank {r}: {exit_desc(code)}"] if code != 0 else []
    if rep.get("failure"):
        out.append(f"rank {r}: {rep['failure'][:300]}")
    return out


def reported(r: int, rep: dict, code: int | None, key: str, missing: str
             ) -> tuple[list[str], dict | None]:
    """Rank r's exit problems and its report's `key`; `missing` is a problem when the
    report has neither that key nor a recorded failure."""
    problems = exit_problems(r, code, rep)
    if not rep.get(key) and not rep.get("failure"):
        problems.append(f"rank {r}: {missing}")
    return problems, rep.get(key)


def exit_desc(code: int | None) -> str:
    if code is None:
        return "hung (killed by the parent)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} ({code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def scan_log(text: str) -> list[str]:
    """The forbidden patterns that occur in a rank's log, each with its first line."""
    found = []
    for name, pat in BAD_LOG:
        m = pat.search(text)
        if m:
            line = text[text.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0]
            found.append(f"{name!r} in its log: {line.strip()[:160]}")
    return found


def names_failure(msg: str, rank: int, peer: int, stages=STAGES) -> bool:
    """Whether a log message names `rank`, `peer` and one of the stages."""
    def has(word: str, r: int) -> bool:
        return re.search(rf"\b{word}\s*[=:#]?\s*{r}\b", msg) is not None

    return (has("rank", rank) and (has("rank", peer) or has("peer", peer))
            and any(s in msg for s in stages))


def parse_log_lines(text: str) -> list[dict]:
    """Records written in LOG_FORMAT: time, level, logger, thread, message (with the
    lines that follow a record's first line, up to the next record or a blank line)."""
    out: list[dict] = []
    cont = False
    for line in text.splitlines():
        m = _LOG_LINE.match(line.strip())
        if m:
            out.append({"t": float(m.group(1)), "level": m.group(2), "logger": m.group(3),
                        "thread": m.group(4), "msg": m.group(5)})
            cont = True
        elif cont and line.strip() and not line.startswith("["):
            out[-1]["msg"] += "\n" + line
        else:
            cont = False
    return out


def find_failure_log(text: str, rank: int, peer: int, stages=STAGES) -> dict | None:
    """The first ERROR line of logger mixcc (or a child of it) naming rank, peer, stage."""
    for rec in parse_log_lines(text):
        if (rec["level"] == "ERROR" and rec["logger"].split(".")[0] == "mixcc"
                and names_failure(rec["msg"], rank, peer, stages)):
            return rec
    return None


def judge_kill_trial(world: int, victim: int, t_kill: float | None, reports: dict,
                     codes: dict, logs: dict, timeout_s: float, slack_s: float = 1.0
                     ) -> tuple[list[str], dict[int, float]]:
    """Problems of one kill trial (empty: passed) and each survivor's latency, the time
    from the victim's kill to the survivor's CollectiveTimeout."""
    problems: list[str] = []
    lat: dict[int, float] = {}
    if t_kill is None:
        why = (reports.get(victim) or {}).get("failure") or exit_desc(codes.get(victim))
        problems.append(f"victim {victim} never reached its kill ({why})")
    elif codes.get(victim) != -signal.SIGKILL:
        problems.append(f"victim {victim}: {exit_desc(codes.get(victim))}, expected SIGKILL")
    limit = timeout_s + slack_s
    for r in range(world):
        if r == victim:
            continue
        rep = reports.get(r) or {}
        more, err = reported(r, rep, codes.get(r), "error",
                             f"raised nothing (calls made: {rep.get('calls')})")
        problems += more
        if err:
            if err.get("type") != "CollectiveTimeout":
                problems.append(f"rank {r}: raised {err.get('type')}: {err.get('msg', '')[:200]}")
            else:
                if err.get("peer") != victim:
                    problems.append(f"rank {r}: {PEER_PROBLEM} {err.get('peer')}, not the dead "
                                    f"rank {victim} (stage {err.get('stage')!r})")
                if err.get("rank") != r:
                    problems.append(f"rank {r}: CollectiveTimeout says rank {err.get('rank')}")
            if t_kill is not None and rep.get("t_raise") is not None:
                dt = rep["t_raise"] - t_kill
                lat[r] = dt
                if dt > limit:
                    problems.append(f"rank {r}: raised {dt:.2f} s after the kill "
                                    f"(limit {limit:.2f} s)")
                elif dt < -0.05:
                    problems.append(f"rank {r}: raised {-dt:.2f} s before the kill")
            if not rep.get("closed"):
                problems.append(f"rank {r}: close_all() did not complete: "
                                f"{rep.get('close_error', 'no report')}")
        problems += [f"rank {r}: {p}" for p in scan_log(logs.get(r, ""))]
    return problems, lat


def judge_watchdog(world: int, skipper: int, reports: dict, codes: dict, logs: dict,
                   timeout_s: float, abort: bool, stages=STAGES) -> list[str]:
    """Problems of one watchdog run: every rank but the skipper logs the failure from
    the watchdog thread within timeout_s + 2 s of its call, then exits 0 (abort: dies of
    SIGABRT after logging); the skipper logs nothing and exits 0."""
    problems = []
    for r in range(world):
        rep, code, text = reports.get(r) or {}, codes.get(r), logs.get(r, "")
        if rep.get("failure"):
            problems.append(f"rank {r}: {rep['failure'][:300]}")
        if not rep.get("watchdog_thread"):
            problems.append(f"rank {r}: no thread named 'mixcc-watchdog' after the first call")
        if r == skipper:
            if code != 0:
                problems.append(f"rank {r} (skipper): {exit_desc(code)}")
            errs = [x for x in parse_log_lines(text) if x["level"] == "ERROR"]
            if errs:
                problems.append(f"rank {r} (skipper) logged an error: {errs[0]['msg'][:160]}")
            continue
        want = -signal.SIGABRT if abort else 0
        if code != want:
            problems.append(f"rank {r}: {exit_desc(code)}, expected "
                            f"{'SIGABRT (-6)' if abort else 'exit code 0'}")
        rec = find_failure_log(text, r, skipper, stages)
        if rec is None:
            problems.append(f"rank {r}: no ERROR line of logger 'mixcc' naming rank {r}, "
                            f"peer {skipper} and a stage in its log")
            continue
        if rec["thread"] != "mixcc-watchdog":
            problems.append(f"rank {r}: the line came from thread {rec['thread']!r}")
        t_call = rep.get("t_call")
        if t_call is None:
            problems.append(f"rank {r}: no call time reported")
        elif not timeout_s - 0.5 <= rec["t"] - t_call <= timeout_s + 2:
            problems.append(f"rank {r}: logged {rec['t'] - t_call:.2f} s after its call "
                            f"(expected {timeout_s:g} to {timeout_s + 2:g} s)")
        problems += [f"rank {r}: {p}" for p in scan_log(text)
                     if not (abort and "core dumped" in p)]
    return problems


def _words(text: str) -> str:
    return text.replace("'", " ").replace('"', " ")


def judge_mismatch(world: int, odd: int, reports: dict, codes: dict, logs: dict,
                   kind: str, limit_s: float, programs=("allreduce(tp)", "allgather(tp)"),
                   rows=(MIS_ROWS, MIS_ROWS_BAD)) -> list[str]:
    """Problems of one mismatch run: every rank raised CollectiveMismatch within limit_s
    of the mismatched call, the ranks naming rank `odd` (which names another); for kind
    "collective" ranks 0 and `odd` name both programs, for "shape" each names its own
    rows in `mine` and the two descriptions differ."""
    problems = []
    for r in range(world):
        more, res = reported(r, reports.get(r) or {}, codes.get(r), "mismatch",
                             "no mismatch result reported")
        problems += more
        if not res:
            continue
        err = res.get("error")
        if not err:
            problems.append(f"rank {r}: nothing raised (call, synchronize + check, next call)")
            continue
        if err.get("type") != "CollectiveMismatch":
            problems.append(f"rank {r}: raised {err.get('type')} at {res.get('where')}: "
                            f"{err.get('msg', '')[:200]}")
            continue
        if res.get("seconds", 1e9) >= limit_s:
            problems.append(f"rank {r}: raised {res['seconds']:.2f} s after the call "
                            f"(limit {limit_s:g} s)")
        if err.get("rank") != r:
            problems.append(f"rank {r}: CollectiveMismatch says rank {err.get('rank')}")
        peer = err.get("peer")
        if (r != odd and peer != odd) or (r == odd and (peer == odd or peer not in range(world))):
            problems.append(f"rank {r}: CollectiveMismatch names peer {peer}")
        mine, theirs = str(err.get("mine", "")), str(err.get("theirs", ""))
        if r not in (0, odd):
            continue
        if kind == "collective":
            both = _words(mine + " " + theirs)
            own = programs[1] if r == odd else programs[0]
            missing = [p for p in programs if p not in both]
            if missing:
                problems.append(f"rank {r}: mine/theirs do not name {missing}: "
                                f"mine={mine!r} theirs={theirs!r}")
            elif own not in mine:
                problems.append(f"rank {r}: mine={mine!r} does not name its own {own}")
        else:
            own_rows = rows[1] if r == odd else rows[0]
            if not re.search(rf"\b{own_rows}\b", mine):
                problems.append(f"rank {r}: mine={mine!r} does not show its {own_rows} rows")
            if mine == theirs:
                problems.append(f"rank {r}: mine == theirs ({mine!r})")
    for r in range(world):
        problems += [f"rank {r}: {p}" for p in scan_log(logs.get(r, ""))]
    return problems


def judge_good_calls(world: int, reports: dict) -> tuple[list[str], int]:
    """Problems of the correct calls made before the mismatch, and how many were checked."""
    problems, n = [], 0
    for r in range(world):
        for g in (reports.get(r) or {}).get("good", []):
            n += 1
            if g.get("err"):
                problems.append(f"rank {r}: debug={g['debug']} {g['program']} round "
                                f"{g['round']}: {g['err'][:200]}")
    if n == 0:
        problems.append("no correct call was checked")
    return problems, n


def judge_leaks(samples: dict[int, dict], phase: str, tol: dict) -> list[str]:
    """Problems of one leak phase: per rank, end minus warm start of every metric within
    `tol` (None values, as on CPU, are skipped)."""
    problems = []
    for r, s in sorted(samples.items()):
        start, end = s.get(f"{phase}_start"), s.get(f"{phase}_end")
        if not start or not end:
            problems.append(f"rank {r}: no {phase} start/end measurement")
            continue
        for m, t in tol.items():
            a, b = start.get(m), end.get(m)
            if a is None or b is None:
                continue
            if b - a > t:
                unit = " bytes" if m in ("gpu_used", "reserved") else ""
                problems.append(f"rank {r}: {m} {a} -> {b}{unit} (+{b - a}, tolerance {t})")
    return problems

