"""The reliability runs of issue 10 on GPUs, one subprocess per rank: what happens when
ranks die (kill), stall (watchdog), disagree (mismatch) or run long (leaks).

Every run starts its ranks as fresh processes (`python gpu_helpers/reliability.py _rank
CONFIG RANK`, rank r on GPU r % visible GPUs, a gloo process group rendezvousing on a
TCPStore that the parent hosts, so the store outlives any rank), collects each rank's JSON
report, exit code and log, and judges them with the pure functions of
gpu_helpers.judge. Every run is bounded: ranks not ready within `startup_s`, or still
running `after_ready_s` later, are killed and the run fails.

  kill      Per trial, a random victim SIGKILLs itself after a random number of calls
            while the others call `coll(x, out=out)` in a loop without synchronising.
            Every survivor must raise mixcc.CollectiveTimeout naming the victim within
            timeout_s + slack_s of the kill, close_all() with the peer gone and exit 0
            with a clean log. IPC: allreduce(tp) on one node; NVSHMEM: allreduce(world)
            on 2 simulated nodes (ranks_per_node = world / 2). bf16, timeout_s=2.
  watchdog  The last rank skips a call; the others make their call and then no other.
            Each must log, from the "mixcc-watchdog" thread, an ERROR naming itself, the
            skipper and a stage within timeout_s + 2 s and exit 0; again with
            MIXCC_ABORT_ON_ERROR=1 / compile(abort_on_error=True): log, then SIGABRT.
  mismatch  Debug mode: correct results (float64 oracle) with debug off and on; then
            rank 1 calls allgather while the others call allreduce (and, with
            MIXCC_DEBUG=1, rank 1 calls with 40 rows, the others 24): every rank raises
            mixcc.CollectiveMismatch in under mismatch_limit_s, naming both sides.
  leaks     `calls` eager calls, then `cycles` cycles of init_process_group / compile /
            call / close_all / destroy_process_group: GPU memory, torch's reserved
            memory, fds, threads, tasks and /proc/self/maps lines equal at the end.

`Options(fake=True)` runs all of it on CPU with a stand-in collective that meets its
peers through the store with the same timeout / mismatch / watchdog semantics: it tests
the orchestration, not mixcc (tests/test_reliability_judge.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # a rank: `judge` is a sibling module
    sys.path.insert(0, os.path.dirname(HERE))

from gpu_helpers.judge import (  # noqa: E402
    LEAK_TOL,
    LOG_FORMAT,
    MIB,
    MIS_HIDDEN,
    MIS_ROWS,
    MIS_ROWS_BAD,
    PEER_PROBLEM,
    exit_desc,
    find_failure_log,
    judge_good_calls,
    judge_kill_trial,
    judge_leaks,
    judge_mismatch,
    judge_watchdog,
    scan_log,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # the repository
TESTS = os.path.join(ROOT, "tests")
# Every process of ours keeps NVLink multicast off (as mixcc.launch.NO_MULTICAST_ENV;
# repeated so that the parent need not import torch to build a child's environment).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}
# Simulated nodes on one host: P2P only, bootstrap on loopback.
NVSHMEM_ENV = {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo"}


@dataclass
class Options:
    """What the runs do; tests fill it from the environment (gpu_helpers.ranks.env_int)."""

    world: int = 4                # ranks of kill / watchdog / mismatch / leaks
    per_gpu: int = 1              # ranks sharing a GPU (MPS share of NVSHMEM PEs)
    timeout_s: float = 2.0        # compile(timeout_s=) of kill and watchdog
    slack_s: float = 1.0          # kill: a survivor raises within timeout_s + this
    parallel: int = 1             # kill trials at once (each its own processes)
    min_call: int = 10            # kill: earliest victim call
    max_call: int = 500           # kill: latest victim call
    max_hangs: int = 2            # kill: stop the series after this many hung trials
    mismatch_timeout_s: float = 10.0
    mismatch_limit_s: float = 5.0
    calls: int = 100_000          # leaks: eager calls
    cycles: int = 100             # leaks: measured cycles
    warm_cycles: int = 3
    leak_limit_s: float = 240.0
    maps_tolerance: int = LEAK_TOL["maps"]
    startup_s: float = 120.0      # limit for a run's ranks to be ready (builds included)
    seed: int = 10
    logdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="mixcc-rel-"))
    fake: bool = False            # CPU dry run with a stand-in collective


# ---------------------------------------------------------------------------------------
# Parent: processes, limits, reports
# ---------------------------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    rundir: str
    world: int
    codes: dict[int, int | None] = field(default_factory=dict)
    reports: dict[int, dict] = field(default_factory=dict)
    logs: dict[int, str] = field(default_factory=dict)
    hung: bool = False
    startup_failed: bool = False
    seconds: float = 0.0

    def read_json(self, name: str) -> dict | None:
        try:
            with open(os.path.join(self.rundir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    problems: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0


class Parent:
    """Hosts the store, runs the ranks of each run as subprocesses and collects them."""

    def __init__(self, args: Options):
        from datetime import timedelta

        import torch.distributed as dist

        self.args = args
        os.makedirs(args.logdir, exist_ok=True)
        self.store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=120),
                                   wait_for_workers=False)
        self.port = self.store.port
        self.print_lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.procs_lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.print_lock:
            print(text, flush=True)

    def child_env(self, rank: int, world: int, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MIXCC_DEBUG", "MIXCC_ABORT_ON_ERROR")}
        env.update(NO_MULTICAST_ENV)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, TESTS, env.get("PYTHONPATH"))
                                            if p)
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world))
        env.update(extra)
        return env

    def run(self, name: str, role: str, world: int, cfg: dict, env: dict | None = None,
            rank_env: dict | None = None, after_ready_s: float = 60.0) -> RunResult:
        """Run `world` ranks of `role`; kill them all past the limits (startup_s until every
        rank is ready, then after_ready_s), or as soon as a rank dies before being ready."""
        rundir = os.path.join(self.args.logdir, name)
        os.makedirs(rundir, exist_ok=True)
        for f in os.listdir(rundir):
            os.unlink(os.path.join(rundir, f))
        cfg = dict(cfg, role=role, world=world, port=self.port, prefix=f"{name}/",
                   fake=self.args.fake, rundir=rundir)
        with open(os.path.join(rundir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        res = RunResult(name, rundir, world)
        t0 = time.time()
        procs, files = [], []
        try:
            for r in range(world):
                e = self.child_env(r, world, dict(env or {}, **((rank_env or {}).get(r, {}))))
                logf = open(os.path.join(rundir, f"rank{r}.log"), "wb")
                files.append(logf)
                p = subprocess.Popen([sys.executable, os.path.join(HERE, "reliability.py"), "_rank",
                                      os.path.join(rundir, "config.json"), str(r)],
                                     stdout=logf, stderr=subprocess.STDOUT, env=e, cwd=ROOT,
                                     start_new_session=True)
                procs.append(p)
                with self.procs_lock:
                    self.procs.add(p)
            ready_at = None
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                now = time.time()
                if ready_at is None:
                    ready = [os.path.exists(os.path.join(rundir, f"ready.{r}"))
                             for r in range(world)]
                    if all(ready):
                        ready_at = now
                    # a rank that died before it was ready leaves its peers waiting for it
                    elif (any(c is not None and not ok for c, ok in zip(codes, ready,
                                                                         strict=True))
                          or now - t0 > self.args.startup_s):
                        res.startup_failed = True
                        break
                elif now - ready_at > after_ready_s:
                    res.hung = True
                    break
                time.sleep(0.02)
        finally:
            killed = set()
            for i, p in enumerate(procs):
                if p.poll() is None:
                    killed.add(i)
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for i, p in enumerate(procs):
                code = p.wait()
                res.codes[i] = None if i in killed else code
                with self.procs_lock:
                    self.procs.discard(p)
            for f in files:
                f.close()
        res.seconds = time.time() - t0
        for r in range(world):
            res.reports[r] = res.read_json(f"rank{r}.json") or {}
            try:
                with open(os.path.join(rundir, f"rank{r}.log"), errors="replace") as f:
                    res.logs[r] = f.read()
            except OSError:
                res.logs[r] = ""
        return res

    def kill_everything(self) -> None:
        with self.procs_lock:
            for p in list(self.procs):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def run_problems(res: RunResult) -> list[str]:
    """What went wrong with the run itself (limits), before judging its content."""
    out = []
    if res.startup_failed:
        dead = [f"rank {r}: {exit_desc(c)}" for r, c in res.codes.items() if c not in (None,)]
        why = "a rank died before all were ready" if dead else "not ready within startup_s"
        out.append(f"{res.name}: {why} ({'; '.join(dead) or 'all hung'}); logs in {res.rundir}")
        for r, c in res.codes.items():
            if c not in (None, 0):
                tail = [ln for ln in res.logs.get(r, "").strip().splitlines()[-3:] if ln]
                out.append(f"rank {r} log tail: {' | '.join(tail)[:400]}")
    if res.hung:
        hung = [r for r, c in res.codes.items() if c is None]
        out.append(f"{res.name}: ranks {hung} still ran at the limit and were killed")
    return out


# ---------------------------------------------------------------------------------------
# The checks (parent side)
# ---------------------------------------------------------------------------------------

def kill_config(kind: str, world: int) -> dict:
    if kind == "ipc":
        return {"program": "allreduce(tp)", "axes": [["dp", 1], ["tp", world]], "rpn": world}
    return {"program": "allreduce(world)", "axes": [["w", world]], "rpn": world // 2}


def kill_env(kind: str, per_gpu: int) -> dict:
    if kind == "ipc":
        return {}
    env = {k: os.environ.get(k, v) for k, v in NVSHMEM_ENV.items()}
    if per_gpu > 1:  # several NVSHMEM PEs on one GPU: MPS shares summing to at most 100
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // per_gpu)
    return env


def check_kill(P: Parent, kind: str, trials: int, parallel: int) -> Check:
    """`trials` kill trials over `kind` ("ipc" or "nvshmem"), `parallel` at a time."""
    a = P.args
    t0 = time.time()
    name = f"kill-{kind}"
    world = a.world
    rng = random.Random(f"{a.seed}/{kind}")
    plan = [(i, rng.randrange(world), rng.randint(a.min_call, a.max_call))
            for i in range(trials)]
    P.say(f"\n--- {name}: {trials} trials, world {world}, {kill_config(kind, world)['program']}"
          f", timeout_s={a.timeout_s:g}, {parallel} at a time ---")
    hangs = [0]
    outcomes: dict[int, dict] = {}

    def trial(i: int, victim: int, call: int) -> None:
        if hangs[0] >= a.max_hangs:
            outcomes[i] = {"ran": False, "victim": victim, "call": call,
                           "problems": ["not run: too many hangs"]}
            P.say(f"  trial {i + 1:2d}/{trials}: not run")
            return
        cfg = dict(kill_config(kind, world), victim=victim, kill_call=call,
                   timeout_s=a.timeout_s, loop_limit_s=a.timeout_s + 15)
        res = P.run(f"{name}/trial{i:02d}", "kill", world, cfg, env=kill_env(kind, a.per_gpu),
                    after_ready_s=a.timeout_s + 30)
        vic = res.read_json("victim.json") or {}
        problems = run_problems(res)
        more, lat = judge_kill_trial(world, victim, vic.get("t_kill"), res.reports, res.codes,
                                     res.logs, a.timeout_s, a.slack_s)
        problems += more
        if res.hung or res.startup_failed:
            hangs[0] += 1
        peers = {r: (res.reports[r].get("error") or {}).get("peer") for r in res.reports
                 if r != victim}
        outcomes[i] = {"ran": True, "victim": victim, "call": call, "latency": lat,
                       "peers": peers, "problems": problems, "seconds": res.seconds,
                       "close_s": {r: rep.get("close_s") for r, rep in res.reports.items()
                                   if r != victim},
                       "calls": {r: rep.get("calls") for r, rep in res.reports.items()}}
        lat_txt = " ".join(f"{lat[r]:.2f}" for r in sorted(lat)) or "-"
        P.say(f"  trial {i + 1:2d}/{trials}: victim {victim} at call {call:3d}: latency "
              f"{lat_txt} s, peers {peers}, {res.seconds:.1f} s  "
              f"{'ok' if not problems else 'FAIL: ' + problems[0]}")
        for p in problems[1:6]:
            P.say(f"      {p}")

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as ex:
        futs = [ex.submit(trial, *t) for t in plan]
        for f in futs:
            f.result()
    ok_trials = [i for i, o in outcomes.items() if o["ran"] and not o["problems"]]
    lats = [max(o["latency"].values()) for o in outcomes.values() if o.get("latency")]
    problems = [f"trial {i + 1}: {p}" for i, o in sorted(outcomes.items())
                for p in o["problems"]]
    # a survivor that waited on a live rank which waited on the dead one may name the
    # live rank (no root-cause propagation between ranks): counted apart, still failed
    peer_only = [i for i, o in outcomes.items()
                 if o["problems"] and all(PEER_PROBLEM in p for p in o["problems"])]
    mx = max(lats) if lats else float("nan")
    med = sorted(lats)[len(lats) // 2] if lats else float("nan")
    summary = (f"{len(ok_trials)}/{trials} trials passed (every survivor: CollectiveTimeout "
               f"naming the victim within {a.timeout_s + a.slack_s:g} s, close_all, clean exit)"
               f"; kill -> raise, max over survivors: max {mx:.2f} s, median {med:.2f} s"
               + (f"; {len(peer_only)} failed only by naming a live peer" if peer_only else ""))
    return Check(name, len(ok_trials) == trials, summary, problems,
                 {"trials": outcomes, "max_latency_s": mx, "latencies_s": lats,
                  "failed_only_on_peer": peer_only},
                 time.time() - t0)


def check_watchdog(P: Parent) -> list[Check]:
    a = P.args
    t0 = time.time()
    world = a.world
    skipper = world - 1
    base = {"program": "allreduce(tp)", "axes": [["dp", 1], ["tp", world]], "rpn": world,
            "timeout_s": a.timeout_s, "skipper": skipper}
    P.say(f"\n--- watchdog: world {world}, rank {skipper} skips a call; timeout_s="
          f"{a.timeout_s:g}; plain run and abort run side by side ---")
    # abort run: the environment variable on ranks 0 and 1, the compile option on rank 2
    option_ranks = [r for r in range(world) if r != skipper and r >= 2]
    env_ranks = [r for r in range(world) if r != skipper and r not in option_ranks]
    runs = {
        "log": (dict(base, abort_option_ranks=[]), {}),
        "abort": (dict(base, abort_option_ranks=option_ranks),
                  {r: {"MIXCC_ABORT_ON_ERROR": "1"} for r in env_ranks}),
    }
    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = {k: ex.submit(P.run, f"watchdog-{k}", "watchdog", world, cfg, rank_env=renv,
                             after_ready_s=a.timeout_s + 25)
                for k, (cfg, renv) in runs.items()}
        results = {k: f.result() for k, f in futs.items()}
    checks = []
    for k, res in results.items():
        problems = run_problems(res) + judge_watchdog(world, skipper, res.reports, res.codes,
                                                      res.logs, a.timeout_s, k == "abort")
        lat = {}
        for r in range(world):
            rec = find_failure_log(res.logs.get(r, ""), r, skipper)
            t_call = res.reports.get(r, {}).get("t_call")
            if rec and t_call:
                lat[r] = round(rec["t"] - t_call, 3)
        waited = ", ".join(f"{v:.2f}" for v in lat.values()) or "-"
        codes = ", ".join(f"{r}: {c}" for r, c in res.codes.items())
        if k == "log":
            summary = (f"ranks {[r for r in range(world) if r != skipper]} log the timeout "
                       f"(rank, peer {skipper}, stage) from 'mixcc-watchdog' with no further "
                       f"call within {a.timeout_s + 2:g} s, all exit 0: logged after {waited} s"
                       f"; exit codes {codes}")
        else:
            summary = (f"MIXCC_ABORT_ON_ERROR=1 (ranks {env_ranks}), abort_on_error=True "
                       f"(ranks {option_ranks}): log, then SIGABRT (-6); skipper exits 0: "
                       f"logged after {waited} s; exit codes {codes}")
        checks.append(Check(f"watchdog-{k}", not problems, summary, problems,
                            {"log_latency_s": lat,
                             "codes": {r: c for r, c in res.codes.items()}},
                            time.time() - t0))
    return checks


def check_mismatch(P: Parent) -> list[Check]:
    a = P.args
    t0 = time.time()
    world = a.world
    odd = 1
    base = {"axes": [["dp", 1], ["tp", world]], "rpn": world, "timeout_s": a.mismatch_timeout_s,
            "odd": odd, "seed": a.seed}
    P.say(f"\n--- mismatch: world {world}, debug mode, timeout_s={a.mismatch_timeout_s:g}; "
          f"rank {odd} calls the other collective, then another shape ---")
    runs = {"collective": (dict(base, case="collective"), {}),
            "shape": (dict(base, case="shape"), {"MIXCC_DEBUG": "1"})}
    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = {k: ex.submit(P.run, f"mismatch-{k}", "mismatch", world, cfg, env=env,
                             after_ready_s=a.mismatch_timeout_s * 3 + 30)
                for k, (cfg, env) in runs.items()}
        results = {k: f.result() for k, f in futs.items()}
    checks = []
    for k, res in results.items():
        problems = run_problems(res) + judge_mismatch(world, odd, res.reports, res.codes,
                                                      res.logs, k, a.mismatch_limit_s)
        secs = {r: round(rep.get("mismatch", {}).get("seconds", -1), 3)
                for r, rep in res.reports.items()}
        where = {r: rep.get("mismatch", {}).get("where") for r, rep in res.reports.items()}
        errs = {r: rep.get("mismatch", {}).get("error") or {} for r, rep in res.reports.items()}
        how = "compile(debug=True)" if k == "collective" else "MIXCC_DEBUG=1"
        what = ("rank 1 allgather(tp), others allreduce(tp)" if k == "collective" else
                f"allreduce(tp), rank 1 {MIS_ROWS_BAD} rows, others {MIS_ROWS}")
        places = sorted(set(map(str, where.values())))
        summary = (f"{how}, {what}: CollectiveMismatch on every rank within "
                   f"{a.mismatch_limit_s:g} s (timeout_s {a.mismatch_timeout_s:g}): max "
                   f"{max(secs.values(), default=-1):.2f} s, raised at {places}")
        for r in (0, odd):
            e = errs.get(r) or {}
            if e:
                P.say(f"  [{k}] rank {r}: {e.get('type')} peer={e.get('peer')} "
                      f"mine={e.get('mine')!r} theirs={e.get('theirs')!r}")
        checks.append(Check(f"mismatch-{k}", not problems, summary, problems,
                            {"seconds": secs, "where": where, "errors": errs},
                            time.time() - t0))
    problems, n = [], 0
    for k, res in results.items():
        p, m = judge_good_calls(world, res.reports)
        problems += [f"{k}: {x}" for x in p]
        n += m
    checks.append(Check("debug-results", not problems,
                        f"calls with debug off, debug=True and MIXCC_DEBUG=1 (allreduce(tp),"
                        f" allgather(tp), bf16) match the float64 oracle: {n} checked",
                        problems, {"calls": n}, time.time() - t0))
    return checks


def check_leaks(P: Parent) -> list[Check]:
    a = P.args
    t0 = time.time()
    world = a.world
    cfg = {"program": "allreduce(tp)", "axes": [["dp", 1], ["tp", world]], "rpn": world,
           "timeout_s": 5.0, "calls": a.calls, "cycles": a.cycles,
           "warm_cycles": a.warm_cycles, "warm_calls": 2000, "sync_every": 1000}
    P.say(f"\n--- leaks: world {world}, {a.calls} calls, then {a.warm_cycles} + {a.cycles} "
          f"cycles of init / compile / call / close_all / destroy ---")
    res = P.run("leaks", "leaks", world, cfg, after_ready_s=a.leak_limit_s)
    samples = {r: rep.get("samples", {}) for r, rep in res.reports.items()}
    base = run_problems(res)
    for r in range(world):
        if res.codes.get(r) != 0:
            base.append(f"rank {r}: {exit_desc(res.codes.get(r))}")
        if res.reports.get(r, {}).get("failure"):
            base.append(f"rank {r}: {res.reports[r]['failure'][:300]}")
        base += [f"rank {r}: {p}" for p in scan_log(res.logs.get(r, ""))]
    tol = dict(LEAK_TOL, gpu_used=LEAK_TOL["gpu_used"] * world, maps=a.maps_tolerance)
    checks = []
    rep0 = res.reports.get(0, {})
    for phase, what in (("calls", f"{a.calls} eager calls"),
                        ("cycles", f"{a.cycles} compile/close_all/re-init cycles")):
        problems = base + judge_leaks(samples, phase, tol)
        s0 = samples.get(0, {})
        keys = [k for k in s0 if k.startswith(phase + "_")]
        P.say(f"  [{phase}] rank 0 at {', '.join(k.removeprefix(phase + '_') for k in keys)}:")
        for m in ("gpu_used", "reserved", "fds", "threads", "tasks", "maps"):
            vals = [s0[k].get(m) for k in keys]
            if m in ("gpu_used", "reserved"):
                vals = [None if v is None else round(v / MIB, 1) for v in vals]
            P.say(f"    {m + (' MiB' if m in ('gpu_used', 'reserved') else ''):<13} "
                  + " ".join(str(v) for v in vals))
        start, end = s0.get(f"{phase}_start", {}), s0.get(f"{phase}_end", {})
        rate = rep0.get(f"{phase}_seconds")
        summary = (f"{what} ({rate:.1f} s): rank 0 start -> end: "
                   if rate is not None else f"{what}: rank 0 start -> end: ")
        summary += ", ".join(f"{m} {_fmt(start.get(m), m)} -> {_fmt(end.get(m), m)}"
                             for m in ("gpu_used", "reserved", "fds", "threads", "tasks",
                                       "maps"))
        checks.append(Check(f"leak-{phase}", not problems, summary, problems,
                            {"samples": samples, "tolerance": tol,
                             "seconds": rep0.get(f"{phase}_seconds")},
                            time.time() - t0))
    return checks


def _fmt(v, m: str) -> str:
    if v is None:
        return "n/a"
    return f"{v / MIB:.1f}MiB" if m in ("gpu_used", "reserved") else str(v)


# ---------------------------------------------------------------------------------------
# Children (one process per rank)
# ---------------------------------------------------------------------------------------

class Report:
    """A rank's JSON report, rewritten atomically on every update (it survives a kill)."""

    def __init__(self, path: str):
        self.path, self.data, self.lock = path, {}, threading.Lock()

    def update(self, **kw) -> None:
        with self.lock:
            self.data.update(kw)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, default=str)
            os.replace(tmp, self.path)


def exc_info(e: BaseException) -> dict:
    d = {"type": type(e).__name__, "msg": str(e)[:2000]}
    for k in ("rank", "peer", "stage", "mine", "theirs"):
        if hasattr(e, k):
            d[k] = getattr(e, k)
    return d


class Ctx:
    """One rank: its config, report, store, process group and collectives."""

    def __init__(self, cfg: dict, rank: int):
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        self.cfg, self.rank, self.world = cfg, rank, cfg["world"]
        self.fake = cfg["fake"]
        self.rep = Report(os.path.join(cfg["rundir"], f"rank{rank}.json"))
        self.rep.update(rank=rank, pid=os.getpid(), phase="start")
        self.torch, self.dist = torch, dist
        if not self.fake:
            torch.cuda.set_device(rank % torch.cuda.device_count())
            self.dev = torch.device("cuda", torch.cuda.current_device())
        else:
            self.dev = torch.device("cpu")
        self.base = dist.PrefixStore(cfg["prefix"], dist.TCPStore(
            "127.0.0.1", cfg["port"], None, False, timeout=timedelta(seconds=120)))
        self.pg_timeout = timedelta(seconds=120)

    def init_pg(self, tag: str) -> None:
        self.dist.init_process_group("gloo", store=self.dist.PrefixStore(tag + "/", self.base),
                                     rank=self.rank, world_size=self.world,
                                     timeout=self.pg_timeout)

    def teardown(self) -> None:
        """What mixcc.launch does after close_all: forget the reference subgroups, destroy."""
        if not self.fake:
            from mixcc.reference import clear_groups

            clear_groups()
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def ready(self) -> None:
        self.rep.update(phase="ready", t_ready=time.time())
        open(os.path.join(self.cfg["rundir"], f"ready.{self.rank}"), "w").close()

    def coll(self, program: str, group=None, **opts):
        axes = [tuple(x) for x in self.cfg["axes"]]
        if self.fake:
            return _fake_compile(self, program, group, **opts)
        import mixcc

        return mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=self.cfg["rpn"]),
                             dtype=self.torch.bfloat16, group=group, backend="fused", **opts)

    def sync(self) -> None:
        if self.fake:
            _fake_sync()
        else:
            self.torch.cuda.synchronize()

    def close_all(self, **kw) -> None:
        if self.fake:
            _fake_close_all()
        else:
            import mixcc.runtime

            mixcc.runtime.close_all(**kw)

    def close_reported(self) -> None:
        """close_all(), its outcome and duration in the report."""
        t = time.time()
        try:
            self.close_all()
            self.rep.update(closed=True, close_s=round(time.time() - t, 3))
        except Exception as e:
            self.rep.update(closed=False, close_error=f"{type(e).__name__}: {e}")

    def store_barrier(self, key: str) -> None:
        from datetime import timedelta

        if self.base.add(f"bar/{key}", 1) == self.world:
            self.base.set(f"bar/{key}/go", "1")
        self.base.wait([f"bar/{key}/go"], timedelta(seconds=120))


def role_kill(ctx: Ctx) -> int:

    cfg, torch = ctx.cfg, ctx.torch
    victim, kill_call = cfg["victim"], cfg["kill_call"]
    ctx.init_pg("pg")
    coll = ctx.coll(cfg["program"], timeout_s=cfg["timeout_s"])
    x = torch.ones(8, 256, dtype=torch.bfloat16, device=ctx.dev)
    out = torch.empty(coll.output_shape(x.shape), dtype=x.dtype, device=ctx.dev)
    for _ in range(3):
        coll(x, out=out)
    ctx.sync()
    if not bool((out.float() == ctx.world).all()):
        ctx.rep.update(failure=f"warm-up result wrong: {out.float().flatten()[:4].tolist()}")
        return 1
    ctx.dist.barrier()
    ctx.ready()
    calls = 0
    if ctx.rank == victim:
        while calls < kill_call:
            coll(x, out=out)
            calls += 1
        ctx.rep.update(calls=calls, phase="killing")
        path = os.path.join(cfg["rundir"], "victim.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": ctx.rank, "call": calls, "t_kill": time.time()}, f)
        os.replace(path + ".tmp", path)
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.time() + cfg["loop_limit_s"]
    try:
        while True:
            coll(x, out=out)
            calls += 1
            if not calls & 255 and time.time() > deadline:
                ctx.rep.update(calls=calls, phase="no-timeout")
                break
    except Exception as e:  # CollectiveTimeout, or what the judge names
        ctx.rep.update(t_raise=time.time(), error=exc_info(e), calls=calls, phase="raised")
    ctx.close_reported()
    try:
        ctx.teardown()
        ctx.rep.update(destroyed=True)
    except Exception as e:
        ctx.rep.update(destroyed=False, destroy_error=f"{type(e).__name__}: {e}")
    ctx.rep.update(phase="done")
    return 0


def role_watchdog(ctx: Ctx) -> int:
    cfg, torch = ctx.cfg, ctx.torch
    skipper = cfg["skipper"]
    ctx.init_pg("pg")
    opts = {"timeout_s": cfg["timeout_s"]}
    if ctx.rank in cfg["abort_option_ranks"]:
        opts["abort_on_error"] = True
    coll = ctx.coll(cfg["program"], **opts)
    x = torch.ones(8, 256, dtype=torch.bfloat16, device=ctx.dev)
    out = torch.empty(coll.output_shape(x.shape), dtype=x.dtype, device=ctx.dev)
    coll(x, out=out)
    ctx.sync()
    names = [t.name for t in threading.enumerate()]
    ctx.rep.update(watchdog_thread="mixcc-watchdog" in names, threads=names,
                   warm_ok=bool((out.float() == ctx.world).all()),
                   abort_option="abort_on_error" in opts,
                   abort_env=os.environ.get("MIXCC_ABORT_ON_ERROR"))
    ctx.dist.barrier()
    ctx.ready()
    if ctx.rank == skipper:  # skip the call; outlive the others' timeouts
        time.sleep(cfg["timeout_s"] + 4)
        ctx.close_all(barrier=False)  # the others' runtimes failed: no closing barrier
    else:
        t_call = time.time()
        coll(x, out=out)  # never completes: the skipper is not there
        ctx.rep.update(t_call=t_call)
        time.sleep(cfg["timeout_s"] + 2)  # no further call: only the watchdog can tell
        ctx.rep.update(slept=True)
        ctx.close_all()
    ctx.teardown()
    ctx.rep.update(phase="done")
    return 0


def _oracle():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle

    return oracle


def good_calls(ctx: Ctx, colls: dict, debug, rows: int, rounds: int, seed: int) -> list[dict]:
    """Calls with seeded inputs, every result against the float64 oracle."""
    oracle, torch = _oracle(), ctx.torch
    axes = [tuple(x) for x in ctx.cfg["axes"]]
    out = []
    for rnd in range(rounds):
        for i, (program, coll) in enumerate(colls.items()):
            s = seed * 100 + rnd * 10 + i
            inputs = [oracle.make_input(s, r, rows, MIS_HIDDEN, torch.bfloat16)
                      for r in range(ctx.world)]
            exp, mag, terms = oracle.expected(program, axes, inputs)
            y = coll(inputs[ctx.rank].to(ctx.dev))
            ctx.sync()
            err = oracle.mismatch(y.cpu(), exp[ctx.rank], mag[ctx.rank], torch.bfloat16, 1,
                                  terms)
            out.append({"debug": debug, "program": program, "round": rnd, "err": err})
    return out


def provoke(ctx: Ctx, first, again, colls) -> dict:
    """Make the mismatched call; then synchronize and check; then call again."""
    t0 = time.time()
    where = "call"
    try:
        first()
        where = "check after synchronize"
        ctx.sync()
        for c in colls:
            c.check()
        where = "next call"
        again()
        where = "check after the next call"
        ctx.sync()
        for c in colls:
            c.check()
        return {"error": None, "seconds": time.time() - t0}
    except Exception as e:
        return {"error": exc_info(e), "where": where, "seconds": time.time() - t0}


def role_mismatch(ctx: Ctx) -> int:
    cfg, torch = ctx.cfg, ctx.torch
    odd, timeout_s = cfg["odd"], cfg["timeout_s"]
    ar, ag = "allreduce(tp)", "allgather(tp)"
    ctx.init_pg("pg")
    good = []
    if cfg["case"] == "collective":
        # debug off (own group, own runtime): the normal calls give correct results
        g_off = ctx.dist.new_group(list(range(ctx.world)), backend="gloo")
        off = {p: ctx.coll(p, group=g_off, timeout_s=timeout_s, debug=False) for p in (ar, ag)}
        good += good_calls(ctx, off, False, MIS_ROWS, 3, cfg["seed"])
        on = {p: ctx.coll(p, timeout_s=timeout_s, debug=True) for p in (ar, ag)}
        good += good_calls(ctx, on, True, MIS_ROWS, 3, cfg["seed"] + 1)
        ctx.rep.update(good=good)
        ctx.dist.barrier()
        ctx.ready()
        x = torch.ones(MIS_ROWS, MIS_HIDDEN, dtype=torch.bfloat16, device=ctx.dev)
        mine = on[ag] if ctx.rank == odd else on[ar]
        res = provoke(ctx, lambda: mine(x), lambda: mine(x), list(on.values()))
    else:  # shape, debug from MIXCC_DEBUG=1
        coll = ctx.coll(ar, timeout_s=timeout_s)
        good += good_calls(ctx, {ar: coll}, "env", MIS_ROWS, 2, cfg["seed"] + 2)
        ctx.rep.update(good=good, env_debug=os.environ.get("MIXCC_DEBUG"))
        ctx.dist.barrier()
        ctx.ready()
        rows = MIS_ROWS_BAD if ctx.rank == odd else MIS_ROWS
        x = torch.ones(rows, MIS_HIDDEN, dtype=torch.bfloat16, device=ctx.dev)
        res = provoke(ctx, lambda: coll(x), lambda: coll(x), [coll])
    ctx.rep.update(mismatch=res)
    ctx.dist.barrier()  # every rank is out of its collectives before anyone closes
    ctx.close_reported()
    ctx.teardown()
    ctx.rep.update(phase="done")
    return 0


def measure(ctx: Ctx, key: str, samples: dict) -> None:
    """All ranks quiescent (store barriers around it), then every counter."""
    import gc

    torch = ctx.torch
    ctx.sync()
    gc.collect()
    ctx.store_barrier(f"m/{key}/in")
    s = {"gpu_used": None, "reserved": None}
    if not ctx.fake:
        free, total = torch.cuda.mem_get_info()
        s = {"gpu_used": total - free, "reserved": torch.cuda.memory_reserved()}
    s["fds"] = len(os.listdir("/proc/self/fd"))
    s["threads"] = threading.active_count()
    s["tasks"] = len(os.listdir("/proc/self/task"))
    with open("/proc/self/maps") as f:
        s["maps"] = sum(1 for _ in f)
    ctx.store_barrier(f"m/{key}/out")
    samples[key] = s
    ctx.rep.update(samples=samples)


def role_leaks(ctx: Ctx) -> int:
    import gc

    cfg, torch = ctx.cfg, ctx.torch
    want = ctx.world * (ctx.world + 1) / 2  # allreduce of rank + 1
    samples: dict = {}

    def fresh(tag: str):
        ctx.init_pg(tag)
        coll = ctx.coll(cfg["program"], timeout_s=cfg["timeout_s"])
        x = torch.full((4, 512), ctx.rank + 1.0, dtype=torch.bfloat16, device=ctx.dev)
        return coll, x, torch.empty(coll.output_shape(x.shape), dtype=x.dtype, device=ctx.dev)

    def verify(out, what: str) -> None:
        if not bool((out.float() == want).all()):
            raise RuntimeError(f"{what}: wrong result {out.float().flatten()[:4].tolist()}, "
                               f"expected {want}")

    coll, x, out = fresh("calls")
    ctx.ready()
    for _ in range(cfg["warm_calls"]):
        coll(x, out=out)
    ctx.sync()
    verify(out, "warm-up")
    n, every = cfg["calls"], cfg["sync_every"]
    marks = {n * k // 4 for k in (1, 2, 3)}
    measure(ctx, "calls_start", samples)
    t0 = time.time()
    for i in range(1, n + 1):
        coll(x, out=out)
        if i % every == 0:
            ctx.sync()
        if i in marks:
            measure(ctx, f"calls_{i}", samples)
    ctx.sync()
    ctx.rep.update(calls_seconds=time.time() - t0)
    verify(out, f"after {n} calls")
    measure(ctx, "calls_end", samples)
    ctx.close_all()
    del coll, x, out
    ctx.teardown()
    gc.collect()
    warm, cycles = cfg["warm_cycles"], cfg["cycles"]
    cmarks = {warm + cycles * k // 4 for k in (1, 2, 3)}
    t0 = time.time()
    for c in range(warm + cycles):
        if c == warm:
            measure(ctx, "cycles_start", samples)
            t0 = time.time()
        elif c in cmarks:
            measure(ctx, f"cycles_{c - warm}", samples)
        coll, x, out = fresh(f"cycle{c}")
        coll(x, out=out)
        ctx.sync()
        verify(out, f"cycle {c}")
        ctx.close_all()
        del coll, x, out
        ctx.teardown()
        gc.collect()
    ctx.rep.update(cycles_seconds=time.time() - t0)
    measure(ctx, "cycles_end", samples)
    ctx.rep.update(phase="done")
    return 0


ROLES = {"kill": role_kill, "watchdog": role_watchdog, "mismatch": role_mismatch,
         "leaks": role_leaks}


def capture_handler(rep: Report):
    """A logging handler for logger 'mixcc' that copies each record into the report at
    once (before any abort that follows it)."""
    import logging

    class Capture(logging.Handler):
        def emit(self, record):
            logs = rep.data.get("mixcc_log", [])
            rep.update(mixcc_log=logs + [{"t": record.created, "level": record.levelname,
                                          "thread": record.threadName,
                                          "msg": record.getMessage()[:2000]}])

    return Capture(level=logging.WARNING)


def child_main(config_path: str, rank: int) -> int:
    import logging
    import resource
    import traceback

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT must not write a core
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    with open(config_path) as f:
        cfg = json.load(f)
    sys.path.insert(0, ROOT)
    ctx = Ctx(cfg, rank)
    logging.getLogger("mixcc").addHandler(capture_handler(ctx.rep))
    try:
        return ROLES[cfg["role"]](ctx)
    except Exception as e:
        tb = traceback.format_exc()
        ctx.rep.update(failure=f"{type(e).__name__}: {e}", traceback=tb)
        print(f"rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if ctx.fake:
            _fake_close_all()


# ---------------------------------------------------------------------------------------
# --fake: a CPU stand-in for the fused backend (tests the orchestration, not mixcc)
# ---------------------------------------------------------------------------------------

_FAKE_RTS: dict = {}


class _FakeRuntime:
    """A 'device' thread runs the queued calls in order; each meets its peers through the
    store (a missing peer past timeout_s is a timeout naming it; with debug, a different
    fingerprint is a mismatch); after a failure queued calls give up at once. A watchdog
    thread logs the failure and, when asked, aborts, like the real runtime's."""

    def __init__(self, ctx: Ctx, ns: str, timeout_s: float, abort: bool):
        import queue

        self.ctx, self.ns, self.timeout_s, self.abort = ctx, ns, timeout_s, abort
        self.store = ctx.dist.distributed_c10d._get_default_store()
        self.q: queue.Queue = queue.Queue(maxsize=256)
        self.err: tuple | None = None
        self.calls = 0
        self.stop = threading.Event()
        self.device = threading.Thread(target=self._work, name="fake-device", daemon=True)
        self.dog = threading.Thread(target=self._watch, name="mixcc-watchdog", daemon=True)
        self.device.start()
        self.dog.start()

    def exception(self):
        import mixcc

        if self.err is None:
            return None
        if self.err[0] == "timeout":
            return mixcc.CollectiveTimeout(self.ctx.rank, self.err[1], "input", 0, self.err[2],
                                           self.timeout_s)
        return mixcc.CollectiveMismatch(self.ctx.rank, self.err[1], self.err[2], self.err[3])

    def raise_if_failed(self) -> None:
        e = self.exception()
        if e is not None:
            raise e

    def _watch(self) -> None:
        import logging

        while not self.stop.wait(0.05):
            e = self.exception()
            if e is not None:
                logging.getLogger("mixcc").error("fake watchdog (rank %d): %s", self.ctx.rank, e)
                if self.abort or os.environ.get("MIXCC_ABORT_ON_ERROR") == "1":
                    sys.stderr.flush()
                    os.abort()
                return

    def _work(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if self.err is None:
                    self._run(*item)
            except Exception as e:  # a store failure: report it as a timeout on peer -1
                self.err = ("timeout", -1, 0, str(e))
            finally:
                self.q.task_done()

    def _run(self, n: int, program: str, fp: str, x, out) -> None:
        import pickle
        from datetime import timedelta

        torch, rank, world = self.ctx.torch, self.ctx.rank, self.ctx.world
        key = f"fake/{self.ns}/{n}/"
        self.store.set(key + str(rank), pickle.dumps((fp, x)))
        vals = {}
        t_end = time.time() + self.timeout_s
        for p in range(world):
            if p == rank:
                vals[p] = (fp, x)
                continue
            try:
                self.store.wait([key + str(p)], timedelta(seconds=max(0.01, t_end - time.time())))
            except Exception:
                self.err = ("timeout", p, n)
                return
            vals[p] = pickle.loads(self.store.get(key + str(p)))
        for p, (pfp, _) in vals.items():
            if fp and pfp != fp:
                self.err = ("mismatch", p, fp, pfp)
                return
        if program.startswith("allgather"):
            out.copy_(torch.cat([vals[p][1] for p in range(world)]))
        else:
            out.copy_(sum(vals[p][1].double() for p in range(world)).to(out.dtype))

    def close(self) -> None:
        self.stop.set()
        self.q.put(None)
        self.device.join()
        self.dog.join()


class _FakeColl:
    def __init__(self, rt: _FakeRuntime, program: str, world: int, debug: bool):
        self.rt, self.program, self.world, self.debug = rt, program, world, debug

    def output_shape(self, shape):
        rows = shape[0] * (self.world if self.program.startswith("allgather") else 1)
        return (rows, *shape[1:])

    def __call__(self, x, out=None):
        self.rt.raise_if_failed()
        if out is None:
            out = self.rt.ctx.torch.empty(self.output_shape(x.shape), dtype=x.dtype)
        self.rt.calls += 1
        n = self.rt.calls
        fp = f"{self.program} {tuple(x.shape)} {x.dtype} call {n}" if self.debug else ""
        self.rt.q.put((n, self.program, fp, x.clone(), out))
        return out

    def check(self) -> None:
        self.rt.raise_if_failed()


def _fake_compile(ctx: Ctx, program: str, group, timeout_s: float = 5.0, debug=None,
                  abort_on_error: bool = False) -> _FakeColl:
    key = id(group)
    rt = _FAKE_RTS.get(key)
    if rt is None:
        rt = _FAKE_RTS[key] = _FakeRuntime(ctx, f"rt{len(_FAKE_RTS)}", timeout_s,
                                           abort_on_error)
    if debug is None:
        debug = os.environ.get("MIXCC_DEBUG") == "1"
    return _FakeColl(rt, program, ctx.world, bool(debug))


def _fake_sync() -> None:
    for rt in _FAKE_RTS.values():
        rt.q.join()


def _fake_close_all() -> None:
    for rt in _FAKE_RTS.values():
        rt.close()
    _FAKE_RTS.clear()




# ---------------------------------------------------------------------------------------
# For the tests
# ---------------------------------------------------------------------------------------

def report(checks: list[Check]) -> str:
    """One line per check (PASS/FAIL and its summary), then its first problems."""
    lines = []
    for c in checks:
        lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<20} {c.summary}")
        lines += [f"        - {p}" for p in c.problems[:12]]
    return "\n".join(lines)


def assert_passed(checks: list[Check]) -> None:
    """Fail with the report unless every check passed (and there was one)."""
    text = report(checks)
    print(text)
    assert checks and all(c.ok for c in checks), text


if __name__ == "__main__":
    if sys.argv[1:2] != ["_rank"]:
        sys.exit("usage: reliability.py _rank CONFIG RANK (the tests start the ranks)")
    sys.exit(child_main(sys.argv[2], int(sys.argv[3])))
