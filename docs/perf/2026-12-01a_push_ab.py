"""A/B of push's split of a block's threads between senders and receivers (twelfth
session, docs/PERF.md, issue 14 target c): allreduce(tp) bf16 on two ranks, push with
SEND_THREADS = THREADS / 2 (as built), 3/4 and 1/4 of the block, the copy's unroll 4 (as
built) or 8 for the senders, the flags released by a signal warp (PUSH_SIGNAL_WARP), and
the one-shot for reference, in one process pair; CUDA
graphs of 20 calls, replays interleaved (one per variant per round, order turning), median
of `repeats`, each the max over the ranks. The variants are the template's source edited in
this process (the module cache keys on the source); the signal warp's switch comes with
docs/perf/2026-12-01a_push_signal_warp.patch (on f14e0c8), which must be applied first.
Run from the repository root:

    python3 docs/perf/2026-12-01a_push_ab.py $PWD            # on two GPUs
    python3 docs/perf/2026-12-01a_push_ab.py $PWD mps        # one GPU, MPS running
    python3 docs/perf/2026-12-01a_push_ab.py $PWD prebuild   # build the modules only
"""
import statistics
import sys

import torch

BASE = "constexpr int SEND_THREADS = THREADS / 2,"
VARIANTS = {"half": {},
            "s3q": {BASE: "constexpr int SEND_THREADS = THREADS * 3 / 4,"},
            "s1q": {BASE: "constexpr int SEND_THREADS = THREADS / 4,"},
            "unr8": {"constexpr int UNR = 4;\n  int v = lo + tid;":
                     "constexpr int UNR = NT < THREADS ? 8 : 4;\n  int v = lo + tid;"},
            "sig": {"constexpr bool PUSH_SIGNAL_WARP = false;":
                    "constexpr bool PUSH_SIGNAL_WARP = true;"}}


def patch(variant):
    """Make mixcc.fused render the stage source with the variant's edits."""
    import mixcc.fused as F
    from mixcc.codegen.render import render_stage

    def render(stage, dtype, epilogue=()):
        src = render_stage(stage, dtype, epilogue)
        for old, new in VARIANTS[variant].items():
            assert src.count(old) == 1, (variant, old)
            src = src.replace(old, new)
        return src
    F.render_stage = render


def run(rank, world, cfg):
    import mixcc
    from mixcc.bench import _max_over_ranks, capture_graphs, time_replay
    dev = torch.device("cuda", torch.cuda.current_device())
    mesh = mixcc.Mesh({"dp": 1, "tp": world})
    colls = {}
    for v in VARIANTS:
        patch(v)
        colls[v] = mixcc.compile("allreduce(tp)", mesh, dtype=torch.bfloat16,
                                 backend="fused", algorithm="push")
    patch("half")
    colls["one_shot"] = mixcc.compile("allreduce(tp)", mesh, dtype=torch.bfloat16,
                                      backend="fused", algorithm="one_shot")
    out = []
    for mib in cfg["mib"]:
        n = (mib << 20) // 2
        g = torch.Generator(device=dev).manual_seed(rank * 7 + mib)
        x = torch.randn(n // 4096, 4096, generator=g, device=dev, dtype=torch.bfloat16)
        o = torch.empty_like(x)
        want = x.float() * 0
        for r in range(world):
            gr = torch.Generator(device=dev).manual_seed(r * 7 + mib)
            want += torch.randn(n // 4096, 4096, generator=gr, device=dev,
                                dtype=torch.bfloat16).float()
        bad = {}
        for v, c in colls.items():
            o.zero_()
            c(x, out=o)
            y = x.clone()
            c(y, out=y)  # in place
            torch.cuda.synchronize()
            bad[v] = sum(int(((t.float() - want).abs() > 1e-2 * want.abs() + 1e-2).sum())
                         for t in (o, y))
        graphs = {v: capture_graphs(lambda c=c, x=x, o=o: c(x, out=o), 20)
                  for v, c in colls.items()}
        got = {v: [] for v in graphs}
        names = list(graphs)
        for k in range(cfg["repeats"]):
            for v in names[k % len(names):] + names[:k % len(names)]:
                got[v].append(time_replay(*graphs[v], 20))
        del graphs
        res = {v: statistics.median(_max_over_ranks(t, dev)) * 1e6 for v, t in got.items()}
        out.append((mib, res, bad))
    if rank == 0:
        for mib, res, bad in out:
            print(f"{mib} MiB: " + "  ".join(
                f"{v} {t:.1f} ({(mib << 20) / t / 1e3 / 378 * 100:.0f}%, wrong {bad[v]})"
                for v, t in res.items()), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    if sys.argv[2:] == ["prebuild"]:
        import concurrent.futures as cf

        import mixcc
        import mixcc.fused as F
        from mixcc.codegen.build import build
        from mixcc.runtime import build_native
        build_native("sm_90a")
        specs = []
        for v in VARIANTS:
            patch(v)
            coll = mixcc.compile("allreduce(tp)", mixcc.Mesh({"dp": 1, "tp": 2}),
                                 dtype=torch.bfloat16, backend="reference")
            specs.append(F.stage_spec(coll.plan.stages[0], torch.bfloat16, "sm_90a"))
        with cf.ThreadPoolExecutor(2) as ex:
            print([b.cached for b in ex.map(build, specs)])
    else:
        from mixcc import launch
        # "mps": both ranks on one GPU under MPS (gloo): the wrong counts, no link
        mps = sys.argv[2:] == ["mps"]
        launch.spawn(run, 2, {"mib": [32, 64], "repeats": 3 if mps else 7},
                     backend="gloo" if mps else "nccl")
