"""Does interleaving the columns change the fused call's time? (eleventh session,
docs/PERF.md) In one process pair, after capturing the four columns' graphs: each
column's replays back to back ("seq"), interleaved one per column per round ("int"), the
fused call alternating with the plain one ("pair"), and back to back again ("seq2").
Run from the repository root on two GPUs:

    python3 docs/perf/2026-11-30k_interleave_ab.py $PWD
"""
import statistics
import sys

import torch


def run(rank, world, cfg):
    import mixcc
    from mixcc import bench_epilogue as B
    from mixcc.bench import _max_over_ranks, capture_graphs, time_replay
    torch._dynamo.config.cache_size_limit = 256
    dev = torch.device("cuda", torch.cuda.current_device())
    out = []
    for name in cfg["cases"]:
        program, axis = B.CASES[name]
        mesh = mixcc.Mesh({"dp": 1, "tp": world})
        fused = mixcc.compile(program, mesh, dtype=torch.bfloat16, backend="fused")
        plain = mixcc.compile(program.split("; add")[0], mesh, dtype=torch.bfloat16)
        nccl = B._nccl_collective(name, world)
        for hidden in cfg["hidden"]:
            epi = B._epilogue_fn("quant" in program, True)
            for rows in cfg["rows"]:
                g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
                x = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16)
                r = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16) * 0.01
                w = torch.rand(hidden, generator=g, device=dev, dtype=torch.bfloat16) + 0.5
                s = torch.ones(1, device=dev, dtype=torch.float32)
                kw = {"residual": r, "weight": w, **({"scale": s} if "quant" in program else {})}
                fns = B._candidates(fused, plain, nccl, epi, x, kw)
                cols = list(B.COLUMNS)
                graphs = {c: capture_graphs(fns[c], 20) for c in cols}
                res = {}
                for c in cols:  # sequential
                    t = [time_replay(*graphs[c], 20) for _ in range(cfg["repeats"])]
                    res["seq " + c] = statistics.median(_max_over_ranks(t, dev)) * 1e6
                got = {c: [] for c in cols}
                for k in range(cfg["repeats"]):
                    for c in cols[k % 4:] + cols[:k % 4]:
                        got[c].append(time_replay(*graphs[c], 20))
                for c in cols:
                    res["int " + c] = statistics.median(_max_over_ranks(got[c], dev)) * 1e6
                got = {c: [] for c in ("fused", "mixcc alone")}
                for _ in range(cfg["repeats"]):
                    for c in ("fused", "mixcc alone"):
                        got[c].append(time_replay(*graphs[c], 20))
                for c in got:
                    res["pair " + c] = statistics.median(_max_over_ranks(got[c], dev)) * 1e6
                for c in cols:  # sequential again
                    t = [time_replay(*graphs[c], 20) for _ in range(cfg["repeats"])]
                    res["seq2 " + c] = statistics.median(_max_over_ranks(t, dev)) * 1e6
                del graphs
                out.append((name, hidden, rows, res))
    if rank == 0:
        for name, hidden, rows, res in out:
            print(f"{name} {hidden} rows {rows}:", flush=True)
            for mode in ("seq", "int", "pair", "seq2"):
                print(f"  {mode:5s} " + "  ".join(f"{k.split(' ', 1)[1]} {v:.2f}"
                                                  for k, v in res.items()
                                                  if k.split(' ')[0] == mode), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from mixcc import launch
    cfg = {"cases": ["ar_add_rmsnorm_quant", "ar_add_rmsnorm"], "hidden": [4096, 8192],
           "rows": [1, 4, 16], "repeats": 8}
    launch.spawn(run, 2, cfg, backend="nccl")
