"""A/B of the LL epilogue's row split (tenth session, docs/PERF.md): the fused kernel's
time with rows over four blocks, over two, and whole (ll_row_split forced to 1), in one
process pair, three rounds. It ran on the branch ll-row-split before 82b859d (the layout's
ROW_SPLIT_MAX was 4, no ROW_SPLIT_MIN_BYTES); on later trees four blocks are refused.
Run from the repository root on two GPUs:

    python3 docs/perf/2026-11-30j_split_ab.py $PWD layer,quant
"""
import statistics
import sys

import torch

LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
PROGS = {"layer": LAYER, "quant": LAYER + "; quant(fp8_e4m3, scale)",
         "norm_quant": "allreduce(tp); rmsnorm(weight); quant(fp8_e4m3, scale)",
         "add_store": "allreduce(tp); add(residual); store(residual)",
         "plain": "allreduce(tp)"}


def run(rank, world, cfg):
    import mixcc
    import mixcc.fused as F
    from mixcc.bench import _max_over_ranks, repeat_times
    dev = torch.device("cuda", torch.cuda.current_device())
    orig = getattr(F, "ll_row_split", None)
    mesh = mixcc.Mesh({"dp": 1, "tp": world})
    out = []
    for name in cfg["progs"]:
        coll = mixcc.compile(PROGS[name], mesh, dtype=torch.bfloat16, backend="fused")
        for hidden in cfg["hidden"]:
            for rows in cfg["rows"]:
                g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
                x = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16)
                kw = {}
                if "residual" in PROGS[name]:
                    kw["residual"] = torch.randn(rows, hidden, generator=g, device=dev,
                                                 dtype=torch.bfloat16) * 0.01
                if "weight" in PROGS[name]:
                    kw["weight"] = torch.rand(hidden, generator=g, device=dev,
                                              dtype=torch.bfloat16) + 0.5
                if "scale" in PROGS[name]:
                    kw["scale"] = torch.ones(1, device=dev, dtype=torch.float32)
                res = {}
                import mixcc.codegen.layout as L
                for _ in range(cfg["rounds"]):
                    for mode in ("split4", "split2", "whole"):
                        L.ROW_SPLIT_MAX = 2 if mode == "split2" else 4
                        F.ll_row_split = orig if mode != "whole" else (lambda *a, **k: 1)
                        r = coll._fused_runner(x)
                        r._args.clear()
                        p = r._params(0, rows * hidden, x.nbytes, hidden)
                        t = repeat_times(lambda c=coll, x=x, kw=kw: c(x, **kw), 20, cfg["repeats"],
                                         "graph")
                        m = statistics.median(_max_over_ranks(t, dev)) * 1e6
                        res.setdefault(mode, [[], p])[0].append(m)
                L.ROW_SPLIT_MAX = 4
                out.append((name, hidden, rows, res))
    if rank == 0:
        for name, hidden, rows, res in out:
            print(name, hidden, rows, "  ".join(
                f"{m} {min(t):.2f} ({'/'.join(f'{v:.2f}' for v in t)}) {p[3]}b"
                for m, (t, p) in res.items()), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from mixcc import launch
    cfg = {"progs": sys.argv[2].split(","), "hidden": [4096, 8192], "rows": [1, 2, 4, 8, 16, 32],
           "repeats": 7, "rounds": 3}
    launch.spawn(run, 2, cfg, backend="nccl")
