import pytest

from mixcc import Mesh
from mixcc.codegen import layout
from mixcc.codegen.linear_map import linear_map
from mixcc.codegen.lower import lower, phases
from mixcc.codegen.plan import (
    HierStage,
    IntraStage,
    grid,
    hier_cols,
    intra_cols,
    part_elem,
    share_cap,
)
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
    plan = lowered("allreduce(tp); allgather(dp)", m)
    assert plan.one_node and len(plan.stages) == 1
    st = plan.stages[0]
    assert isinstance(st, IntraStage) and st.transports == ("ipc",)
    assert set(st.schedules) == {"one_shot", "two_shot", "push"}
    region = layout.region_bytes(layout.DEFAULT_WORKSPACE_BYTES)
    cols = intra_cols(st, True, 2, region)
    assert cols % 8 == 0 and st.units_per_region(True) == 3
    assert 3 * cols * 2 <= region < 3 * (cols + 8) * 2
    text = plan.describe(2)
    assert "two_shot chunk" in text and "push chunk" in text


@pytest.mark.parametrize("coll", ["allreduce", "allgather", "reducescatter"])
def test_multi_node_plan_is_hierarchical(coll):
    m = Mesh({"dp": 2, "tp": 4}, ranks_per_node=2)
    plan = lowered(f"{coll}(tp*dp)", m)
    assert not plan.one_node
    (st,) = plan.stages  # one fused kernel: IPC inside the node, NVSHMEM across
    assert isinstance(st, HierStage) and st.transports == ("ipc", "nvshmem")
    assert st.hier.nodes == 4 and st.hier.local == 2
    scopes = [s.scope for s in plan.steps]  # the reference backend's view
    assert "intra" in scopes and "inter" in scopes
    if coll != "allreduce":
        assert "local" in scopes


@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("program", ["allreduce(world)", "allreduce(tp); allgather(dp)",
                                     "reducescatter(dp); allreduce(tp)", "allgather(world)"])
def test_hier_chunk_fits_both_workspaces(program, elem):
    m = Mesh({"dp": 2, "tp": 4}, ranks_per_node=4)
    (st,) = lowered(program, m).stages
    for ws, sym in ((12 << 20, 1 << 20), (16 << 20, 16 << 20), (16 << 20, 1 << 20)):
        region, sregion = layout.region_bytes(ws), layout.sym_region_bytes(sym)
        cols = hier_cols(st, elem, region, sregion)
        h, sc = st.hier, share_cap(cols, elem, st.hier.local)
        pe = part_elem(st, elem)  # fp32 parts where node parts of 16-bit sums are added
        assert cols > 0 and cols % (16 // elem) == 0
        assert (h.in_units * cols + h.max_finals * sc) * elem <= region
        assert 2 * h.nodes * h.max_parts * sc * pe <= sregion
        bigger = cols + 16 // elem  # the next width does not fit one of the two
        sc2 = share_cap(bigger, elem, h.local)
        assert ((h.in_units * bigger + h.max_finals * sc2) * elem > region
                or 2 * h.nodes * h.max_parts * sc2 * pe > sregion)
    text = lowered(program, m).describe(elem)
    assert "[intra+inter] transport=ipc+nvshmem" in text and "pipeline depth 2" in text
    assert "NVSHMEM symmetric heap 256 MiB" in text  # layout.DEFAULT_SYMMETRIC_BYTES


@pytest.mark.parametrize("program", ["allreduce(dp)", "allgather(dp)"])
def test_one_rank_per_node_chunks_by_the_nvshmem_region_alone(program):
    """With one rank per node the kernel stages nothing in the IPC region (DIRECT in
    templates/hier_kernel.cu.j2): the chunk is the widest the NVSHMEM region holds, even
    past the IPC region; with fp32 result slots (a fused epilogue) the IPC region bounds
    it again."""
    (st,) = lowered(program, Mesh({"dp": 2, "tp": 1}, ranks_per_node=1)).stages
    h, elem = st.hier, 2
    region, sregion = layout.region_bytes(12 << 20), layout.sym_region_bytes(64 << 20)
    cols = hier_cols(st, elem, region, sregion)
    assert cols * elem * h.in_units > region  # no longer bounded by the IPC region
    assert 2 * h.nodes * h.max_parts * cols * elem <= sregion
    assert 2 * h.nodes * h.max_parts * (cols + 8) * elem > sregion
    slots = hier_cols(st, elem, region, sregion, 4)
    assert 0 < slots < cols and (h.in_units * slots * elem + h.max_finals * slots * 4
                                 <= region)
    text = lowered(program, Mesh({"dp": 2, "tp": 1}, ranks_per_node=1)).describe(elem)
    assert "one rank per node: the input is read in place" in text


def test_grid_covers_every_column_evenly():
    for unit_elems in (1, 7, 8192, 131072, 7168 * 4096, 12345):
        for cols in (8, 4096, 65536):
            nblocks, chunks, c = grid(unit_elems, cols, 2, 32)
            assert 1 <= nblocks <= 32 and c % 8 == 0 and 8 <= c <= cols
            assert chunks * nblocks * c >= unit_elems  # every column is covered
            assert chunks == 1 or (chunks - 1) * nblocks * cols < unit_elems  # no extra chunk
            # evenly spread: every block of every chunk but the last pack has columns
            assert (chunks * nblocks - 1) * c < unit_elems or unit_elems <= 8 * nblocks


def test_identity_program_has_no_stage():
    m = Mesh({"dp": 1, "tp": 1})
    plan = lowered("allreduce(tp)", m)
    assert plan.stages == () and "identity" in plan.describe()


def test_explain_prints_max_and_min_as_such():
    m = Mesh({"dp": 2, "tp": 2}, ranks_per_node=4)
    text = lowered("allreduce(tp, op=max); allgather(dp)", m).describe(4)
    assert "max(r0.u0, r1.u0)" in text and " + " not in text.split("reference")[0]
    hier = lowered("allreduce(world, op=min)", Mesh({"dp": 2, "tp": 2}, ranks_per_node=2))
    text = hier.describe(4)
    assert "min(r0.u0, r1.u0)" in text and "final 0 = min(node0.slot0, node1.slot0)" in text


@pytest.mark.parametrize("world", [2, 4, 8])
def test_presets_can_run_ll_and_its_chunk_fits_a_sender_area(world):
    """Every preset on every mesh of the world can run LL (each rank stores only to peers
    that store to it, and push's in-place rule holds): auto's LL rule rests on it. An LL
    chunk's lines fit a sender's share of the plain chunk (8 KiB) and a row's of the
    whole region (32 KiB); explain says whether LL can run."""
    from mixcc.codegen.plan import ll_cols, ll_safe
    from mixcc.presets import PRESETS

    for dp in (d for d in (1, 2, world // 2, world) if world % d == 0):
        m = Mesh({"dp": dp, "tp": world // dp})
        for name, program in PRESETS.items():
            plan = lowered(program, m)
            for st in plan.stages:
                assert isinstance(st, IntraStage) and ll_safe(st), (name, dp)
                for rows, region in ((False, layout.LL_CHUNK_BYTES),
                                     (True, layout.LL_REGION_BYTES)):
                    cols = ll_cols(st, 2, rows)
                    area = layout.sender_area_bytes(region, world)
                    assert cols > 0 and st.push_schedule.slots * cols * 2 * 2 <= area
                    assert st.push_schedule.slots * (cols + 8) * 2 * 2 > area
            if plan.stages:  # a program over a size-1 axis is the identity
                assert "LL can run here: yes" in plan.describe(2)
    # grid(ll=True): one block per LL chunk while blocks last
    assert grid(4096, 2048, 2, 128, ll=True) == (2, 1, 2048)
    assert grid(1 << 20, 2048, 2, 128, ll=True) == (128, 4, 2048)
