"""Rank-pool tasks of tests/test_thresholds.py (module level: the pool pickles them)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist


def agree_on_different_facts(rank: int, world: int, group, facts: list, user_rank: int,
                             user_body: dict) -> str:
    """Every rank passes its own fake facts (facts[rank]); rank `user_rank` alone has a user
    table for the key rank 0 derives. All ranks must end with rank 0's resolution: the key
    from every rank's facts, rank 0's tables."""
    from mixcc.tuning import thresholds

    with tempfile.TemporaryDirectory() as d:
        user = Path(d)
        if rank == user_rank:
            (user / f"{thresholds.classify([thresholds.RankFacts(**f) for f in facts])}.json"
             ).write_text(json.dumps(user_body))
        got = thresholds.agree(group, thresholds.RankFacts(**facts[rank]), user=user)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, (str(got.key), asdict(got.values), got.source),
                               group=group)
    key = thresholds.classify([thresholds.RankFacts(**f) for f in facts])
    if len(set(map(repr, everyone))) != 1:
        return f"rank {rank}: ranks disagree: {everyone}"
    if everyone[0][0] != str(key):
        return f"rank {rank}: key {everyone[0][0]}, expected {key}"
    if user_rank == 0 and "tuned defaults" not in everyone[0][2]:
        return f"rank {rank}: rank 0's own table not used: {everyone[0][2]}"
    if user_rank != 0 and "tuned defaults" in everyone[0][2]:
        return f"rank {rank}: another rank's table leaked in: {everyone[0][2]}"
    return ""
