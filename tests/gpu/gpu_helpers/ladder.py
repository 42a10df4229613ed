"""The correctness ladder of the fused backend (docs/DESIGN.md section 7, steps 3-4):
results against the float64 oracle of tests/oracle.py, and against the reference backend
on NCCL where every rank has its own GPU.

A case is one (program, mesh, dtype, rows, hidden, algorithm): out-of-place, `out=`, in
place (where the shapes allow), input kept, replicas bitwise equal. `ladder_task` runs the
cases that a config selects on every rank, a crash on one case recorded without hiding
the others, and writes the ranks' summary (passed / failed per category, the first
failures) as JSON for the test to judge. `mutate_tables` is the negative control: the
rendered tables drop the last term of every reduction, so the ladder must fail.
"""

from __future__ import annotations

import json
import math
import random
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

import mixcc
from mixcc import presets

from oracle import expected, make_input, mismatch, statements

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMALL_WS = 12 << 20  # forces several chunks at moderate sizes (about 3.4 KiB regions)
HIDDENS = (1, 3, 7, 8, 33, 64, 100, 256, 520, 1024, 1032)
EXTRA = ["allreduce(tp*dp)", "allgather(tp*dp)", "reducescatter(tp*dp)", "allreduce(world)",
         "allgather(world)", "reducescatter(world)"]
Axes = list[tuple[str, int]]

# What a ladder run does; a test passes a dict with some of these keys changed.
DEFAULTS: dict[str, Any] = {
    "seed": 1,
    "one_node": True,       # the one-node cases below (False: only the cross-node ones)
    "presets": True,        # every preset x mesh x dtype x (rows 1 / odd / large) x algorithm
    "fuzz_programs": 1,     # seeded random programs per world, 3 dtypes, 3 shapes each
    "shapes": 0,            # random (program, dtype, rows, hidden, algorithm) cases over
                            # the presets and fuzzed programs
    "big": True,            # default workspace, large rows, 2 presets in bf16
    "graph": False,         # CUDA graph replay with new data, then eager calls
    "timeout": False,       # one rank skips a call: CollectiveTimeout naming it
    "nccl": False,          # the NCCL reference backend too, fused compared with it
    "nodes": [],            # ranks_per_node values: cross-node (NVSHMEM) cases
    "node_shapes": 0,       # random cross-node (program, rpn, dtype, rows, hidden, depth)
    "mutate": False,        # the negative control
    "summary": None,        # path of the JSON summary written by rank 0
}


def meshes_for(world: int) -> list[Axes]:
    return [[("dp", dp), ("tp", world // dp)] for dp in (1, 2, 4, 8) if world % dp == 0]


def mixed_mesh(world: int) -> Axes:
    """dp=2 x tp=world/2 from 4 ranks up (both axes real), else dp=1 x tp=world."""
    return [("dp", 2), ("tp", world // 2)] if world >= 4 else [("dp", 1), ("tp", world)]


def fuzz_programs(world: int, n: int, seed: int) -> list[tuple[str, Axes]]:
    """n seeded random programs of 1-3 statements over random 1-3 axis meshes."""
    rng = random.Random(seed * 31 + world)
    cases: list[tuple[str, Axes]] = []
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
        if frac <= 16:
            cases.append(("; ".join(stmts), axes))
    return cases


def reference(program: str, axes: Axes, rpn: int) -> mixcc.Collective:
    return mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn), backend="reference")


def granularity(program: str, axes: Axes) -> int:
    return reference(program, axes, math.prod(s for _, s in axes)).ir.granularity


class Results:
    """Pass/fail counts per category (the text in the last [...] of a check's name)."""

    def __init__(self) -> None:
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


def program_pool(world: int, cfg: dict) -> list[tuple[str, Axes]]:
    """The presets on every (dp, tp) mesh, then the fuzzed programs."""
    return ([(p, a) for a in meshes_for(world) for p in presets.PRESETS.values()]
            + fuzz_programs(world, cfg["fuzz_programs"], cfg["seed"]))


def one_node_cases(world: int, cfg: dict) -> list[tuple]:
    """(program, axes, dtype, rows, hidden, algorithm, workspace) of the one-node ladder."""
    cases: list[tuple] = []
    pool = program_pool(world, cfg)
    fuzzed = pool[len(pool) - cfg["fuzz_programs"]:] if cfg["fuzz_programs"] else []
    if cfg["presets"]:
        for prog, axes in pool[:len(pool) - len(fuzzed)]:
            g = granularity(prog, axes)
            for dt in DTYPES:
                for rows, hidden in ((g, 1024), (g * 7, 7), (g * 64, 1024 + 8)):
                    for algo in ["one_shot", "two_shot", "push", "ll"] if rows > g else ["auto"]:
                        cases.append((prog, axes, dt, rows, hidden, algo, SMALL_WS))
    for prog, axes in fuzzed:
        g = granularity(prog, axes)
        for dt in DTYPES:
            cases.append((prog, axes, dt, g * 3, 33, "auto", SMALL_WS))
            cases.append((prog, axes, dt, g * 16, 512, "two_shot", SMALL_WS))
            cases.append((prog, axes, dt, g * 16, 520, "one_shot", SMALL_WS))
    if cfg["shapes"]:  # many shapes per built kernel, seeded: the same on every rank
        rng = random.Random(cfg["seed"] * 1000 + world)
        for _ in range(cfg["shapes"]):
            prog, axes = rng.choice(pool)
            cases.append((prog, axes, rng.choice(list(DTYPES)),
                          granularity(prog, axes) * rng.randint(1, 48), rng.choice(HIDDENS),
                          rng.choice(("auto", "one_shot", "two_shot", "push", "ll")),
                          SMALL_WS))
    if cfg["big"]:
        for prog in (presets.ALLREDUCE_ALLGATHER, presets.REDUCESCATTER_ALLREDUCE):
            axes = mixed_mesh(world)
            cases.append((prog, axes, "bfloat16", granularity(prog, axes) * 256, 7168, "auto",
                          16 << 20))  # 7.4 MiB of data: several chunks
    return cases


def hier_cases(world: int, rpns: list[int], cfg: dict) -> list[tuple]:
    """Cross-node cases (nodes simulated by ranks_per_node): presets and the plain
    collectives over tp*dp and world on the meshes whose plan crosses nodes, a fuzzed
    sample, three dtypes, rows 1 (granularity), odd and large, depth 2 and 1; then
    `node_shapes` random shapes over those programs. (program, axes, rpn, dtype, rows,
    hidden, depth)."""
    cases: list[tuple] = []
    # world 8: two meshes and two dtypes keep the module count (each links NVSHMEM's
    # device library: about 8 s of nvcc) within one time-limited remote run
    meshes = meshes_for(world) if world < 8 else [[("dp", 2), ("tp", 4)], [("dp", 4), ("tp", 2)]]
    dtypes = list(DTYPES) if world < 8 else ["bfloat16", "float32"]
    for rpn in rpns:
        for axes in meshes if cfg["presets"] else []:
            for prog in list(presets.PRESETS.values()) + EXTRA:
                if reference(prog, axes, rpn).plan.one_node:
                    continue
                g = granularity(prog, axes)
                for dt in dtypes:
                    cases.append((prog, axes, rpn, dt, g, 1024, 2))
                    cases.append((prog, axes, rpn, dt, g * 7, 7, 2))
                    cases.append((prog, axes, rpn, dt, g * 64, 1032, 2))
                cases.append((prog, axes, rpn, "bfloat16", g * 64, 1032, 1))
        for prog, axes in fuzz_programs(world, cfg["fuzz_programs"], cfg["seed"] + rpn):
            g = granularity(prog, axes)
            for dt in dtypes:
                cases.append((prog, axes, rpn, dt, g * 3, 33, 2))
                cases.append((prog, axes, rpn, dt, g * 16, 512, 3))
    rng = random.Random(cfg["seed"] * 1000 + world + 1)
    base = sorted({(c[0], tuple(c[1]), c[2], c[3]) for c in cases})
    for _ in range(cfg["node_shapes"] if base else 0):
        prog, axes, rpn, dt = rng.choice(base)
        cases.append((prog, list(axes), rpn, dt, granularity(prog, list(axes)) * rng.randint(1, 48),
                      rng.choice(HIDDENS), rng.choice((1, 2, 3))))
    return cases


def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def nccl_reference_case(res: Results, rank: int, world: int, program: str, axes: Axes,
                        rpn: int, dtype_name: str, rows: int, hidden: int, seed: int,
                        group) -> torch.Tensor:
    """The reference backend on CUDA tensors (NCCL subgroups) against the oracle."""
    dtype = DTYPES[dtype_name]
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn), dtype=dtype,
                         group=group, backend="reference")
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(program, axes, inputs)
    out = coll(inputs[rank].to(cuda()))
    torch.cuda.synchronize()
    where = "simulated nodes" if rpn < world else "one node"
    res.check(f"{program} {axes} rpn={rpn} {dtype_name} [nccl reference, {where}]",
              mismatch(out.cpu(), exp[rank], mag[rank], dtype, len(statements(program)), terms))
    return out


_COLLS: dict[tuple, mixcc.Collective] = {}


def run_case(res: Results, rank: int, world: int, program: str, axes: Axes, dtype_name: str,
             rows: int, hidden: int, algorithm: str, seed: int, ws: int, group,
             nccl: bool = False, rpn: int | None = None, depth: int = 2) -> None:
    """One case on this rank: oop, input kept, out=, in place, replicas bitwise; with
    `nccl` the NCCL reference backend too, and fused against it."""
    dtype = DTYPES[dtype_name]
    tag = f" rpn={rpn} depth={depth}" if rpn else ""
    name = f"{program} {axes}{tag} {dtype_name} rows={rows}x{hidden} {algorithm}"
    key = (program, tuple(axes), rpn, dtype_name, algorithm, ws, depth, id(group))
    coll = _COLLS.get(key)
    if coll is None:  # shape-fuzzed cases reuse the collective (and its kernels)
        coll = _COLLS[key] = mixcc.compile(
            program, mixcc.Mesh(axes, ranks_per_node=rpn or world), dtype=dtype, group=group,
            backend="fused", algorithm=algorithm, workspace_bytes=ws, symmetric_bytes=ws,
            pipeline_depth=depth, max_blocks=8 if world > 4 else 16)
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(program, axes, inputs)
    nst = len(statements(program))
    x = inputs[rank].to(cuda())
    out = coll(x)
    torch.cuda.synchronize()
    h = "hier " if rpn else ""
    res.check(f"{name} [{h}oop]", mismatch(out.cpu(), exp[rank], mag[rank], dtype, nst, terms))
    res.check(name + " [input kept]", None if torch.equal(x.cpu(), inputs[rank])
              else "input modified")
    buf = torch.full(tuple(out.shape), float("nan"), device=cuda()).to(dtype)
    coll(x, out=buf)
    torch.cuda.synchronize()
    res.check(f"{name} [{h}out=]", mismatch(buf.cpu(), exp[rank], mag[rank], dtype, nst, terms))
    if tuple(out.shape) == tuple(x.shape):
        y = x.clone()
        coll(y, out=y)
        torch.cuda.synchronize()
        res.check(f"{name} [{h}in place]", mismatch(y.cpu(), exp[rank], mag[rank], dtype, nst,
                                                    terms))
    # replicas: ranks whose exact expected outputs agree must agree bitwise
    everyone = [torch.empty_like(out.cpu()) for _ in range(world)]
    dist.all_gather(everyone, out.cpu().contiguous())
    bad = [(a, b) for a in range(world) for b in range(a + 1, world)
           if torch.equal(exp[a], exp[b]) and not torch.equal(everyone[a], everyone[b])]
    res.check(name + " [replicas bitwise]", f"differ: {bad[:4]}" if bad else None)
    if nccl:
        from mixcc.bench import count_wrong

        ref = nccl_reference_case(res, rank, world, program, axes, rpn or world, dtype_name,
                                  rows, hidden, seed, group)
        wrong = count_wrong(out, ref)
        res.check(name + " [fused vs nccl]", f"{wrong} elements differ" if wrong else None)


def graph_case(res: Results, rank: int, world: int, dtype_name: str, rpn: int | None = None,
               ws: int = SMALL_WS) -> None:
    """Capture two calls in a CUDA graph, replay with new data, then call eagerly."""
    dtype = DTYPES[dtype_name]
    axes = mixed_mesh(world)
    program = presets.ALLREDUCE_ALLGATHER
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn or world), dtype=dtype,
                         backend="fused", workspace_bytes=ws, symmetric_bytes=ws, max_blocks=8)
    tag = "hier " if rpn else ""
    rows, hidden = 16, 520
    x = make_input(100, rank, rows, hidden, dtype).to(cuda())
    out = torch.empty(coll.output_shape(x.shape), dtype=dtype, device=cuda())
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
        inputs = [make_input(200 + it, r, rows, hidden, dtype) for r in range(world)]
        x.copy_(inputs[rank].to(cuda()))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        exp, mag, terms = expected(program, axes, inputs)
        res.check(f"replay {it} {dtype_name} rpn={rpn} [{tag}graph replay]",
                  mismatch(out.cpu(), exp[rank], mag[rank], dtype, 2, terms))
    out2 = coll(x)  # eager calls after the replays: epochs stayed consistent
    torch.cuda.synchronize()
    res.check(f"{dtype_name} [{tag}eager after graph]",
              mismatch(out2.cpu(), exp[rank], mag[rank], dtype, 2, terms))


def timeout_case(res: Results, rank: int, world: int, rpn: int | None = None,
                 ws: int = SMALL_WS) -> None:
    """The last rank skips a call: the others raise CollectiveTimeout naming it within 10 s,
    and it sticks. Cross-node: on the group NVSHMEM serves, so it must be the last case."""
    gloo = dist.new_group(list(range(world)), backend="gloo")
    group = None if rpn else gloo
    coll = mixcc.compile("allreduce(world)", mixcc.Mesh({"w": world}, ranks_per_node=rpn or world),
                         dtype=torch.float32, group=group, backend="fused", timeout_s=1.0,
                         workspace_bytes=ws, symmetric_bytes=ws, max_blocks=4)
    tag = "hier " if rpn else ""
    x = torch.ones(8, 64, device=cuda())
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
            res.check(f"[{tag}timeout raised]", "no CollectiveTimeout after a peer skipped")
        except mixcc.CollectiveTimeout as e:
            # cross-node: a rank may wait on the skipper's rail peer that waits on it
            ok = e.rank == rank and "skipped" in str(e) and (rpn or e.peer == skipper)
            res.check(f"[{tag}timeout raised]", None if ok else f"wrong info: {e}")
            try:
                coll(x)
                res.check(f"[{tag}timeout sticky]", "call after a timeout did not raise")
            except mixcc.CollectiveTimeout:
                res.check(f"[{tag}timeout sticky]", None)
        took = time.time() - t0
        res.check(f"[{tag}timeout < 10 s]", None if took < 10 else f"{took:.1f} s")
    dist.barrier(group=gloo)
    from mixcc.runtime import _RUNTIMES

    for rt in list(_RUNTIMES.values()):
        if rt.group is group:
            rt.close(barrier=False)  # its flags are inconsistent now


def mutate_tables() -> None:
    """Negative control: render every stage with the last term of each reduction dropped
    (one-node pull tables, cross-node parts) or, in push tables, counted twice (its
    coefficient doubled): the LL kernel, which runs push's tables, orders a rank's reuse of
    a line set by the reads of its consumers, so a read left out would turn the wrong
    answer into a timeout."""
    from mixcc.codegen import render
    from mixcc.codegen.hier import HierRank, HierSchedule, Part
    from mixcc.codegen.schedule import PushRank, PushSchedule, RankSchedule, Schedule

    original, original_hier, original_push = (render.schedule_table, render.hier_table,
                                              render.push_table)

    def broken(sched: Schedule):
        ranks = tuple(RankSchedule(tuple(t.__class__(t.dst_kind, t.dst, t.owner_index, t.owners,
                                                     t.terms[:-1] or t.terms)
                                         for t in rs.reduce), rs.gather, rs.neighbors)
                      for rs in sched.ranks)
        return original(Schedule(sched.algorithm, sched.in_units, sched.slots, ranks,
                                 sched.redop))

    def broken_hier(sched: HierSchedule):
        ranks = tuple(HierRank(rs.neighbors, tuple(
            tuple(Part(p.terms[:-1] or p.terms, p.copy) for p in row) for row in rs.sends),
            rs.finals, rs.out_finals, rs.recv_nodes, rs.put_nodes) for rs in sched.ranks)
        return original_hier(HierSchedule(sched.nodes, sched.local, sched.in_units, sched.redop,
                                          sched.max_parts, sched.max_finals, ranks))

    def broken_push(sched: PushSchedule):
        ranks = tuple(PushRank(pr.dsts, pr.srcs, pr.sends,
                               tuple((j, (*terms[:-1], (*terms[-1][:3], 2 * terms[-1][3])))
                                     for j, terms in pr.reduce),
                               pr.inplace_safe) for pr in sched.ranks)
        return original_push(PushSchedule(sched.in_units, sched.slots, ranks, sched.redop))

    render.schedule_table, render.hier_table, render.push_table = (broken, broken_hier,
                                                                   broken_push)


def ladder_task(rank: int, world: int, cfg: dict) -> None:
    """A rank of a ladder run (see DEFAULTS); rank 0 writes the summary to cfg["summary"]."""
    cfg = {**DEFAULTS, **cfg}
    if cfg["mutate"]:
        mutate_tables()
    res = Results()
    t0 = time.time()
    cases = one_node_cases(world, cfg) if cfg["one_node"] else []
    hier = hier_cases(world, cfg["nodes"], cfg) if cfg["nodes"] else []
    try:
        groups: dict[int, Any] = {}  # runtimes are per (group, workspace): a group per size
        for i, (prog, axes, dt, rows, hidden, algo, ws) in enumerate(cases):
            if ws not in groups:
                groups[ws] = dist.new_group(list(range(world)))
            try:
                run_case(res, rank, world, prog, axes, dt, rows, hidden, algo, 1000 + i, ws,
                         groups[ws], cfg["nccl"])
            except Exception as e:  # a crash on one case must not hide the others
                res.check(f"{prog} {axes} {dt} {rows} [crash]", f"{type(e).__name__}: {e}")
                if isinstance(e, mixcc.CollectiveTimeout):
                    raise
        if cfg["graph"] and cfg["one_node"]:
            for dt in DTYPES:
                graph_case(res, rank, world, dt)
        for i, (prog, axes, rpn, dt, rows, hidden, depth) in enumerate(hier):
            try:
                run_case(res, rank, world, prog, axes, dt, rows, hidden, "auto", 5000 + i,
                         SMALL_WS, None, cfg["nccl"], rpn=rpn, depth=depth)
            except Exception as e:
                res.check(f"{prog} {axes} rpn={rpn} {dt} {rows} [hier crash]",
                          f"{type(e).__name__}: {e}")
                if isinstance(e, mixcc.CollectiveTimeout):
                    raise
        if hier and cfg["graph"]:
            for dt in DTYPES:
                graph_case(res, rank, world, dt, cfg["nodes"][0])
        if cfg["timeout"]:
            timeout_case(res, rank, world, cfg["nodes"][0] if hier else None)
    except Exception:
        res.check("worker [crash]", traceback.format_exc(limit=6))
    summary = {"rank": rank, "passed": res.passed, "failed": res.failed, "msgs": res.msgs,
               "seconds": time.time() - t0, "by_category": res.by_cat,
               "cases": len(cases) + len(hier)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, summary)
    if rank == 0 and cfg["summary"]:
        with open(cfg["summary"], "w") as f:
            json.dump(everyone, f, indent=1)


def totals(summaries: list[dict]) -> tuple[int, int, dict[str, list[int]], list[str]]:
    """Passed, failed, per-category [passed, failed] and failure messages over all ranks."""
    cats: dict[str, list[int]] = {}
    for s in summaries:
        for c, (p, f) in s["by_category"].items():
            cats.setdefault(c, [0, 0])
            cats[c][0] += p
            cats[c][1] += f
    msgs = [f"rank {s['rank']}: {m}" for s in summaries for m in s["msgs"]]
    return (sum(s["passed"] for s in summaries), sum(s["failed"] for s in summaries), cats,
            msgs)


def prebuild(worlds: list[int], nodes: dict[int, list[int]], cfg: dict, arch: str | None,
             extra: list[tuple[str, Axes, int]] = ()) -> None:
    """Render and build every module that ladder runs of `cfg` over `worlds` (and the
    cross-node `nodes`: world -> ranks_per_node values) load, and those of the `extra`
    (program, axes, ranks_per_node), in three dtypes; nvcc in parallel."""
    import concurrent.futures as cf
    import os

    from mixcc import nvshmem
    from mixcc.codegen.build import build, device_arch
    from mixcc.fused import epilogue_refusal, stage_spec
    from mixcc.runtime import build_native

    cfg = {**DEFAULTS, **cfg}
    if cfg["mutate"]:
        mutate_tables()
    arch = arch or device_arch()
    t0 = time.time()
    build_native(arch)
    specs: dict = {}  # BuildSpec -> None: each module once
    progs: set[tuple[str, tuple, int]] = set()
    for w in worlds:
        progs |= {(prog, tuple(axes), w) for prog, axes in program_pool(w, cfg)}
        progs.add(("allreduce(world)", (("w", w),), w))
    for w, rpns in nodes.items():
        nvshmem.build_library(arch)
        progs |= {(c[0], tuple(c[1]), c[2]) for c in hier_cases(w, rpns, cfg)}
        for rpn in rpns:
            progs |= {(presets.ALLREDUCE_ALLGATHER, tuple(mixed_mesh(w)), rpn),
                      ("allreduce(world)", (("w", w),), rpn)}
    progs |= {(prog, tuple(axes), rpn) for prog, axes, rpn in extra}
    for prog, axes, rpn in progs:
        coll = reference(prog, list(axes), rpn)
        # a fusable epilogue is part of the last stage's module (fused.load_stage)
        epi = coll.ir.epilogue if epilogue_refusal(coll.plan, coll.ir.epilogue) is None else ()
        for i, st in enumerate(coll.plan.stages):
            for dt in DTYPES.values():
                specs[stage_spec(st, dt, arch, epi if i == len(coll.plan.stages) - 1
                                 else ())] = None
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
        built = list(ex.map(build, list(specs)))
    cold = [b.seconds for b in built if not b.cached]
    print(f"prebuild: {len(built)} modules for {arch}, {len(cold)} compiled "
          f"(mean {sum(cold) / max(1, len(cold)):.2f} s each), {time.time() - t0:.1f} s wall",
          flush=True)
