"""One-GPU (or several-GPU) correctness run of the fused backend: docs/DESIGN.md
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
SMALL_WS = 1 << 20  # forces several chunks at moderate sizes


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


_COLLS: dict[tuple, mixcc.Collective] = {}
HIDDENS = (1, 3, 7, 8, 33, 64, 100, 256, 520, 1024, 1032)


def shape_cases(pool: list[tuple[str, list]], n: int, seed: int) -> list[tuple]:
    """n random (program, axes, dtype, rows, hidden, algorithm) cases over the programs of
    `pool` (the same list on every rank: seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prog, axes = rng.choice(pool)
        g = granularity(prog, axes)
        algo = rng.choice(("auto", "one_shot", "two_shot", "push"))
        out.append((prog, axes, rng.choice(list(DTYPES)), g * rng.randint(1, 48),
                    rng.choice(HIDDENS), algo, SMALL_WS))
    return out


def run_case(res: Results, rank: int, world: int, program: str, axes, dtype_name: str,
             rows: int, hidden: int, algorithm: str, seed: int, ws: int, gloo, group,
             nccl: bool = False, rpn: int | None = None, depth: int = 2) -> None:
    dtype = DTYPES[dtype_name]
    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh(axes, ranks_per_node=rpn or world)
    tag = f" rpn={rpn} depth={depth}" if rpn else ""
    name = f"{program} {axes}{tag} {dtype_name} rows={rows}x{hidden} {algorithm}"
    key = (program, tuple(axes), rpn, dtype_name, algorithm, ws, depth, id(group))
    coll = _COLLS.get(key)
    if coll is None:  # shape-fuzzed cases reuse the collective (and its kernels)
        coll = _COLLS[key] = mixcc.compile(
            program, mesh, dtype=dtype, group=group, backend="fused", algorithm=algorithm,
            workspace_bytes=ws, symmetric_bytes=ws, pipeline_depth=depth,
            max_blocks=8 if world > 4 else 16)
    inputs = [make_input(seed, r, rows, hidden, dtype) for r in range(world)]
    exp, mag, terms = expected(program, axes, inputs)
    nst = len(statements(program))
    x = inputs[rank].to(dev)
    out = coll(x)
    torch.cuda.synchronize()
    cat = " [hier oop]" if rpn else " [oop]"
    res.check(name + cat, mismatch(out.cpu(), exp[rank], mag[rank], dtype, nst, terms))
    res.check(name + " [input kept]", None if torch.equal(x.cpu(), inputs[rank])
              else "input modified")
    buf = torch.full(tuple(out.shape), float("nan"), device=dev).to(dtype)
    coll(x, out=buf)
    torch.cuda.synchronize()
    h = "hier " if rpn else ""
    res.check(name + f" [{h}out=]", mismatch(buf.cpu(), exp[rank], mag[rank], dtype, nst,
                                             terms))
    if tuple(out.shape) == tuple(x.shape):
        y = x.clone()
        coll(y, out=y)
        torch.cuda.synchronize()
        res.check(name + f" [{h}in place]", mismatch(y.cpu(), exp[rank], mag[rank], dtype,
                                                     nst, terms))
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


def graph_case(res: Results, rank: int, world: int, dtype_name: str, rpn: int | None = None,
               ws: int = SMALL_WS) -> None:
    dtype = DTYPES[dtype_name]
    dev = torch.device("cuda", torch.cuda.current_device())
    axes = mixed_mesh(world)
    program = presets.ALLREDUCE_ALLGATHER
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn or world), dtype=dtype,
                         backend="fused", workspace_bytes=ws, symmetric_bytes=ws, max_blocks=8)
    tag = "hier " if rpn else ""
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
        res.check(f"replay {it} {dtype_name} rpn={rpn} [{tag}graph replay]",
                  mismatch(out.cpu(), exp[rank], mag[rank], dtype, 2, terms))
    # eager calls after the replays still agree (epochs stayed consistent)
    out2 = coll(x)
    torch.cuda.synchronize()
    res.check(f"[{tag}eager after graph]", mismatch(out2.cpu(), exp[rank], mag[rank], dtype, 2,
                                                    terms))


def timeout_case(res: Results, rank: int, world: int, gloo, rpn: int | None = None,
                 ws: int = SMALL_WS) -> None:
    # one-node: a group of its own (own runtime); cross-node: the group NVSHMEM serves,
    # so this must be the last case (the skipped call leaves its sequence numbers behind)
    group = None if rpn else dist.new_group(list(range(world)), backend="gloo")
    dev = torch.device("cuda", torch.cuda.current_device())
    coll = mixcc.compile("allreduce(world)", mixcc.Mesh({"w": world}, ranks_per_node=rpn or world),
                         dtype=torch.float32, group=group, backend="fused", timeout_s=1.0,
                         workspace_bytes=ws, symmetric_bytes=ws, max_blocks=4)
    tag = "hier " if rpn else ""
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
        res.check(f"[{tag}timeout < 10 s]", None if time.time() - t0 < 10 else
                  f"{time.time() - t0:.1f} s")
    dist.barrier(group=gloo)
    from mixcc.runtime import _RUNTIMES

    for rt in list(_RUNTIMES.values()):
        if rt.group is group:
            rt.close(barrier=False)  # its flags are inconsistent now


HIER_WS = SMALL_WS  # IPC and NVSHMEM workspaces of the cross-node cases: many chunks
EXTRA = ["allreduce(tp*dp)", "allgather(tp*dp)", "reducescatter(tp*dp)", "allreduce(world)",
         "allgather(world)", "reducescatter(world)"]


def hier_cases(world: int, rpns: list[int], fuzz: int, seed: int) -> list[tuple]:
    """Cross-node cases (nodes simulated by ranks_per_node): presets and the plain
    collectives over tp*dp and world on every (dp, tp) mesh, a fuzzed sample, three
    dtypes, rows 1 (granularity), odd and large (at least 4 chunks), depth 2 and 1."""
    cases = []
    # world 8: two meshes with both axes real and two dtypes keep the module count (each
    # links NVSHMEM's device library: about 8 s of nvcc) within one device call
    meshes = meshes_for(world) if world < 8 else [[("dp", 2), ("tp", world // 2)],
                                                  [("dp", 4), ("tp", world // 4)]]
    dtypes = list(DTYPES) if world < 8 else ["bfloat16", "float32"]
    for rpn in rpns:
        for axes in meshes:
            for prog in list(presets.PRESETS.values()) + EXTRA:
                g = granularity(prog, axes)
                if mixcc.compile(prog, mixcc.Mesh(axes, ranks_per_node=rpn),
                                 backend="reference").plan.one_node:
                    continue
                for dtype_name in dtypes:
                    cases.append((prog, axes, rpn, dtype_name, g, 1024, 2))
                    cases.append((prog, axes, rpn, dtype_name, g * 7, 7, 2))
                    cases.append((prog, axes, rpn, dtype_name, g * 64, 1032, 2))
                cases.append((prog, axes, rpn, "bfloat16", g * 64, 1032, 1))
        for prog, axes, _ in fuzz_programs(world, fuzz, seed + rpn):
            g = granularity(prog, axes)
            for dtype_name in dtypes:
                cases.append((prog, axes, rpn, dtype_name, g * 3, 33, 2))
                cases.append((prog, axes, rpn, dtype_name, g * 16, 512, 3))
    return cases


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
        return original(Schedule(sched.algorithm, sched.in_units, sched.slots, ranks,
                                 sched.redop))

    render.schedule_table = broken
    original_hier = render.hier_table

    def broken_hier(sched):  # drop the last term of every reduced part
        from mixcc.codegen.hier import HierRank, HierSchedule, Part

        ranks = tuple(HierRank(rs.neighbors, tuple(
            tuple(Part(p.terms[:-1] or p.terms, p.copy) for p in row) for row in rs.sends),
            rs.finals, rs.out_finals, rs.recv_nodes, rs.put_nodes) for rs in sched.ranks)
        return original_hier(HierSchedule(sched.nodes, sched.local, sched.in_units, sched.redop,
                                          sched.max_parts, sched.max_finals, ranks))

    render.hier_table = broken_hier
    original_push = render.push_table

    def broken_push(sched):  # drop the last term of every reduce task
        from mixcc.codegen.schedule import PushRank, PushSchedule

        ranks = tuple(PushRank(pr.dsts, pr.srcs, pr.sends,
                               tuple((j, terms[:-1] or terms) for j, terms in pr.reduce),
                               pr.inplace_safe) for pr in sched.ranks)
        return original_push(PushSchedule(sched.in_units, sched.slots, ranks, sched.redop))

    render.push_table = broken_push


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
        for axes in meshes_for(world) if not cfg["skip_one_node"] else []:
            for prog in presets.PRESETS.values():
                g = granularity(prog, axes)
                for dtype_name in DTYPES:
                    for rows, hidden in ((g, 1024), (g * 7, 7), (g * 64, 1024 + 8)):
                        algos = ["one_shot", "two_shot", "push"] if rows > g else ["auto"]
                        for algo in algos:
                            cases.append((prog, axes, dtype_name, rows, hidden, algo, SMALL_WS))
        one_node_fuzz = [] if cfg["skip_one_node"] else fuzz_programs(world, cfg["fuzz"],
                                                                      cfg["seed"])
        for prog, axes, _ in one_node_fuzz:
            g = granularity(prog, axes)
            for dtype_name in DTYPES:
                cases.append((prog, axes, dtype_name, g * 3, 33, "auto", SMALL_WS))
                cases.append((prog, axes, dtype_name, g * 16, 512, "two_shot", SMALL_WS))
                cases.append((prog, axes, dtype_name, g * 16, 520, "one_shot", SMALL_WS))
        if cfg["shapes"] and not cfg["skip_one_node"]:  # many shapes per built kernel
            pool = sorted({(c[0], tuple(c[1])) for c in cases})
            cases += shape_cases([(p, list(a)) for p, a in pool], cfg["shapes"],
                                 cfg["seed"] * 1000 + world)
        # default workspace, big rows: 2 presets in bf16
        for prog in (presets.ALLREDUCE_ALLGATHER, presets.REDUCESCATTER_ALLREDUCE)[
                :0 if cfg["skip_one_node"] else 2]:
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
        hier_rpns = cfg["nodes"].get(world, [])
        if hier_rpns:
            hier = hier_cases(world, hier_rpns, cfg["fuzz"], cfg["seed"])
            if cfg["shapes"]:  # random shapes over the built cross-node programs too
                rng = random.Random(cfg["seed"] * 1000 + world + 1)
                base = sorted({(c[0], tuple(c[1]), c[2], c[3]) for c in hier})
                for _ in range(cfg["shapes"] // 4):
                    prog, axes, rpn, dtype_name = rng.choice(base)
                    hier.append((prog, list(axes), rpn, dtype_name,
                                 granularity(prog, axes) * rng.randint(1, 48),
                                 rng.choice(HIDDENS), rng.choice((1, 2, 3))))
            cases += hier
            for i, (prog, axes, rpn, dtype_name, rows, hidden, depth) in enumerate(hier):
                try:
                    run_case(res, rank, world, prog, axes, dtype_name, rows, hidden, "auto",
                             5000 + i, HIER_WS, gloo, None, rpn=rpn, depth=depth)
                except Exception as e:
                    res.check(f"{prog} {axes} rpn={rpn} {dtype_name} {rows} [hier oop]",
                              f"{type(e).__name__}: {e}")
                    if isinstance(e, mixcc.CollectiveTimeout):
                        raise
            for dtype_name in DTYPES:
                graph_case(res, rank, world, dtype_name, hier_rpns[0], HIER_WS)
            timeout_case(res, rank, world, gloo, hier_rpns[0], HIER_WS)
        else:
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
    from mixcc import nvshmem
    from mixcc.codegen.build import build, device_arch
    from mixcc.fused import stage_spec
    from mixcc.runtime import build_native

    arch = cfg["arch"] or device_arch()
    t0 = time.time()
    build_native(arch)
    specs: dict = {}  # BuildSpec -> None: each module once

    def add(prog: str, axes, rpn: int) -> None:
        coll = mixcc.compile(prog, mixcc.Mesh(axes, ranks_per_node=rpn), backend="reference")
        for dt in DTYPES.values():
            for st in coll.plan.stages:
                specs[stage_spec(st, dt, arch)] = None

    for w in worlds:
        progs = [(p, a) for a in meshes_for(w) for p in presets.PRESETS.values()]
        progs += [(p, a) for p, a, _ in fuzz_programs(w, cfg["fuzz"], cfg["seed"])]
        progs.append(("allreduce(world)", [("w", w)]))
        for prog, axes in progs:
            add(prog, axes, w)
    for w, rpns in cfg["nodes"].items():
        nvshmem.build_library(arch)
        for prog, axes, rpn, *_ in hier_cases(w, rpns, cfg["fuzz"], cfg["seed"]):
            add(prog, axes, rpn)
        for rpn in rpns:
            add(presets.ALLREDUCE_ALLGATHER, mixed_mesh(w), rpn)
            add("allreduce(world)", [("w", w)], rpn)
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
        built = list(ex.map(build, list(specs)))
    cold = [b.seconds for b in built if not b.cached]
    print(f"prebuild: {len(built)} modules for {arch}, {len(cold)} compiled "
          f"(mean {sum(cold) / max(1, len(cold)):.2f} s each, in parallel), "
          f"{time.time() - t0:.1f} s wall", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--fuzz", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shapes", type=int, default=0,
                    help="add this many random (program, dtype, rows, hidden, algorithm) "
                         "cases per world over the programs already listed, and a quarter "
                         "as many (program, ranks_per_node, dtype, rows, hidden, depth) "
                         "cross-node cases where --nodes lists the world")
    ap.add_argument("--arch", default=None, help="prebuild for this arch (default: the GPU's)")
    ap.add_argument("--prebuild-only", action="store_true")
    ap.add_argument("--mutate", action="store_true",
                    help="negative control: drop the last term of every reduction in the "
                         "rendered tables; the run must then report failures")
    ap.add_argument("--nodes", default="",
                    help="cross-node (NVSHMEM) cases, world:ranks_per_node pairs, e.g. "
                         "4:2,8:4,8:2 (nodes simulated on the GPUs at hand)")
    ap.add_argument("--skip-one-node", action="store_true",
                    help="only the cross-node cases (and the graph / timeout cases)")
    ap.add_argument("--pg", choices=("gloo", "nccl"), default="gloo",
                    help="gloo: ranks share GPUs; nccl: one process per GPU, NCCL checked too")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    import tempfile

    nodes: dict[int, list[int]] = {}
    for pair in filter(None, args.nodes.split(",")):
        w, rpn = (int(v) for v in pair.split(":"))
        nodes.setdefault(w, []).append(rpn)
    cfg = {"fuzz": args.fuzz, "seed": args.seed, "shapes": args.shapes,
           "out": os.environ.get("OUT"), "nodes": nodes,
           "skip_one_node": args.skip_one_node,
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
        if cfg["nodes"].get(w) and torch.cuda.device_count() < w:
            # NVSHMEM with several PEs on one GPU needs MPS with the PEs' active thread
            # percentages summing to at most 100 (full multi-process-per-GPU support).
            per_gpu = -(-w // torch.cuda.device_count())
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // per_gpu)
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
