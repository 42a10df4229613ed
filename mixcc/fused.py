"""The fused backend: generated CUDA, IPC inside a node and NVSHMEM between nodes.

`unavailable_reason` is the hard check (auto falls back to the reference backend when
it gives a reason; `backend="fused"` raises it); the performance heuristics (one-shot
or two-shot, chunking, pipeline depth) live apart, in `_params` / `_make_args` and the
plan. Each plan stage becomes one kernel launch on the current stream; every launch is
CUDA-graph capturable (the first call per dtype renders, builds and allocates, so make
it before capture).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import debug, nvshmem, ops, precision, tune
from .codegen import abi, layout
from .codegen.build import build, device_arch, find_nvcc
from .codegen.plan import (
    HierStage,
    IntraStage,
    Plan,
    Stage,
    ce_copies,
    ce_safe,
    grid,
    hier_cols,
    intra_cols,
    ll_auto,
    ll_cols,
    ll_roles,
    ll_row_split,
    ll_safe,
    push_auto,
    push_cols,
    push_safe,
    push_width,
    row_grid,
    share_cap,
)
from .codegen.render import CTYPES, render_stage
from .codegen.spec import BuildSpec, nvshmem_spec
from .overlap import overlaps, overlaps_partly, same_elements
from .tuning import thresholds
from .tuning.thresholds import Thresholds

# auto's thresholds (LL, push, two-shot, NCCL hand-off, registered inputs, copy engines)
# are data: mixcc/tuning/thresholds.py resolves them per GPU arch, topology and world size.
ALGORITHMS = ("one_shot", "two_shot", "push", "ll")  # the intra kernels' `algo` codes, in order
ALGO_CE = 4  # the one-shot in the copy-engine mode (mixcc_ce_launch), auto's only
MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def _public_stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# The raw current stream of a device: torch's fast private accessor (a few us cheaper per
# call than building a Stream object), else the public API.
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _public_stream


def multicast_refusal() -> str | None:
    """Why multicast must not be used here, or None."""
    bad = [v for v in MULTICAST_ENV
           if os.environ.get(v) == ("0" if v == "NCCL_NVLS_ENABLE" else "1")]
    return f"multicast is disabled on this machine ({', '.join(bad)} set)" if bad else None


def unavailable_reason(plan: Plan, mesh, options: dict, dtype: torch.dtype | None
                       ) -> str | None:
    """Why the fused backend cannot run `plan` for `dtype`, or None if it can."""
    if options.get("multicast"):
        refusal = multicast_refusal()
        if refusal:
            return f"the multicast transport was requested but {refusal}"
        return "the multicast transport is not built (use the default ipc transport)"
    if dtype is not None and dtype not in CTYPES:
        return f"dtype {dtype} is not one of {list(CTYPES)}"
    if mesh.world_size > layout.MAX_RANKS:
        return f"it has {mesh.world_size} ranks (at most {layout.MAX_RANKS})"
    if not plan.one_node:
        reason = nvshmem.available()
        if reason:
            return f"its groups cross nodes and {reason}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if mesh.world_size > 1 and not dist.is_initialized():
        return "torch.distributed is not initialized"
    return None


def shares_reduction(stage: IntraStage) -> bool:
    """Whether two-shot splits a real reduction among owners. For pure data movement
    (allgather) two-shot only doubles the remote traffic, so auto never picks it."""
    return any(len(t.terms) > 1 and t.owners > 1
               for rs in stage.schedules["two_shot"].ranks for t in rs.reduce)


def reduces_across_nodes(plan: Plan) -> bool:
    """Whether a cross-node stage of the plan combines parts from several nodes (allreduce,
    reducescatter) rather than only copying them (allgather)."""
    hier = [st.hier for st in plan.stages if isinstance(st, HierStage)]
    return any(len(srcs) > 1 for h in hier for rs in h.ranks for srcs in rs.finals)


def _from(nbytes: int, threshold: int | None) -> bool:
    """nbytes >= threshold; a threshold of None is never reached."""
    return threshold is not None and nbytes >= threshold


def _upto(nbytes: int, threshold: int | None) -> bool:
    """nbytes <= threshold; a threshold of None admits nothing."""
    return threshold is not None and nbytes <= threshold


@dataclass(frozen=True)
class AutoTraits:
    """What auto's rule reads of one intra stage (FusedRunner._stage_facts)."""

    ll: bool  # plan.ll_auto and LL's area holds a pack per unit
    push: bool  # plan.push_auto
    wide: bool  # a rank reads several peers and the two-shot splits a reduction


def auto_algorithm(th: Thresholds, traits: AutoTraits, nbytes: int, pool: bool = False
                   ) -> str:
    """auto's kernel for an intra stage at `nbytes` per rank without a tuning-table entry:
    LL up to LL_MAX_BYTES, push from PUSH_MIN_BYTES (POOL_PUSH_MIN_BYTES in a group with a
    registered pool, `pool`), the two-shot above ONE_SHOT_MAX_BYTES_WIDE in wide stages,
    else the one-shot (docs/DESIGN.md, "Intra-node algorithms")."""
    if traits.ll and _upto(nbytes, th.ll_max_bytes):
        return "ll"
    if traits.push and _from(nbytes, th.pool_push_min_bytes if pool else th.push_min_bytes):
        return "push"
    if traits.wide and th.one_shot_max_bytes_wide is not None \
            and nbytes > th.one_shot_max_bytes_wide:
        return "two_shot"
    return "one_shot"


def stage_traits(stage: IntraStage, elem: int | None = None) -> AutoTraits:
    """AutoTraits of an intra stage (LL where its area holds a pack per unit at `elem`
    bytes per element, when given)."""
    ll = ll_auto(stage) and (elem is None or ll_cols(stage, elem) >= 16 // elem)
    return AutoTraits(ll, push_auto(stage), push_width(stage) > 1 and shares_reduction(stage))


def _bound(n: int, lower: bool) -> str:
    """A segment's bound in human units: "> 256 KiB" for a lower bound just past a round
    size, else ">= 32 MiB"; "<= 256 KiB" or "< 32 MiB" for an upper one."""
    h = thresholds.human_bytes
    if lower:
        return f"> {h(n - 1)}" if (n - 1) % 1024 == 0 and n % 1024 else f">= {h(n)}"
    return f"<= {h(n - 1)}" if (n - 1) % 1024 == 0 and n % 1024 else f"< {h(n)}"


def _segments(edges: set[int], pick) -> list[tuple[str, str, str]]:
    """(size range, algorithm, source) rows: `pick(nbytes)` -> (algorithm, source) on each
    segment between `edges` (first bytes of a new segment), equal neighbours merged."""
    cuts = sorted(e for e in edges if e > 1)
    rows: list[list] = []
    for lo, hi in zip([1, *cuts], [*cuts, None], strict=True):
        got = pick(lo)
        if rows and rows[-1][2:] == list(got):
            rows[-1][1] = hi
        else:
            rows.append([lo, hi, *got])
    out = []
    for lo, hi, algo, src in rows:
        if lo == 1 and hi is None:
            size = "every size"
        elif lo == 1:
            size = _bound(hi, False)
        elif hi is None:
            size = _bound(lo, True)
        else:
            size = f"{_bound(lo, True)}, {_bound(hi, False)}"
        out.append((size, algo, src))
    return out


def _table(rows: list[tuple[str, str, str]], indent: str = "      ") -> list[str]:
    w = max(len("size per rank"), *(len(r[0]) for r in rows))
    a = max(len("algorithm"), *(len(r[1]) for r in rows))
    head = f"{indent}{'size per rank':<{w}}  {'algorithm':<{a}}  source"
    return [head] + [f"{indent}{r[0]:<{w}}  {r[1]:<{a}}  {r[2]}" for r in rows]


def auto_lines(i: int, stage: Stage, plan: Plan, resolved: thresholds.Resolved,
               elem: int | None = None, tuned: dict[int, tune.Choice] | None = None,
               tuned_source: str = "", epilogue: tuple = ()) -> list[str]:
    """What auto runs stage i at each size per rank, as a table of size ranges, algorithm
    and where the choice comes from (`tuned`: the tuning table's entries of the stage by
    size bucket, from `tuned_source`), for `mixcc explain`."""
    th, src = resolved.values, resolved.source
    tuned = tuned or {}
    bucket_edges = {(1 << b) + 1 for b in tuned} | {(1 << (b - 1)) + 1 for b in tuned if b}

    def entry(n: int) -> tuple[str, str] | None:
        c = tuned.get(tune.bucket(n))
        return None if c is None else (f"{c.algorithm} ({c.blocks} blocks)",
                                       f"tuned table {tuned_source}")

    lines = []
    if isinstance(stage, IntraStage):
        traits = stage_traits(stage, elem)
        edges = {t for t in (th.push_min_bytes, th.pool_push_min_bytes) if t is not None}
        edges |= {t + 1 for t in (th.ll_max_bytes, th.one_shot_max_bytes_wide)
                  if t is not None}
        plain = _segments(edges | bucket_edges, lambda n: entry(n) or (
            auto_algorithm(th, traits, n), src))
        lines.append("    auto's kernel (docs/DESIGN.md, \"Intra-node algorithms\"):")
        lines += _table(plain)
        ce = i == 0 and ce_safe(stage)
        if ce and th.ce_min_bytes is not None:
            edges.add(th.ce_min_bytes)

        def pooled(n: int) -> tuple[str, str]:
            if ce and _from(n, th.ce_min_bytes):
                return "copy engines", src
            return entry(n) or (auto_algorithm(th, traits, n, pool=True), src)

        with_pool = _segments(edges | bucket_edges, pooled)
        if with_pool != plain:
            lines.append("    in a group with a registered pool (mixcc.empty):")
            lines += _table(with_pool)
        reg = (f"is read in place by the one-shot from {thresholds.human_bytes(th.reg_min_bytes)}"
               " per rank, staged below" if th.reg_min_bytes is not None else "is staged")
        lines.append(f"    a registered input {reg} ({src})")
        if i == len(plan.stages) - 1 and epilogue:
            lines.append(f"    a fused epilogue runs on ll up to "
                         f"{thresholds.human_bytes(th.ll_epi_max_bytes)} per rank where ll "
                         f"can run here ({'yes' if traits.ll else 'no'}), else the one-shot; "
                         f"rows of {thresholds.human_bytes(th.row_split_min_bytes)} or more "
                         f"over two blocks ({src})")
        return lines
    nccl = hier_nccl_min_bytes(plan, epilogue, th) if i == 0 else None
    edges = {nccl} if nccl is not None else set()
    rows = _segments(edges | bucket_edges, lambda n: entry(n) or (
        ("nccl (reference backend)" if _from(n, nccl) else "hierarchical kernel"), src))
    lines.append("    auto on an NCCL group (on gloo the hierarchical kernel at every size):")
    lines += _table(rows)
    return lines


def hier_kind(plan: Plan, epilogue: tuple) -> str | None:
    """Which NCCL threshold governs a plan: None for one-node plans; "direct" for one rank
    per node with no epilogue fused into the cross-node stage (the in-place kernel) where
    the plan reduces across nodes, "copy" where it only copies; else "staged"."""
    if plan.one_node:
        return None
    direct = all(st.hier.local == 1 for st in plan.stages if isinstance(st, HierStage))
    if direct and not (epilogue and isinstance(plan.stages[-1], HierStage)):
        return "direct" if reduces_across_nodes(plan) else "copy"
    return "staged"


def hier_nccl_min_bytes(plan: Plan, epilogue: tuple, th: Thresholds) -> int | None:
    """Bytes per rank from which auto without a tuning-table entry runs the plan on NCCL,
    or None (never): HIER_NCCL_MIN_BYTES for "direct" plans (hier_kind), never for "copy"
    plans and one-node plans, HIER_STAGED_NCCL_MIN_BYTES for "staged" ones."""
    kind = hier_kind(plan, epilogue)
    return {"direct": th.hier_nccl_min_bytes,
            "staged": th.hier_staged_nccl_min_bytes}.get(kind)  # type: ignore[arg-type]


def epilogue_refusal(plan: Plan, epilogue: tuple) -> str | None:
    """Why the fused backend runs this program's epilogue as torch ops after its kernels
    instead of inside its last stage's kernel, whatever the call (None: it can fuse; each
    call still needs a shape and tensors that allow it, see FusedRunner.epilogue_call)."""
    if not plan.stages:
        return "the program has no stage (its output is a copy of its input)"
    if len(ops.epilogue_slots(epilogue)) > ops.EPI_SLOTS:
        return f"it names more than {ops.EPI_SLOTS} tensors"
    return None


def stage_spec(stage: Stage, dtype: torch.dtype, arch: str, epilogue: tuple = ()
               ) -> BuildSpec:
    """The build spec of one stage's module: hierarchical stages link NVSHMEM."""
    source = render_stage(stage, dtype, epilogue)
    if isinstance(stage, HierStage):
        return nvshmem_spec("hier", source, arch)
    return BuildSpec("stage", source, arch)


def tuning_key(stage: Stage, dtype: torch.dtype) -> str:
    """The tuning table's key of a stage: the hash of its source without an epilogue (an
    epilogue changes the module, not the launch choices measured for the collective)."""
    return tune.source_hash(render_stage(stage, dtype))


def load_stage(stage: Stage, dtype: torch.dtype, arch: str, epilogue: tuple = ()
               ) -> tuple[ctypes.CDLL, float, str]:
    """Render, build (or find in the cache) and load the module of one stage; returns it
    with its build seconds and its tuning key."""
    spec = stage_spec(stage, dtype, arch, epilogue)
    built = build(spec)
    key = tuning_key(stage, dtype) if epilogue else tune.source_hash(spec.source)
    return abi.bind(ctypes.CDLL(str(built.path))), built.seconds, key


def blocks_per_sm(lib: ctypes.CDLL) -> int:
    """How many blocks of the module's kernels one SM holds at once (occupancy API)."""
    n = ctypes.c_int()
    rc = lib.mixcc_blocks_per_sm(ctypes.byref(n))
    if rc != 0:
        from .runtime import cuda_check

        cuda_check(rc, "cudaOccupancyMaxActiveBlocksPerMultiprocessor")
    return max(1, n.value)


def block_cap(occupancy: int, sms_per_rank: int) -> int:
    """The most blocks one rank may launch so that the spinning blocks of every rank on
    the GPU are resident at once: blocks per SM x SMs / ranks on the device."""
    return max(1, min(layout.MAX_BLOCKS, occupancy * sms_per_rank))


class FusedRunner:
    """The fused kernels of one collective for one dtype, bound to the shared runtime
    (and to NVSHMEM when a stage crosses nodes)."""

    batch_invariant = False  # options["batch_invariant"] (set in __init__)
    _invariant_sums = False  # batch_invariant and the plan sums: never NCCL

    def __init__(self, plan: Plan, mesh, group: dist.ProcessGroup | None, options: dict,
                 dtype: torch.dtype, program: str = "", epilogue: tuple = ()):
        from .runtime import _POOLS, abort_enabled, get_runtime, native

        self.plan, self.mesh, self.dtype, self.program = plan, mesh, dtype, program
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.vec = 16 // self.elem
        self.algorithm = options["algorithm"]
        self.depth = options["pipeline_depth"]
        self.timeout_ns = int(options["timeout_s"] * 1e9)
        self.debug = debug.enabled(options.get("debug"))
        self.device = torch.cuda.current_device()
        native()
        self.rt = get_runtime(group, self.device, options["workspace_bytes"],
                              options["timeout_s"], abort_enabled(options.get("abort_on_error")))
        node = mesh.node_of(self.rt.rank)
        self.rt.check_node(list(range(node * mesh.ranks_per_node,
                                      (node + 1) * mesh.ranks_per_node)))
        self.nv = None
        if not plan.one_node:
            self.nv = nvshmem.get(group, options["symmetric_bytes"])
            self.rt.set_symmetric_blame(self.nv.sym + layout.SYM_BLAME_OFFSET)
        # auto's thresholds, rank 0's on every rank (tuning/thresholds.py)
        self.thresholds = thresholds.agree(group, thresholds.local_facts(self.device))
        self.th = self.thresholds.values
        arch = device_arch()
        self.stages: list[tuple[Stage, ctypes.CDLL]] = []
        self.build_seconds = 0.0
        hashes = []
        occupancy = layout.MAX_BLOCKS
        self._set_epilogue(plan, epilogue)
        for i, stage in enumerate(plan.stages):
            epi = self.epilogue if i == len(plan.stages) - 1 else ()
            lib, secs, src_hash = load_stage(stage, dtype, arch, epi)
            if isinstance(stage, HierStage):
                self.nv.bind_module(lib)
            self.build_seconds += secs
            self.stages.append((stage, lib))
            hashes.append(src_hash)
            occupancy = min(occupancy, blocks_per_sm(lib))
        if self.rt.world > 1:  # every rank must launch the same grid: agree on the fewest
            everyone: list = [None] * self.rt.world
            dist.all_gather_object(everyone, occupancy, group=group)
            occupancy = min(everyone)
        self.block_cap = block_cap(occupancy, self.rt.sms_per_rank)
        self.max_blocks = min(options["max_blocks"] or layout.MAX_BLOCKS, self.block_cap)
        self._stage_facts()
        self._ce_init()
        self._nccl = dist.is_initialized() and "nccl" in str(dist.get_backend(group)).lower()
        self._nccl_from = hier_nccl_min_bytes(plan, self.epilogue, self.th)
        # batch_invariant: no sum on NCCL, no LL row split (docs/DESIGN.md, "Precision")
        self.batch_invariant = bool(options.get("batch_invariant"))
        self._invariant_sums = self.batch_invariant and precision.sums(plan.steps)
        self._pools = _POOLS  # every live registered pool of the process (usually none)
        self._sym_region = (layout.sym_region_bytes(options["symmetric_bytes"])
                            if self.nv else 0)
        dname = str(dtype).removeprefix("torch.")
        self._prefixes = [tune.stage_prefix(h, dname, self.rt.world, arch) for h in hashes]
        self.tuned = (tune.shared(group, self._prefixes)
                      if self.algorithm == "auto" and options["max_blocks"] is None else {})
        self._args: dict[tuple[int, int], abi.LaunchArgs] = {}

    def _stage_facts(self) -> None:
        """The per-stage facts the hot path needs, computed once (self.stages, elem, vec and
        debug set)."""
        intra = [st if isinstance(st, IntraStage) else None for st, _ in self.stages]
        self._shares_reduction = [st is not None and shares_reduction(st) for st in intra]
        self._push_safe = [st is not None and push_safe(st) for st in intra]
        self._push_width = [push_width(st) if st is not None else 0 for st in intra]
        self._push_auto = [st is not None and push_auto(st) for st in intra]
        self._ll_safe = [st is not None and ll_safe(st) and ll_cols(st, self.elem) >= self.vec
                         for st in intra]
        # (debug mode: _params and _epilogue_algorithm keep LL off)
        self._ll_auto = [safe and ll_auto(st)
                         for safe, st in zip(self._ll_safe, intra, strict=True)]
        self._traits = [AutoTraits(ll, push, width > 1 and shares)
                        for ll, push, width, shares in zip(
                            self._ll_auto, self._push_auto, self._push_width,
                            self._shares_reduction, strict=True)]
        # the copy-engine mode: only the first stage's input can lie in a registered pool
        self._ce_safe = [i == 0 and st is not None and ce_safe(st) and not self.debug
                         for i, st in enumerate(intra)]

    def _ce_init(self) -> None:
        """Bind the copy-engine entry points of the stages that may use them and make their
        side stream and events (eagerly: not while a graph captures)."""
        self._ce_copies: dict[tuple[int, int], tuple[object, int]] = {}
        for (_, lib), safe in zip(self.stages, self._ce_safe, strict=True):
            if safe:
                rc = abi.bind_ce(lib).mixcc_ce_init()
                if rc != 0:
                    from .runtime import cuda_check

                    cuda_check(rc, "mixcc_ce_init")

    def _ce_candidate(self, i: int, nbytes: int) -> bool:
        """Whether auto would run intra stage i of a call with `nbytes` per rank in the
        copy-engine mode once its group has a registered pool (CE_MIN_BYTES)."""
        return self.algorithm == "auto" and self._ce_safe[i] and _from(nbytes,
                                                                      self.th.ce_min_bytes)

    def _pool_decides(self, i: int, nbytes: int) -> bool:
        """Whether auto's kernel for intra stage i at `nbytes` per rank depends on whether
        the group has a registered pool (which may come later): the copy-engine mode, or
        the one-shot in place of push below POOL_PUSH_MIN_BYTES (default_algorithm)."""
        return self._ce_candidate(i, nbytes) or (
            self.algorithm == "auto" and self._push_auto[i]
            and _from(nbytes, self.th.push_min_bytes)
            and not _from(nbytes, self.th.pool_push_min_bytes))

    def _ce_mode(self, i: int, nbytes: int) -> bool:
        """Whether auto runs intra stage i of a call with `nbytes` per rank in the
        copy-engine mode: a candidate, in a group with a pool of one size on every rank;
        the same on every rank (the pool is made collectively; the size and the stage are
        the same everywhere)."""
        return (self._ce_candidate(i, nbytes) and self.rt.pool is not None
                and self.rt.pool_same_size)

    def _set_epilogue(self, plan: Plan, epilogue: tuple) -> None:
        """The epilogue fused into the last stage's kernel where the plan allows it (else
        none), its tensors by slot, and the names it stores into or reads as a scale."""
        self.epilogue = epilogue if epilogue and epilogue_refusal(plan, epilogue) is None else ()
        self._epi_slots = ops.epilogue_slots(self.epilogue)
        self._epi_writes = {e.name for e in self.epilogue if ops.EPILOGUES[e.op].writes}
        self._epi_scales = {e.name for e in self.epilogue if ops.EPILOGUES[e.op].needs_float32}

    @property
    def _row_split_min(self) -> int | None:
        return self.th.row_split_min_bytes

    def _tuned(self, i: int, nbytes: int) -> tune.Choice | None:
        return self.tuned.get((i, tune.bucket(nbytes))) if self.tuned else None

    def default_algorithm(self, i: int, nbytes: int) -> str:
        """auto's choice for intra stage i without a tuning-table entry (auto_algorithm)."""
        return auto_algorithm(self.th, self._traits[i], nbytes, self.rt.pool is not None)

    def prefers_reference(self, nbytes: int) -> bool:
        """Whether auto should run a call with `nbytes` of input per rank on the reference
        backend (NCCL): the tuning table's entry for this size says so, or, without one,
        nbytes reaches hier_nccl_min_bytes. Only on an NCCL group (the reference backend
        cannot run CUDA tensors on gloo)."""
        if not self._nccl or self.algorithm != "auto" or self._invariant_sums:
            return False
        choice = self._tuned(0, nbytes)
        if choice is not None:
            return choice.algorithm == "nccl"
        return self._nccl_from is not None and nbytes >= self._nccl_from

    def _params(self, i: int, unit_elems: int, nbytes: int, hidden: int = 0
                ) -> tuple[int, int, int, int, int]:
        """(algorithm code, columns per block, chunks, blocks, roles) for intra stage i; the
        same on every rank for the same shape, as the barriers require. A tuning-table
        entry decides when there is one; else default_algorithm. With `hidden` (a fused
        epilogue's row width, the last stage only) the one-shot on whole rows, or the
        two-shot where algorithm='two_shot' asked for it (its result slots in fp32); on LL
        its rows split over blocks (ll_row_split) or its output units on blocks of their
        own (ll_roles, where one chunk holds every row)."""
        stage = self.stages[i][0]
        if hidden:
            algo = self._epilogue_algorithm(i, nbytes, hidden)
            cols = self._epilogue_cols(stage, algo)
            norms = sum(e.op == "rmsnorm" for e in self.epilogue)
            rows = unit_elems // hidden
            roles = ll_roles(stage) if algo == "ll" else 1
            if 1 < roles <= self.max_blocks:
                split = 1 if self.batch_invariant else ll_row_split(
                    stage, rows, hidden, self.elem, self.max_blocks, norms, roles,
                    self._row_split_min)
                nblocks, n_chunks, c = row_grid(unit_elems, cols, hidden, self.elem,
                                                self.max_blocks // roles, split)
                if n_chunks == 1:
                    return ALGORITHMS.index(algo), c, 1, nblocks * roles, roles
            split = ll_row_split(stage, rows, hidden, self.elem, self.max_blocks, norms,
                                 min_bytes=self._row_split_min) \
                if algo == "ll" and not self.batch_invariant else 1
            nblocks, n_chunks, cols = row_grid(unit_elems, cols, hidden, self.elem,
                                               self.max_blocks, split)
            return ALGORITHMS.index(algo), cols, n_chunks, nblocks, 1
        if self._ce_mode(i, nbytes):  # on the one-shot's grid: it runs where the CE cannot
            cols = intra_cols(stage, False, self.elem, self.rt.region_bytes)
            if cols >= self.vec:
                nblocks, n_chunks, cols = grid(unit_elems, cols, self.elem, self.max_blocks)
                return ALGO_CE, cols, n_chunks, nblocks, 1
        choice = self._tuned(i, nbytes)
        if self.algorithm != "auto":
            algo = self.algorithm
        elif choice is not None and choice.algorithm in ALGORITHMS:
            algo = choice.algorithm
        else:
            algo = self.default_algorithm(i, nbytes)
        # push where it cannot run: auto's or a table's falls back to the one-shot, a
        # requested one is refused (below, or by the workspace check). Decided per stage,
        # never per call: whether a call runs in place may differ between ranks, and every
        # rank must launch the same kernel.
        if algo == "push" and self.algorithm != "push" and (
                not self._push_safe[i]
                or push_cols(stage, self.elem, self.rt.region_bytes) < self.vec):
            algo = "one_shot"
        if algo == "push" and not self._push_safe[i]:
            raise ValueError(
                f"algorithm='push' cannot run stage {i} of this program: an output block "
                "is written before a later one reads it as input, so it could not run "
                "in place; use algorithm='one_shot' or 'two_shot'")
        if algo == "ll" and (not self._ll_safe[i] or self.debug):
            if self.algorithm == "ll":
                why = ("debug mode's fingerprints travel with barriers, which LL has none of"
                       if self._ll_safe[i] else
                       "a rank stores to a peer that stores nothing to it, an output block is "
                       "written before a later one reads it as input, or a sender's LL area "
                       "holds less than 16 bytes per unit")
                raise ValueError(f"algorithm='ll' cannot run stage {i} of this program: "
                                 f"{why}; use algorithm='one_shot'")
            algo = "one_shot"
        two = algo == "two_shot"
        if algo == "ll":
            cols = ll_cols(stage, self.elem)
            units = f"{stage.push_schedule.slots} unit slot(s) per LL sender area"
        elif algo == "push":
            cols = push_cols(stage, self.elem, self.rt.region_bytes)
            units = f"{stage.push_schedule.slots} unit slot(s) per sender area"
        else:
            cols = intra_cols(stage, two, self.elem, self.rt.region_bytes)
            units = f"{stage.units_per_region(two)} units per block region"
        if cols < self.vec:
            raise ValueError(
                f"workspace_bytes={self.rt.workspace_bytes} is too small for {units}; "
                "raise workspace_bytes")
        blocks = self.max_blocks
        if choice is not None and choice.algorithm == algo:
            blocks = min(blocks, choice.blocks)
            if self.vec <= choice.chunk_cols <= cols:
                cols = choice.chunk_cols // self.vec * self.vec
        nblocks, n_chunks, cols = grid(unit_elems, cols, self.elem, blocks, algo == "ll")
        return ALGORITHMS.index(algo), cols, n_chunks, nblocks, 1

    def _make_args(self, i: int, unit_elems: int, nbytes: int, hidden: int = 0
                   ) -> abi.LaunchArgs:
        """The launch arguments of stage i for this shape (pointers and stream are set
        per call); `hidden`: see _params."""
        stage = self.stages[i][0]
        a = abi.LaunchArgs()
        a.unit_elems, a.rank, a.timeout_ns = unit_elems, self.rt.rank, self.timeout_ns
        a.peers, a.epochs = self.rt.peers.data_ptr(), self.rt.epochs.data_ptr()
        a.data_off, a.region_bytes, a.err = layout.DATA_OFFSET, self.rt.region_bytes, \
            self.rt.err_dev
        if isinstance(stage, IntraStage):
            a.algo, a.cols, a.n_chunks, a.nblocks, a.roles = self._params(i, unit_elems, nbytes,
                                                                          hidden)
            return a
        cols = self._epilogue_cols(stage) if hidden else \
            hier_cols(stage, self.elem, self.rt.region_bytes, self._sym_region,
                      epilogue=bool(self.epilogue) and i == len(self.stages) - 1)
        if cols < self.vec:
            raise ValueError("workspace_bytes / symmetric_bytes are too small for this "
                             "hierarchical stage; raise them")
        blocks = self.max_blocks
        choice = self._tuned(i, nbytes)
        if choice is not None and choice.algorithm == "hier":
            blocks = min(blocks, choice.blocks)
            if self.vec <= choice.chunk_cols <= cols and not hidden:
                cols = choice.chunk_cols // self.vec * self.vec
        if hidden:  # a fused epilogue (or its fallback): whole rows in every chunk
            a.nblocks, a.n_chunks, a.cols = row_grid(unit_elems, cols, hidden, self.elem,
                                                     blocks)
        else:
            a.nblocks, a.n_chunks, a.cols = grid(unit_elems, cols, self.elem, blocks)
        a.share_cap = share_cap(a.cols, self.elem, stage.hier.local)
        a.depth = max(1, min(self.depth, a.n_chunks))
        a.sym, a.sym_region_bytes = self.nv.sym, self._sym_region
        return a

    def _cached_args(self, i: int, unit_elems: int, nbytes: int, hidden: int = 0
                     ) -> abi.LaunchArgs:
        """The launch arguments of stage i for this shape, made once and kept."""
        key = (i, unit_elems, hidden, self.rt.pool is not None)
        a = self._args.get(key)
        if a is None:
            if len(self._args) >= 4096:  # many shapes: start over rather than grow
                self._args.clear()
            a = self._args[key] = self._make_args(i, unit_elems, nbytes, hidden)
        return a

    def reg_word(self, x_ptr: int, nbytes: int, out_ptr: int) -> int:
        """The one-shot kernel's registered-input word for an input at x_ptr: 1 + its
        offset / 16 in this runtime's pool, or 0 (staged: not in the pool, in place, or
        not 16-byte aligned). ValueError for an input partly inside a registered pool, or
        inside the pool of a closed runtime or of another process group."""
        pool = self.rt.pool
        how = pool.contains(x_ptr, nbytes) if pool is not None else None
        if how is None:
            from .runtime import pool_of

            other, how = pool_of(x_ptr, nbytes)
            if other is None:
                return 0
            if how == "in":
                whose = "a closed runtime" if other._closed else "another process group"
                raise ValueError(f"x lies in the registered buffer (mixcc.empty) of {whose}; "
                                 "allocate it from this collective's group, or pass an "
                                 "ordinary tensor")
        if how == "partly":
            raise ValueError("x lies partly inside a registered buffer (mixcc.empty): pass "
                             "a tensor wholly inside it or wholly outside it")
        off = x_ptr - pool.base
        return 0 if x_ptr == out_ptr or off % 16 else off // 16 + 1

    def _pool_args(self, a: abi.LaunchArgs, i: int, x_ptr: int, nbytes: int, out_ptr: int
                   ) -> tuple[int, int]:
        """(pool_peers, in_off) of a launch: the peers' pool bases where the group has a
        registered pool and the call has at least REG_MIN_BYTES (the one-shot kernel then
        runs the registered-input protocol), else 0; and the input's registered-input word
        (one-shot intra stages only). Inputs in a pool are checked at every size."""
        if self.rt.pool is None and not self._pools:
            return 0, 0  # no registered pool anywhere: the hot path's common case
        if not isinstance(self.stages[i][0], IntraStage):
            return 0, 0
        word = self.reg_word(x_ptr, nbytes, out_ptr)  # refuses foreign and partial inputs
        if a.algo == ALGO_CE:
            return self.rt.pool_peers.data_ptr(), word
        if self.rt.pool is None or not _from(nbytes, self.th.reg_min_bytes) or a.algo != 0:
            return 0, 0
        return self.rt.pool_peers.data_ptr(), word

    def _launch(self, i: int, x: torch.Tensor, dst: torch.Tensor, inner: int, fp: int,
                hidden: int = 0, epi: list[torch.Tensor] | None = None) -> None:
        """Launch stage i from x into dst; `hidden` as in _params, `epi` the fused
        epilogue's tensors by slot (None: the plain kernel, on the same grid)."""
        unit_elems = x.shape[0] // self.stages[i][0].lmap.in_units * inner
        if unit_elems == 0:
            return
        in_ptr, out_ptr = x.data_ptr(), dst.data_ptr()
        nbytes = x.numel() * self.elem
        a = self._cached_args(i, unit_elems, nbytes, hidden)
        a.in_ptr, a.out_ptr = in_ptr, out_ptr
        a.epi_h = hidden if epi is not None else 0  # the fused epilogue's row width
        for j, t in enumerate(epi or ()):
            setattr(a, f"epi{j}", t.data_ptr())
        a.pool_peers, a.in_off = self._pool_args(a, i, in_ptr, nbytes, out_ptr)
        a.wide = unit_elems % self.vec == 0 and in_ptr % 16 == 0 and out_ptr % 16 == 0
        a.stream = _current_stream(self.device)
        a.fp = fp
        if a.algo == ALGO_CE:
            if overlaps(x, dst):  # the copy engines would write what peers still read
                a.in_off = 0
            copies, n = self._ce_copy_table(i, unit_elems)
            rc = self.stages[i][1].mixcc_ce_launch(ctypes.byref(a), copies, n,
                                                    self.rt.pool_bases)
        else:
            rc = self.stages[i][1].mixcc_launch(ctypes.byref(a))
        if rc != 0:
            from .runtime import cuda_check

            cuda_check(rc, f"launch of fused stage {i}")

    def _ce_copy_table(self, i: int, unit_elems: int) -> tuple[object, int]:
        """plan.ce_copies of intra stage i for units of `unit_elems`, as the flat C array
        mixcc_ce_launch reads, and its length in copies; made once per shape."""
        key = (i, unit_elems)
        got = self._ce_copies.get(key)
        if got is None:
            if len(self._ce_copies) >= 4096:  # many shapes: start over rather than grow
                self._ce_copies.clear()
            runs = ce_copies(self.stages[i][0], self.rt.rank, unit_elems * self.elem)
            flat = [v for run in runs for v in run]
            got = self._ce_copies[key] = ((ctypes.c_longlong * max(1, len(flat)))(*flat),
                                          len(runs))
        return got

    def fast_call(self, x: torch.Tensor, shape: torch.Size):
        """For one-stage plans outside debug mode: fn(x, out) -> out for inputs of x's
        shape, dtype and device (already validated), which sets only the pointers and
        stream of the cached launch arguments per call; else None. The host overhead of
        an eager call is the hot path of a serving step (issue 8)."""
        if len(self.stages) != 1 or self.debug:
            return None
        stage, lib = self.stages[0]
        unit_elems = x.shape[0] // stage.lmap.in_units * (x.numel() // max(1, x.shape[0]))
        if unit_elems == 0:
            return None
        nbytes = x.numel() * self.elem
        if self._pool_decides(0, nbytes):
            return None  # the kernel depends on a pool that may come later
        a = self._cached_args(0, unit_elems, nbytes)
        ref, launch, rt, device = ctypes.byref(a), lib.mixcc_launch, self.rt, self.device
        pool_args = self._pool_args
        even = unit_elems % self.vec == 0
        raw = _current_stream
        timeout_s = self.timeout_ns / 1e9

        def call(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
            err = rt._err
            if err is None or err.status:
                rt.check()
            if out is None:
                out = torch.empty(shape, dtype=x.dtype, device=x.device)
            a.in_ptr = xp = x.data_ptr()
            a.out_ptr = op = out.data_ptr()
            a.wide = even and not (xp | op) & 15
            a.pool_peers, a.in_off = pool_args(a, 0, xp, nbytes, op)
            a.stream = raw(device)
            rt.timeout_s = timeout_s
            rc = launch(ref)
            if rc:
                from .runtime import cuda_check

                cuda_check(rc, "launch of fused stage 0")
            return out

        return call

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None, shape: torch.Size,
                 hidden: int = 0, epi: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run on validated input; `shape` is the output shape; `hidden` and `epi` as in
        _launch, for the last stage."""
        rt = self.rt
        if rt._err is None or rt._err.status:  # closed, or failed: raise why
            rt.check()
        rt.timeout_s = self.timeout_ns / 1e9
        if out is None:
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
        stages = self.stages
        if not stages:
            if out.data_ptr() != x.data_ptr():
                out.copy_(x)
            return out
        inner = x.numel() // x.shape[0] if x.shape[0] else 0
        count = 0
        if self.debug:
            rt.calls += 1
            count = rt.calls
        cur = x
        last = len(stages) - 1
        for i, (stage, _) in enumerate(stages):
            if i == last:
                dst = out
            else:
                rows = cur.shape[0] // stage.lmap.in_units * len(stage.lmap.out_units[0])
                dst = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
            fp = debug.fingerprint(self.program, i, x.dtype, tuple(x.shape), count) \
                if self.debug else 0
            if i == last:
                self._launch(i, cur, dst, inner, fp, hidden, epi)
            else:
                self._launch(i, cur, dst, inner, fp)
            cur = dst
        return out

    def _epilogue_algorithm(self, i: int, nbytes: int, hidden: int) -> str:
        """The kernel of intra stage i with the fused epilogue on rows of `hidden`: the
        two-shot where algorithm='two_shot' asked for it; LL where algorithm='ll' asked for
        it or auto takes it (up to LL_EPI_MAX_BYTES, where LL_MAX_BYTES allows LL), the
        stage can run LL, debug mode is off and a block's LL region holds a row; else the
        one-shot (as for algorithm='push'). By size and shape alone: the same on every
        rank."""
        if self.algorithm == "two_shot":
            return "two_shot"
        ll = self.algorithm == "ll" or (self.algorithm == "auto" and self._ll_auto[i]
                                        and _upto(nbytes, self.th.ll_epi_max_bytes))
        if ll and self._ll_safe[i] and not self.debug \
                and ll_cols(self.stages[i][0], self.elem, True) >= hidden:
            return "ll"
        return "one_shot"

    def _epilogue_cols(self, stage: Stage, algo: str = "") -> int:
        """Columns per block and chunk of the last stage's kernel with the fused epilogue:
        the one-shot's, or with algorithm='two_shot' the two-shot's with fp32 result
        slots, or LL's whole region (`algo` "ll"); a hierarchical stage's with fp32 result
        slots (docs/DESIGN.md, "Epilogues")."""
        if isinstance(stage, HierStage):
            return hier_cols(stage, self.elem, self.rt.region_bytes, self._sym_region, 4)
        if algo == "ll":
            return ll_cols(stage, self.elem, True)
        two = self.algorithm == "two_shot"
        return intra_cols(stage, two, self.elem, self.rt.region_bytes, 4 if two else 0)

    def epilogue_hidden(self, shape: torch.Size, tensors: dict[str, torch.Tensor]) -> int:
        """The row width with which the last stage runs this program's epilogue for an
        output of `shape`, or 0 (then the epilogue runs as torch ops after the kernels):
        rows of at most EPI_MAX_HIDDEN elements in whole 16-byte packs that fit a block's
        region, and named tensors of x's dtype (the scale: one float32). It depends on the
        shape and dtypes alone, the same on every rank, so every rank launches the same
        grid and every replica computes the same values. Where the last stage's kernel
        keeps fp32 result slots for the epilogue (the two-shot's, the hierarchical one),
        a named tensor of another dtype is refused (ValueError): a rank that ran the
        plain kernel there would hand its peers slots of the wrong type."""
        if not self.epilogue or len(shape) < 2:
            return 0
        hidden = shape[-1]
        cols = self._epilogue_cols(self.stages[-1][0])
        if hidden > ops.EPI_MAX_HIDDEN or hidden % self.vec or cols < hidden:
            return 0
        other = [n for n in self._epi_slots
                 if n not in self._epi_scales and tensors[n].dtype != self.dtype]
        if other and self._fp32_slots(len(self.stages) - 1):
            raise ValueError(
                f"keyword tensor(s) {other} must have x's dtype {self.dtype} here: this "
                "program's last stage runs its epilogue from fp32 result slots that every "
                "rank must write alike (algorithm='two_shot' or a cross-node last stage); "
                "convert them, or use algorithm='one_shot' on one node")
        return 0 if other else hidden

    def _fp32_slots(self, i: int) -> bool:
        """Whether stage i's kernel keeps fp32 result slots when it runs the epilogue: the
        two-shot's and the hierarchical kernel's owners (docs/DESIGN.md, "Epilogues")."""
        return isinstance(self.stages[i][0], HierStage) or self.algorithm == "two_shot"

    def epilogue_call(self, x: torch.Tensor, out: torch.Tensor, shape: torch.Size,
                      hidden: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the program with its epilogue inside the last stage's kernel (after
        epilogue_hidden gave `hidden`); returns out. The kernel loads every named tensor
        before its statements write, so a tensor it cannot use in place goes through an
        aligned copy: one that is not contiguous or not 16-byte aligned, one partly
        overlapping out, and a stored one overlapping x or another named tensor (a peer may
        still read a registered x). Copies that the kernel writes go back in the order of
        their last store, then out's copy where one of them overlapped out: the state the
        statements run one after another leave (api checks that no statement reads what an
        earlier store wrote through another name)."""
        writes, scales = self._epi_writes, self._epi_scales
        named = [(n, tensors[n]) for n in self._epi_slots]
        last = {e.name: i for i, e in enumerate(self.epilogue) if ops.EPILOGUES[e.op].writes}
        back: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (order, copy, target)

        def copy(t: torch.Tensor, order: int | None) -> torch.Tensor:
            c = t.clone(memory_format=torch.contiguous_format)  # the allocator aligns it
            if order is not None:  # written by the kernel: back after the call
                back.append((order, c, t))
            return c

        def aligned(t: torch.Tensor, order: int | None) -> torch.Tensor:
            return t if t.is_contiguous() and not t.data_ptr() & 15 else copy(t, order)

        out_order = len(self.epilogue)  # out is written after every statement
        xa = aligned(x, None)
        oa = xa if same_elements(out, x) else aligned(out, out_order)
        if oa is xa and xa is not x:
            back.append((out_order, xa, x))  # in place through the copy
        slots = []
        for n, t in named:
            if n in scales:
                slots.append(t)
            elif n in writes and (overlaps(t, x) or overlaps_partly(t, out) or any(
                    overlaps(t, u) for m, u in named if m != n)):
                if overlaps(t, out) and not any(o == out_order for o, _, _ in back):
                    oa = copy(out, out_order)  # out's elements must land after this copy's
                slots.append(copy(t, last[n]))
            elif same_elements(t, out):
                slots.append(oa)
            elif overlaps_partly(t, out):
                slots.append(copy(t, None))
            else:
                slots.append(aligned(t, last.get(n) if n in writes else None))
        self(xa, oa, shape, hidden, slots)
        for _, c, t in sorted(back, key=lambda e: e[0]):
            t.copy_(c)
        return out


def prebuild(plans: list[tuple[str, Plan] | tuple[str, Plan, tuple]], dtypes: list[torch.dtype],
             arch: str | None = None) -> Iterator[str]:
    """Compile the runtime libraries and every fused stage of `plans` ahead of time: (program,
    plan) or (program, plan, epilogue), the last stage with the epilogue where it is fused
    (as FusedRunner loads it)."""
    from .runtime import build_native

    arch = arch or device_arch()
    b = build_native(arch)
    yield f"runtime  {'cached' if b.cached else f'built in {b.seconds:.1f} s'}  {b.path}"
    if any(not entry[1].one_node for entry in plans):
        if nvshmem.available():
            yield f"cross-node stages skipped: {nvshmem.available()}"
        else:
            b = nvshmem.build_library(arch)
            yield (f"nvshmem runtime  {'cached' if b.cached else f'built in {b.seconds:.1f} s'}"
                   f"  {b.path}")
    for program, plan, *rest in plans:
        epi = rest[0] if rest else ()
        epi = epi if epi and epilogue_refusal(plan, epi) is None else ()
        for dtype in dtypes:
            for i, stage in enumerate(plan.stages):
                if isinstance(stage, HierStage) and nvshmem.available():
                    continue
                b = build(stage_spec(stage, dtype, arch,
                                     epi if i == len(plan.stages) - 1 else ()))
                how = "cached" if b.cached else f"built in {b.seconds:.1f} s"
                yield f"{program} [{str(dtype).removeprefix('torch.')}]  {how}  {b.path}"
