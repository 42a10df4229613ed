from fractions import Fraction

import pytest
import torch

from mixcc import CompileError, Mesh
from mixcc.ir.build import build, check_rows
from mixcc.ir.nodes import Op
from mixcc.ir.parser import parse
from mixcc.ir.passes import drop_trivial, merge_adjacent, optimize, scope_of, split_nodes

MESH = Mesh({"dp": 2, "tp": 4, "one": 1}, ranks_per_node=4)


def ops(text, mesh=MESH):
    return build(parse(text), mesh).ops


def test_build_resolves_world_and_shapes():
    ir = build(parse("allgather(world); reducescatter(tp)"), MESH)
    assert ir.ops[0].axes == ("dp", "tp", "one")
    assert ir.row_factor == Fraction(2) and ir.granularity == 1  # 8R rows split by 4
    ir = build(parse("reducescatter(dp); reducescatter(tp)"), MESH)
    assert ir.granularity == 8 and ir.row_factor == Fraction(1, 8)
    assert check_rows(ir, 16) == 2
    with pytest.raises(CompileError, match="rows=12 must be divisible by 8"):
        check_rows(ir, 12)


@pytest.mark.parametrize("text,msg,col", [
    ("allreduce(tp*xx)", "unknown axis 'xx'", 14),
    ("allreduce(tp*dp*tp)", "axis 'tp' appears twice", 17),
])
def test_compile_errors_point_at_the_axis(text, msg, col):
    with pytest.raises(CompileError, match=msg) as ei:
        build(parse(text), MESH)
    assert ei.value.column == col
    assert str(ei.value).splitlines()[-1].index("^") == col + 1


def test_dtype_redop_pairs():
    build(parse("allreduce(tp, op=max)"), MESH, torch.int32)
    with pytest.raises(CompileError, match="op=sum is not supported for dtype torch.int32"):
        build(parse("allreduce(tp)"), MESH, torch.int32)
    with pytest.raises(CompileError, match="dtype torch.complex64 is not supported"):
        build(parse("allreduce(tp)"), MESH, torch.complex64)
    build(parse("allgather(tp)"), MESH, torch.int32)  # no reduction: any listed dtype


def test_drop_trivial():
    kept = drop_trivial(ops("allreduce(one); allgather(tp*one); reducescatter(one)"), MESH)
    assert [str(o) for o in kept] == ["allgather(tp*one)"]


@pytest.mark.parametrize("text,merged", [
    ("allreduce(tp); allreduce(dp)", "allreduce(tp*dp)"),
    ("allreduce(tp); allreduce(tp)", "allreduce(tp); allreduce(tp)"),  # sum: x|tp|, not one
    ("allreduce(tp, op=max); allreduce(tp*dp, op=max)", "allreduce(tp*dp, op=max)"),
    ("allreduce(tp, op=max); allreduce(dp)", "allreduce(tp, op=max); allreduce(dp)"),
    ("reducescatter(dp*tp); allgather(dp*tp)", "allreduce(dp*tp)"),
    ("reducescatter(dp*tp); allgather(tp*dp)", "reducescatter(dp*tp); allgather(tp*dp)"),
    ("allgather(tp); allgather(dp)", "allgather(dp*tp)"),
    ("reducescatter(tp); reducescatter(dp)", "reducescatter(tp*dp)"),
    ("reducescatter(dp); allgather(dp); allreduce(tp)", "allreduce(dp*tp)"),
])
def test_merge_adjacent(text, merged):
    got = merge_adjacent(ops(text))
    assert "; ".join(str(o) for o in got) == merged


def test_scopes():
    m = Mesh({"dp": 2, "tp": 4}, ranks_per_node=4)
    assert scope_of(("tp",), m) == "intra"
    assert scope_of(("dp",), m) == "inter"
    assert scope_of(("dp", "tp"), m) == "hier"
    assert scope_of(("b",), Mesh({"a": 2, "b": 3}, 3)) == "intra"
    assert scope_of(("b",), Mesh({"a": 3, "b": 4}, 6)) == "flat"
    tagged = split_nodes((Op("allreduce", ("dp",)),), m)
    assert tagged[0].scope == "inter"


def test_optimize_keeps_shape_facts():
    ir = build(parse("reducescatter(dp); allgather(dp)"), MESH)
    opt = optimize(ir, MESH)
    assert [str(o) for o in opt.ops] == ["allreduce(dp)"]
    assert opt.granularity == 2  # the program as written still needs even rows
