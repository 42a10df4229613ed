"""A/B of the LL epilogue's rows of 16 KiB split over two blocks together with output
units on blocks of their own (twelfth session, docs/PERF.md): the fused call's time with
plan.ll_row_split as built ("split": each unit's row on two blocks) and forced to 1
("whole": each unit's row on one block, as committed in the eleventh session), and the
plain allgather alone, in one process pair; CUDA graphs of 20 calls, replays interleaved,
median of `repeats`, each the max over the ranks. Run from the repository root on two GPUs:

    python3 docs/perf/2026-12-01a_roles_split_ab.py $PWD        # two GPUs
    python3 docs/perf/2026-12-01a_roles_split_ab.py $PWD mps    # one GPU, MPS running
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
    orig = F.ll_row_split
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
                graphs, params, outs = {}, {}, {}
                res_init = kw["residual"].clone()  # the graphs' warm-up calls store into it
                for mode in ("split", "whole"):
                    F.ll_row_split = orig if mode == "split" else (lambda *a, **k: 1)
                    r = coll._fused_runner(x)
                    r._args.clear()
                    params[mode] = r._params(0, rows * hidden, x.nbytes, hidden)
                    res0 = res_init.clone()
                    outs[mode] = coll(x, **{**kw, "residual": res0}).float()
                    torch.cuda.synchronize()
                    graphs[mode] = capture_graphs(lambda c=coll, x=x, kw=kw: c(x, **kw), 20)
                F.ll_row_split = orig
                # the two grids compute the same rows (a split row's sum of squares is
                # added in another order: bf16 rounding apart)
                diff = (outs["split"] - outs["whole"]).abs().max().item()
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
                out.append((name, hidden, rows, res, params, diff))
    if rank == 0:
        for name, hidden, rows, res, params, diff in out:
            print(f"{name} {hidden} rows {rows}: " + "  ".join(
                f"{m} {v:.2f}" + (f" {params[m][1:]}" if params[m] else "")
                for m, v in res.items())
                + f"  split/whole {res['split'] / res['whole']:.2f}  maxdiff {diff:.3g}",
                flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from mixcc import launch
    cfg = {"progs": ["ar_ag", "ag_store"], "hidden": [8192],
           "rows": [1, 2, 4, 8, 16], "repeats": 9}
    # "mps": both ranks on one GPU under MPS (gloo), a proxy without the link
    launch.spawn(run, 2, cfg, backend="gloo" if sys.argv[2:] == ["mps"] else "nccl")
