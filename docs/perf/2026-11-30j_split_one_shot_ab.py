"""A/B of the one-shot's fused epilogue with rows split over two blocks (tenth session,
docs/PERF.md): the fused call's time with plan.row_split on and forced to 1, one process
pair, three rounds, the fastest. From the repository root on two GPUs:

    git apply docs/perf/2026-11-30j_split_one_shot.patch   # on 9201302
    python3 docs/perf/2026-11-30j_split_one_shot_ab.py
"""
import statistics

import torch

LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
PROGS = {"layer": LAYER, "quant": LAYER + "; quant(fp8_e4m3, scale)"}
CASES = [("one_shot", r) for r in (1, 8, 16, 32, 64)] + [("auto", r) for r in (32, 64, 128)]


def run(rank, world, cfg):
    import mixcc
    import mixcc.fused as F
    from mixcc.bench import _max_over_ranks, repeat_times
    from mixcc.fused import ALGORITHMS
    dev = torch.device("cuda", torch.cuda.current_device())
    orig = F.row_split
    mesh = mixcc.Mesh({"dp": 1, "tp": world})
    out = []
    for name, program in PROGS.items():
        colls = {a: mixcc.compile(program, mesh, dtype=torch.bfloat16, backend="fused",
                                  algorithm=a) for a in ("one_shot", "auto")}
        for hidden in cfg["hidden"]:
            for algo, rows in CASES:
                c = colls[algo]
                g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
                x = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16)
                kw = {"residual": torch.randn(rows, hidden, generator=g, device=dev,
                                              dtype=torch.bfloat16) * 0.01,
                      "weight": torch.rand(hidden, generator=g, device=dev,
                                           dtype=torch.bfloat16) + 0.5}
                if "scale" in program:
                    kw["scale"] = torch.ones(1, device=dev, dtype=torch.float32)
                res = {}
                for _ in range(cfg["rounds"]):
                    for mode in ("split", "whole"):
                        F.row_split = orig if mode == "split" else (lambda *a, **k: 1)
                        r = c._fused_runner(x)
                        r._args.clear()
                        p = r._params(0, rows * hidden, x.nbytes, hidden)
                        t = repeat_times(lambda c=c, x=x, kw=kw: c(x, **kw), 20,
                                         cfg["repeats"], "graph")
                        m = statistics.median(_max_over_ranks(t, dev)) * 1e6
                        res.setdefault(mode, [[], f"{ALGORITHMS[p[0]]}/{p[3]}b"])[0].append(m)
                F.row_split = orig
                out.append((name, hidden, algo, rows, res))
    if rank == 0:
        for name, hidden, algo, rows, res in out:
            print(name, hidden, algo, rows, "  ".join(
                f"{m} {min(t):.2f} ({'/'.join(f'{v:.2f}' for v in t)}) {k}"
                for m, (t, k) in res.items()), flush=True)


if __name__ == "__main__":
    from mixcc import launch
    launch.spawn(run, 2, {"hidden": [8192], "repeats": 7, "rounds": 3}, backend="nccl")
