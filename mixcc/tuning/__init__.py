"""`mixcc tune`: measure the fused launch choices and write the tuning table (mixcc/tune.py);
with --emit-defaults also auto's thresholds (thresholds.py, emit.py).

For every program and size (bytes of input per rank, powers of two), every rank runs
the program with each candidate (algorithm x blocks x chunk width, and on an NCCL group
the reference backend, "nccl") forced on all its stages, timed by CUDA graphs (median of
repeats, then the max over ranks: the same number on every rank), and the fastest
candidate becomes the entry of each stage for that size bucket (near ties are timed again
in a final round: FINAL_WITHIN). The heuristic's own time is measured beside it. Rank 0
writes the table. Ranks sharing one GPU run under MPS (mixcc/mps.py starts it when
needed); one process per GPU runs on NCCL.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from .. import launch, mps, tune
from ..codegen.plan import IntraStage
from ..mesh import Mesh
from . import emit, thresholds

# Columns per block and chunk: the widest that fits, 16384 or 8192 (push's chunk sets its
# pipeline's fill and drain; 16384 added in commit d6ffbd1).
CHUNK_CANDIDATES = (0, 16384, 8192)
BLOCK_CANDIDATES = (4, 8, 16, 32, 64, 128)
# Near ties (within FINAL_WITHIN of the best, at most FINAL_MAX) are re-timed FINAL_ROUNDS
# times, interleaved; one short round misranks them (commit d80d72c).
FINAL_WITHIN, FINAL_MAX, FINAL_ROUNDS = 1.10, 4, 3


def candidates(runner) -> list[tune.Choice]:
    """The launch choices worth timing for `runner` (a FusedRunner): the intra algorithms
    (two-shot where it splits a reduction, LL where every intra stage can run it, push
    where it can run), block counts up to its block cap, and the reference backend on an
    NCCL group."""
    algos = ["one_shot", "push"]
    if any(runner._shares_reduction):
        algos.append("two_shot")
    intra = [safe for (st, _), safe in zip(runner.stages, runner._ll_safe, strict=True)
             if isinstance(st, IntraStage)]
    if intra and all(intra):
        algos.append("ll")
    if not any(isinstance(st, IntraStage) for st, _ in runner.stages):
        algos = ["hier"]
    blocks = sorted({b for b in BLOCK_CANDIDATES if b <= runner.max_blocks} | {runner.max_blocks})
    # LL's chunk is its fixed area's (a few KiB per block): 8192 columns would not fit
    out = [tune.Choice(a, b, c) for a in algos for b in blocks
           for c in (CHUNK_CANDIDATES if a != "ll" else (0,))]
    if runner._nccl:
        out.append(tune.Choice("nccl", 0))
    return out


def finalists(results: list[tuple[float, tune.Choice]]) -> list[tune.Choice]:
    """The candidates of a first round worth timing again: those within FINAL_WITHIN of
    the fastest, fastest first, at most FINAL_MAX. `results` holds (seconds, choice), the
    same on every rank (maxed over ranks), so every rank times the same list."""
    ranked = sorted(results, key=lambda r: r[0])
    best = ranked[0][0]
    return [c for t, c in ranked if t <= best * FINAL_WITHIN][:FINAL_MAX]


def final_choice(rounds: list[list[float]], choices: list[tune.Choice]
                 ) -> tuple[float, tune.Choice]:
    """(median seconds, choice) of the finalist with the lowest median over its rounds;
    rounds[k][j]: round k's time of choices[j]. Ties keep the earlier (first-round faster)."""
    meds = [statistics.median(r[j] for r in rounds) for j in range(len(choices))]
    j = min(range(len(choices)), key=lambda i: (meds[i], i))
    return meds[j], choices[j]


def stage_input_bytes(runner, rows: int, inner: int) -> list[int]:
    """Bytes of input per rank of each stage of `runner` for `rows` x `inner` input."""
    out = []
    for stage, _ in runner.stages:
        out.append(rows * inner * runner.elem)
        rows = rows // stage.lmap.in_units * len(stage.lmap.out_units[0])
    return out


def _time_choice(coll, runner, x: torch.Tensor, out: torch.Tensor, per_stage: list[int],
                 choice: tune.Choice | None, cfg: dict) -> float:
    """Seconds per call with `choice` forced on every stage (None: the heuristic)."""
    from ..bench import _max_over_ranks, repeat_times

    runner.tuned = {} if choice is None else {
        (i, tune.bucket(b)): choice for i, b in enumerate(per_stage)}
    runner._args.clear()  # launch arguments are cached per shape, and so are fast calls
    coll._seen.clear()
    ts = repeat_times(lambda: coll(x, out=out), cfg["iters"], cfg["repeats"], "graph")
    # the group's own device: CPU tensors on gloo (ranks sharing a GPU), CUDA on NCCL
    return _max_over_ranks([statistics.median(ts)], x.device if runner._nccl
                           else torch.device("cpu"))[0]


def worker(rank: int, world: int, cfg: dict) -> None:
    """Body of every rank (see the module docstring)."""
    import mixcc

    from ..bench import DTYPES

    mesh = Mesh(cfg["mesh_axes"], ranks_per_node=cfg["ranks_per_node"])
    dtype = DTYPES[cfg["dtype"]]
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(99 + rank)
    entries: dict[str, tune.Choice] = {}
    samples: list[emit.Sample] = []
    runner = None
    for program in cfg["programs"]:
        coll = mixcc.compile(program, mesh, dtype=dtype)  # auto: "nccl" entries apply
        g = coll.ir.granularity
        for nbytes in cfg["sizes"]:
            hidden = cfg["hidden"]
            rows = max(g, -(-nbytes // (hidden * dtype.itemsize)) // g * g)
            x = torch.randn((rows, hidden), generator=gen).to(dev, dtype)
            out = torch.empty(coll.output_shape(x.shape), dtype=dtype, device=dev)
            coll(x, out=out)
            runner = coll._fused[dtype]
            per_stage = stage_input_bytes(runner, rows, hidden)

            base = _time_choice(coll, runner, x, out, per_stage, None, cfg)
            results = [(_time_choice(coll, runner, x, out, per_stage, c, cfg), c)
                       for c in candidates(runner)]
            if len(runner.stages) == 1:
                samples.append(sample(program, runner, per_stage[0], results))
            final = finalists(results)
            rounds = [[_time_choice(coll, runner, x, out, per_stage, c, cfg) for c in final]
                      for _ in range(FINAL_ROUNDS)] if len(final) > 1 else []
            t, best = final_choice(rounds, final) if rounds else min(results,
                                                                   key=lambda r: r[0])
            for p, b in zip(runner._prefixes, per_stage, strict=True):
                entries[p + str(tune.bucket(b))] = tune.Choice(
                    best.algorithm, best.blocks, best.chunk_cols, round(t * 1e6, 2))
            runner.tuned = {(i, tune.bucket(b)): entries[p + str(tune.bucket(b))]
                            for i, (p, b) in enumerate(zip(runner._prefixes, per_stage,
                                                           strict=True))}
            runner._args.clear()
            coll._seen.clear()
            if rank == 0:
                print(f"{program:<34} {rows * hidden * dtype.itemsize:>10} "
                      f"{best.algorithm:>9} {best.blocks:>6} {best.chunk_cols:>6} "
                      f"{t * 1e6:>10.2f} {base * 1e6:>14.2f} {base / t:>6.2f}", flush=True)
    if rank == 0:
        path = tune.save(entries)
        print(f"wrote {len(entries)} entries to {path}", flush=True)
        if cfg.get("emit") is not None and runner is not None:
            write_defaults(cfg, runner, samples, str(path))


def sample(program: str, runner, nbytes: int, results: list[tuple[float, tune.Choice]]
           ) -> emit.Sample:
    """The sweep's record of a one-stage program at one size, for --emit-defaults."""
    from ..fused import hier_kind

    traits = runner._traits[0]
    best: dict[str, float] = {}
    for t, c in results:  # LL and push count only where auto may take them (AutoTraits)
        if (c.algorithm != "ll" or traits.ll) and (c.algorithm != "push" or traits.push):
            best[c.algorithm] = min(t, best.get(c.algorithm, t))
    stage = runner.stages[0][0]
    if isinstance(stage, IntraStage):
        kind = "intra"
    else:  # which of the two NCCL thresholds governs this plan ("hier_copy": neither)
        kind = f"hier_{hier_kind(runner.plan, runner.epilogue)}"
    return emit.Sample(program, nbytes, kind, traits.wide if kind == "intra" else False, best)


def write_defaults(cfg: dict, runner, samples: list[emit.Sample], table: str) -> None:
    """Rank 0: derive auto's thresholds from the sweep and write them as a table keyed by
    this group's arch, topology and world (cfg["emit"]: a path, or "" for the default)."""
    resolved = runner.thresholds
    if resolved.key is None:
        print("note: no threshold table written: this group's key is unknown", flush=True)
        return
    body = emit.emit_body(samples, resolved.key, resolved.values, resolved.source,
                          cfg.get("command", "mixcc tune"), [table])
    where = cfg["emit"] or thresholds.user_dir()
    if where is None:
        print(f"note: no threshold table written ({tune.ENV}=off and no path given)",
              flush=True)
        return
    path = Path(where)
    if path.suffix != ".json":
        path = path / f"{resolved.key}.json"
    thresholds.write_table(path, body)
    print(f"wrote auto's thresholds for {resolved.key} to {path}", flush=True)


def header() -> str:
    return (f"{'program':<34} {'bytes':>10} {'algorithm':>9} {'blocks':>6} {'chunk':>6} "
            f"{'best(us)':>10} {'heuristic(us)':>14} {'gain':>6}")


def run(cfg: dict) -> None:
    """Spawn the ranks (under MPS when they share a GPU) and tune."""
    world = cfg["world"]
    shared = torch.cuda.device_count() < world
    print(f"# mixcc tune: mesh {cfg['mesh_axes']} (ranks_per_node {cfg['ranks_per_node']}), "
          f"world {world}, {cfg['dtype']}, "
          f"time: median of {cfg['repeats']} CUDA graphs of {cfg['iters']} calls, max over "
          f"ranks{', ranks sharing one GPU under MPS' if shared else ''}", flush=True)
    print(header(), flush=True)
    if shared:
        with mps.ensure():
            launch.spawn(worker, world, cfg, backend="gloo")
    else:
        launch.spawn(worker, world, cfg)
    sys.stdout.flush()
