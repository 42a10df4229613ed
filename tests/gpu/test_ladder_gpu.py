"""The correctness ladder on GPUs (docs/DESIGN.md section 7): the fused backend against
the float64 oracle and, where each rank has its own GPU, the NCCL reference backend;
cross-node programs on simulated nodes (NVSHMEM); CUDA graph replay; the timeout case;
the fuzz; and the `mutate` negative control, which must be caught.

Placements: two ranks on two GPUs (NCCL), four ranks sharing one GPU under MPS (gloo).
MIXCC_FUZZ random shapes per world (default 40; the issue's 10,000-case run:
MIXCC_FUZZ=5000 on each placement), MIXCC_FUZZ_PROGRAMS random programs (default 1),
MIXCC_SEED (default 1)."""

from __future__ import annotations

import json

import pytest
from gpu_helpers import ladder
from gpu_helpers.ranks import Placement, env_int

TWO_GPUS = Placement(2, 2)
ONE_GPU_MPS = Placement(4, 1)
PLACEMENTS = [pytest.param(TWO_GPUS, id=str(TWO_GPUS)),
              pytest.param(ONE_GPU_MPS, id=str(ONE_GPU_MPS))]


def run_ladder(spawn_ranks, tmp_path, p: Placement, nvshmem: bool = False, **cfg) -> dict:
    """Run a ladder on `p`; returns passed, failed, categories, msgs, cases."""
    path = tmp_path / "summary.json"
    cfg = {"seed": env_int("MIXCC_SEED", 1), "fuzz_programs": env_int("MIXCC_FUZZ_PROGRAMS", 1),
           "nccl": p.nccl, **cfg, "summary": str(path)}
    spawn_ranks(ladder.ladder_task, p.world, cfg, gpus=p.gpus, backend=p.backend,
                nvshmem=nvshmem)
    summaries = json.loads(path.read_text())
    passed, failed, cats, msgs = ladder.totals(summaries)
    print(f"{p}: {summaries[0]['cases']} cases, {passed} checks passed, {failed} failed; "
          + ", ".join(f"{c} {ok}/{ok + bad}" for c, (ok, bad) in sorted(cats.items())))
    return {"passed": passed, "failed": failed, "cats": cats, "msgs": msgs,
            "cases": summaries[0]["cases"]}


def assert_clean(r: dict, *categories: str) -> None:
    assert r["failed"] == 0, "\n".join(r["msgs"][:20])
    assert r["passed"] > 0
    for c in categories:
        assert r["cats"].get(c, [0])[0] > 0, f"no {c!r} check ran: {sorted(r['cats'])}"


@pytest.mark.parametrize("p", PLACEMENTS)
def test_ladder_one_node(spawn_ranks, tmp_path, p: Placement):
    """Presets on every mesh, a fuzzed program, 3 dtypes, rows 1 / odd / many chunks,
    every algorithm, oop / out= / in place, replicas bitwise (and NCCL on two GPUs)."""
    r = run_ladder(spawn_ranks, tmp_path, p)
    assert_clean(r, "oop", "out=", "in place", "replicas bitwise")
    if p.nccl:
        assert_clean(r, "fused vs nccl", "nccl reference, one node")


@pytest.mark.parametrize("p", PLACEMENTS)
def test_graph_replay_and_timeout(spawn_ranks, tmp_path, p: Placement):
    """CUDA graph replay with new data, eager calls after it; a skipped call times out."""
    r = run_ladder(spawn_ranks, tmp_path, p, presets=False, fuzz_programs=0, big=False,
                   graph=True, timeout=True)
    assert_clean(r, "graph replay", "eager after graph")
    assert r["cats"]["timeout raised"] == [p.world - 1, 0], r["cats"]


NODES = [pytest.param(Placement(2, 2), [1], id="w2-2gpu-rpn1"),   # the two GPUs as two nodes
         pytest.param(Placement(4, 1), [2], id="w4-1gpu-mps-rpn2"),
         pytest.param(Placement(4, 2), [2], id="w4-2gpu-mps-rpn2")]


@pytest.mark.parametrize("p,rpns", NODES)
def test_cross_node(spawn_ranks, tmp_path, p: Placement, rpns: list[int]):
    """Hierarchical (IPC + NVSHMEM) programs on simulated nodes against the oracle (and
    the NCCL reference on simulated nodes), graph replay, the cross-node timeout."""
    r = run_ladder(spawn_ranks, tmp_path, p, nvshmem=True, one_node=False, nodes=rpns,
                   graph=True, timeout=True, node_shapes=env_int("MIXCC_FUZZ", 40) // 4)
    assert_clean(r, "hier oop", "hier out=", "hier graph replay")


@pytest.mark.parametrize("p", PLACEMENTS)
def test_fuzz(spawn_ranks, tmp_path, p: Placement):
    """MIXCC_FUZZ random (program, mesh, dtype, rows, hidden, algorithm) cases."""
    n = env_int("MIXCC_FUZZ", 40)
    r = run_ladder(spawn_ranks, tmp_path, p, presets=False, big=False, shapes=n)
    assert_clean(r, "oop")
    assert r["cases"] >= n


@pytest.mark.parametrize("p", PLACEMENTS)
def test_mutate_is_caught(spawn_ranks, tmp_path, p: Placement):
    """Negative control: tables that drop a reduction term must fail the ladder."""
    r = run_ladder(spawn_ranks, tmp_path, p, big=False, mutate=True)
    assert r["failed"] > 0, "the broken kernel tables passed the ladder"
    assert r["cats"].get("oop", [0, 0])[1] > 0, r["cats"]
