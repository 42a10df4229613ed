"""A/B of the fused epilogue's kernel above LL_EPI_MAX_BYTES (tenth session, docs/PERF.md):
the fused call's time with algorithm='ll' against 'one_shot' (and auto), in one process
pair, three rounds, the fastest. From the repository root on two GPUs:

    python3 docs/perf/2026-11-30j_epi_algo_ab.py
"""
import statistics

import torch

LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
PROGS = {"layer": (LAYER, "tp"), "quant": (LAYER + "; quant(fp8_e4m3, scale)", "tp"),
         "ar_ag": ("allreduce(tp); allgather(dp); add(residual); rmsnorm(weight)", "dp")}
ALGOS = ("ll", "one_shot", "auto")


def run(rank, world, cfg):
    import mixcc
    from mixcc.bench import _max_over_ranks, repeat_times
    from mixcc.fused import ALGORITHMS
    dev = torch.device("cuda", torch.cuda.current_device())
    out = []
    for name, (program, axis) in PROGS.items():
        mesh = mixcc.Mesh({"dp": world, "tp": 1} if axis == "dp" else {"dp": 1, "tp": world})
        colls = {a: mixcc.compile(program, mesh, dtype=torch.bfloat16, backend="fused",
                                  algorithm=a) for a in ALGOS}
        for hidden in cfg["hidden"]:
            for rows in cfg["rows"]:
                g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
                x = torch.randn(rows, hidden, generator=g, device=dev, dtype=torch.bfloat16)
                orows = colls["ll"].output_shape(x.shape)[0]
                kw = {"residual": torch.randn(orows, hidden, generator=g, device=dev,
                                              dtype=torch.bfloat16) * 0.01,
                      "weight": torch.rand(hidden, generator=g, device=dev,
                                           dtype=torch.bfloat16) + 0.5}
                if "scale" in program:
                    kw["scale"] = torch.ones(1, device=dev, dtype=torch.float32)
                res = {}
                for _ in range(cfg["rounds"]):
                    for a in ALGOS:
                        c = colls[a]
                        r = c._fused_runner(x)
                        p = r._params(0, x.numel() // r.stages[0][0].lmap.in_units
                                      if hasattr(r.stages[0][0], "lmap") else x.numel(),
                                      x.nbytes, hidden)
                        t = repeat_times(lambda c=c, x=x, kw=kw: c(x, **kw), 20,
                                         cfg["repeats"], "graph")
                        m = statistics.median(_max_over_ranks(t, dev)) * 1e6
                        res.setdefault(a, [[], f"{ALGORITHMS[p[0]]}/{p[3]}b"])[0].append(m)
                out.append((name, hidden, rows, res))
    if rank == 0:
        for name, hidden, rows, res in out:
            print(name, hidden, rows, "  ".join(
                f"{a} {min(t):.2f} ({'/'.join(f'{v:.2f}' for v in t)}) {k}"
                for a, (t, k) in res.items()), flush=True)


if __name__ == "__main__":
    from mixcc import launch
    launch.spawn(run, 2, {"hidden": [4096, 8192], "rows": [8, 16, 32, 64, 128, 256],
                          "repeats": 7, "rounds": 3}, backend="nccl")
