"""`mixcc bench` for dispatch programs: dispatch + combine per call, against what a user
writes without mixcc, in the same processes on the same data (docs/DESIGN.md, "Expert
parallelism").

    mixcc bench --program "dispatch(ep, experts=64, topk=8)" --world-size 2
    mixcc bench --ep --hidden 4096      # top-8 of 64 and 256 experts, bf16 and fp8 wires

Rows: `auto` (mixcc's dispatch then combine as compiled, backend auto: the reference
backend today), `a2a` (torch.distributed all_to_all_single: the per-expert counts
exchange a user needs, the rows, a stable sort into expert-major order, and the way
back with a weighted sum in fp32), `symm_a2a` (torch symmetric memory's all_to_all_vdev
there and back, on CUDA with NCCL only: the rows' movement alone, no expert-major
order). The experts are the identity (combine gets recv_x back; an fp8 wire gets a
fixed buffer of x's dtype). Routing: top-K distinct experts per token, uniform, seeded.
Times: `repeats` runs of `iters` eager calls (the reference backend reads the counts on
the host, so nothing is captured in a CUDA graph), each the max over ranks, their
median; host clock on CPU, synchronised on CUDA. moved: the bytes a rank sends to
other ranks per call, dispatch and combine, averaged over ranks. Each row's errors: its
combine output against the float64 result of the identity experts (one check before
the timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from . import bench, launch
from .bench import DTYPES, Row
from .errors import MixccError
from .ir.parser import parse
from .mesh import Mesh
from .presets import resolve

EP_BACKENDS = ("auto", "a2a", "symm_a2a")
# `mixcc bench --ep`: the shapes DeepEP's and pplx-kernels' users quote (top-8 of 64 and
# 256 experts), each with the token's dtype and with fp8 and a scale per 128 elements
EP_PROGRAMS = tuple(f"dispatch(ep, experts={e}, topk=8{w})" for e in (64, 256)
                    for w in ("", ", wire=fp8_e4m3, scale_block=128"))


def is_ep(program: str) -> bool:
    """Whether `program` (text or preset) is a dispatch or combine program."""
    try:
        return parse(resolve(program)).ep is not None
    except MixccError:
        return False


def config(args: argparse.Namespace) -> tuple[int, dict]:
    """(world, the config every rank runs) from bench's flags, checked before any process
    starts; UsageError (cli) on a bad flag."""
    from .api import compile as mixcc_compile
    from .cli import UsageError, _positive

    _positive(args, "hidden", "min_rows", "max_rows", "iters", "repeats", "ranks_per_node")
    progs = [resolve(p) for p in args.program or []]
    if getattr(args, "ep", False):
        progs = list(dict.fromkeys([*EP_PROGRAMS, *progs]))
    for p in progs:
        ast = parse(p)
        if ast.ep is None or ast.ep.kind != "dispatch":
            raise UsageError(f"--program {p!r}: a dispatch benchmark takes dispatch programs "
                             "only (each runs with its combine); run collectives apart")
    gpus = bench.gpu_count()
    if args.world_size is not None:
        try:
            world = int(args.world_size)
        except ValueError:
            raise UsageError(f"--world-size {args.world_size!r}: dispatch programs take one "
                             "world size") from None
    elif args.mesh:
        world = Mesh.parse(args.mesh, 1).world_size
    else:
        world = gpus if gpus > 1 else 2
    if world < 1:
        raise UsageError(f"--world-size must be >= 1, got {world}")
    rpn = args.ranks_per_node or world
    if world % rpn:
        raise UsageError(f"--ranks-per-node {rpn} must divide the world size {world}")
    try:
        mesh = Mesh.parse(args.mesh, rpn) if args.mesh else Mesh({"ep": world}, rpn)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None
    if mesh.world_size != world:
        raise UsageError(f"--mesh {args.mesh} has {mesh.world_size} ranks, --world-size "
                         f"{world}")
    dtype_name = args.dtype or "bfloat16"
    if DTYPES.get(dtype_name) not in (torch.bfloat16, torch.float16, torch.float32):
        raise UsageError(f"--dtype {dtype_name!r}: dispatch moves bfloat16, float16 or "
                         "float32 tokens")
    for p in progs:
        try:
            mixcc_compile(p, mesh, dtype=DTYPES[dtype_name], backend="reference")
        except (MixccError, ValueError) as e:
            raise UsageError(f"--program {p!r}: {e}") from None
    nccl = 0 < world <= gpus
    backends = ["auto", "a2a"] + (["symm_a2a"] if nccl else [])
    if args.backend is not None:
        backends = list(dict.fromkeys(b.strip() for b in args.backend.split(",")))
        for b in backends:
            if b not in EP_BACKENDS:
                raise UsageError(f"--backend {b!r}: dispatch programs run "
                                 f"{', '.join(EP_BACKENDS)}")
        if "symm_a2a" in backends and not nccl:
            raise UsageError("--backend symm_a2a needs one GPU per rank (NCCL)")
    min_rows, max_rows = args.min_rows or 1, args.max_rows or (4096 if gpus else 64)
    if min_rows > max_rows:
        raise UsageError(f"--min-rows {min_rows} is above --max-rows {max_rows}")
    if args.out:
        from .cli import _check_out

        _check_out(args.out)
    return world, {
        "mesh_axes": list(zip(mesh.names, mesh.sizes, strict=True)),
        "ranks_per_node": mesh.ranks_per_node, "programs": progs, "backends": backends,
        "dtype": dtype_name, "hidden": args.hidden or (7168 if gpus else 512),
        "min_rows": min_rows, "max_rows": max_rows,
        "iters": args.iters or (20 if gpus else 3), "repeats": args.repeats or (10 if gpus else 3),
        "pg": "nccl" if nccl else "gloo", "out": args.out,
    }


def main(args: argparse.Namespace) -> int:
    """`mixcc bench` with dispatch programs: spawn the ranks, print and write the rows."""
    world, cfg = config(args)
    with tempfile.TemporaryDirectory(prefix="mixcc-bench-ep-") as tmp:
        cfg["rows_path"] = os.path.join(tmp, "rows.json")
        launch.spawn(_worker, world, cfg, backend=cfg["pg"])
        rows = bench.read_rows(cfg["rows_path"])
    bench.add_ratios(rows)
    print(summary(rows), flush=True)
    if cfg["out"]:
        for path in bench.write_outputs(rows, cfg["out"]):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def summary(rows: list[Row]) -> str:
    """One line per (program, tokens): time (us) per backend, and auto's over the best
    baseline's; the last thing printed."""
    backends = list(dict.fromkeys(r.backend for r in rows))
    by: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by.setdefault((r.program, r.world, r.rows), {})[r.backend] = r
    width = max([len(p) for p, _, _ in by] + [7])
    lines = ["# dispatch + combine: time (us) per backend; auto/best: auto's time over the "
             "best baseline's",
             f"{'program':<{width}} {'world':>5} {'tokens':>6} "
             + " ".join(f"{b:>12}" for b in backends) + f" {'auto/best':>9}"]
    for (prog, world, tokens), rs in by.items():
        cells = " ".join(f"{rs[b].time_us:>12.1f}" if b in rs else f"{'-':>12}"
                         for b in backends)
        auto = rs.get("auto")
        ratio = f"{auto.ratio:>9.2f}" if auto is not None and auto.ratio == auto.ratio \
            else f"{'-':>9}"
        lines.append(f"{prog:<{width}} {world:>5} {tokens:>6} {cells} {ratio}")
    return "\n".join(lines)


def _worker(rank: int, world: int, cfg: dict) -> None:
    rows = run(rank, world, cfg)
    if rank == 0:
        bench.dump_rows(rows, cfg["rows_path"])


def routing(seed: int, rank: int, tokens: int, hidden: int, experts: int, topk: int,
            dtype: torch.dtype, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, topk_idx, topk_weights): top-`topk` distinct experts per token, uniform."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = torch.randn((tokens, hidden), generator=g).to(dtype)
    idx = torch.rand((tokens, experts), generator=g).topk(topk, dim=1).indices
    w = torch.rand((tokens, topk), generator=g)
    return x.to(device), idx.to(device), w.to(device)


def identity_expected(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over k of w[t, k] * x[t] in float64 (idx -1 skipped): combine's result when
    every expert returns its input."""
    keep = (idx >= 0).double() * w.double()
    return keep.sum(1, keepdim=True) * x.double()


def _a2a(pg, n: int, experts: int):
    """The user's path on torch.distributed: experts placed by the group's own rank order."""
    local = experts // n

    def step(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        tokens, k = idx.shape
        flat = idx.reshape(-1)
        pairs = (flat >= 0).nonzero().squeeze(1)
        order = flat[pairs].argsort(stable=True)  # by expert = by rank, expert, token
        pairs = pairs[order]
        send_counts = torch.bincount(flat[pairs], minlength=experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=pg)
        in_splits = send_counts.view(n, local).sum(1).tolist()
        out_splits = recv_counts.view(n, local).sum(1).tolist()
        wire = (lambda t: t) if x.is_cuda else (lambda t: t.view(torch.uint8))
        send = x[pairs // k]
        recv = torch.empty((sum(out_splits), x.shape[1]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(wire(recv), wire(send), out_splits, in_splits, group=pg)
        expert = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(n),
                                         recv_counts.view(-1))
        perm = expert.argsort(stable=True)
        expert_out = recv[perm]  # expert-major; the identity expert
        back_send = torch.empty_like(recv)
        back_send[perm] = expert_out
        back = torch.empty_like(send)
        dist.all_to_all_single(wire(back), wire(back_send), in_splits, out_splits, group=pg)
        rows = torch.zeros((tokens * k, x.shape[1]), dtype=torch.float32, device=x.device)
        rows[pairs] = back.float()
        return (rows.view(tokens, k, -1) * w.unsqueeze(-1)).sum(1).to(x.dtype)

    return step


def _symm_a2a(pg, n: int, experts: int, max_pairs: int, hidden: int, dtype: torch.dtype,
              device: torch.device):
    """torch symmetric memory's all_to_all_vdev there and back (the rows only)."""
    import torch.distributed._symmetric_memory as symm

    name = pg.group_name
    if hasattr(symm, "set_backend"):
        symm.set_backend("NVSHMEM")
    symm.enable_symm_mem_for_group(name)
    cap = max_pairs * n
    inp = symm.empty((cap, hidden), dtype=dtype, device=device)
    out = symm.empty((cap, hidden), dtype=dtype, device=device)
    splits = symm.empty(n, dtype=torch.int64, device=device)
    back_splits = symm.empty(n, dtype=torch.int64, device=device)
    out_so = symm.empty((2, n), dtype=torch.int64, device=device)
    back_so = symm.empty((2, n), dtype=torch.int64, device=device)
    symm.rendezvous(inp, name)
    symm.rendezvous(out, name)
    local = experts // n

    def step(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        tokens, k = idx.shape
        flat = idx.reshape(-1)
        pairs = (flat >= 0).nonzero().squeeze(1)
        pairs = pairs[flat[pairs].argsort(stable=True)]
        inp[:pairs.numel()] = x[pairs // k]
        splits.copy_(torch.bincount(flat[pairs] // local, minlength=n))
        torch.ops.symm_mem.all_to_all_vdev(inp, out, splits, out_so, name)
        back_splits.copy_(out_so[0])
        torch.ops.symm_mem.all_to_all_vdev(out, inp, back_splits, back_so, name)
        rows = torch.zeros((tokens * k, x.shape[1]), dtype=torch.float32, device=x.device)
        rows[pairs] = inp[:pairs.numel()].float()
        return (rows.view(tokens, k, -1) * w.unsqueeze(-1)).sum(1).to(x.dtype)

    return step


def _times(fn, iters: int, repeats: int, cuda: bool) -> list[float]:
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / iters)
    return out


def run(rank: int, world: int, cfg: dict) -> list[Row]:
    """Every rank runs every row; rank 0 prints them and returns them."""
    from .api import compile as mixcc_compile

    dtype = DTYPES[cfg["dtype"]]
    mesh = Mesh(cfg["mesh_axes"], ranks_per_node=cfg["ranks_per_node"])
    cuda = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    hidden, elem = cfg["hidden"], torch.empty((), dtype=dtype).element_size()
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    rows: list[Row] = []
    if rank == 0:
        print(f"# mixcc bench (dispatch + combine): mesh {bench.mesh_spec(mesh)}, world "
              f"{world}, {cfg['pg']} on {device_name}; dtype {cfg['dtype']}, hidden {hidden};"
              f" time: median of {cfg['repeats']} repeats of {cfg['iters']} eager calls, "
              "each the max over ranks\n" + bench.header(), flush=True)
    for prog in cfg["programs"]:
        d = mixcc_compile(prog, mesh, dtype=dtype)
        spec = d.spec
        group_text = "world" if parse(prog).ep.axes is None else "*".join(spec.axes)
        c = mixcc_compile(f"combine({group_text})", mesh, dtype=dtype)
        pgs = [dist.new_group(list(g)) for g in mesh.partition(spec.axes)]  # collective
        pg = next(p for p, g in zip(pgs, mesh.partition(spec.axes), strict=True)
                  if rank in g)
        n = spec.group_size
        size, sizes = cfg["min_rows"], []
        while size <= cfg["max_rows"]:
            if spec.max_tokens is None or size <= spec.max_tokens:
                sizes.append(size)
            size *= 2
        fns: dict[str, object] = {}
        skipped = {}
        for be in cfg["backends"]:
            try:
                if be == "a2a":
                    fns[be] = _a2a(pg, n, spec.experts)
                elif be == "symm_a2a":
                    fns[be] = _symm_a2a(pg, n, spec.experts, max(sizes or [1]) * spec.topk,
                                        hidden, dtype, dev)
            except Exception as e:  # noqa: BLE001 - a baseline torch cannot run here
                skipped[be] = f"{type(e).__name__}: {e}"
        if rank == 0:
            for be, why in skipped.items():
                print(f"skip: {be}: {why}", file=sys.stderr)
        for tokens in sizes:
            x, idx, w = routing(tokens, rank, tokens, hidden, spec.experts, spec.topk, dtype,
                                dev)
            slots = spec.slots(spec.max_tokens or tokens)
            eo = torch.zeros((spec.local_experts, slots, hidden), dtype=dtype, device=dev)

            def mixcc_step(x=x, idx=idx, w=w, eo=eo, d=d, c=c, fp8=spec.wire is not None
                           ) -> torch.Tensor:
                res = d(x, topk_idx=idx, topk_weights=w)
                return c(eo if fp8 else res[0], handle=res[-1])

            want = identity_expected(x, idx, w)  # the baselines send x as it is
            want_auto = want
            if spec.wire is not None:  # mixcc's identity experts return the dequantized rows
                from .expert import quantize_fp8

                q, s = quantize_fp8(x, spec.scale_block or hidden)
                deq = (q.float().view(tokens, -1, spec.scale_block or hidden)
                       * s.unsqueeze(-1)).view(tokens, hidden).to(dtype)
                want_auto = identity_expected(deq, idx, w)
            sent = int(((idx >= 0) & (_owner(idx, spec, mesh, rank) != rank)).sum())
            moved = bench._sum_over_ranks(2 * sent * hidden * elem, dev) / world
            for be in ["auto", *fns] if "auto" in cfg["backends"] else list(fns):
                if be == "auto":
                    fn = mixcc_step
                    if spec.wire is not None:  # check with dequantized expert outputs
                        res = d(x, topk_idx=idx, topk_weights=w)
                        deq_out = (res[0].float() * res[1].repeat_interleave(
                            spec.scale_block or hidden, dim=2)).to(dtype)
                        got = c(deq_out, handle=res[-1])
                    else:
                        got = fn()
                else:
                    def fn(f=fns[be], x=x, idx=idx, w=w) -> torch.Tensor:
                        return f(x, idx, w)

                    got = fn()
                errors = bench._sum_over_ranks(
                    bench.count_wrong(got, want_auto if be == "auto" else want), dev)
                times = bench._max_over_ranks(_times(fn, cfg["iters"], cfg["repeats"], cuda),
                                              dev)
                med = statistics.median(times) * 1e6
                nbytes = tokens * hidden * elem
                row = Row(prog, be, "oop", "eager" if cuda else "cpu", cfg["dtype"], world,
                          bench.mesh_spec(mesh), mesh.ranks_per_node, tokens, hidden, nbytes,
                          moved, med, min(times) * 1e6, max(times) * 1e6,
                          nbytes / med / 1e3 if med else 0.0, moved / med / 1e3 if med else 0.0,
                          errors, iters=cfg["iters"], repeats=cfg["repeats"],
                          device=device_name, setup=bench.setup_label(cuda, int(cuda), False))
                rows.append(row)
                if rank == 0:
                    print(bench.format_row(row), flush=True)
    return bench.add_ratios(rows)


def _owner(idx: torch.Tensor, spec, mesh: Mesh, rank: int) -> torch.Tensor:
    """The mesh rank holding each entry's expert (-1 entries: this rank)."""
    members = torch.tensor(mesh.group_members(rank, spec.axes), device=idx.device)
    own = members[(idx.clamp(min=0) // spec.local_experts).long()]
    return torch.where(idx >= 0, own, rank)
