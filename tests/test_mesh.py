import pytest

from mixcc import Mesh


def test_row_major_layout_and_groups():
    m = Mesh({"dp": 2, "tp": 4}, ranks_per_node=4)
    assert m.world_size == 8 and m.coords(6) == (1, 2)
    assert m.group_members(5, ["tp"]) == (4, 5, 6, 7)
    assert m.group_members(5, ["dp"]) == (1, 5)
    assert m.group_members(5, ["tp", "dp"]) == (0, 4, 1, 5, 2, 6, 3, 7)
    assert m.group_index(5, ["tp", "dp"]) == 3
    assert m.group_members(3, None) == tuple(range(8))
    assert m.partition(["dp"]) == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_nodes_and_split():
    m = Mesh([("dp", 2), ("tp", 4)], ranks_per_node=4)
    assert m.num_nodes == 2 and m.node_of(5) == 1
    assert m.split_group(5, ["dp", "tp"]) == ((4, 5, 6, 7), (1, 5))
    assert m.is_intra_node(["tp"]) and not m.is_intra_node(["dp"])


def test_default_ranks_per_node_from_env(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Mesh({"a": 4}).ranks_per_node == 2


@pytest.mark.parametrize("axes,rpn,msg", [
    ({}, None, "at least one axis"),
    ({"a": 0}, None, "size of axis 'a'"),
    ({"world": 2}, None, "keyword"),
    ({"a": 4}, 3, "must divide the world size"),
])
def test_bad_meshes(axes, rpn, msg):
    with pytest.raises(ValueError, match=msg):
        Mesh(axes, ranks_per_node=rpn)


def test_from_device_mesh_and_parse():
    class FakeDM:  # the two attributes Mesh reads from torch's DeviceMesh
        mesh_dim_names = ("dp", "tp")

        def __init__(self):
            import torch

            self.mesh = torch.arange(8).reshape(2, 4)

    assert Mesh.from_device_mesh(FakeDM(), 8) == Mesh({"dp": 2, "tp": 4}, 8)
    assert Mesh.parse("dp=2,tp=4", 4) == Mesh({"dp": 2, "tp": 4}, 4)
    with pytest.raises(ValueError, match="name=size"):
        Mesh.parse("dp2")


def test_from_device_mesh_refuses_ranks_out_of_row_major_order():
    import torch

    class FakeDM:
        mesh_dim_names = ("dp", "tp")

        def __init__(self, mesh):
            self.mesh = mesh

    with pytest.raises(ValueError, match="row-major"):
        Mesh.from_device_mesh(FakeDM(torch.arange(8).reshape(4, 2).t().contiguous()), 8)
    with pytest.raises(ValueError, match="row-major"):  # ranks of another group
        Mesh.from_device_mesh(FakeDM(torch.arange(8, 16).reshape(2, 4)), 8)
    with pytest.raises(ValueError, match="mesh_dim_names"):
        dm = FakeDM(torch.arange(4).reshape(2, 2))
        dm.mesh_dim_names = None
        Mesh.from_device_mesh(dm)
