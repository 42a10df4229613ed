"""NaN and infinities through the fused backend, on one GPU: worlds of 2 and 4 processes
sharing it through CUDA IPC (gloo process group; run under MPS, as device_one_gpu.sh
does). The programs of tests/test_nan.py in float32, bfloat16 and float16, one-shot
and two-shot, on data with NaN, +inf and -inf planted (tests/oracle.py planted_input),
against torch's semantics in float64: max/min give NaN wherever a term is NaN, sums
follow IEEE (inf + -inf = NaN), infinities keep their sign.

    python3 scripts/nan_check.py            # on the GPU machine; exits 1 on a failure
    python3 scripts/nan_check.py --dry-run  # no GPU: the same checks on the reference
                                            # backend (gloo, CPU tensors)
    python3 scripts/nan_check.py --prebuild-only --arch sm_90a  # only build the modules

Prints `nan_check: N passed, M failed` last (N, M count (rank, case) pairs; a world
whose processes crash counts as one failure).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mixcc  # noqa: E402

from oracle import expected_nonfinite, mismatch_nonfinite, planted_input, statements  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MESHES = {2: [("dp", 1), ("tp", 2)], 4: [("dp", 2), ("tp", 2)]}
PROGRAMS = [  # as tests/test_nan.py
    "allreduce(tp, op=max)", "allreduce(tp, op=min)", "allreduce(tp)",
    "reducescatter(tp, op=max)", "reducescatter(tp, op=min)", "reducescatter(tp)",
    "allreduce(tp, op=max); allgather(dp)", "allreduce(world, op=min)",
    "reducescatter(dp, op=max); allreduce(tp, op=max)", "reducescatter(dp); allreduce(tp)",
]
ALGORITHMS = ("one_shot", "two_shot")


def check(rank: int, world: int, program: str, dtype_name: str, algorithm: str, seed: int,
          backend: str) -> str | None:
    """This rank's output for one case against the oracle: None, or what is wrong."""
    dtype, axes = DTYPES[dtype_name], MESHES[world]
    opts = {"algorithm": algorithm, "max_blocks": 8} if backend == "fused" else {}
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=world), dtype=dtype,
                         backend=backend, **opts)
    rows = 16 * coll.ir.granularity  # several units per rank: two-shot splits them
    inputs = [planted_input(seed, r, world, rows, 72, dtype) for r in range(world)]
    exp, mag, terms = expected_nonfinite(program, axes, inputs)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "fused" else "cpu"
    out = coll(inputs[rank].to(dev))
    if backend == "fused":
        torch.cuda.synchronize()
    return mismatch_nonfinite(out.cpu(), exp[rank], mag[rank], dtype,
                              len(statements(program)), terms)


def worker(rank: int, world: int, cfg: dict) -> None:
    passed, failed = 0, []
    for i, (program, dtype_name, algorithm) in enumerate(
            (p, d, a) for p in PROGRAMS for d in DTYPES for a in ALGORITHMS):
        name = f"world {world} {program} {dtype_name} {algorithm}"
        try:
            msg = check(rank, world, program, dtype_name, algorithm, cfg["seed"] + i,
                        cfg["backend"])
        except Exception as e:  # one crash must not hide the other cases
            msg = f"{type(e).__name__}: {e}"
            if isinstance(e, mixcc.CollectiveTimeout):
                raise
        if msg:
            failed.append(f"rank {rank} {name} (seed {cfg['seed'] + i}): {msg}")
        else:
            passed += 1
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (passed, failed))
    if rank == 0:
        with open(cfg["results"], "a") as f:
            for p, fs in everyone:
                f.write(json.dumps([p, fs]) + "\n")


def prebuild(arch: str | None) -> None:
    """Build every fused module of the run at once (nvcc in parallel), before spawning."""
    from mixcc.codegen.build import build, device_arch
    from mixcc.fused import stage_spec
    from mixcc.runtime import build_native

    arch = arch or device_arch()
    build_native(arch)
    specs = {stage_spec(st, dt, arch): None for w, axes in MESHES.items() for p in PROGRAMS
             for st in mixcc.compile(p, mixcc.Mesh(axes, ranks_per_node=w),
                                     backend="reference").plan.stages
             for dt in DTYPES.values()}
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
        built = list(ex.map(build, specs))
    print(f"prebuild: {len(built)} modules for {arch}, "
          f"{sum(not b.cached for b in built)} compiled", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh one (printed)")
    ap.add_argument("--dry-run", action="store_true",
                    help="reference backend on CPU tensors (no GPU needed)")
    ap.add_argument("--prebuild-only", action="store_true")
    ap.add_argument("--arch", default=None, help="build for this arch (default: the GPU's)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"nan_check: seed {seed}", flush=True)
    if not args.dry_run:
        prebuild(args.arch)
        if args.prebuild_only:
            return
    from mixcc import launch

    cfg = {"seed": seed, "backend": "reference" if args.dry_run else "fused",
           "results": os.path.join(tempfile.mkdtemp(), "results.jsonl")}
    crashed = []
    for w in (int(v) for v in args.worlds.split(",")):
        try:
            launch.spawn(worker, w, cfg, backend="gloo")
        except Exception as e:  # a rank died or timed out: its world's cases count as one
            crashed.append(f"world {w} crashed: {e}")
    rows = [json.loads(line) for line in open(cfg["results"])] \
        if os.path.exists(cfg["results"]) else []
    failures = crashed + [m for _, fs in rows for m in fs]
    for m in failures[:20]:
        print("FAIL", m)
    print(f"nan_check: {sum(p for p, _ in rows)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
