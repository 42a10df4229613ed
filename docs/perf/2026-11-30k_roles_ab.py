"""A/B of the LL epilogue's output units on blocks of their own (eleventh session,
docs/PERF.md): the fused call's time with plan.ll_roles as built ("roles") and forced to
1 ("one": a block holds every output unit of its rows), and the plain allgather alone, in
one process pair; CUDA graphs of 20 calls, replays interleaved, median of `repeats`, each
the max over the ranks. Run from the repository root on two GPUs:

    python3 docs/perf/2026-11-30k_roles_ab.py $PWD
"""
import statistics
import sys

import torch

PROGS = {"ar_ag": "allreduce(tp); allgather(dp); add(residual); rmsnorm(weight)",
         "ag_store": "allgather(dp); add(residual); store(residual); rmsnorm(weight)"}


def run(rank, world, cfg):
    import mixcc
    import mixcc.fused as F
    from mixcc.bench import _max_over_ranks, capture_graphs, time_replay
    dev = torch.device("cuda", torch.cuda.current_device())
    orig = F.ll_roles
    mesh = mixcc.Mesh({"dp": world, "tp": 1})
    plain = mixcc.compile("allgather(dp)", mesh, dtype=torch.bfloat16)
    out = []
    for name in cfg["progs"]:
        coll = mixcc.compile(PROGS[name], mesh, dtype=torch.bfloat16, backend="fused")
        for hidden in cfg["hidden"]:
            for rows in cfg["rows"]:
                g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
                x = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16)
                kw = {"residual": torch.randn(2 * rows, hidden, generator=g, device=dev,
                                              dtype=torch.bfloat16) * 0.01,
                      "weight": torch.rand(hidden, generator=g, device=dev,
                                           dtype=torch.bfloat16) + 0.5}
                graphs, params = {}, {}
                for mode in ("roles", "one"):
                    F.ll_roles = orig if mode == "roles" else (lambda *a, **k: 1)
                    r = coll._fused_runner(x)
                    r._args.clear()
                    params[mode] = r._params(0, rows * hidden, x.nbytes, hidden)
                    graphs[mode] = capture_graphs(lambda c=coll, x=x, kw=kw: c(x, **kw), 20)
                F.ll_roles = orig
                graphs["plain"] = capture_graphs(lambda x=x: plain(x), 20)
                params["plain"] = None
                got = {m: [] for m in graphs}
                modes = list(graphs)
                for k in range(cfg["repeats"]):
                    for m in modes[k % 3:] + modes[:k % 3]:
                        got[m].append(time_replay(*graphs[m], 20))
                del graphs
                res = {m: statistics.median(_max_over_ranks(t, dev)) * 1e6
                       for m, t in got.items()}
                out.append((name, hidden, rows, res, params))
    if rank == 0:
        for name, hidden, rows, res, params in out:
            print(f"{name} {hidden} rows {rows}: " + "  ".join(
                f"{m} {v:.2f}" + (f" ({params[m][3]}b)" if params[m] else "")
                for m, v in res.items())
                + f"  roles/one {res['roles'] / res['one']:.2f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from mixcc import launch
    cfg = {"progs": ["ar_ag", "ag_store"], "hidden": [4096, 8192],
           "rows": [1, 2, 4, 8, 16, 32], "repeats": 9}
    launch.spawn(run, 2, cfg, backend="nccl")
