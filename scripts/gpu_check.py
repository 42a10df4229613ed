"""One-GPU (or several-GPU) correctness run of the fused backend: ARCHITECTURE.md
section 7, steps 3-4. Run by scripts/device_one_gpu.sh (several processes share one
GPU, gloo process group) or scripts/device_multi_gpu.sh (`--pg nccl`: one process per
GPU, process group "cpu:gloo,cuda:nccl", and the reference backend on NCCL is checked
too, also on simulated nodes).

World sizes 2, 4 and 8 (processes; they share GPUs round-robin, so on one GPU all
share it through CUDA IPC, under MPS). For each world: all five presets on several
meshes, a seeded fuzzed sample of programs, dtypes float32/bfloat16/float16, rows 1,
odd and large (several workspace chunks), out-of-place, out= and in-place calls, one-
shot and two-shot, results against the float64 oracle of tests/oracle.py, replicas
bitwise equal, CUDA graph replay with new data, and the timeout test (one rank skips
a call). Prints a table last; writes JSON under $OUT when set.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mixcc  # noqa: E402
from mixcc import presets  # noqa: E402

from oracle import expected, make_input, mismatch, statements  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMALL_WS = 256 << 10  # forces several chunks at moderate sizes


def meshes_for(world: int) -> list[list[tuple[str, int]]]:
    out = []
    for dp in (1, 2, 4, 8):
        if world % dp == 0:
            out.append([("dp", dp), ("tp", world // dp)])
    return out


def mixed_mesh(world: int) -> list[tuple[str, int]]:
    """dp=2 x tp=world/2 from 4 ranks up (both axes real), else dp=1 x tp=world."""
    return [("dp", 2), ("tp", world // 2)] if world >= 4 else [("dp", 1), ("tp", world)]


def fuzz_programs(world: int, n: int, seed: int) -> list[tuple[str, list, int]]:
    rng = random.Random(seed * 31 + world)
    cases = []
    while len(cases) < n:
        names = ["a", "b", "c"][: rng.randint(1, 3)]
        sizes, left = [], world
        for i, _ in enumerate(names):
            divs = [d for d in (1, 2, 4, 8) if left % d == 0]
            s = left if i == len(names) - 1 else rng.choice(divs)
            sizes.append(s)
            left //= s
        axes = list(zip(names, sizes, strict=True))
        stmts, frac = [], 1.0
        for _ in range(rng.randint(1, 3)):
            coll = rng.choice(["allreduce", "allgather", "reducescatter"])
            grp = rng.sample(names, rng.randint(1, len(names)))
            n_g = math.prod(dict(axes)[a] for a in grp)
            op = rng.choice(["", "", ", op=max", ", op=min"])
            stmts.append(f"{coll}({'*'.join(grp)}{op})")
            if coll == "allgather":
                frac *= n_g
            elif coll == "reducescatter":
                frac /= n_g
        if frac > 16:
            continue
        cases.append(("; ".join(stmts), axes, world))
    return cases


def granularity(program: str, axes) -> int:
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=math.prod(s for _, s in axes)),
                         backend="reference")
    return coll.ir.granularity


class Results:
    """Pass/fail counts per category (the text in the last [...] of a check's name)."""

    def __init__(self):
        self.passed, self.failed, self.msgs = 0, 0, []
        self.by_cat: dict[str, list[int]] = {}

    def check(self, name: str, msg: str | None) -> None:
        cat = name.rsplit("[", 1)[-1].rstrip("]") if name.endswith("]") else name.split(" ")[0]
        counts = self.by_cat.setdefault(cat, [0, 0])
        if msg:
            self.failed += 1
            counts[1] += 1
            if len(self.msgs) < 40:
                self.msgs.append(f"{name}: {msg}")
        else:
            self.passed += 1
            counts[0] += 1


def nccl_reference_case(res: Results, rank: int, world: int, program: str, axes, rpn: int,
                        dtype_name: str, rows: int, hidden: int, seed: int, group) -> None:
    """The reference backend on CUDA tensors (NCCL subgroups) against the oracle."""
    dtype = DTYPES[dtype_name]
    dev = torch.device("cuda", torch.cuda.current_device())
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn), dtype=dtype,
                         group=group, backend="reference")
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(program, axes, inputs)
    out = coll(inputs[rank].to(dev))
    torch.cuda.synchronize()
    where = "simulated nodes" if rpn < world else "one node"
    res.check(f"{program} {axes} rpn={rpn} {dtype_name} [nccl reference, {where}]",
              mismatch(out.cpu(), exp[rank], mag[rank], dtype, len(statements(program)), terms))
    return out


def run_case(res: Results, rank: int, world: int, program: str, axes, dtype_name: str,
             rows: int, hidden: int, algorithm: str, seed: int, ws: int, gloo, group,
             nccl: bool = False) -> None:
    dtype = DTYPES[dtype_name]
    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh(axes, ranks_per_node=world)
    name = f"{program} {axes} {dtype_name} rows={rows}x{hidden} {algorithm}"
    coll = mixcc.compile(program, mesh, dtype=dtype, group=group, backend="fused",
                         algorithm=algorithm, workspace_bytes=ws,
                         max_blocks=8 if world > 4 else 16)
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(program, axes, inputs)
    nst = len(statements(program))
    x = inputs[rank].to(dev)
    out = coll(x)
    torch.cuda.synchronize()
    res.check(name + " [oop]", mismatch(out.cpu(), exp[rank], mag[rank], dtype, nst, terms))
    res.check(name + " [input kept]", None if torch.equal(x.cpu(), inputs[rank])
              else "input modified")
    buf = torch.full(tuple(out.shape), float("nan"), device=dev).to(dtype)
    coll(x, out=buf)
    torch.cuda.synchronize()
    res.check(name + " [out=]", mismatch(buf.cpu(), exp[rank], mag[rank], dtype, nst, terms))
    if tuple(out.shape) == tuple(x.shape):
        y = x.clone()
        coll(y, out=y)
        torch.cuda.synchronize()
        res.check(name + " [in place]", mismatch(y.cpu(), exp[rank], mag[rank], dtype, nst,
                                                 terms))
    # replicas: ranks whose exact expected outputs agree must agree bitwise
    everyone = [torch.empty_like(out.cpu()) for _ in range(world)]
    dist.all_gather(everyone, out.cpu().contiguous(), group=gloo)
    bad = [(a, b) for a in range(world) for b in range(a + 1, world)
           if torch.equal(exp[a], exp[b]) and not torch.equal(everyone[a], everyone[b])]
    res.check(name + " [replicas bitwise]", f"differ: {bad[:4]}" if bad else None)
    if nccl:  # the same case on the NCCL reference backend, and fused against it
        ref = nccl_reference_case(res, rank, world, program, axes, world, dtype_name, rows,
                                  hidden, seed, group)
        from mixcc.bench import count_wrong

        wrong = count_wrong(out, ref)
        res.check(name + " [fused vs nccl]", f"{wrong} elements differ" if wrong else None)


def graph_case(res: Results, rank: int, world: int, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    dev = torch.device("cuda", torch.cuda.current_device())
    axes = mixed_mesh(world)
    program = presets.ALLREDUCE_ALLGATHER
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=world), dtype=dtype,
                         backend="fused", workspace_bytes=SMALL_WS, max_blocks=8)
    rows, hidden = 16, 520
    x = make_input(100, rank, rows, hidden, dtype).to(dev)
    out = torch.empty(coll.output_shape(x.shape), dtype=dtype, device=dev)
    coll(x, out=out)  # warm-up: builds and binds before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        coll(x, out=out)
        coll(x, out=out)  # two calls per graph: epochs advance on the device
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for it in range(4):
        seed = 200 + it
        inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
        x.copy_(inputs[rank].to(dev))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        exp, mag, terms = expected(program, axes, inputs)
        res.check(f"replay {it} {dtype_name} [graph replay]",
                  mismatch(out.cpu(), exp[rank], mag[rank], dtype, 2, terms))
    # eager calls after the replays still agree (epochs stayed consistent)
    out2 = coll(x)
    torch.cuda.synchronize()
    res.check("[eager after graph]", mismatch(out2.cpu(), exp[rank], mag[rank], dtype, 2, terms))


def timeout_case(res: Results, rank: int, world: int, gloo) -> None:
    group = dist.new_group(list(range(world)), backend="gloo")  # own runtime
    dev = torch.device("cuda", torch.cuda.current_device())
    coll = mixcc.compile("allreduce(world)", mixcc.Mesh({"w": world}, ranks_per_node=world),
                         dtype=torch.float32, group=group, backend="fused", timeout_s=1.0,
                         workspace_bytes=SMALL_WS, max_blocks=4)
    x = torch.ones(8, 64, device=dev)
    coll(x)
    torch.cuda.synchronize()
    dist.barrier(group=gloo)
    skipper = world - 1
    t0 = time.time()
    if rank != skipper:
        coll(x)
        torch.cuda.synchronize()
        try:
            coll.check()
            res.check("[timeout raised]", "no CollectiveTimeout after a peer skipped")
        except mixcc.CollectiveTimeout as e:
            ok = e.peer == skipper and e.rank == rank and "skipped" in str(e)
            res.check("[timeout raised]", None if ok else f"wrong info: {e}")
            try:
                coll(x)
                res.check("[timeout sticky]", "call after a timeout did not raise")
            except mixcc.CollectiveTimeout:
                res.check("[timeout sticky]", None)
        res.check("[timeout < 10 s]", None if time.time() - t0 < 10 else
                  f"{time.time() - t0:.1f} s")
    dist.barrier(group=gloo)
    from mixcc.runtime import _RUNTIMES

    for rt in list(_RUNTIMES.values()):
        if rt.group is group:
            rt.close(barrier=False)  # its flags are inconsistent now


def mutate_tables() -> None:
    """Negative control: render every stage with the last term of each reduction dropped."""
    from mixcc.codegen import render
    from mixcc.codegen.schedule import RankSchedule, Schedule

    original = render.schedule_table

    def broken(sched: Schedule):
        ranks = tuple(RankSchedule(tuple(t.__class__(t.dst_kind, t.dst, t.owner_index, t.owners,
                                                     t.terms[:-1] or t.terms)
                                         for t in rs.reduce), rs.gather, rs.neighbors)
                      for rs in sched.ranks)
        return original(Schedule(sched.algorithm, sched.in_units, sched.slots, ranks))

    render.schedule_table = broken


def worker(rank: int, world: int, cfg: dict) -> None:
    if cfg["mutate"]:
        mutate_tables()
    nccl = cfg["pg"] == "nccl"
    pg_backend = None if nccl else "gloo"  # None: the default group's "cpu:gloo,cuda:nccl"
    res = Results()
    gloo = dist.group.WORLD
    t0 = time.time()
    cases: list = []
    try:
        for axes in meshes_for(world):
            for prog in presets.PRESETS.values():
                g = granularity(prog, axes)
                for dtype_name in DTYPES:
                    for rows, hidden in ((g, 1024), (g * 7, 7), (g * 64, 1024 + 8)):
                        algos = ["one_shot", "two_shot"] if rows > g else ["auto"]
                        for algo in algos:
                            cases.append((prog, axes, dtype_name, rows, hidden, algo, SMALL_WS))
        for prog, axes, _ in fuzz_programs(world, cfg["fuzz"], cfg["seed"]):
            g = granularity(prog, axes)
            for dtype_name in DTYPES:
                cases.append((prog, axes, dtype_name, g * 3, 33, "auto", SMALL_WS))
                cases.append((prog, axes, dtype_name, g * 16, 512, "two_shot", SMALL_WS))
        # default workspace, big rows: 2 presets in bf16
        for prog in (presets.ALLREDUCE_ALLGATHER, presets.REDUCESCATTER_ALLREDUCE):
            axes = mixed_mesh(world)
            g = granularity(prog, axes)
            cases.append((prog, axes, "bfloat16", g * 256, 7168, "auto", 8 << 20))
        # runtimes are per (group, workspace): use one group per workspace size
        groups = {}
        for i, (prog, axes, dtype_name, rows, hidden, algo, ws) in enumerate(cases):
            if ws not in groups:
                groups[ws] = dist.new_group(list(range(world)), backend=pg_backend)
            try:
                run_case(res, rank, world, prog, axes, dtype_name, rows, hidden, algo,
                         1000 + i, ws, gloo, groups[ws], nccl)
            except Exception as e:  # a crash on one case must not hide the others
                res.check(f"{prog} {axes} {dtype_name} {rows}", f"{type(e).__name__}: {e}")
                if isinstance(e, mixcc.CollectiveTimeout):
                    raise
        if nccl and world >= 4:  # hierarchical plans on simulated nodes, NCCL reference
            for rpn in (world // 2, world // 4):
                for prog in list(presets.PRESETS.values()) + ["allreduce(tp*dp)",
                                                              "allgather(tp*dp)",
                                                              "reducescatter(tp*dp)"]:
                    axes = [("dp", 2), ("tp", world // 2)]
                    g = granularity(prog, axes)
                    for dtype_name in DTYPES:
                        try:
                            nccl_reference_case(res, rank, world, prog, axes, rpn, dtype_name,
                                                g * 5, 96, 77, groups[SMALL_WS])
                        except Exception as e:
                            res.check(f"{prog} rpn={rpn} [nccl reference, simulated nodes]",
                                      f"{type(e).__name__}: {e}")
        for dtype_name in DTYPES:
            graph_case(res, rank, world, dtype_name)
        timeout_case(res, rank, world, gloo)
    except Exception:
        res.check("worker", traceback.format_exc(limit=6))
    summary = {"rank": rank, "passed": res.passed, "failed": res.failed, "msgs": res.msgs,
               "seconds": time.time() - t0, "by_category": res.by_cat, "cases": len(cases)}
    everyone = [None] * world
    dist.all_gather_object(everyone, summary)
    if rank == 0:
        path = os.path.join(cfg["out"], f"gpu_check_w{world}.json") if cfg["out"] else None
        if path:
            with open(path, "w") as f:
                json.dump(everyone, f, indent=1)
        cats: dict[str, list[int]] = {}
        for s in everyone:
            for c, (p, f) in s["by_category"].items():
                cats.setdefault(c, [0, 0])
                cats[c][0] += p
                cats[c][1] += f
        for m in [m for s in everyone for m in s["msgs"]][:10]:
            print("FAIL", m, flush=True)
        with open(cfg["table_path"], "a") as f:
            f.write(json.dumps([world, everyone[0]["cases"], cats]) + "\n")


def prebuild(worlds: list[int], cfg: dict) -> None:
    """Render and build every module the run needs, in parallel (nvcc processes)."""
    from mixcc.codegen.build import build_module, device_arch
    from mixcc.codegen.render import render_stage
    from mixcc.runtime import build_native

    arch = cfg["arch"] or device_arch()
    t0 = time.time()
    build_native(arch)
    jobs = {}
    for w in worlds:
        progs = [(p, a) for a in meshes_for(w) for p in presets.PRESETS.values()]
        progs += [(p, a) for p, a, _ in fuzz_programs(w, cfg["fuzz"], cfg["seed"])]
        progs.append(("allreduce(world)", [("w", w)]))
        for prog, axes in progs:
            coll = mixcc.compile(prog, mixcc.Mesh(axes, ranks_per_node=w), backend="reference")
            for dt in DTYPES.values():
                for st in coll.plan.stages:
                    src = render_stage(st, dt)
                    jobs[src] = None
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
        built = list(ex.map(lambda s: build_module(s, "stage", arch), jobs))
    cold = [b.seconds for b in built if not b.cached]
    print(f"prebuild: {len(built)} modules for {arch}, {len(cold)} compiled "
          f"(mean {sum(cold) / max(1, len(cold)):.2f} s each, in parallel), "
          f"{time.time() - t0:.1f} s wall", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--fuzz", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--arch", default=None, help="prebuild for this arch (default: the GPU's)")
    ap.add_argument("--prebuild-only", action="store_true")
    ap.add_argument("--mutate", action="store_true",
                    help="negative control: drop the last term of every reduction in the "
                         "rendered tables; the run must then report failures")
    ap.add_argument("--pg", choices=("gloo", "nccl"), default="gloo",
                    help="gloo: ranks share GPUs; nccl: one process per GPU, NCCL checked too")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    import tempfile

    cfg = {"fuzz": args.fuzz, "seed": args.seed, "out": os.environ.get("OUT"),
           "arch": args.arch, "pg": args.pg, "mutate": args.mutate,
           "table_path": os.path.join(tempfile.mkdtemp(), "table.jsonl")}
    if args.mutate:
        mutate_tables()
    prebuild(worlds, cfg)
    if args.prebuild_only:
        return
    from mixcc import launch

    secs = {}
    for w in worlds:
        t0 = time.time()
        launch.spawn(worker, w, cfg, backend="gloo" if args.pg == "gloo" else "cpu:gloo,cuda:nccl")
        secs[w] = time.time() - t0
    rows = [json.loads(line) for line in open(cfg["table_path"])]
    cats = sorted({c for _, _, cs in rows for c in cs})
    print(f"\n{'check':<22}" + "".join(f"{f'world {w}':>16}" for w, _, _ in rows))
    print(f"{'cases':<22}" + "".join(f"{n:>16}" for _, n, _ in rows))
    for c in cats:
        cells = [f"{cs.get(c, [0, 0])[0]} ok/{cs.get(c, [0, 0])[1]} bad" for _, _, cs in rows]
        print(f"{c:<22}" + "".join(f"{x:>16}" for x in cells))
    print(f"{'seconds':<22}" + "".join(f"{secs[w]:>16.1f}" for w, _, _ in rows))
    total_bad = sum(f for _, _, cs in rows for _, f in cs.values())
    total_ok = sum(p for _, _, cs in rows for p, _ in cs.values())
    print(f"TOTAL: {total_ok} passed, {total_bad} failed")
    sys.exit(1 if total_bad else 0)


if __name__ == "__main__":
    main()
