"""auto's thresholds on real GPUs (mixcc/tuning/thresholds.py): every rank's runner holds
the same resolved table, keyed by this machine's arch, topology and world size; two GPUs
over NVLink (or joined through an NVSwitch) and one GPU shared by its ranks resolve to the
shipped tables of their setups when they are Hopper GPUs."""

from __future__ import annotations

import torch


def thresholds_task(rank: int, world: int, shared: bool) -> None:
    from dataclasses import asdict

    import torch.distributed as dist

    import mixcc
    from mixcc.tuning import thresholds

    dev = torch.device("cuda", torch.cuda.current_device())
    coll = mixcc.compile("allreduce(world)", mixcc.Mesh({"w": world}), dtype=torch.bfloat16)
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(rank)).to(dev,
                                                                            torch.bfloat16)
    coll(x)
    got = coll._fused[torch.bfloat16].thresholds
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (str(got.key), asdict(got.values), got.source))
    assert len(set(map(repr, everyone))) == 1, everyone
    major, minor = torch.cuda.get_device_capability()
    key = got.key
    assert key.arch == f"sm_{major}{minor}" and key.world == world
    assert key.topology == ("mps" if shared else key.topology)
    if key.arch == "sm_90" and key.topology in ("nvlink", "mps") and world in (2, 4, 8):
        want = thresholds.shipped(key)
        if "tuned defaults" not in got.source:
            assert got.values == want and got.source == f"shipped default {key}"


def test_two_gpus_agree_on_their_table(spawn_ranks):
    spawn_ranks(thresholds_task, 2, False)


def test_ranks_sharing_one_gpu_agree_on_their_table(spawn_ranks):
    spawn_ranks(thresholds_task, 2, True, gpus=1)
