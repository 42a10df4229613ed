"""auto's thresholds as data (mixcc/tuning/thresholds.py), on CPU: the tables' schema, the
lookup order (the user's table, the shipped one, the built-in rule), keys without a table,
rank agreement over a gloo group, `mixcc tune --emit-defaults`'s derivation, and auto's
choices on the measured setups against the rule it followed before the tables (copied
below as plain numbers)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import mixcc
from mixcc import tune
from mixcc.codegen import layout
from mixcc.codegen.plan import ce_safe, ll_auto, ll_cols, push_auto, push_width
from mixcc.fused import ALGO_CE, ALGORITHMS, FusedRunner, hier_nccl_min_bytes, shares_reduction
from mixcc.tuning import emit, thresholds
from mixcc.tuning.thresholds import BUILTIN, Key, RankFacts, Thresholds

KIB, MIB = 1 << 10, 1 << 20
# What auto used before the tables, on every setup (plain numbers, not read from the code).
OLD = {"LL_MAX_BYTES": 256 * KIB, "LL_EPI_MAX_BYTES": 256 * KIB, "PUSH_MIN_BYTES": 32 * MIB,
       "POOL_PUSH_MIN_BYTES": 128 * MIB, "ONE_SHOT_MAX_BYTES_WIDE": 1 * MIB,
       "HIER_NCCL_MIN_BYTES": 16 * MIB, "HIER_STAGED_NCCL_MIN_BYTES": 4 * MIB,
       "REG_MIN_BYTES": 16 * MIB, "CE_MIN_BYTES": 16 * MIB, "ROW_SPLIT_MIN_BYTES": 16 * KIB}
MEASURED = [Key("sm_90", "nvlink", 2), Key("sm_90", "mps", 2), Key("sm_90", "mps", 4),
            Key("sm_90", "mps", 8)]


def shipped_body(key: Key) -> dict:
    return json.loads((thresholds.SHIPPED_DIR / f"{key}.json").read_text())


# -- schema --------------------------------------------------------------------------------

def test_shipped_tables_hold_the_measured_values_with_provenance():
    assert [str(k) for k in thresholds.shipped_keys()] == sorted(str(k) for k in MEASURED)
    for key in MEASURED:
        body = shipped_body(key)
        assert body["thresholds"] == OLD, key
        prov = body["provenance"]
        assert all(prov[f] for f in thresholds.PROVENANCE), key
        setup = "h200x2-nvlink" if key.topology == "nvlink" else "h200-1gpu-mps"
        assert prov["evidence"] == [f"docs/perf/{setup}/"]
        assert "mixcc bench" in prov["command"]


def _valid() -> dict:
    return shipped_body(Key("sm_90", "nvlink", 2))


@pytest.mark.parametrize("damage,match", [
    (lambda b: b.update(schema=2), "schema 2"),
    (lambda b: b["thresholds"].pop("CE_MIN_BYTES"), r"missing \['CE_MIN_BYTES'\]"),
    (lambda b: b["thresholds"].update(LL_MAX=1), r"unknown \['LL_MAX'\]"),
    (lambda b: b["thresholds"].update(REG_MIN_BYTES=-1), "REG_MIN_BYTES must be a byte count"),
    (lambda b: b["thresholds"].update(REG_MIN_BYTES=True), "REG_MIN_BYTES must be a byte"),
    (lambda b: b["thresholds"].update(REG_MIN_BYTES="16M"), "REG_MIN_BYTES must be a byte"),
    (lambda b: b["key"].update(topology="infiniband"), "key"),
    (lambda b: b["key"].update(world=0), "key"),
    (lambda b: b["provenance"].pop("driver"), "provenance"),
    (lambda b: b.update(extra=1), r"unknown fields \['extra'\]"),
])
def test_damaged_tables_are_refused_naming_what(damage, match):
    body = _valid()
    damage(body)
    with pytest.raises(ValueError, match=match):
        thresholds.check_table(body, "t.json")


def test_write_and_read_round_trip_and_the_name_is_the_key(tmp_path):
    rng = random.Random()
    values = Thresholds(**{n.lower(): rng.choice([None, rng.randrange(0, 1 << 30)])
                           for n in Thresholds.names()})
    key = Key("sm_100", "nvswitch", 8)
    prov = {p: f"{p}-{rng.random()}" for p in thresholds.PROVENANCE}
    path = thresholds.write_table(tmp_path / f"{key}.json",
                                  thresholds.table_body(key, values, prov))
    assert thresholds.read_table(path) == (key, values, prov)
    wrong = tmp_path / "sm_90-pcie-w2.json"
    wrong.write_text(path.read_text())
    with pytest.raises(ValueError, match="its name must be sm_100-nvswitch-w8.json"):
        thresholds.read_table(wrong)
    with pytest.raises(ValueError, match="must be named"):
        thresholds.write_table(wrong, thresholds.table_body(key, values, prov))


# -- keys ----------------------------------------------------------------------------------

def _facts(n, host="h", arch="sm_90", links=18, switch=False, same_gpu=False):
    return [RankFacts(host if isinstance(host, str) else host(r),
                      "gpu0" if same_gpu else f"gpu{r}", arch, links, switch) for r in range(n)]


def test_classify_from_every_ranks_facts():
    c = thresholds.classify
    assert c(_facts(2)) == Key("sm_90", "nvlink", 2)
    assert c(_facts(2, switch=True)) == Key("sm_90", "nvlink", 2)  # a pair through a switch
    assert c(_facts(8, switch=True)) == Key("sm_90", "nvswitch", 8)
    assert c(_facts(4, links=0)) == Key("sm_90", "pcie", 4)
    assert c(_facts(4, links=-1)) == Key("sm_90", "unknown", 4)
    assert c(_facts(4, same_gpu=True)) == Key("sm_90", "mps", 4)
    assert c(_facts(4, host=lambda r: f"n{r // 2}")) == Key("sm_90", "nodes", 4)
    assert c(_facts(1)) == Key("sm_90", "single", 1)
    shared = _facts(4)
    shared[3] = replace(shared[3], device="gpu0")
    assert c(shared) == Key("sm_90", "shared", 4)
    mixed = _facts(2)
    mixed[1] = replace(mixed[1], arch="sm_80")
    assert c(mixed).arch == "mixed"
    some = _facts(2)
    some[1] = replace(some[1], nvlinks=0)
    assert c(some).topology == "unknown"


# -- lookup order --------------------------------------------------------------------------

def test_lookup_user_table_then_shipped_then_builtin(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(thresholds, "_LOGGED", set())
    key = Key("sm_90", "nvlink", 2)
    got = thresholds.resolve(key, user=tmp_path)
    assert got.values == Thresholds.from_json(OLD, "OLD")
    assert got.source == "shipped default sm_90-nvlink-w2"
    mine = replace(got.values, push_min_bytes=random.randrange(1, 1 << 30))
    path = thresholds.write_table(tmp_path / f"{key}.json", thresholds.table_body(
        key, mine, {p: "x" for p in thresholds.PROVENANCE}))
    got = thresholds.resolve(key, user=tmp_path)
    assert got.values == mine and got.source == f"tuned defaults {path}"
    path.write_text("{damaged")  # skipped with a warning, never trusted
    with caplog.at_level(logging.WARNING, logger="mixcc"):
        assert thresholds.resolve(key, user=tmp_path).source.startswith("shipped default")
    assert "ignoring the threshold table" in caplog.text
    # the user table lives beside the tuning table; MIXCC_TUNE_TABLE=off drops it
    monkeypatch.setenv(tune.ENV, str(tmp_path / "t" / "table.json"))
    assert thresholds.user_dir() == tmp_path / "t" / "defaults"
    monkeypatch.setenv(tune.ENV, "off")
    assert thresholds.user_dir() is None


def test_a_key_without_table_takes_the_builtin_rule_and_says_so_once(tmp_path, caplog,
                                                                      monkeypatch):
    monkeypatch.setattr(thresholds, "_LOGGED", set())
    caplog.set_level(logging.INFO, logger="mixcc")
    for key in (Key("sm_90", "pcie", 2), Key("sm_90", "nvswitch", 8), Key("sm_80", "nvlink", 2),
                Key("sm_90", "nvlink", 4), Key("sm_90", "nodes", 2)):
        caplog.clear()
        for _ in range(3):
            got = thresholds.resolve(key, user=tmp_path)
            assert got.values == BUILTIN and got.source == f"built-in rule (no table for {key})"
        lines = [r.getMessage() for r in caplog.records if r.name == "mixcc"]
        assert len(lines) == 1, lines
        assert str(key) in lines[0] and "mixcc tune" in lines[0]
    assert thresholds.resolve(None).values == BUILTIN


def test_the_builtin_rule_is_conservative():
    assert BUILTIN.ll_max_bytes is None and BUILTIN.ll_epi_max_bytes is None
    assert BUILTIN.push_min_bytes is None and BUILTIN.pool_push_min_bytes is None
    assert BUILTIN.ce_min_bytes is None and BUILTIN.reg_min_bytes is None
    assert BUILTIN.one_shot_max_bytes_wide == 1 * MIB
    assert BUILTIN.hier_nccl_min_bytes == BUILTIN.hier_staged_nccl_min_bytes == 4 * MIB


def test_a_tuning_table_entry_beats_the_thresholds():
    r = _runner("allreduce(tp)", {"tp": 2}, thresholds.shipped(MEASURED[0]))
    assert ALGORITHMS[r._params(0, 1 << 20, 64 * MIB)[0]] == "push"
    r.tuned = {(0, tune.bucket(64 * MIB)): tune.Choice("two_shot", 8)}
    algo, _, _, nblocks, _ = r._params(0, 1 << 20, 64 * MIB)
    assert ALGORITHMS[algo] == "two_shot" and nblocks <= 8


# -- rank agreement ------------------------------------------------------------------------

@pytest.mark.parametrize("world,user_rank", [(2, 1), (4, 0), (4, 3)])
def test_ranks_agree_on_rank_0s_values(rank_pool, world, user_rank):
    """Ranks whose facts differ (links, arch) and whose tables differ still use one key and
    rank 0's values."""
    from threshold_tasks import agree_on_different_facts

    facts = [dict(host="h", device=f"gpu{r}", arch="sm_90", nvlinks=18 if r % 2 == 0 else 0,
                  switch=False) for r in range(world)]
    facts[-1]["arch"] = "sm_80"  # a rank on another GPU: arch "mixed", the built-in rule
    body = thresholds.table_body(Key("mixed", "unknown", world), replace(
        BUILTIN, push_min_bytes=123456), {p: "x" for p in thresholds.PROVENANCE})
    assert rank_pool.run(world, agree_on_different_facts, facts, user_rank, body) == \
        {r: "" for r in range(world)}


# -- auto on the measured setups: the same choices as before the tables -------------------

def old_algorithm(stage, nbytes: int, pool: bool, first: bool, same_size: bool = True) -> str:
    """auto's intra choice before the tables, its numbers written out."""
    if pool and same_size and first and ce_safe(stage) and nbytes >= 16 * MIB:
        return "ce"
    if ll_auto(stage) and ll_cols(stage, 2) >= 8 and nbytes <= 256 * KIB:
        return "ll"
    if push_auto(stage) and nbytes >= (128 * MIB if pool else 32 * MIB):
        return "push"
    if push_width(stage) > 1 and nbytes > 1 * MIB and shares_reduction(stage):
        return "two_shot"
    return "one_shot"


def _runner(program, axes, th, pool=False, rpn=None):
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn), backend="reference")
    r = object.__new__(FusedRunner)  # the arithmetic only, no GPU runtime
    r.stages = [(st, None) for st in coll.plan.stages]
    r.plan, r.algorithm, r.elem, r.vec, r.max_blocks = coll.plan, "auto", 2, 8, 128
    r.rt = SimpleNamespace(region_bytes=layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES),
                           workspace_bytes=layout.DEFAULT_WORKSPACE_BYTES,
                           pool=object() if pool else None, pool_same_size=True)
    r.debug, r.th, r.tuned, r._nccl = False, th, {}, True
    r._stage_facts()
    r._nccl_from = hier_nccl_min_bytes(coll.plan, (), th)
    return r


SIZES = sorted({n + d for e in range(10, 31) for n in (1 << e, 3 << (e - 1))
                for d in (-1, 0, 1)})
PROGRAMS = [("allreduce(tp)", {"tp": 2}), ("allgather(dp)", {"dp": 2, "tp": 1}),
            ("reducescatter(dp)", {"dp": 2, "tp": 1}), ("allreduce(tp)", {"tp": 4}),
            ("allreduce_allgather", {"dp": 2, "tp": 4}), ("allgather(dp)", {"dp": 4, "tp": 2}),
            ("reducescatter_allreduce", {"dp": 2, "tp": 4}), ("allreduce(world)", {"w": 8})]


def _world(axes: dict) -> int:
    return int(torch.tensor(list(axes.values())).prod())


@pytest.mark.parametrize("key,program,axes", [
    (k, p, a) for k in MEASURED for p, a in PROGRAMS if _world(a) == k.world])
def test_auto_chooses_as_before_on_the_measured_setups(key, program, axes):
    th = thresholds.resolve(key, user=thresholds.SHIPPED_DIR / "none").values
    for pool in (False, True):
        r = _runner(program, axes, th, pool)
        for i, (stage, _) in enumerate(r.stages):
            for n in SIZES:
                code = r._params(i, max(1, n // 2), n)[0]
                got = "ce" if code == ALGO_CE else ALGORITHMS[code]
                assert got == old_algorithm(stage, n, pool, i == 0), (program, i, n, pool)
                # registered inputs read in place from 16 MiB (one-shot launches)
                if pool and got == "one_shot":
                    r._pools = [r.rt.pool]
                    assert r._pool_decides(i, n) == (
                        (i == 0 and ce_safe(stage) and n >= 16 * MIB)
                        or (push_auto(stage) and 32 * MIB <= n < 128 * MIB))


@pytest.mark.parametrize("program,axes,rpn,old", [
    ("allreduce(dp)", {"dp": 2, "tp": 1}, 1, 16 * MIB),
    ("reducescatter(dp)", {"dp": 2, "tp": 1}, 1, 16 * MIB),
    ("allgather(dp)", {"dp": 2, "tp": 1}, 1, None),
    ("allgather(dp)", {"dp": 2, "tp": 2}, 2, 4 * MIB),
])
def test_the_nccl_hand_off_is_as_before_on_the_measured_setup(program, axes, rpn, old):
    th = thresholds.shipped(MEASURED[0])
    r = _runner(program, axes, th, rpn=rpn)
    for n in SIZES:
        assert r.prefers_reference(n) == (old is not None and n >= old), (program, n)


def test_the_epilogue_and_row_split_as_before_on_the_measured_setup():
    th = thresholds.shipped(MEASURED[0])
    r = _runner("allreduce(tp)", {"tp": 2}, th)
    r.epilogue = ()
    for n in SIZES:
        assert r._epilogue_algorithm(0, n, 4096) == ("ll" if n <= 256 * KIB else "one_shot")
    assert r._row_split_min == 16 * KIB
    # the built-in rule: the one-shot at every size, rows never split
    r.th = BUILTIN
    assert {r._epilogue_algorithm(0, n, 4096) for n in SIZES} == {"one_shot"}


# -- --emit-defaults -----------------------------------------------------------------------

def _samples(rng, program, kind, winners: dict[int, str], wide=False):
    out = []
    for n, win in winners.items():
        best = {a: rng.uniform(2.0, 3.0) for a in ("one_shot", "two_shot", "push", "ll",
                                                    "nccl", "hier")}
        best[win] = rng.uniform(0.5, 1.0)
        out.append(emit.Sample(program, n, kind, wide, best))
    return out


def test_emit_derives_the_crossovers_and_keeps_the_rest():
    rng = random.Random()
    sizes = [1 << e for e in range(14, 28)]
    ll_to, push_from = sorted(rng.sample(sizes[1:-1], 2))
    two_from, nccl_from = rng.choice(sizes[1:-1]), rng.choice(sizes[1:-1])
    samples = _samples(rng, "allreduce(tp)", "intra", {
        n: "ll" if n <= ll_to else ("push" if n >= push_from else "one_shot") for n in sizes})
    samples += _samples(rng, "allreduce(world)", "intra",
                        {n: "two_shot" if n >= two_from else "one_shot" for n in sizes},
                        wide=True)
    for s in samples[-len(sizes):]:
        s.best.pop("ll"), s.best.pop("push")  # LL and push cannot run a wide stage
    samples += _samples(rng, "allreduce(dp)", "hier_direct",
                        {n: "nccl" if n >= nccl_from else "hier" for n in sizes})
    base = replace(BUILTIN, ce_min_bytes=rng.randrange(1, 1 << 30))
    values, notes = emit.derive(samples, base, "built-in rule")
    assert values.ll_max_bytes == ll_to and values.push_min_bytes == push_from
    assert values.one_shot_max_bytes_wide == two_from // 2
    assert values.hier_nccl_min_bytes == nccl_from
    assert values.ce_min_bytes == base.ce_min_bytes  # not measured: kept
    assert values.hier_staged_nccl_min_bytes == base.hier_staged_nccl_min_bytes
    assert "kept from built-in rule" in notes["CE_MIN_BYTES"]
    assert set(notes) == set(Thresholds.names())


def test_emit_push_that_never_wins_at_the_top_gives_never():
    rng = random.Random()
    sizes = [1 << e for e in range(14, 24)]
    samples = _samples(rng, "allreduce(tp)", "intra", {n: "one_shot" for n in sizes})
    values, _ = emit.derive(samples, BUILTIN, "b")
    assert values.push_min_bytes is None and values.ll_max_bytes is None
    samples = _samples(rng, "allreduce(tp)", "intra", {n: "push" for n in sizes})
    assert emit.derive(samples, BUILTIN, "b")[0].push_min_bytes == sizes[0]


def test_emit_body_is_a_valid_table(tmp_path):
    rng = random.Random()
    key = Key("sm_90", "pcie", 2)
    samples = _samples(rng, "allreduce(tp)", "intra", {1 << e: "one_shot" for e in range(10, 20)})
    body = emit.emit_body(samples, key, BUILTIN, "built-in rule", "mixcc tune --emit-defaults",
                          ["/x/table.json"])
    path = thresholds.write_table(tmp_path / f"{key}.json", body)
    got_key, values, prov = thresholds.read_table(path)
    assert got_key == key and prov["command"] == "mixcc tune --emit-defaults"
    assert prov["mixcc"] == mixcc.__version__ and prov["torch"] == torch.__version__
    assert thresholds.resolve(key, user=tmp_path).source == f"tuned defaults {path}"


def test_human_bytes():
    h = thresholds.human_bytes
    assert [h(75894784), h(1536), h(512), h(16 << 20), h(1 << 30), h(None)] == \
        ["72.4 MiB", "1.5 KiB", "512 B", "16 MiB", "1 GiB", "never"]
