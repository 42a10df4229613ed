"""The hierarchical schedule of a linear map whose terms cross nodes (docs/DESIGN.md,
section "Transports").

Every output unit of rank r is a distinct "final" block F (its sorted term set). On
each node the distinct finals are split into `local` column shares: local rank i owns
share i of every final its node needs. For a final F needed on node m and every node
n holding some of F's sources, node n reduces its part of F (the terms restricted to
node n) over CUDA IPC, each local rank its own share i, and local rank i of node n puts
that share to local rank i of node m over NVSHMEM (rail-aligned: a NIC carries only its
own local rank's traffic). Rank (m, i) then combines the parts of F from every node in
node order into share i, and every consumer on node m copies the shares of its finals
from their owners over IPC. For allreduce(world) this is intra reduce-scatter, inter
allreduce of the shard, intra allgather; for allreduce(tp); allgather(dp) with tp
inside a node it is intra reduce-scatter, inter allgather of the shard, intra
allgather: the order falls out of the map.

Flat per-rank table read by templates/hier_kernel.cu.j2, all ints:

    n_nbrs, nbrs...                                  local ranks (global ids), no self
    for dest node m in 0..nodes-1:                   parts node n sends to node m
      n_parts, {kind, ...} x n_parts                 kind 0: n_terms, {src, unit, coef}...
                                                     kind 1 (copy): node, slot
    n_finals, {n_src, {node, slot} x n_src} x n_finals
    n_out, final index x n_out
    n_recv, recv nodes...                            nodes whose parts this rank waits for
"""

from __future__ import annotations

from dataclasses import dataclass

from ..mesh import Mesh
from .linear_map import LinearMap, Term
from .schedule import format_terms

KIND_REDUCE, KIND_COPY = 0, 1


@dataclass(frozen=True)
class Part:
    """One part sent to a node: reduce `terms` (local sources), or copy slot `copy` =
    (dest node, slot) of this rank's send area, where the same part was reduced before."""

    terms: tuple[Term, ...] = ()
    copy: tuple[int, int] | None = None


@dataclass(frozen=True)
class HierRank:
    neighbors: tuple[int, ...]  # the other local ranks of the node (global ranks)
    sends: tuple[tuple[Part, ...], ...]  # per destination node (own node included)
    finals: tuple[tuple[tuple[int, int], ...], ...]  # per final: (node, slot) in node order
    out_finals: tuple[int, ...]  # final index of each output unit
    recv_nodes: tuple[int, ...]  # nodes that send parts to this rank
    put_nodes: tuple[int, ...]  # other nodes this rank puts parts to


@dataclass(frozen=True)
class HierSchedule:
    nodes: int
    local: int  # ranks per node
    in_units: int
    redop: str
    max_parts: int  # largest n_parts of any (source node, destination node)
    max_finals: int  # largest number of finals on one node
    ranks: tuple[HierRank, ...]

    def describe(self, rank: int = 0) -> str:
        rs = self.ranks[rank]
        node = rank // self.local
        lines = [f"hierarchical: {self.nodes} nodes x {self.local} local ranks, "
                 f"rank {rank} (node {node}, local {rank % self.local}) owns share "
                 f"{rank % self.local}/{self.local} of {len(rs.finals)} final block(s)"]
        for m, parts in enumerate(rs.sends):
            if not parts:
                continue
            how = "kept" if m == node else f"put to rank {m * self.local + rank % self.local}"
            descr = []
            for p in parts:
                if p.copy is not None:
                    descr.append(f"copy of part {p.copy}")
                else:
                    descr.append(format_terms(p.terms, self.redop))
            lines.append(f"  node {m}: {len(parts)} part(s) {how}: " + "; ".join(descr))
        for f, srcs in enumerate(rs.finals):
            srcs_text = ", ".join(f"node{n}.slot{k}" for n, k in srcs)
            lines.append(f"  final {f} = {self.redop}({srcs_text})")
        lines.append(f"  out units <- finals {list(rs.out_finals)} (shares from every local "
                     "rank)")
        return "\n".join(lines)


def hier_schedule(lmap: LinearMap, mesh: Mesh, split_terms: bool = False) -> HierSchedule:
    """The hierarchical schedule of `lmap` on `mesh` (nodes of mesh.ranks_per_node ranks).

    `split_terms` (batch-invariant plans): every term is a part of its own, so no node
    pre-reduces its terms and each final combines all of its terms in table order, the
    order of a one-node kernel (docs/DESIGN.md, "Precision")."""
    world, local = lmap.world_size, mesh.ranks_per_node
    nodes = world // local

    def node_of(r: int) -> int:
        return r // local

    def pieces(terms: tuple[Term, ...], n: int) -> list[tuple[Term, ...]]:
        """The parts of a final's terms that node n sends (in term order)."""
        sub = tuple(t for t in terms if node_of(t[0]) == n)
        if split_terms:
            return [(t,) for t in sub]
        return [sub] if sub else []

    # distinct finals per node, in sorted order (the same on every rank of the node)
    finals = [sorted({u for r in range(m * local, (m + 1) * local) for u in lmap.out_units[r]})
              for m in range(nodes)]
    # parts[n][m]: distinct non-empty restrictions to node n of the finals of node m
    parts: list[list[list[tuple[Term, ...]]]] = [[[] for _ in range(nodes)]
                                                 for _ in range(nodes)]
    slot: list[list[dict[tuple[Term, ...], int]]] = [[{} for _ in range(nodes)]
                                                     for _ in range(nodes)]
    for m in range(nodes):
        for terms in finals[m]:
            for n in range(nodes):
                for sub in pieces(terms, n):
                    if sub not in slot[n][m]:
                        slot[n][m][sub] = len(parts[n][m])
                        parts[n][m].append(sub)
    ranks = []
    for r in range(world):
        n = node_of(r)
        first: dict[tuple[Term, ...], tuple[int, int]] = {}
        sends = []
        for m in range(nodes):
            row = []
            for k, sub in enumerate(parts[n][m]):
                if sub in first:
                    row.append(Part(copy=first[sub]))
                else:
                    first[sub] = (m, k)
                    row.append(Part(terms=sub))
            sends.append(tuple(row))
        fin = tuple(
            tuple((nn, slot[nn][n][sub]) for nn in range(nodes) for sub in pieces(terms, nn))
            for terms in finals[n])
        index = {terms: f for f, terms in enumerate(finals[n])}
        out = tuple(index[u] for u in lmap.out_units[r])
        recv = tuple(nn for nn in range(nodes) if nn != n and parts[nn][n])
        puts = tuple(m for m in range(nodes) if m != n and parts[n][m])
        ranks.append(HierRank(tuple(q for q in range(n * local, (n + 1) * local) if q != r),
                              tuple(sends), fin, out, recv, puts))
    return HierSchedule(
        nodes, local, lmap.in_units, lmap.redop,
        max(1, max(len(parts[n][m]) for n in range(nodes) for m in range(nodes))),
        max(1, max(len(f) for f in finals)), tuple(ranks))


def hier_table(sched: HierSchedule) -> tuple[list[int], list[int], int, int]:
    """(flat int table, per-rank offsets, max terms of a part, max sources of a final)."""
    flat: list[int] = []
    offsets = []
    max_terms, max_src = 1, 1
    for rs in sched.ranks:
        offsets.append(len(flat))
        flat += [len(rs.neighbors), *rs.neighbors]
        for row in rs.sends:
            flat.append(len(row))
            for p in row:
                if p.copy is not None:
                    flat += [KIND_COPY, *p.copy]
                else:
                    flat += [KIND_REDUCE, len(p.terms)]
                    for t in p.terms:
                        flat += list(t)
                    max_terms = max(max_terms, len(p.terms))
        flat.append(len(rs.finals))
        for srcs in rs.finals:
            flat.append(len(srcs))
            for nn, k in srcs:
                flat += [nn, k]
            max_src = max(max_src, len(srcs))
        flat += [len(rs.out_finals), *rs.out_finals, len(rs.recv_nodes), *rs.recv_nodes]
    return flat, offsets, max_terms, max_src
