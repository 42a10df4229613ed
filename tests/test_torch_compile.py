"""torch.compile: a model that calls `coll(x)` compiles with fullgraph=True (the call is
one `mixcc::run` custom op, no graph break) and gives the eager result, on gloo ranks and
on a world of one without a process group."""

import torch
import torch._dynamo.testing
from torch._subclasses.fake_tensor import FakeTensorMode

import mixcc
from mixcc import Mesh
from mixcc.torch_ops import handle_of


def _world_of_one() -> mixcc.Collective:
    return mixcc.compile("allreduce(tp); allgather(dp)", Mesh({"dp": 1, "tp": 1}),
                         backend="reference")


def test_op_passes_torch_library_opcheck():
    coll = _world_of_one()
    torch.library.opcheck(torch.ops.mixcc.run.default, (torch.randn(3, 4), handle_of(coll)))


def test_fake_implementation_gives_the_output_shape_without_communicating():
    # a world of 4 without a process group: running it would raise, tracing must not
    coll = mixcc.compile("allgather(dp)", Mesh({"dp": 2, "tp": 2}), backend="reference")
    with FakeTensorMode() as mode:
        y = torch.ops.mixcc.run(mode.from_tensor(torch.empty(3, 5)), handle_of(coll))
    assert y.shape == (6, 5) and y.dtype == torch.float32


def test_compiles_to_one_graph_with_the_custom_op():
    coll = _world_of_one()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, w):
        return coll(x @ w).relu() + 1

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    got = torch.compile(f, fullgraph=True, backend=backend)(x, w)
    assert torch.equal(got, f(x, w))
    (gm,) = graphs
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"
           and n.target in (torch.ops.mixcc.run, torch.ops.mixcc.run.default)]
    assert len(ops) == 1


def test_two_collectives_get_two_handles():
    a, b = _world_of_one(), _world_of_one()
    assert handle_of(a) != handle_of(b)
    assert handle_of(a) == handle_of(a)


def compiled_model_task(rank: int, world: int, group) -> str:
    """On each gloo rank: the compiled model equals eager, in one graph, out= included."""
    mesh = Mesh({"dp": 2, "tp": 2}, ranks_per_node=4)
    ar_ag = mixcc.compile("allreduce(tp); allgather(dp)", mesh, dtype=torch.float32,
                          group=group, backend="reference")
    rs_ar = mixcc.compile("reducescatter(dp); allreduce(tp)", mesh, dtype=torch.float32,
                          group=group, backend="reference")

    def model(x, w, buf):
        h = ar_ag(x @ w)  # rows x 2
        rs_ar(h, out=buf)  # back to rows
        return torch.relu(h).sum(0), buf * 2

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    msgs = []
    for rows in (4, 6):  # small integers: every sum is exact, results must be equal
        x = torch.randint(-3, 4, (rows, 8), generator=torch.Generator().manual_seed(rank))
        w = torch.randint(-2, 3, (8, 8), generator=torch.Generator().manual_seed(7))
        x, w = x.float(), w.float()
        buf_e, buf_c = torch.full((rows, 8), float("nan")), torch.full((rows, 8), float("nan"))
        eager = model(x, w, buf_e)
        got = compiled(x, w, buf_c)
        if not (torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])):
            msgs.append(f"rows {rows}: compiled result differs from eager")
        if not torch.equal(buf_c, buf_e):
            msgs.append(f"rows {rows}: out= buffer differs from eager")
    if counter.frame_count < 1:
        msgs.append("nothing was compiled")
    return "; ".join(msgs)


def test_compiled_model_equals_eager_on_gloo_ranks(rank_pool):
    res = rank_pool.run(4, compiled_model_task, timeout=600)
    assert res == {r: "" for r in range(4)}
