"""Schedules of a linear map for the fused intra-node kernel.

one-shot: every consumer reads all its sources and reduces (one barrier per chunk;
  reads n x the data from peers: best for small, latency-bound messages).
two-shot: each distinct output block is split among the ranks that need it; each
  owner reduces its share into its workspace, then every consumer copies the shares
  from the owners (two barriers per chunk; moves about 2(n-1)/n of the data:
  best for large messages).
push: the one-shot map with the data travelling the other way: every source stores the
  units its consumers need straight from its input into their push areas (posted
  stores, no staging copy), signals, and each consumer reduces its own input and the
  received units from local memory, then returns a credit (docs/DESIGN.md, "Push").

Tables are per rank, in units, so one compiled kernel serves any row count.
"""

from __future__ import annotations

from dataclasses import dataclass

from .linear_map import LinearMap, Term

DST_OUT, DST_WS = 0, 1


@dataclass(frozen=True)
class ReduceTask:
    """Reduce `terms` into output unit / workspace slot `dst`; this rank computes share
    `owner_index` of `owners` of every column block."""

    dst_kind: int
    dst: int
    owner_index: int
    owners: int
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class GatherTask:
    """Copy output unit `dst` from its owners: share i comes from (rank, slot) sources[i]."""

    dst: int
    sources: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RankSchedule:
    reduce: tuple[ReduceTask, ...]
    gather: tuple[GatherTask, ...]
    neighbors: tuple[int, ...]  # ranks this rank exchanges data with (symmetric)


@dataclass(frozen=True)
class Schedule:
    algorithm: str  # "one_shot" | "two_shot"
    in_units: int
    slots: int  # workspace result slots per rank (two-shot), max over ranks
    ranks: tuple[RankSchedule, ...]
    redop: str = "sum"

    def describe(self, rank: int = 0) -> str:
        rs = self.ranks[rank]
        lines = [
            f"{self.algorithm}: {self.in_units} input unit(s), {self.slots} result slot(s); "
            f"rank {rank} talks to {list(rs.neighbors)}"
        ]
        for t in rs.reduce:
            where = f"out[{t.dst}]" if t.dst_kind == DST_OUT else f"ws_slot[{t.dst}]"
            share = f" share {t.owner_index}/{t.owners}" if t.owners > 1 else ""
            lines.append(f"  {where}{share} = {format_terms(t.terms, self.redop)}")
        for g in rs.gather:
            srcs = ", ".join(f"r{s}.slot{k}" for s, k in g.sources)
            lines.append(f"  out[{g.dst}] <- shares of [{srcs}]")
        return "\n".join(lines)


def format_terms(terms: tuple[Term, ...], redop: str) -> str:
    """'r0.u0 + 2*r1.u0' for sums, 'max(r0.u0, r1.u0)' for max and min."""
    return join_terms([(f"r{s}.u{u}", c) for s, u, c in terms], redop)


def join_terms(named: list[tuple[str, int]], redop: str) -> str:
    """'a + 2*b' for sums of (name, coefficient) pairs, 'max(a, b)' for max and min."""
    if redop != "sum":
        return f"{redop}({', '.join(n for n, _ in named)})"
    return " + ".join((f"{c}*" if c != 1 else "") + n for n, c in named)


def _neighbors(world: int, reads: list[set[int]]) -> list[tuple[int, ...]]:
    sym = [set(r) for r in reads]
    for r in range(world):
        for p in reads[r]:
            sym[p].add(r)
    return [tuple(sorted(s - {r})) for r, s in enumerate(sym)]


def one_shot(lmap: LinearMap) -> Schedule:
    ranks, reads = [], []
    for units in lmap.out_units:
        tasks = tuple(ReduceTask(DST_OUT, j, 0, 1, terms) for j, terms in enumerate(units))
        ranks.append(tasks)
        reads.append({s for terms in units for s, _, _ in terms})
    nb = _neighbors(lmap.world_size, reads)
    return Schedule(
        "one_shot", lmap.in_units, 0,
        tuple(RankSchedule(t, (), n) for t, n in zip(ranks, nb, strict=True)), lmap.redop,
    )


def two_shot(lmap: LinearMap) -> Schedule:
    world = lmap.world_size
    consumers: dict[tuple[Term, ...], list[tuple[int, int]]] = {}
    for r, units in enumerate(lmap.out_units):
        for j, terms in enumerate(units):
            consumers.setdefault(terms, []).append((r, j))
    reduce: list[list[ReduceTask]] = [[] for _ in range(world)]
    gather: list[list[GatherTask]] = [[] for _ in range(world)]
    reads: list[set[int]] = [set() for _ in range(world)]
    slots = [0] * world
    for terms in sorted(consumers):
        users = consumers[terms]
        owners = sorted({r for r, _ in users})
        if len(owners) == 1:  # nobody to share with: reduce straight into the output
            for r, j in users:
                reduce[r].append(ReduceTask(DST_OUT, j, 0, 1, terms))
                reads[r].update(s for s, _, _ in terms)
            continue
        slot_of = {}
        for i, o in enumerate(owners):
            slot_of[o] = slots[o]
            reduce[o].append(ReduceTask(DST_WS, slots[o], i, len(owners), terms))
            reads[o].update(s for s, _, _ in terms)
            slots[o] += 1
        sources = tuple((o, slot_of[o]) for o in owners)
        for r, j in users:
            gather[r].append(GatherTask(j, sources))
            reads[r].update(owners)
    nb = _neighbors(world, reads)
    return Schedule(
        "two_shot", lmap.in_units, max(slots),
        tuple(
            RankSchedule(tuple(reduce[r]), tuple(gather[r]), nb[r]) for r in range(world)
        ), lmap.redop,
    )


TERM_INPUT, TERM_SLOT = 0, 1


@dataclass(frozen=True)
class PushRank:
    """One rank's push schedule. `sends`: (consumer, my unit, my area index in the
    consumer's push region, unit slot in that area). `reduce`: (output unit, terms) with
    terms (TERM_INPUT, unit, 0, coef) read from my own input or (TERM_SLOT, area, slot,
    coef) read from my push region."""

    dsts: tuple[int, ...]  # ranks I push to (I wait for their credits)
    srcs: tuple[int, ...]  # ranks that push to me (I wait for their data)
    sends: tuple[tuple[int, int, int, int], ...]
    reduce: tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]
    inplace_safe: bool  # no output unit is written before a later task reads it as input


@dataclass(frozen=True)
class PushSchedule:
    in_units: int
    slots: int  # unit slots per sender area: max over (consumer, source) pairs
    ranks: tuple[PushRank, ...]
    redop: str = "sum"

    def describe(self, rank: int = 0) -> str:
        pr = self.ranks[rank]
        lines = [f"push: {self.slots} unit slot(s) per sender area; rank {rank} pushes to "
                 f"{list(pr.dsts)}, receives from {list(pr.srcs)}"]
        for dst, unit, area, slot in pr.sends:
            lines.append(f"  r{dst}.area{area}.slot{slot} <- in[{unit}]")
        for j, terms in pr.reduce:
            named = [(f"in[{a}]" if kind == TERM_INPUT else f"area{a}.slot{b}", c)
                     for kind, a, b, c in terms]
            lines.append(f"  out[{j}] = {join_terms(named, self.redop)}")
        return "\n".join(lines)


def role_sends(sched: PushSchedule) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per rank, per reduce entry i: the indices of the rank's sends that its consumers'
    entry i reads. Where each output unit has blocks of its own (plan.ll_roles), the block
    of entry i sends these, into the regions of its consumers' blocks of entry i (a send
    that several entries read goes to each of their blocks)."""
    out = []
    for pr in sched.ranks:
        per = []
        for i in range(len(pr.reduce)):
            need = []
            for k, (dst, _, area, slot) in enumerate(pr.sends):
                theirs = sched.ranks[dst].reduce
                if i < len(theirs) and (TERM_SLOT, area, slot) in \
                        {t[:3] for t in theirs[i][1]}:
                    need.append(k)
            per.append(tuple(need))
        out.append(tuple(per))
    return tuple(out)


def push_area(src: int, dst: int, world: int) -> int:
    """The index of sender `src`'s area in consumer `dst`'s push region (layout.py)."""
    return (src - dst - 1) % world


def push(lmap: LinearMap) -> PushSchedule:
    """The one-shot map as a push schedule: each (source, unit) a consumer needs from a
    peer gets a slot in that source's area of the consumer's push region."""
    world = lmap.world_size
    slot_of: list[dict[tuple[int, int], int]] = []  # per consumer: (src, unit) -> slot
    for c, units in enumerate(lmap.out_units):
        need: dict[int, list[int]] = {}
        for terms in units:
            for s, u, _ in terms:
                if s != c and u not in need.setdefault(s, []):
                    need[s].append(u)
        slot_of.append({(s, u): k for s, us in need.items() for k, u in enumerate(sorted(us))})
    slots = max((k + 1 for m in slot_of for k in m.values()), default=1)
    ranks = []
    for r, units in enumerate(lmap.out_units):
        sends = tuple(sorted((c, u, push_area(r, c, world), k)
                             for c in range(world) for (s, u), k in slot_of[c].items()
                             if s == r))
        reduce = []
        written: set[int] = set()
        safe = True
        for j, terms in enumerate(units):
            rt = []
            for s, u, coef in terms:
                if s == r:
                    safe = safe and u not in written
                    rt.append((TERM_INPUT, u, 0, coef))
                else:
                    rt.append((TERM_SLOT, push_area(s, r, world), slot_of[r][(s, u)], coef))
            reduce.append((j, tuple(rt)))
            written.add(j)
        safe = safe or len(units) != lmap.in_units  # other shapes never run in place
        ranks.append(PushRank(tuple(sorted({c for c, *_ in sends})),
                              tuple(sorted({s for s, _ in slot_of[r]})), sends, tuple(reduce),
                              safe))
    return PushSchedule(lmap.in_units, slots, tuple(ranks), lmap.redop)
