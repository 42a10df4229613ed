"""Bad input is refused before any communication, naming the argument and the expected
value; compile-time checks; explain(). No process group is needed: checks come first."""

import pytest
import torch

import mixcc
from mixcc import CompileError, Mesh, ParseError

MESH = Mesh({"dp": 2, "tp": 2}, ranks_per_node=4)


@pytest.fixture
def rs_ar():
    return mixcc.compile("reducescatter_allreduce", MESH, dtype=torch.float32,
                         backend="reference")


def test_presets_names_and_programs():
    assert mixcc.presets.PRESETS["allreduce_allgather"] == "allreduce(tp); allgather(dp)"
    assert mixcc.presets.REDUCESCATTER_ALLREDUCE == "reducescatter(dp); allreduce(tp)"
    assert len(mixcc.presets.PRESETS) == 5


def test_output_shape_and_explain(rs_ar):
    assert rs_ar.output_shape((6, 3, 2)) == torch.Size((3, 3, 2))
    ag = mixcc.compile("allreduce_allgather", MESH, backend="reference")
    assert ag.output_shape((5, 7)) == torch.Size((10, 7))
    text = ag.explain()
    for part in ("AST:", "IR after passes:", "plan", "one_shot", "two_shot", "allgather(dp)"):
        assert part in text


@pytest.mark.parametrize("make,exc,msg", [
    (lambda: [1.0, 2.0], TypeError, "x must be a torch.Tensor"),
    (lambda: torch.zeros(4, 2, dtype=torch.float16), TypeError, "x.dtype must be torch.float32"),
    (lambda: torch.tensor(1.0), ValueError, "at least one dimension"),
    (lambda: torch.zeros(2, 4).t(), ValueError, "x must be contiguous"),
    (lambda: torch.zeros(3, 2), ValueError, r"x.shape\[0\] \(rows\) = 3 must be divisible by 2"),
    (lambda: torch.zeros(4, 2, device="meta"), ValueError, "x.device must be cpu"),
])
def test_bad_x(rs_ar, make, exc, msg):
    with pytest.raises(exc, match=msg):
        rs_ar(make())


@pytest.mark.parametrize("make,exc,msg", [
    (lambda: "buf", TypeError, "out must be a torch.Tensor"),
    (lambda: torch.zeros(2, 2, dtype=torch.float64), TypeError, "out.dtype must be torch.float32"),
    (lambda: torch.zeros(4, 2), ValueError, r"out.shape must be \(2, 2\)"),
    (lambda: torch.zeros(2, 2, device="meta"), ValueError, "out.device must be cpu"),
    (lambda: torch.zeros(2, 2).t(), ValueError, "out must be contiguous"),
])
def test_bad_out(rs_ar, make, exc, msg):
    with pytest.raises(exc, match=msg):
        rs_ar(torch.zeros(4, 2), out=make())


def test_out_overlapping_x_is_refused(rs_ar):
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="not overlap x"):
        rs_ar(x, out=x[2:])


def test_out_starting_at_x_but_longer_is_not_in_place():
    # same data_ptr, different extent: a partial overlap, not "x itself"
    ag = mixcc.compile("allgather(dp)", MESH, dtype=torch.float32, backend="reference")
    t = torch.zeros(8, 2)
    with pytest.raises(ValueError, match="not overlap x"):
        ag(t[:4], out=t[0:8])
    with pytest.raises(ValueError, match="not overlap x"):
        ag(t[4:], out=t[0:8])  # ends at the same address


def test_unsupported_dtype_at_call_time():
    coll = mixcc.compile("allreduce(tp)", MESH, backend="reference")
    with pytest.raises(TypeError, match="op=sum is not supported for dtype torch.int32"):
        coll(torch.zeros(2, 2, dtype=torch.int32))


def test_compile_errors():
    with pytest.raises(ParseError, match="line 1, column 11"):
        mixcc.compile("allreduce(", MESH)
    with pytest.raises(CompileError, match="unknown axis 'ep'"):
        mixcc.compile("allreduce(ep)", MESH)
    with pytest.raises(CompileError, match="rows=3 must be divisible by 2"):
        mixcc.compile("reducescatter(dp)", MESH, rows=3)
    with pytest.raises(CompileError, match="op=sum is not supported"):
        mixcc.compile("allreduce(tp)", MESH, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be one of"):
        mixcc.compile("allreduce(tp)", MESH, backend="nccl")
    with pytest.raises(TypeError, match="mesh must be a mixcc.Mesh"):
        mixcc.compile("allreduce(tp)", {"tp": 2})


def test_world_of_one_runs_without_a_process_group():
    coll = mixcc.compile("allreduce(tp); allgather(dp)", Mesh({"dp": 1, "tp": 1}),
                         backend="reference")
    x = torch.randn(3, 4)
    assert torch.equal(coll(x), x)


def test_call_without_process_group_says_so(rs_ar):
    with pytest.raises(RuntimeError, match="init_process_group"):
        rs_ar(torch.zeros(4, 2))


def test_repeat_call_still_refuses_an_overlapping_out():
    # the second call has the signature of the first (validated once, then the fast
    # path): the overlap of x and out is new on every call and must still be checked
    coll = mixcc.compile("allreduce(tp)", Mesh({"tp": 1}), dtype=torch.float32,
                         backend="reference")
    buf = torch.randn(12, 2)
    x = buf[0:4]
    assert torch.equal(coll(x, out=buf[8:12]), x)  # fine, and now a known signature
    with pytest.raises(ValueError, match="not overlap x"):
        coll(x, out=buf[2:6])
    assert torch.equal(coll(x, out=x), buf[0:4])  # in place stays allowed
