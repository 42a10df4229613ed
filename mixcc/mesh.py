"""Meshes of named axes: rank layout, groups and the node split (docs/DESIGN.md section 2)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any


def _default_ranks_per_node(world: int) -> int:
    """LOCAL_WORLD_SIZE, else the visible GPU count, else the whole world; capped at world."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        n = int(env)
    else:
        try:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # torch without CUDA support at all
            n = 0
        n = n or world
    n = min(n, world)
    return n if world % n == 0 else math.gcd(n, world)


class Mesh:
    """Named axes with sizes, ranks row-major with the last axis fastest.

    `ranks_per_node` groups contiguous ranks into nodes; it defaults to
    LOCAL_WORLD_SIZE, else the number of visible GPUs, else the whole world.
    """

    def __init__(
        self,
        axes: Mapping[str, int] | Iterable[tuple[str, int]],
        ranks_per_node: int | None = None,
    ):
        items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
        if not items:
            raise ValueError("Mesh: axes must name at least one axis, e.g. {'dp': 2, 'tp': 4}")
        names: list[str] = []
        for name, size in items:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"Mesh: axis name {name!r} must be an identifier")
            if name in ("world", "op"):
                raise ValueError(f"Mesh: axis name {name!r} is a keyword of the language")
            if name in names:
                raise ValueError(f"Mesh: axis {name!r} appears twice")
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"Mesh: size of axis {name!r} must be an int >= 1, got {size!r}")
            names.append(name)
        self.names: tuple[str, ...] = tuple(names)
        self.sizes: tuple[int, ...] = tuple(int(s) for _, s in items)
        self.world_size: int = math.prod(self.sizes)
        if ranks_per_node is None:
            ranks_per_node = _default_ranks_per_node(self.world_size)
        if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"Mesh: ranks_per_node must be an int >= 1, got {ranks_per_node!r}")
        if self.world_size % ranks_per_node:
            raise ValueError(
                f"Mesh: ranks_per_node={ranks_per_node} must divide the world size "
                f"{self.world_size}"
            )
        self.ranks_per_node: int = ranks_per_node

    @classmethod
    def from_device_mesh(cls, device_mesh: Any, ranks_per_node: int | None = None) -> Mesh:
        """Build a Mesh from a torch DeviceMesh (names and sizes; same row-major layout)."""
        names = device_mesh.mesh_dim_names
        shape = tuple(device_mesh.mesh.shape)
        if names is None:
            raise ValueError("Mesh.from_device_mesh: the DeviceMesh needs mesh_dim_names")
        flat = device_mesh.mesh.flatten().tolist()
        if flat != list(range(len(flat))):
            raise ValueError(
                "Mesh.from_device_mesh: the DeviceMesh must hold ranks 0..N-1 in row-major "
                f"order, got {flat}"
            )
        return cls(list(zip(names, shape, strict=True)), ranks_per_node=ranks_per_node)

    # -- layout ---------------------------------------------------------------
    def size(self, axis: str) -> int:
        return self.sizes[self.index(axis)]

    def index(self, axis: str) -> int:
        try:
            return self.names.index(axis)
        except ValueError:
            raise KeyError(f"unknown axis {axis!r}; mesh axes are {list(self.names)}") from None

    @cached_property
    def strides(self) -> tuple[int, ...]:
        out, s = [], 1
        for size in reversed(self.sizes):
            out.append(s)
            s *= size
        return tuple(reversed(out))

    def coords(self, rank: int) -> tuple[int, ...]:
        """Coordinates of `rank` along each axis."""
        self._check_rank(rank)
        return tuple((rank // st) % sz for st, sz in zip(self.strides, self.sizes, strict=True))

    def rank_of(self, coords: Sequence[int]) -> int:
        return sum(c * st for c, st in zip(coords, self.strides, strict=True))

    def group_size(self, axes: Sequence[str] | None) -> int:
        """Size of the group over `axes` (None means world)."""
        if axes is None:
            return self.world_size
        return math.prod(self.size(a) for a in axes)

    def group_members(self, rank: int, axes: Sequence[str] | None) -> tuple[int, ...]:
        """Members of `rank`'s group over `axes`, row-major over `axes` in the order written."""
        if axes is None:
            return tuple(range(self.world_size))
        idx = [self.index(a) for a in axes]
        base = list(self.coords(rank))
        for i in idx:
            base[i] = 0
        members = []
        for flat in range(self.group_size(axes)):
            c = list(base)
            rem = flat
            for i in reversed(idx):
                c[i] = rem % self.sizes[i]
                rem //= self.sizes[i]
            members.append(self.rank_of(c))
        return tuple(members)

    def group_index(self, rank: int, axes: Sequence[str] | None) -> int:
        """Position of `rank` in its own group over `axes`."""
        return self.group_members(rank, axes).index(rank)

    def partition(self, axes: Sequence[str] | None) -> tuple[tuple[int, ...], ...]:
        """All groups over `axes`, each in group order, sorted by their first member."""
        seen: dict[int, tuple[int, ...]] = {}
        for r in range(self.world_size):
            if r not in seen:
                g = self.group_members(r, axes)
                for m in g:
                    seen[m] = g
        return tuple(sorted(set(seen.values()), key=lambda g: min(g)))

    # -- nodes ----------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.ranks_per_node

    def split_group(
        self, rank: int, axes: Sequence[str] | None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(intra, inter) parts of `rank`'s group: the members on its node, and the
        members at the same position within their own node's part (group order kept)."""
        members = self.group_members(rank, axes)
        node = self.node_of(rank)
        intra = tuple(m for m in members if self.node_of(m) == node)
        pos = intra.index(rank)
        inter = []
        for n in sorted({self.node_of(m) for m in members}):
            part = [m for m in members if self.node_of(m) == n]
            if pos < len(part):
                inter.append(part[pos])
        return intra, tuple(inter)

    def is_intra_node(self, axes: Sequence[str] | None) -> bool:
        """True when every group over `axes` lies inside one node."""
        return all(len({self.node_of(m) for m in g}) == 1 for g in self.partition(axes))

    # -- misc -----------------------------------------------------------------
    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the mesh of {self.world_size} ranks")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mesh) and (
            (self.names, self.sizes, self.ranks_per_node)
            == (other.names, other.sizes, other.ranks_per_node)
        )

    def __hash__(self) -> int:
        return hash((self.names, self.sizes, self.ranks_per_node))

    def __repr__(self) -> str:
        axes = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.sizes, strict=True))
        return f"Mesh({axes}; ranks_per_node={self.ranks_per_node})"

    @classmethod
    def parse(cls, spec: str, ranks_per_node: int | None = None) -> Mesh:
        """Parse 'dp=2,tp=4' (the CLI's form)."""
        axes = []
        for part in spec.split(","):
            name, sep, size = part.strip().partition("=")
            if not sep or not size.strip().isdigit():
                raise ValueError(f"mesh spec {spec!r}: expected name=size[,name=size...]")
            axes.append((name.strip(), int(size)))
        return cls(axes, ranks_per_node=ranks_per_node)
