"""Process groups seen in a graph, as axes of a mesh (docs/DESIGN.md, "The fusion pass").

A functional collective names its group by a string (`group_name`); here it becomes the
group's global ranks, then the axes of the mesh whose group over those axes, seen from
this rank, is exactly that set of ranks (in that order, where the order matters). Without
a mesh one is derived from the groups themselves: every group whose ranks step by a
constant stride cuts the world at that stride and at stride x size; the cuts, sorted,
are the mesh's axes (outermost first), named after the DeviceMesh dimension that made
the group where there is one (its description reads "mesh_<name>").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch.distributed as dist

from ..mesh import Mesh


def group_ranks(group_name: str) -> tuple[int, ...]:
    """Global ranks of the process group named `group_name`, in group rank order."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return tuple(dist.get_process_group_ranks(_resolve_process_group(group_name)))


def group_desc(group_name: str) -> str:
    """The group's description ("mesh_tp" for a DeviceMesh dimension), or ""."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return str(getattr(_resolve_process_group(group_name), "group_desc", "") or "")


def axes_of(mesh: Mesh, me: int, members: Sequence[int], ordered: bool) -> tuple[str, ...] | None:
    """The axes of `mesh` whose group, for mesh rank `me`, is `members` (mesh ranks, in
    group order when `ordered`, as a set otherwise); None when no axes give it. Axes in
    mesh order are preferred, so an allreduce reads `allreduce(dp*tp)`, not `tp*dp`."""
    members = tuple(members)
    if me not in members:
        return None
    names = mesh.names
    for k in range(1, len(names) + 1):
        for combo in itertools.combinations(names, k):
            if mesh.group_size(combo) != len(members):
                continue
            perms = itertools.permutations(combo) if ordered else (combo,)
            for axes in perms:
                got = mesh.group_members(me, axes)
                if (got == members) if ordered else (set(got) == set(members)):
                    return tuple(axes)
    return None


def derive_mesh(groups: Sequence[tuple[str, Sequence[int]]], world: int) -> Mesh | None:
    """A row-major mesh over `world` ranks in which every group of `groups` (description,
    global ranks) that steps by a constant stride is an axis or a product of adjacent
    axes; None when no group gives a cut. Groups whose cuts would not divide the others
    are skipped (their sites are then refused by axes_of)."""
    cuts = {1, world}
    named: dict[tuple[int, int], str] = {}
    accepted = 0
    for desc, ranks in groups:
        ranks = tuple(ranks)
        if len(ranks) < 2:
            continue
        stride = ranks[1] - ranks[0]
        if stride <= 0 or any(b - a != stride for a, b in zip(ranks, ranks[1:], strict=False)):
            continue
        new = cuts | {stride, stride * len(ranks)}
        ordered = sorted(new)
        if ordered[-1] != world or any(b % a for a, b in zip(ordered, ordered[1:], strict=False)):
            continue
        cuts = new
        accepted += 1
        if desc.startswith("mesh_") and desc[5:].isidentifier():
            named.setdefault((stride, len(ranks)), desc[5:])
    if not accepted:
        return None
    ordered = sorted(cuts)
    axes: list[tuple[str, int]] = []
    used: set[str] = set()
    for i in reversed(range(len(ordered) - 1)):
        stride, size = ordered[i], ordered[i + 1] // ordered[i]
        name = named.get((stride, size))
        if name is None or name in used or name in ("world", "op"):
            name = f"ax{len(ordered) - 2 - i}"
        used.add(name)
        axes.append((name, size))
    if not axes:
        return None
    return Mesh(axes)


__all__ = ["axes_of", "derive_mesh", "group_desc", "group_ranks"]
