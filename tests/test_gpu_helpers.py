"""The GPU suite's helpers on CPU: placements and their skips, the ladder's case lists
(seeded, valid for their meshes) and the negative control's broken tables."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))

from gpu_helpers import ladder, ranks  # noqa: E402


def test_placement():
    p = ranks.Placement(4, 1)
    assert (p.per_gpu, p.shared, p.pg_backend, p.nccl, str(p)) == (4, True, "gloo", False,
                                                                   "w4-1gpu-mps")
    q = ranks.Placement(2, 2)
    assert (q.per_gpu, q.shared, q.pg_backend, q.nccl) == (1, False, "cpu:gloo,cuda:nccl", True)
    assert ranks.Placement(3, 2).per_gpu == 2
    with pytest.raises(ValueError, match="NCCL cannot"):
        ranks.skip_reason(ranks.Placement(4, 2, "nccl"))


def test_skip_without_gpus(monkeypatch):
    monkeypatch.setattr(ranks, "gpu_count", lambda: 1)
    assert ranks.skip_reason(ranks.Placement(2, 2)) == "needs 2 GPU(s), this machine has 1"
    with pytest.raises(pytest.skip.Exception, match="needs 2 GPU"):
        ranks.require(ranks.Placement(4, 2))


def test_env_int(monkeypatch):
    monkeypatch.setenv("MIXCC_FUZZ", "1e4")
    assert ranks.env_int("MIXCC_FUZZ", 40) == 10000
    monkeypatch.setenv("MIXCC_FUZZ", "")
    assert ranks.env_int("MIXCC_FUZZ", 40) == 40


def test_one_node_cases_are_seeded_and_fit_their_meshes():
    cfg = {**ladder.DEFAULTS, "shapes": 30, "fuzz_programs": 2}
    cases = ladder.one_node_cases(4, cfg)
    assert cases == ladder.one_node_cases(4, cfg)  # every rank builds the same list
    assert cases != ladder.one_node_cases(4, {**cfg, "seed": 2})
    assert {c[5] for c in cases} == {"auto", "one_shot", "two_shot", "push", "ll"}
    assert {c[2] for c in cases} == set(ladder.DTYPES)
    for prog, axes, _, rows, _, _, _ in cases:
        assert rows % ladder.granularity(prog, axes) == 0, (prog, axes, rows)
    fuzz_only = ladder.one_node_cases(4, {**cfg, "presets": False, "big": False})
    assert len(fuzz_only) == 2 * 9 + 30


def test_hier_cases_cross_nodes():
    cfg = {**ladder.DEFAULTS, "node_shapes": 10}
    cases = ladder.hier_cases(4, [2], cfg)
    assert len(cases) > 10 and {c[2] for c in cases} == {2}
    for prog, axes, rpn, *_ in cases[::7]:
        assert not ladder.reference(prog, axes, rpn).plan.one_node, (prog, axes)


def test_mutate_breaks_the_rendered_tables(monkeypatch):
    from mixcc.codegen import render
    from mixcc.fused import render_stage

    for name in ("schedule_table", "hier_table", "push_table"):
        monkeypatch.setattr(render, name, getattr(render, name))  # restored after the test
    stages = {}
    for prog, axes, rpn in (("allreduce(tp)", [("dp", 1), ("tp", 4)], 4),
                            ("allreduce(world)", [("w", 4)], 2)):
        stages[prog] = ladder.reference(prog, axes, rpn).plan.stages[0]
    before = {p: render_stage(st, torch.bfloat16) for p, st in stages.items()}
    ladder.mutate_tables()
    after = {p: render_stage(st, torch.bfloat16) for p, st in stages.items()}
    for p in stages:
        assert before[p] != after[p], f"the negative control left {p} unchanged"
