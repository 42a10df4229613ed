"""Debug fingerprints and the tuning table, on CPU: what the kernels compare and what
`auto` reads must decode and round-trip exactly."""

import json
import random

import pytest
import torch

from mixcc import debug, tune
from mixcc.errors import CollectiveMismatch


def test_fingerprint_fields_and_description():
    debug.register("allreduce(tp)", 1)
    debug.register("allreduce(tp); allgather(dp)", 2)
    rng = random.Random()
    count = rng.randrange(1, 10_000)
    shape = (rng.randrange(1, 512), rng.randrange(1, 4096))
    a = debug.fingerprint("allreduce(tp)", 0, torch.bfloat16, shape, count)
    b = debug.fingerprint("allreduce(tp); allgather(dp)", 1, torch.bfloat16, shape, count)
    assert a and b and a != b and a & 0xFF == count & 0xFF
    mine = debug.describe(a)
    assert "'allreduce(tp)'" in mine and "bfloat16" in mine and str(shape) in mine
    theirs = debug.describe(b, a)
    assert "allgather(dp)" in theirs and "stage 2 of 2" in theirs and "the same shape" in theirs
    other_shape = (shape[0] + 1, shape[1])
    c = debug.fingerprint("allreduce(tp)", 0, torch.float32, other_shape, count + 1)
    text = debug.describe(c, a)
    assert "float32" in text and str(other_shape) in text
    unknown = next(c for c in range(256) if c not in debug._STAGES)
    assert "never compiled" in debug.describe(unknown << 24 | 1, a)
    err = CollectiveMismatch(0, 1, mine, theirs)
    assert "rank 0 called 'allreduce(tp)'" in str(err) and "rank 1 called" in str(err)


def test_fingerprint_is_never_zero_and_env_switch(monkeypatch):
    for count in range(512):
        assert debug.fingerprint("x", 0, torch.float16, (1,), count) != 0
    monkeypatch.setenv(debug.ENV, "1")
    assert debug.enabled(None) and not debug.enabled(False)
    monkeypatch.setenv(debug.ENV, "0")
    assert not debug.enabled(None) and debug.enabled(True)


def test_bucket_is_ceil_log2():
    assert [tune.bucket(n) for n in (1, 2, 3, 4, 5, 1 << 20, (1 << 20) + 1)] == \
        [0, 1, 2, 2, 3, 20, 21]


def test_table_round_trip_merge_and_damage(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    monkeypatch.setenv(tune.ENV, str(path))
    k1 = tune.key("abc", "bfloat16", 4, "sm_90a", 3 << 20)
    k2 = tune.key("abc", "bfloat16", 4, "sm_90a", 100)
    tune.save({k1: tune.Choice("one_shot", 16, 0, 12.5)})
    tune.save({k2: tune.Choice("two_shot", 8, 2048, 3.0)})
    got = tune.load()
    assert got == {k1: tune.Choice("one_shot", 16, 0, 12.5),
                   k2: tune.Choice("two_shot", 8, 2048, 3.0)}
    other = tune.stage_prefix("abd", "bfloat16", 4, "sm_90a")
    mine = tune.stage_prefix("abc", "bfloat16", 4, "sm_90a")
    # keyed by (stage index, bucket): stage 1 here is the tuned one
    assert tune.shared(None, [other, mine]) == {
        (1, tune.bucket(3 << 20)): tune.Choice("one_shot", 16, 0, 12.5),
        (1, tune.bucket(100)): tune.Choice("two_shot", 8, 2048, 3.0)}
    assert tune.shared(None, [other]) == {}
    for damaged in ("{not json", "[]", json.dumps({"version": 1, "entries": []}),
                    json.dumps({"version": 1, "entries": {"k": {"algorithm": 1}}})):
        path.write_text(damaged)
        with pytest.warns(RuntimeWarning, match="ignoring the tuning table"):
            assert tune.load() == {}
    path.write_text(json.dumps({"version": 99, "entries": {}}))
    with pytest.warns(RuntimeWarning, match="version"):
        assert tune.load() == {}
    monkeypatch.setenv(tune.ENV, "off")
    assert tune.table_path() is None and tune.load() == {}


def test_tune_candidates_and_stage_bytes():
    from types import SimpleNamespace

    import mixcc
    from mixcc import tuning
    from mixcc.fused import shares_reduction

    coll = mixcc.compile("allreduce(tp); allgather(dp)", mixcc.Mesh({"dp": 2, "tp": 4}),
                         backend="reference")
    stages = [(st, None) for st in coll.plan.stages]
    r = SimpleNamespace(stages=stages, _shares_reduction=[shares_reduction(s) for s, _ in stages],
                        _ll_safe=[True], max_blocks=12, elem=2, _nccl=False)
    cands = tuning.candidates(r)
    assert {c.algorithm for c in cands} == {"one_shot", "two_shot", "push", "ll"}
    assert {c.chunk_cols for c in cands if c.algorithm == "ll"} == {0}  # its area's chunk
    r._ll_safe = [False]  # a stage LL cannot run: not a candidate
    assert {c.algorithm for c in tuning.candidates(r)} == {"one_shot", "two_shot", "push"}
    assert {c.blocks for c in cands} == {4, 8, 12}  # up to the block cap, which is included
    assert {c.chunk_cols for c in cands} == set(tuning.CHUNK_CANDIDATES)
    assert tuning.stage_input_bytes(r, 64, 1024) == [64 * 1024 * 2]
    # on an NCCL group the reference backend (one NCCL call per step) is a candidate too
    r._nccl, r.max_blocks = True, 128
    cands = tuning.candidates(r)
    assert [c for c in cands if c.algorithm == "nccl"] == [tune.Choice("nccl", 0)]
    assert max(c.blocks for c in cands) == 128


def test_tune_final_round_times_near_ties_again():
    from mixcc import tuning

    c = [tune.Choice("one_shot", b) for b in (16, 32, 64, 128)] + [tune.Choice("nccl", 0)]
    first = [(10.0e-6, c[0]), (9.6e-6, c[2]), (9.9e-6, c[3]), (30e-6, c[1]), (10.4e-6, c[4])]
    final = tuning.finalists(first)  # within FINAL_WITHIN of 9.6, fastest first, capped
    assert final == [c[2], c[3], c[0], c[4]][:tuning.FINAL_MAX]
    assert c[1] not in final
    assert tuning.finalists([(5e-6, c[1])]) == [c[1]]
    # the lowest median over the rounds wins, not the first round's luck
    rounds = [[9.9e-6, 9.4e-6, 10.1e-6], [9.8e-6, 9.5e-6, 10.0e-6], [12e-6, 9.3e-6, 9.9e-6]]
    assert tuning.final_choice(rounds, final[:3]) == (9.4e-6, c[3])
    assert tuning.final_choice([[1.0, 1.0]], [c[2], c[3]]) == (1.0, c[2])  # tie: earlier


def test_tune_cli_without_gpu_is_one_line_error(capsys):
    from mixcc.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["tune", "--mesh", "dp=2,tp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixcc: error: mixcc tune measures fused kernels: it needs a CUDA GPU"]


def test_tune_emit_defaults_wants_a_directory(tmp_path, capsys):
    from mixcc.cli import main

    f = tmp_path / "table.json"
    f.write_text("{}")
    assert main(["tune", "--emit-defaults", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mixcc: error: --emit-defaults {str(f)!r} must be a directory (it writes "
                   "DIR/<arch>-<topology>-w<world>.json)"]
