import pytest

from mixcc import Mesh
from mixcc.codegen.linear_map import linear_map
from mixcc.codegen.lower import lower, phases
from mixcc.codegen.schedule import DST_OUT, DST_WS, one_shot, two_shot
from mixcc.ir.build import build
from mixcc.ir.parser import parse
from mixcc.ir.passes import optimize


def lowered(text, mesh, **kw):
    return lower(optimize(build(parse(text), mesh), mesh), mesh, **kw)


def test_linear_map_of_allreduce_allgather():
    m = Mesh({"dp": 2, "tp": 2})
    ir = optimize(build(parse("allreduce(tp); allgather(dp)"), m), m)
    lm = linear_map(ir.ops, m, 1, "sum")
    # rank 3 = (dp 1, tp 1): unit 0 = sum over tp of dp 0, unit 1 = of dp 1
    assert lm.out_units[3] == (((0, 0, 1), (1, 0, 1)), ((2, 0, 1), (3, 0, 1)))


def test_linear_map_coefficients_and_reducescatter_units():
    m = Mesh({"dp": 2, "tp": 2})
    lm = linear_map(build(parse("allreduce(tp); allreduce(tp)"), m).ops, m, 1, "sum")
    assert lm.out_units[0] == (((0, 0, 2), (1, 0, 2)),)
    lm = linear_map(build(parse("reducescatter(dp)"), m).ops, m, 2, "sum")
    assert lm.out_units[2] == (((0, 1, 1), (2, 1, 1)),)
    lm = linear_map(build(parse("allreduce(tp, op=max); allreduce(tp, op=max)"), m).ops, m, 1,
                    "max")
    assert lm.out_units[0] == (((0, 0, 1), (1, 0, 1)),)


def test_two_shot_splits_each_distinct_block_among_its_consumers():
    m = Mesh({"dp": 2, "tp": 4})
    lm = linear_map(build(parse("allreduce(tp); allgather(dp)"), m).ops, m, 1, "sum")
    s2 = two_shot(lm)
    assert s2.slots == 2
    r5 = s2.ranks[5]
    assert all(t.dst_kind == DST_WS and t.owners == 8 and t.owner_index == 5 for t in r5.reduce)
    assert [g.dst for g in r5.gather] == [0, 1]
    assert r5.gather[1].sources == tuple((r, 1) for r in range(8))
    s1 = one_shot(lm)
    assert all(t.dst_kind == DST_OUT and t.owners == 1 for t in s1.ranks[5].reduce)
    assert s1.ranks[5].neighbors == (0, 1, 2, 3, 4, 6, 7)


def test_neighbors_are_symmetric():
    m = Mesh({"dp": 2, "tp": 2})
    s = one_shot(linear_map(build(parse("allreduce(tp)"), m).ops, m, 1, "sum"))
    assert [r.neighbors for r in s.ranks] == [(1,), (0,), (3,), (2,)]


def test_phases_split_on_reduction_op():
    m = Mesh({"dp": 2, "tp": 2})
    ir = build(parse("allgather(dp); allreduce(tp, op=max); allgather(tp); allreduce(dp)"), m)
    assert [(r, len(o)) for r, o in phases(ir.ops)] == [("max", 3), ("sum", 1)]


def test_one_node_plan_is_fused_capable_with_chunking():
    m = Mesh({"dp": 2, "tp": 4}, ranks_per_node=8)
    plan = lowered("allreduce(tp); allgather(dp)", m, elem_bytes=2)
    assert plan.one_node and len(plan.stages) == 1
    st = plan.stages[0]
    assert st.transport == "ipc" and set(st.schedules) == {"one_shot", "two_shot"}
    assert st.chunking.elems_per_block % 8 == 0 and st.chunking.units_per_region == 3
    assert "two_shot" in plan.describe()


@pytest.mark.parametrize("coll", ["allreduce", "allgather", "reducescatter"])
def test_multi_node_plan_is_hierarchical(coll):
    m = Mesh({"dp": 2, "tp": 4}, ranks_per_node=2)
    plan = lowered(f"{coll}(tp*dp)", m)
    assert not plan.one_node
    scopes = [s.scope for s in plan.stages]
    assert "intra" in scopes and "inter" in scopes
    if coll != "allreduce":
        assert "local" in scopes


def test_identity_program_has_no_stage():
    m = Mesh({"dp": 1, "tp": 1})
    plan = lowered("allreduce(tp)", m)
    assert plan.stages == () and "identity" in plan.describe()
