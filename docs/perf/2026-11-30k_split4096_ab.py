"""A/B of LL rows of 4096 bf16 (8 KiB) over two blocks (plan.ROW_SPLIT_MIN_BYTES lowered
to 8 KiB: "split") against whole rows ("whole", the rule as built), with the plain
allreduce alone, interleaved replays (eleventh session). Run on two GPUs:

    python3 docs/perf/2026-11-30k_split4096_ab.py $PWD
"""
import statistics
import sys

import torch

LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
PROGS = {"layer": LAYER, "quant": LAYER + "; quant(fp8_e4m3, scale)"}


def run(rank, world, cfg):
    import mixcc
    import mixcc.codegen.plan as P
    from mixcc.bench import _max_over_ranks, capture_graphs, time_replay
    dev = torch.device("cuda", torch.cuda.current_device())
    orig = P.ROW_SPLIT_MIN_BYTES
    mesh = mixcc.Mesh({"dp": 1, "tp": world})
    plain = mixcc.compile("allreduce(tp)", mesh, dtype=torch.bfloat16)
    out = []
    for name in cfg["progs"]:
        coll = mixcc.compile(PROGS[name], mesh, dtype=torch.bfloat16, backend="fused")
        hidden = 4096
        for rows in cfg["rows"]:
            g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
            x = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16)
            kw = {"residual": torch.randn(rows, hidden, generator=g, device=dev,
                                          dtype=torch.bfloat16) * 0.01,
                  "weight": torch.rand(hidden, generator=g, device=dev,
                                       dtype=torch.bfloat16) + 0.5}
            if name == "quant":
                kw["scale"] = torch.ones(1, device=dev, dtype=torch.float32)
            graphs, params = {}, {}
            for mode in ("split", "whole"):
                P.ROW_SPLIT_MIN_BYTES = 8 << 10 if mode == "split" else orig
                r = coll._fused_runner(x)
                r._args.clear()
                params[mode] = r._params(0, rows * hidden, x.nbytes, hidden)
                graphs[mode] = capture_graphs(lambda c=coll, x=x, kw=kw: c(x, **kw), 20)
            P.ROW_SPLIT_MIN_BYTES = orig
            graphs["plain"] = capture_graphs(lambda x=x: plain(x), 20)
            got = {m: [] for m in graphs}
            modes = list(graphs)
            for k in range(cfg["repeats"]):
                for m in modes[k % 3:] + modes[:k % 3]:
                    got[m].append(time_replay(*graphs[m], 20))
            del graphs
            res = {m: statistics.median(_max_over_ranks(t, dev)) * 1e6 for m, t in got.items()}
            out.append((name, rows, res, params))
    if rank == 0:
        for name, rows, res, params in out:
            print(f"{name} 4096 rows {rows}: " + "  ".join(
                f"{m} {v:.2f}" + (f" ({params[m][3]}b)" if m in params else "")
                for m, v in res.items()) + f"  split/whole {res['split'] / res['whole']:.2f}",
                flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from mixcc import launch
    cfg = {"progs": ["layer", "quant"], "rows": [1, 2, 4, 8, 16], "repeats": 9}
    launch.spawn(run, 2, cfg, backend="nccl")
