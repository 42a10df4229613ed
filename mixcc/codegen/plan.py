"""The plan: typed stages with scope, transports, algorithm and chunking, as data.

A plan has two views of the same program, both computed once by `lower`:
- `stages`: what the fused backend launches, one kernel per stage. `IntraStage` runs a
  linear map whose terms stay inside each node (transport IPC, one-shot or two-shot);
  `HierStage` runs one whose terms cross nodes (IPC inside the node, NVSHMEM between
  nodes, chunks pipelined). Each stage is one maximal run of ops with one reduction.
- `steps`: what the reference backend runs, torch.distributed collectives over
  partitions plus local block permutations (`Step`).

The chunking of a stage (columns per block per chunk, workspace per rank) is a pure
function of the stage, the element size and the workspace sizes: `chunk_cols` and
`grid` below serve the launcher and `explain` alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..ir.nodes import Op
from . import layout
from .hier import HierSchedule
from .linear_map import LinearMap
from .schedule import TERM_INPUT, PushSchedule, Schedule, role_sends


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB", 75894784 -> "72.4 MiB" (binary units)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Step:
    """One torch.distributed collective over a partition of the world (reference backend),
    or a local block permutation (`perms[rank][p]` = input block feeding output block p)."""

    coll: str  # allreduce | allgather | reducescatter | permute
    groups: tuple[tuple[int, ...], ...] = ()
    redop: str = "sum"
    scope: str = "intra"  # intra | inter | local
    perms: tuple[tuple[int, ...], ...] = ()

    def __str__(self) -> str:
        if self.coll == "permute":
            return f"permute blocks [local], rank 0: {list(self.perms[0])}"
        op = "" if self.redop == "sum" else f", op={self.redop}"
        groups = " ".join(str(list(g)) for g in self.groups[:4])
        more = f" ... ({len(self.groups)} groups)" if len(self.groups) > 4 else ""
        transport = "" if self.scope == "local" else " (nccl/gloo)"
        return f"{self.coll}{op} [{self.scope}]{transport} over {groups}{more}"


@dataclass(frozen=True)
class IntraStage:
    """One fused kernel over CUDA IPC: every term of the map lies on the consumer's node."""

    ops: tuple[Op, ...]
    lmap: LinearMap
    schedules: dict[str, Schedule | PushSchedule] = field(default_factory=dict)
    scope = "intra"
    transports = ("ipc",)

    @property
    def push_schedule(self) -> PushSchedule:
        return self.schedules["push"]  # type: ignore[return-value]

    def units_per_region(self, two_shot: bool) -> int:
        return self.lmap.in_units + (self.schedules["two_shot"].slots if two_shot else 0)


@dataclass(frozen=True)
class HierStage:
    """One fused kernel whose terms cross nodes: IPC inside a node, NVSHMEM between nodes
    (rail-aligned), chunks pipelined (codegen/hier.py)."""

    ops: tuple[Op, ...]
    lmap: LinearMap
    hier: HierSchedule
    scope = "intra+inter"
    transports = ("ipc", "nvshmem")


Stage = IntraStage | HierStage


def push_safe(stage: IntraStage) -> bool:
    """Whether the push kernel may run this stage in place on every rank (it reads its own
    input units during the reduce, so no output unit may be written before a later task
    reads it as input)."""
    return all(r.inplace_safe for r in stage.push_schedule.ranks)


def push_width(stage: IntraStage) -> int:
    """The most peers one rank pushes to in this stage."""
    return max(len(r.dsts) for r in stage.push_schedule.ranks)


def push_auto(stage: IntraStage) -> bool:
    """Whether auto may take push for this stage from PUSH_MIN_BYTES (its table): the case
    measured (two ranks: each pushes to its one peer, into a whole push region) and push
    can run in place. On larger worlds a one-peer stage's sender area is a 1/(world-1)
    share of the region, so its chunks are smaller: not measured, the one-shot stays."""
    return stage.lmap.world_size == 2 and push_width(stage) == 1 and push_safe(stage)


def ll_safe(stage: IntraStage) -> bool:
    """Whether the LL kernel may run this stage: every rank a rank stores lines to also
    stores lines to it (so a rank reuses a set only after its consumers finished with it:
    templates/stage_kernel.cu.j2, ll_kernel), and push could run it in place (the same
    schedule and task order)."""
    return push_safe(stage) and all(set(r.dsts) <= set(r.srcs)
                                    for r in stage.push_schedule.ranks)


def ll_auto(stage: IntraStage) -> bool:
    """Whether auto may take LL for this stage up to LL_MAX_BYTES (its table): the case measured
    (two ranks) where LL can run; more ranks were not measured."""
    return stage.lmap.world_size == 2 and ll_safe(stage)


def ll_cols(stage: IntraStage, elem: int, rows: bool = False) -> int:
    """Columns of every unit one block sends per LL chunk: a sender's area of an LL chunk
    (`rows`: of the whole LL region, where a fused epilogue keeps rows whole) holds
    `slots` units of that many columns at two bytes of line per byte of data (a multiple
    of 16 bytes; 0 if none fits)."""
    vec = max(1, 16 // elem)
    area = layout.sender_area_bytes(
        layout.LL_REGION_BYTES if rows else layout.LL_CHUNK_BYTES, stage.lmap.world_size)
    return area // (stage.push_schedule.slots * 2 * elem) // vec * vec


def cliques(stage: IntraStage) -> bool:
    """Whether the one-shot's ranks form cliques (each rank's neighbours plus itself are the
    same set for all of them), so that every member of a clique sees every member's
    registered-input word and all of them take the same path: the copy engines
    (ce_safe), or the one-shot's chunks without barriers when every input lies in its
    pool (templates/stage_kernel.cu.j2, REG_CLIQUES)."""
    ranks = stage.schedules["one_shot"].ranks
    groups = [frozenset((r, *rs.neighbors)) for r, rs in enumerate(ranks)]
    return all(len(g) > 1 and all(groups[p] == g for p in g) for g in groups)


def ce_safe(stage: IntraStage) -> bool:
    """Whether the copy engines may move this stage (docs/DESIGN.md, "Copy engines"): a
    pure copy (every output unit is one input unit with coefficient 1: an allgather) among
    ranks that form cliques."""
    lmap = stage.lmap
    if any(len(terms) != 1 or terms[0][2] != 1 for unit in lmap.out_units for terms in unit):
        return False
    return cliques(stage)


def ce_copies(stage: IntraStage, rank: int, unit_bytes: int) -> tuple[tuple[int, ...], ...]:
    """The copies of `rank`'s output from its peers' inputs, one per output unit that a
    peer holds: (byte offset in the output, source rank, byte offset in the source's
    input, bytes). Its own units are not listed (ce_local_kernel copies them while the
    copy engines move the peers')."""
    return tuple((j * unit_bytes, src, u * unit_bytes, unit_bytes)
                 for j, ((src, u, _),) in enumerate(stage.lmap.out_units[rank]) if src != rank)


def intra_cols(stage: IntraStage, two_shot: bool, elem: int, region_bytes: int,
               result_elem: int = 0) -> int:
    """Columns of every unit one block handles per chunk (a multiple of 16 bytes), or 0 when
    the region is too small for one vector. `result_elem`: bytes per element of the
    two-shot's result slots when not `elem` (4: fp32 slots before a fused epilogue)."""
    vec = max(1, 16 // elem)
    slots = stage.units_per_region(two_shot) - stage.lmap.in_units
    per = region_bytes // (stage.lmap.in_units * elem + slots * (result_elem or elem))
    return per // vec * vec


def push_cols(stage: IntraStage, elem: int, region_bytes: int) -> int:
    """Columns of every unit one block pushes per chunk: the sender's area of a push region
    holds `slots` units of that many columns (a multiple of 16 bytes; 0 if none fits)."""
    vec = max(1, 16 // elem)
    area = layout.sender_area_bytes(region_bytes, stage.lmap.world_size)
    return area // (stage.push_schedule.slots * elem) // vec * vec


def share_cap(cols: int, elem: int, local: int) -> int:
    """Elements of one column share of `cols` split among `local` ranks in 16-byte packs."""
    vec = max(1, 16 // elem)
    return -(-(cols // vec) // local) * vec


def part_elem(stage: HierStage, elem: int, epilogue: bool = False) -> int:
    """Bytes per element of the parts a hierarchical stage sends between nodes: 4 (fp32)
    where a part sums (or scales) terms of a 16-bit dtype and is then added to other parts
    or handed to a fused epilogue, so that every output is rounded once (docs/DESIGN.md,
    "Precision"); else the dtype's own (a part that is a final by itself is rounded once
    either way)."""
    h = stage.hier
    if elem >= 4 or h.redop != "sum":
        return elem
    reduces = any(len(p.terms) > 1 or any(c != 1 for _, _, c in p.terms)
                  for rs in h.ranks for row in rs.sends for p in row)
    combines = any(len(srcs) > 1 for rs in h.ranks for srcs in rs.finals)
    return 4 if reduces and (combines or epilogue) else elem


def hier_cols(stage: HierStage, elem: int, region_bytes: int, sym_region_bytes: int,
              result_elem: int = 0, epilogue: bool = False) -> int:
    """The largest chunk width (multiple of 16 bytes) whose staging and result slots fit an
    IPC region (none with one rank per node and no result slots: the kernel works in
    place) and whose send and receive parts fit an NVSHMEM region; 0 if none does.
    `result_elem`: bytes per element of the result slots when not `elem` (4: fp32 slots
    before a fused epilogue); `epilogue`: the module was rendered with one (its parts'
    type, part_elem, is the module's, whether or not this launch runs the statements)."""
    h = stage.hier
    vec = max(1, 16 // elem)
    # one rank per node and no fp32 result slots: the kernel reads its input and writes its
    # output in place (templates/hier_kernel.cu.j2, DIRECT), the IPC region holds nothing
    direct = h.local == 1 and not result_elem
    pe = part_elem(stage, elem, epilogue or bool(result_elem))

    def fits(cols: int) -> bool:
        sc = share_cap(cols, elem, h.local)
        ipc = 0 if direct else h.in_units * cols * elem + h.max_finals * sc * (result_elem or elem)
        sym = 2 * h.nodes * h.max_parts * sc * pe
        return ipc <= region_bytes and sym <= sym_region_bytes

    lo, hi = 0, (sym_region_bytes // pe if direct else region_bytes // h.in_units // elem) // vec
    while lo < hi:  # the largest packs count that fits (fits() is monotone)
        mid = (lo + hi + 1) // 2
        if fits(mid * vec):
            lo = mid
        else:
            hi = mid - 1
    return lo * vec


def grid(unit_elems: int, cols: int, elem: int, max_blocks: int, ll: bool = False
         ) -> tuple[int, int, int]:
    """(blocks, chunks, columns per block and chunk) for `unit_elems` columns per unit: as
    many blocks as there are full 16-byte passes of THREADS threads (`ll`: as there are
    chunks of `cols` columns, for an LL chunk is less than a pass: one chunk per block
    while blocks last), capped at max_blocks; enough chunks of at most `cols` columns;
    then the columns spread evenly over blocks x chunks (in 16-byte packs), so that no
    block idles while another works through a region-sized chunk."""
    vec = max(1, 16 // elem)
    per_block = cols if ll else layout.THREADS * vec
    nblocks = max(1, min(max_blocks, math.ceil(unit_elems / per_block)))
    chunks = math.ceil(unit_elems / (nblocks * cols))
    per = math.ceil(unit_elems / (nblocks * chunks))
    return nblocks, chunks, min(cols, math.ceil(per / vec) * vec)


# Rows below this many bytes keep one block each in the LL kernel's fused epilogue (the
# built-in rule; per setup: the tables' ROW_SPLIT_MIN_BYTES, mixcc/tuning/defaults).
ROW_SPLIT_MIN_BYTES = 16 << 10


def ll_row_split(stage: IntraStage, rows: int, hidden: int, elem: int, max_blocks: int,
                 norms: int = 1, roles: int = 1, min_bytes: int | None = ROW_SPLIT_MIN_BYTES
                 ) -> int:
    """Blocks per row of the LL kernel's fused epilogue (docs/DESIGN.md, "Epilogues"): for
    rows of at least `min_bytes` (None: never), as many as the plain LL call spreads a row over
    (its chunk's columns per block, ll_cols), at most layout.ROW_SPLIT_MAX, each holding
    whole packs of an equal part, while every row's blocks fit the grid; else 1 (a block
    per row). A block that holds a whole row sends and receives all its lines alone; the
    split rows' blocks add their sums of squares through the workspace instead.
    Only where the row pass exchanges sums once per kernel (the slots and their tag serve
    one exchange): one output unit per block (one per rank, or `roles` > 1: ll_roles, each
    unit's rows on blocks of their own, `roles` x the blocks in the grid) and at most one
    rmsnorm statement (`norms`)."""
    if norms > 1 or any(len(r.reduce) != roles for r in stage.push_schedule.ranks):
        return 1
    if min_bytes is None or hidden * elem < min_bytes:
        return 1
    vec = max(1, 16 // elem)
    cols = ll_cols(stage, elem)
    n = min(layout.ROW_SPLIT_MAX, -(-hidden // cols)) if cols > 0 else 1
    while n > 1 and (hidden % n or hidden // n % vec or rows * n * roles > max_blocks):
        n -= 1
    return n


def ll_roles(stage: IntraStage) -> int:
    """Blocks per chunk of columns in the LL kernel's fused epilogue: one per output unit
    (reduce entry) of a rank, each sending what its consumers' same entry reads
    (schedule.role_sends) and running that entry's row pass (docs/DESIGN.md, "Output units
    over blocks"); or 1, every block holding all of them. More than one where every rank
    has the same number n > 1 of entries, at most 31 sends (the role masks' bits), and a
    call in place cannot race: where input and output units match in number (the only
    shape that runs in place), no entry's block reads the input unit that another entry's
    block writes. The host runs it only in one chunk (a block that reads nothing from a
    peer would otherwise run a chunk ahead of it: the LL sets' order holds between calls,
    through the kernel's end, docs/DESIGN.md)."""
    sched = stage.push_schedule
    n = {len(r.reduce) for r in sched.ranks}
    if len(n) != 1 or min(n) < 2 or any(len(r.sends) > 31 for r in sched.ranks):
        return 1
    if sched.in_units == min(n):
        for pr, roles in zip(sched.ranks, role_sends(sched), strict=True):
            for i, (j, _) in enumerate(pr.reduce):
                for i2, (_, terms) in enumerate(pr.reduce):
                    if i2 != i and ((TERM_INPUT, j) in {t[:2] for t in terms} or
                                    any(pr.sends[k][1] == j for k in roles[i2])):
                        return 1
    return min(n)


def row_grid(unit_elems: int, cols: int, hidden: int, elem: int, max_blocks: int,
             split: int = 1) -> tuple[int, int, int]:
    """grid() for a fused epilogue: the same, but every chunk holds whole rows of `hidden`
    columns (hidden divides unit_elems and cols >= hidden), so a block owns each of its
    rows entirely (docs/DESIGN.md, "Epilogues"); or with `split` > 1 (ll_row_split) one
    chunk in which `split` consecutive blocks hold a row, hidden / split columns each."""
    vec = max(1, 16 // elem)
    rows = unit_elems // hidden
    if split > 1:
        return rows * split, 1, hidden // split
    per_chunk = cols // hidden
    nblocks = max(1, min(max_blocks, rows, math.ceil(unit_elems / (layout.THREADS * vec))))
    chunks = math.ceil(rows / (nblocks * per_chunk))
    return nblocks, chunks, math.ceil(rows / (nblocks * chunks)) * hidden


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]  # fused view: one kernel each
    steps: tuple[Step, ...]  # reference view
    granularity: int
    one_node: bool  # no term crosses a node: IPC alone runs every stage

    def describe(self, elem: int | None = None,
                 workspace_bytes: int = layout.DEFAULT_WORKSPACE_BYTES,
                 symmetric_bytes: int = layout.DEFAULT_SYMMETRIC_BYTES,
                 depth: int = 2, auto: Callable[[int, Stage], list[str]] | None = None
                 ) -> str:
        """Every stage with scope, transport, `auto`'s lines (auto's choice by size: see
        fused.auto_lines), chunk bytes (when the element size is known), pipeline depth and
        workspace per rank; then the reference steps."""
        h = human_bytes
        if not self.stages:
            return "no stage: the program is the identity (output = copy of input)"
        lines = []
        region = layout.region_bytes(workspace_bytes)
        sym = layout.sym_region_bytes(symmetric_bytes)
        for i, st in enumerate(self.stages):
            ops = "; ".join(str(o) for o in st.ops)
            lines.append(f"stage {i} [{st.scope}] transport={'+'.join(st.transports)}: {ops}")
            if auto is not None:
                lines += auto(i, st)
            if isinstance(st, IntraStage):
                if elem:
                    for two in (False, True):
                        cols = intra_cols(st, two, elem, region)
                        name = "two_shot" if two else "one_shot"
                        lines.append(f"    {name} chunk: {cols} elements x "
                                     f"{st.units_per_region(two)} unit(s) per block = "
                                     f"{h(cols * elem * st.lmap.in_units)} of input per "
                                     "block")
                    cols = push_cols(st, elem, region)
                    lines.append(f"    push chunk: {cols} elements per unit per block, "
                                 f"{layout.NSETS} chunks in flight per block (credits)")
                    lines.append(f"    ll chunk: {ll_cols(st, elem)} elements per unit per "
                                 "block (lines of 8 data bytes and the epoch, in an LL area "
                                 f"of {h(layout.LL_BYTES)} per rank); LL can run here: "
                                 f"{'yes' if ll_safe(st) else 'no'}")
                lines.append(f"    workspace per rank: IPC {h(workspace_bytes)} (pull and push "
                             f"areas of {layout.NSETS} sets x {layout.MAX_BLOCKS} regions of "
                             f"{h(region)}), no symmetric heap; inputs and outputs are "
                             "ordinary tensors, read and written in place (no copy of the "
                             "message is allocated); an input from mixcc.empty (the group's "
                             "registered pool, 1 GiB per rank by default) may be read by "
                             "peers in place (above); push reads any input in place")
                for sched in st.schedules.values():
                    lines += ["    " + ln for ln in sched.describe(0).splitlines()]
            else:
                hs = st.hier
                lines.append(f"    algorithm: hierarchical (intra reduce of node parts -> "
                             f"rail-aligned NVSHMEM put-with-signal -> combine -> intra "
                             f"gather); pipeline depth {depth} (chunks in flight)")
                if elem:
                    cols = hier_cols(st, elem, region, sym)
                    lines.append(f"    chunk: {cols} elements per unit per block "
                                 f"({human_bytes(cols * elem * hs.in_units)} of input per "
                                 "block), share "
                                 f"{share_cap(cols, elem, hs.local)} elements per local rank"
                                 + ("; one rank per node: the input is read in place and, "
                                    "without a fused epilogue (whose fp32 shares go through "
                                    "the IPC region, in narrower chunks), the output written "
                                    "in place" if hs.local == 1 else ""))
                lines.append(f"    workspace per rank: IPC {h(workspace_bytes)}, NVSHMEM "
                             f"symmetric heap {h(symmetric_bytes)} (fixed, independent of the "
                             "message size)")
                lines += ["    " + ln for ln in hs.describe(0).splitlines()]
        lines.append("reference backend steps:")
        lines += [f"    {s}" for s in self.steps]
        return "\n".join(lines)
