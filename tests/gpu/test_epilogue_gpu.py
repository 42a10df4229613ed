"""Epilogues on GPUs (issue 15, item 5): programs ending in add / store / rmsnorm / quant
on the fused backend against the float64 oracle (tests/tasks.py check_epilogue): bf16,
fp16 and fp32; hidden 128, 4096, 7168 and 16384 (fused into the one-shot kernel), an odd
width and one past ops.EPI_MAX_HIDDEN (torch ops after the kernel); 1, 3 and 128 rows,
1024 rows at 4096; CUDA graph replay with new data. Two ranks on two GPUs (NCCL), four
and eight ranks on one GPU under MPS (one node, and two simulated nodes over NVSHMEM,
where the epilogue runs in the hierarchical kernel's step D from the local owners' fp32
shares).
With algorithm='two_shot' the epilogue runs in the two-shot's gather from the owners'
fp32 shares (a third of the cases, one node); with algorithm='ll' in the LL kernel's row
pass where a row fits a block's LL region (else the one-shot's), at every row count (a
third of the two-GPU cases, a ninth at four ranks); auto takes LL for small calls on two
ranks.
Each case also checks which path it took."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers.ranks import Placement

# two ranks on two GPUs (NCCL), and on one GPU under MPS (gloo), for the LL grids' tests
TWO_RANKS = [pytest.param(Placement(2, 2), id="w2-2gpu"),
             pytest.param(Placement(2, 1), id="w2-1gpu-mps")]

LAYER = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
QUANT = LAYER + "; quant(fp8_e4m3, scale)"
AR_AG = "allreduce(tp); allgather(dp); add(residual); rmsnorm(weight, eps=1e-5)"
HIDDEN_FUSED = (128, 4096, 7168, 16384)


def cases(programs: list[tuple[str, list]], rpn: int | None, algorithm: str = "auto"
          ) -> list[tuple]:
    """(program, axes, rpn, rows, hidden, dtype, graph, algorithm) of one run."""
    out = []
    for program, axes in programs:
        for dtype in ("bfloat16", "float16", "float32"):
            for hidden in (*HIDDEN_FUSED, 4100, 20000):
                for rows in (1, 3, 128):
                    out.append((program, axes, rpn, rows, hidden, dtype, rows == 3, algorithm))
        out.append((program, axes, rpn, 1024, 4096, "bfloat16", True, algorithm))
    return out


def fused_expected(coll, hidden: int, dtype: torch.dtype, algorithm: str) -> bool:
    """Whether the kernel runs this epilogue: a plan it can fuse into, rows of at most
    EPI_MAX_HIDDEN elements in whole 16-byte packs, whose input units' rows (and, in the
    two-shot and the hierarchical kernel, the result slots' fp32 rows) fit one block's
    regions of the default workspaces."""
    from mixcc import fused, ops
    from mixcc.codegen import layout
    from mixcc.codegen.plan import HierStage, hier_cols

    elem = torch.empty((), dtype=dtype).element_size()
    region = layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES)
    last = coll.plan.stages[-1]
    if isinstance(last, HierStage):
        sym = layout.sym_region_bytes(layout.DEFAULT_SYMMETRIC_BYTES)
        fits = hidden <= hier_cols(last, elem, region, sym, 4)
    else:
        per_col = elem * last.lmap.in_units
        if algorithm == "two_shot":
            per_col += 4 * (last.units_per_region(True) - last.lmap.in_units)
        fits = hidden * per_col <= region
    return (fused.epilogue_refusal(coll.plan, coll.ir.epilogue) is None
            and hidden <= ops.EPI_MAX_HIDDEN and hidden * elem % 16 == 0 and fits)


def epilogue_task(rank: int, world: int, case_list: list[tuple]) -> None:
    import torch.distributed as dist

    import mixcc

    from tasks import DTYPES, check_epilogue

    bad = []
    for i, (program, axes, rpn, rows, hidden, dtype_name, graph, algorithm) in \
            enumerate(case_list):
        if rank == 0:  # progress: a hung case is the last one printed (pytest -s)
            print(f"epilogue case {i + 1}/{len(case_list)}: {program} {axes} rpn {rpn} rows "
                  f"{rows} hidden {hidden} {dtype_name} {algorithm}", flush=True)
        mesh = mixcc.Mesh(axes, ranks_per_node=rpn)
        probe = mixcc.compile(program, mesh, dtype=DTYPES[dtype_name], backend="fused",
                              algorithm=algorithm)
        x = torch.zeros(rows * probe.ir.granularity, hidden, dtype=DTYPES[dtype_name],
                        device="cuda")
        runner = probe._fused_runner(x)
        kinds = {n: torch.empty(0, dtype=torch.float32 if n == "scale" else x.dtype)
                 for n in ("residual", "weight", "scale")}
        took = bool(runner.epilogue_hidden(probe.output_shape(x.shape), kinds))
        if took != fused_expected(probe, hidden, DTYPES[dtype_name], algorithm):
            bad.append(f"{program} {dtype_name} hidden {hidden} {algorithm}: fused={took}")
        msg = check_epilogue(rank, world, dist.group.WORLD, program, axes, rpn or world,
                             rows * probe.ir.granularity, hidden, dtype_name, 100 + i,
                             backend="fused", graph=graph, algorithm=algorithm)
        if msg:
            bad.append(f"{program} {axes} rows {rows} hidden {hidden} {dtype_name} "
                       f"{algorithm}: {msg}")
    assert not bad, f"rank {rank}: {len(bad)} of {len(case_list)} cases failed:\n" + \
        "\n".join(bad[:20])


def test_two_gpus(spawn_ranks) -> None:
    p = Placement(2, 2)
    programs = [(LAYER, [("dp", 1), ("tp", 2)]), (QUANT, [("dp", 1), ("tp", 2)]),
                (AR_AG, [("dp", 2), ("tp", 1)])]
    spawn_ranks(epilogue_task, 2,
                cases(programs, None) + cases(programs, None, "two_shot")[::3]
                + cases(programs, None, "ll")[1::3], gpus=p.gpus)


def test_two_gpus_as_two_nodes(spawn_ranks) -> None:
    """The hierarchical kernel's step D, one rank per GPU and node (NVSHMEM between them)."""
    programs = [(LAYER, [("dp", 1), ("tp", 2)]), (AR_AG, [("dp", 2), ("tp", 1)])]
    spawn_ranks(epilogue_task, 2, cases(programs, 1)[::3], gpus=2, nvshmem=True)


# the programs at world 8 (test_eight_ranks_one_gpu_mps; scripts/prebuild_gpu_tests.py)
WORLD8 = [(LAYER, [("dp", 2), ("tp", 4)]), (AR_AG, [("dp", 2), ("tp", 4)]),
          (QUANT, [("dp", 1), ("tp", 8)])]


@pytest.mark.parametrize("rpn", [8, 4], ids=["one-node", "two-nodes"])
def test_eight_ranks_one_gpu_mps(spawn_ranks, rpn: int) -> None:
    """World 8 (the issue's worlds 2-8): eight ranks on one GPU under MPS, every seventh
    case (7 is coprime with the 3 row counts and 6 widths, so each appears); at two
    nodes of four AR_AG and QUANT cross nodes, LAYER (tp=4) stays inside one."""
    spawn_ranks(epilogue_task, 8, cases(WORLD8, rpn)[::7], gpus=1, nvshmem=rpn < 8)


@pytest.mark.parametrize("rpn", [4, 2], ids=["one-node", "two-nodes"])
def test_four_ranks_one_gpu_mps(spawn_ranks, rpn: int) -> None:
    # at two nodes: LAYER on dp=2,tp=2 stays inside a node, AR_AG and QUANT cross nodes
    programs = [(LAYER, [("dp", 2), ("tp", 2)]), (AR_AG, [("dp", 2), ("tp", 2)]),
                (QUANT, [("dp", 1), ("tp", 4)])]
    todo = cases(programs, rpn)[::3]
    if rpn == 4:
        todo += cases(programs, rpn, "two_shot")[1::3] + cases(programs, rpn, "ll")[2::9]
    spawn_ranks(epilogue_task, 4, todo, gpus=1, nvshmem=rpn < 4)


def ll_grid(case: tuple) -> tuple[str, int, int, int, int, int]:
    """(algorithm, columns, chunks, blocks, roles, split) of an epilogue case's first
    launch as this rank's runner plans it; split: the blocks a row of 16 KiB takes."""
    import mixcc
    from mixcc.fused import ALGORITHMS

    from tasks import DTYPES

    program, axes, _, rows, hidden, dtype_name, _, algorithm = case
    coll = mixcc.compile(program, mixcc.Mesh(axes), dtype=DTYPES[dtype_name],
                         backend="fused", algorithm=algorithm)
    x = torch.zeros(rows, hidden, dtype=DTYPES[dtype_name], device="cuda")
    algo, cols, chunks, blocks, roles = coll._fused_runner(x)._params(
        0, rows * hidden, x.nbytes, hidden)
    split = 2 if hidden * x.element_size() >= 16 << 10 else 1
    return ALGORITHMS[algo], cols, chunks, blocks, roles, split


def split_task(rank: int, world: int, case_list: list[tuple]) -> None:
    """epilogue_task, and the LL grid of each case splits its rows of 16 KiB over two
    blocks (plan.ll_row_split), smaller rows not."""
    for case in case_list:
        rows, hidden = case[3], case[4]
        algo, cols, chunks, blocks, roles, split = ll_grid(case)
        assert (algo, chunks, blocks, roles) == ("ll", 1, rows * split, 1) \
            and (split == 1 or cols == hidden // split), (rank, hidden, rows, cols, blocks)
    epilogue_task(rank, world, case_list)


@pytest.mark.parametrize("p", TWO_RANKS)
def test_two_ranks_split_rows(spawn_ranks, p: Placement) -> None:
    """LL's row pass with rows split over two blocks (the sums of squares through the
    rank's workspace): 8192-wide bf16 / fp16 and 4096-wide fp32 rows, 1, 3 and 16 of them,
    graph replay at 3, and 4096-wide bf16 rows (whole); out of place, as auto runs them
    at these sizes."""
    shapes = [(8192, "bfloat16"), (8192, "float16"), (4096, "float32"), (4096, "bfloat16")]
    todo = [(prog, [("dp", 1), ("tp", 2)], None, rows, hidden, dtype, rows == 3, "auto")
            for prog in (LAYER, QUANT) for hidden, dtype in shapes for rows in (1, 3, 16)]
    spawn_ranks(split_task, 2, todo, gpus=p.gpus)


def roles_task(rank: int, world: int, case_list: list[tuple]) -> None:
    """epilogue_task, and each case's LL grid holds every output unit on blocks of its own
    (plan.ll_roles: two per row on dp=2,tp=1), rows of 16 KiB split over two blocks each
    (plan.ll_row_split: four per row)."""
    for case in case_list:
        rows, hidden = case[3], case[4]
        algo, cols, chunks, blocks, roles, split = ll_grid(case)
        assert (algo, chunks, blocks, roles, cols) == \
            ("ll", 1, 2 * split * rows, 2, hidden // split), \
            (rank, hidden, rows, algo, chunks, blocks, roles, cols)
    epilogue_task(rank, world, case_list)


@pytest.mark.parametrize("p", TWO_RANKS)
def test_two_ranks_output_units_on_blocks(spawn_ranks, p: Placement) -> None:
    """LL's row pass with each output unit on blocks of its own (allreduce + allgather on
    dp=2,tp=1: one block sends this rank's rows and normalises them, another normalises
    the peer's as they arrive): 4096- and 8192-wide bf16, 8192 fp16 and 4096 fp32 rows, 1,
    3 and 16 of them, graph replay at 3; as auto runs them at these sizes (rows of 16 KiB
    over two blocks per unit, their sums of squares exchanged)."""
    shapes = [(4096, "bfloat16"), (8192, "bfloat16"), (8192, "float16"), (4096, "float32")]
    todo = [(AR_AG, [("dp", 2), ("tp", 1)], None, rows, hidden, dtype, rows == 3, "auto")
            for hidden, dtype in shapes for rows in (1, 3, 16)]
    spawn_ranks(roles_task, 2, todo, gpus=p.gpus)


STORE_AG = "allgather(dp); add(residual); store(residual); rmsnorm(weight)"


def mixed_paths_task(rank: int, world: int, cfg: dict) -> None:
    """Rank 0's stored residual is a strided view (the kernel writes an aligned copy, copied
    back after the call), rank 1's an ordinary tensor: both run the statements in the
    kernel on the grid with output units on blocks of their own. Each rank's output and
    stored residual against a float64 oracle."""
    import torch.distributed as dist

    import mixcc

    rows, hidden, dtype = cfg["rows"], cfg["hidden"], torch.bfloat16
    coll = mixcc.compile(STORE_AG, mixcc.Mesh({"dp": 2, "tp": 1}), dtype=dtype,
                         backend="fused")
    g = torch.Generator().manual_seed(7 + rank)
    xs = torch.randn(rows, hidden, generator=g).to(dtype)
    rs = (torch.randn(2 * rows, hidden, generator=g) * 0.5).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    allx = [torch.empty_like(xs) for _ in range(world)]
    dist.all_gather(allx, xs)  # CPU tensors: gloo, on either placement
    gathered = torch.cat(allx)
    x = xs.cuda()
    runner = coll._fused_runner(x)
    _, _, chunks, blocks, roles = runner._params(0, rows * hidden, x.nbytes, hidden)
    split = 2 if hidden * x.element_size() >= 16 << 10 else 1  # plan.ll_row_split
    assert (chunks, blocks, roles) == (1, 2 * split * rows, 2), (chunks, blocks, roles)
    if rank == 0:
        r = torch.empty(hidden, 2 * rows, dtype=dtype, device="cuda").t()
        r.copy_(rs.cuda())
    else:
        r = rs.cuda()
    out = coll(x, residual=r, weight=w.cuda())
    torch.cuda.synchronize()
    v = gathered.double() + rs.double()
    want = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-6) * w.double()
    assert torch.equal(r.cpu(), v.to(dtype)), f"rank {rank}: residual differs"
    err = (out.cpu().double() - want).abs().max().item()
    assert err <= 2 ** -7 * want.abs().max().item(), f"rank {rank}: output off by {err}"


@pytest.mark.parametrize("p", TWO_RANKS)
def test_two_ranks_output_units_on_blocks_mixed_paths(spawn_ranks, p: Placement) -> None:
    """A stored tensor through a copy against one in place, on one grid: rows of 4096
    whole, and of 8192 split over two blocks per output unit."""
    for rows, hidden in ((1, 4096), (3, 4096), (1, 8192), (3, 8192)):
        spawn_ranks(mixed_paths_task, 2, {"rows": rows, "hidden": hidden}, gpus=p.gpus)
