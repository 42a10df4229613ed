"""dispatch / combine on GPUs (docs/DESIGN.md, "Expert parallelism"): the reference backend
on NCCL with one rank per GPU (2, 4 and 8 GPUs where there are that many) against the
float64 oracle (tests/oracle_ep.py through tests/tasks_ep.py check_ep): top-8 of 64 and
256 experts, hidden 7168 and 4096, 1 to 512 tokens per rank with T below max_tokens,
random, skewed and one-expert routing, bf16 and fp8 wires (a scale per token and per
128 elements), and at four ranks a group written as both axes of a 2x2 mesh in reverse.
Ranks sharing one GPU (MPS, gloo) cannot run the reference backend on CUDA tensors (NCCL
takes one rank per GPU) and the fused kernels are not built: there a call must refuse
cleanly on every rank, and so must a call inside a CUDA graph capture."""

from __future__ import annotations

import pytest


def cases(world: int) -> list[tuple]:
    """check_ep's arguments after (rank, world, pg): (mesh axes, group axes, experts, topk,
    max_tokens, capacity, fp8 block, dtype, seeds, mode, tokens per call and rank,
    hidden)."""
    ep = [("ep", world)]
    out = [
        (ep, ["ep"], 64, 8, 128, None, None, "bfloat16", [1, 2], "random",
         [[128] * world, [1 + r for r in range(world)]], 7168),
        (ep, ["ep"], 256, 8, 512, None, None, "bfloat16", [3, 4], "skewed",
         [[512] * world, [0] + [300] * (world - 1)], 4096),
        (ep, None, 64, 8, None, None, 0, "bfloat16", [5, 6], "random",
         [[64] * world, [64] * world], 7168),
        (ep, ["ep"], 64, 8, 32, 8 * world * 4, 128, "bfloat16", [7, 8], "random",
         [[32] * world, [17] * world], 7168),
        (ep, ["ep"], 64, 2, 16, None, None, "float32", [9, 10], "one",
         [[16] * world, [3] * world], 4096),
    ]
    if world == 4:
        mesh = [("a", 2), ("b", 2)]
        out.append((mesh, ["b", "a"], 64, 8, 128, None, None, "bfloat16", [11, 12],
                    "skewed", [[128, 64, 0, 128], [5, 128, 128, 1]], 4096))
    return out


def ep_task(rank: int, world: int, case_list: list[tuple]) -> None:
    from tasks_ep import check_ep

    bad = []
    for i, case in enumerate(case_list):
        if rank == 0:  # progress: a hung case is the last one printed (pytest -s)
            print(f"dispatch case {i + 1}/{len(case_list)}: {case[:8]}", flush=True)
        msg = check_ep(rank, world, None, *case, device="cuda")
        if msg:
            bad.append(f"case {i} {case[:8]}: {msg}")
    assert not bad, f"rank {rank}: {len(bad)} of {len(case_list)} cases failed:\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_reference_nccl(spawn_ranks, world: int) -> None:
    spawn_ranks(ep_task, world, cases(world), gpus=world)


def refusal_task(rank: int, world: int, nccl: bool) -> None:
    """Inside a CUDA graph capture a dispatch refuses before it touches the group; on a
    gloo group (ranks sharing a GPU) CUDA tensors are refused on every rank together (on
    NCCL the same call runs, its counts and rows equal to the oracle's), and
    backend='fused' at compile time."""
    import torch
    from oracle_ep import expected_dispatch, make_case

    import mixcc

    mesh = mixcc.Mesh({"ep": world})
    d = mixcc.compile("dispatch(ep, experts=8, topk=2, max_tokens=4)", mesh,
                      dtype=torch.bfloat16)
    inputs = [make_case(31, r, "random", 4, 256, 8, 2, torch.bfloat16) for r in range(world)]
    x, idx, w = (t.cuda() for t in inputs[rank])
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(g):
            d(x, topk_idx=idx, topk_weights=w)
    if not nccl:
        with pytest.raises(ValueError, match="no NCCL backend"):
            d(x, topk_idx=idx, topk_weights=w)
    else:
        recv_x, recv_count, h = d(x, topk_idx=idx, topk_weights=w)
        counts, rows = expected_dispatch(inputs, 8, rank)
        assert recv_x.is_cuda and recv_count.cpu().tolist() == counts, \
            (recv_count.tolist(), counts)
        for j, c in enumerate(counts):
            assert torch.equal(recv_x[j, :c].cpu(), rows[j]), j
    with pytest.raises(ValueError, match="fused dispatch/combine kernels are not built"):
        mixcc.compile("combine(ep)", mesh, backend="fused")


def test_refusals_two_gpus(spawn_ranks) -> None:
    spawn_ranks(refusal_task, 2, True, gpus=2)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_refusals_one_gpu_mps(spawn_ranks, world: int) -> None:
    spawn_ranks(refusal_task, world, False, gpus=1)
