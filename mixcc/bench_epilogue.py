"""The fused-epilogue benchmark (issue 15): a program ending in add / store / rmsnorm
[/ quant] with its epilogue fused into the kernel, against the best unfused chains a user
could write: mixcc's collective, or NCCL's, followed by the same epilogue compiled by
torch.compile (inductor). One process per GPU on NCCL, CUDA graphs of `iters` calls, the
median of `repeats` (each the max over ranks), as `mixcc bench` times; the columns' repeats
interleaved (one replay of each column per round, the order turning from round to round),
so that a drift of the clocks during a row reaches every column alike. A fourth column
times mixcc's collective alone, with no epilogue: the floor under any fused kernel, so
that (mixcc+compiled - alone) is what the unfused epilogue costs and fusion can save.

    python -m mixcc.bench_epilogue --world-size 2 --hidden 4096,8192 --out results/epi
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
CASES = {  # name: (program, mesh axes as dp, tp of a world of 2 * n)
    "ar_add_rmsnorm": (LAYER, "tp"),
    "ar_add_rmsnorm_quant": (LAYER + "; quant(fp8_e4m3, scale)", "tp"),
    "ar_ag_add_rmsnorm": ("allreduce(tp); allgather(dp); add(residual); rmsnorm(weight)", "dp"),
}
COLUMNS = ("fused", "mixcc+compiled", "nccl+compiled", "mixcc alone")


def _epilogue_fn(quant: bool, store: bool):
    """The unfused epilogue as torch code for torch.compile: fp32 math as mixcc/ops.py."""

    def fn(y: torch.Tensor, r: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = y.float() + r.float()
        if store:
            r.copy_(v.to(r.dtype))
        v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-6) * w.float()
        if quant:
            return (v / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return v.to(y.dtype)

    return torch.compile(fn)


def _nccl_collective(name: str, world: int):
    """The NCCL call the program's collectives amount to on its mesh (the allreduce runs
    in place on a buffer of its own: its values grow call after call, which costs NCCL
    and the compiled epilogue nothing)."""
    if CASES[name][1] == "tp":
        def ar(x: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(x)
            return x

        return ar

    def ag(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(y, x)
        return y

    return ag


def _candidates(fused, plain, nccl, epi, x: torch.Tensor, kw: dict) -> dict:
    """The three ways to run one case and the floor, as no-argument calls (COLUMNS)."""
    r, w = kw["residual"], kw["weight"]
    s = kw.get("scale", w)
    xc = x.clone()
    return {"fused": lambda: fused(x, **kw),
            "mixcc+compiled": lambda: epi(plain(x), r, w, s),
            "nccl+compiled": lambda: epi(nccl(xc), r, w, s),
            "mixcc alone": lambda: plain(x)}


def run(rank: int, world: int, cfg: dict) -> None:
    import mixcc
    from mixcc.bench import _max_over_ranks, capture_graphs, time_replay

    torch._dynamo.config.cache_size_limit = 256
    dev = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    rows_out = []
    for name in cfg["cases"]:
        program, axis = CASES[name]
        mesh = mixcc.Mesh({"dp": world, "tp": 1} if axis == "dp" else {"dp": 1, "tp": world})
        fused = mixcc.compile(program, mesh, dtype=dtype, backend="fused",
                              algorithm=cfg.get("algorithm", "auto"))
        colls = program.split("; add")[0]
        plain = mixcc.compile(colls, mesh, dtype=dtype)  # auto, as a user would
        nccl = _nccl_collective(name, world)
        quant = "quant" in program
        for hidden in cfg["hidden"]:
            # one compiled epilogue per row width, as a model has (rows become dynamic
            # after the first recompile: torch.compile's automatic dynamic shapes)
            epi = _epilogue_fn(quant, "store" in program)
            rows = 1
            while rows <= cfg["max_rows"]:
                g = torch.Generator(device=dev).manual_seed(rank * 1000 + rows)
                x = torch.randn(rows, hidden, generator=g, device=dev, dtype=dtype)
                out_rows = fused.output_shape(x.shape)[0]
                r = torch.randn(out_rows, hidden, generator=g, device=dev, dtype=dtype) * 0.01
                w = torch.rand(hidden, generator=g, device=dev, dtype=dtype) + 0.5
                s = torch.ones(1, device=dev, dtype=torch.float32)
                kw = {"residual": r, "weight": w, **({"scale": s} if quant else {})}
                runner = fused._fused_runner(x)
                is_fused = bool(runner.epilogue_hidden(fused.output_shape(x.shape), kw))
                fns = _candidates(fused, plain, nccl, epi, x, kw)
                graphs = {c: capture_graphs(fns[c], cfg["iters"]) for c in COLUMNS}
                got: dict[str, list[float]] = {c: [] for c in COLUMNS}
                for k in range(cfg["repeats"]):
                    for col in COLUMNS[k % len(COLUMNS):] + COLUMNS[:k % len(COLUMNS)]:
                        got[col].append(time_replay(*graphs[col], cfg["iters"]))
                del graphs
                times = {c: statistics.median(_max_over_ranks(got[c], dev)) * 1e6
                         for c in COLUMNS}
                rows_out.append({"case": name, "program": program, "hidden": hidden,
                                 "algorithm": cfg.get("algorithm", "auto"),
                                 "rows": rows, "bytes": x.numel() * x.element_size(),
                                 "fused_kernel": is_fused,
                                 **{f"{c} us": times[c] for c in COLUMNS}})
                rows *= 2
    if rank == 0:
        _report(rows_out, cfg.get("out"))


def _report(rows: list[dict], out: str | None) -> None:
    head = ("case", "hidden", "rows", "fused us", "mixcc+compiled us", "nccl+compiled us",
            "mixcc alone us", "fused/mixcc", "fused/nccl", "in kernel")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        f, m, n = r["fused us"], r["mixcc+compiled us"], r["nccl+compiled us"]
        alone = r.get("mixcc alone us")
        lines.append(" | ".join(str(v) for v in (
            r["case"], r["hidden"], r["rows"], f"{f:.1f}", f"{m:.1f}", f"{n:.1f}",
            "-" if alone is None else f"{alone:.1f}",
            f"{f / m:.2f}", f"{f / n:.2f}", "yes" if r["fused_kernel"] else "no")))
    text = "\n".join(f"| {ln} |" for ln in lines)
    print(text, flush=True)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out + ".json", "w") as fh:
            json.dump(rows, fh, indent=1)
        with open(out + ".md", "w") as fh:
            fh.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    from mixcc import launch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="default: all three")
    ap.add_argument("--hidden", default="4096,8192", help="comma list")
    ap.add_argument("--max-rows", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--algorithm", default="auto", choices=("auto", "one_shot", "two_shot", "ll"),
                    help="the fused kernel's one-node algorithm (the epilogue runs after "
                         "the one-shot's reduction, in the two-shot's gather, or in LL's "
                         "row pass where a row fits its region)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.device_count() < a.world_size:
        ap.error(f"needs {a.world_size} GPUs (one process per GPU on NCCL)")
    cfg = {"cases": a.case or list(CASES), "hidden": [int(h) for h in a.hidden.split(",")],
           "max_rows": a.max_rows, "iters": a.iters, "repeats": a.repeats, "out": a.out,
           "algorithm": a.algorithm}
    launch.spawn(run, a.world_size, cfg, backend="nccl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
