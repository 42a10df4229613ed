"""render: a fused plan stage -> CUDA source (docs/DESIGN.md section 3, step 5).

The per-rank one-shot and two-shot schedules are baked into the source as tables,
so one source serves every rank and every row count; the text is deterministic.
"""

from __future__ import annotations

import functools

import jinja2
import torch

from .. import ops
from ..paths import templates_dir
from . import abi, layout
from .hier import hier_table
from .plan import HierStage, IntraStage, Stage, cliques, ll_roles, part_elem
from .schedule import PushSchedule, Schedule, role_sends

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
OP_ENUMS = {"sum": "kSum", "max": "kMax", "min": "kMin"}


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


def schedule_table(sched: Schedule) -> tuple[list[int], list[int], int]:
    """(flat int table, per-rank offsets, max terms) in the layout the template reads."""
    flat: list[int] = []
    offsets = []
    max_terms = 1
    for rs in sched.ranks:
        offsets.append(len(flat))
        flat += [len(rs.neighbors), *rs.neighbors, len(rs.reduce)]
        for t in rs.reduce:
            flat += [t.dst_kind, t.dst, t.owner_index, t.owners, len(t.terms)]
            for src, unit, coef in t.terms:
                flat += [src, unit, coef]
            max_terms = max(max_terms, len(t.terms))
        flat.append(len(rs.gather))
        for g in rs.gather:
            flat += [g.dst, len(g.sources)]
            for src, slot in g.sources:
                flat += [src, slot]
    return flat, offsets, max_terms


def push_table(sched: PushSchedule) -> tuple[list[int], list[int], int]:
    """(flat int table, per-rank offsets, max terms) of a push schedule, as the template's
    push kernel reads it: [n_dst, dsts.., n_src, srcs.., n_send, {dst, unit, area, slot} x
    n_send, n_reduce, {out unit, n_terms, {kind, a, b, coef} x n_terms} x n_reduce, role
    masks x n_reduce]: bit k of entry i's mask says that the LL kernel's block of entry i
    sends send k where output units have blocks of their own (schedule.role_sends; all 0
    for ranks of more than 31 sends, which plan.ll_roles keeps off that path)."""
    flat: list[int] = []
    offsets = []
    max_terms = 1
    for pr, roles in zip(sched.ranks, role_sends(sched), strict=True):
        offsets.append(len(flat))
        flat += [len(pr.dsts), *pr.dsts, len(pr.srcs), *pr.srcs, len(pr.sends)]
        for send in pr.sends:
            flat += list(send)
        flat.append(len(pr.reduce))
        for j, terms in pr.reduce:
            flat += [j, len(terms)]
            for term in terms:
                flat += list(term)
            max_terms = max(max_terms, len(terms))
        flat += [sum(1 << k for k in ks) if len(pr.sends) <= 31 else 0 for ks in roles]
    return flat, offsets, max_terms


def _ints(values: list[int], per_line: int = 24) -> str:
    lines = [", ".join(map(str, values[i:i + per_line])) for i in range(0, len(values), per_line)]
    return ",\n    ".join(lines)


def _common(stage: Stage, dtype: torch.dtype) -> dict:
    if dtype not in CTYPES:
        raise ValueError(f"the fused backend supports {list(CTYPES)}, not {dtype}")
    lmap = stage.lmap
    if lmap.world_size > layout.MAX_RANKS:
        raise ValueError(f"the fused backend serves at most {layout.MAX_RANKS} ranks")
    elem = torch.empty((), dtype=dtype).element_size()
    return dict(
        ops="; ".join(str(o) for o in stage.ops),
        dtype=str(dtype).removeprefix("torch."),
        redop=lmap.redop,
        ctype=CTYPES[dtype],
        op_enum=OP_ENUMS[lmap.redop],
        nranks=lmap.world_size,
        max_ranks=layout.MAX_RANKS,
        max_blocks=layout.MAX_BLOCKS,
        threads=layout.THREADS,
        in_units=lmap.in_units,
        vec=16 // elem,
        nsets=layout.NSETS,
        abi_struct=abi.c_struct(),
        abi_version=abi.VERSION,
        ipc_layout=ipc_layout_struct(),
    )


def ipc_layout_struct() -> str:
    """The IPC workspace's layout constants (mixcc/codegen/layout.py) as the C++ traits
    struct that templates/transport_ipc.cuh addresses the workspace with."""
    ints = {"MAX_RANKS": layout.MAX_RANKS, "MAX_BLOCKS": layout.MAX_BLOCKS,
            "NSETS": layout.NSETS, "LL_SETS": layout.LL_SETS,
            "ROW_SPLIT_MAX": layout.ROW_SPLIT_MAX}
    offsets = {"PUSH_FLAG_OFFSET": layout.PUSH_FLAG_OFFSET, "SENT_OFFSET": layout.SENT_OFFSET,
               "REG_OFFSET": layout.REG_OFFSET, "ROWSUM_OFFSET": layout.ROWSUM_OFFSET,
               "LL_OFFSET": layout.LL_OFFSET,
               "LL_REGION_BYTES": layout.LL_REGION_BYTES}
    return _traits("IpcLayout", ints, offsets)


def _traits(name: str, ints: dict[str, int], offsets: dict[str, int]) -> str:
    """A C++ struct of static constexpr ints and long long offsets."""
    body = [f"  static constexpr int {k} = {v};" for k, v in ints.items()]
    body += [f"  static constexpr long long {k} = {v};" for k, v in offsets.items()]
    return f"struct {name} {{\n" + "\n".join(body) + "\n};"


def sym_layout_struct() -> str:
    """The NVSHMEM symmetric workspace's layout constants (mixcc/codegen/layout.py) as the
    C++ traits struct that templates/transport_nvshmem.cuh addresses it with."""
    ints = {"MAX_RANKS": layout.MAX_RANKS, "MAX_BLOCKS": layout.MAX_BLOCKS,
            "NSETS": layout.NSETS}
    offsets = {"SIG_BYTES": layout.SIG_BYTES, "CREDIT_BYTES": layout.CREDIT_BYTES,
               "SYM_DATA_OFFSET": layout.SYM_DATA_OFFSET,
               "SYM_BLAME_OFFSET": layout.SYM_BLAME_OFFSET}
    return _traits("SymLayout", ints, offsets)


def render_stage(stage: Stage, dtype: torch.dtype, epilogue: tuple = ()) -> str:
    """CUDA source of one fused stage for `dtype` (deterministic text); an intra stage
    given the program's `epilogue` statements can run them after its one-shot reduction
    or in its two-shot gather (docs/DESIGN.md, "Epilogues")."""
    if isinstance(stage, HierStage):
        return render_hier(stage, dtype, epilogue)
    if not isinstance(stage, IntraStage):
        raise TypeError(f"not a fused stage: {stage!r}")
    ctx = _common(stage, dtype)
    scheds = []
    for name, key in (("OneShot", "one_shot"), ("TwoShot", "two_shot")):
        flat, offsets, max_terms = schedule_table(stage.schedules[key])
        scheds.append({"name": name, "table": _ints(flat), "offsets": _ints(offsets),
                       "max_terms": max_terms})
    flat, offsets, max_terms = push_table(stage.push_schedule)
    scheds.append({"name": "Push", "table": _ints(flat), "offsets": _ints(offsets),
                   "max_terms": max_terms})
    return _env().get_template("stage_kernel.cu.j2").render(
        schedules=scheds, ll_roles=ll_roles(stage) if epilogue else 1,
        reg_cliques=cliques(stage),
        **_epilogue_ctx(epilogue, ctx["vec"]), **ctx)


def _epilogue_ctx(epilogue: tuple, vec: int) -> dict:
    """What templates/epilogue_rows.cu.j2 renders a fused epilogue from."""
    loads, body = ops.epilogue_cuda(epilogue)
    return dict(epilogue_loads=loads, epilogue=body,
                epilogue_text="; ".join(str(e) for e in epilogue),
                epi_fp8=bool(epilogue) and epilogue[-1].op == "quant",
                epi_max_hidden=ops.EPI_MAX_HIDDEN,
                epi_max_packs=ops.EPI_MAX_HIDDEN // (vec * layout.THREADS))


def render_hier(stage: HierStage, dtype: torch.dtype, epilogue: tuple = ()) -> str:
    """CUDA source of one hierarchical (IPC + NVSHMEM) stage for `dtype`; with the
    program's `epilogue`, its step D runs the statements (docs/DESIGN.md, "Epilogues")."""
    ctx = _common(stage, dtype)
    h = stage.hier
    if h.nodes > layout.MAX_NODES:
        raise ValueError(f"the fused backend serves at most {layout.MAX_NODES} nodes")
    flat, offsets, max_terms, max_src = hier_table(h)
    return _env().get_template("hier_kernel.cu.j2").render(
        table=_ints(flat), offsets=_ints(offsets), max_terms=max_terms, max_src=max_src,
        local=h.local, nodes=h.nodes, max_parts=h.max_parts, max_nodes=layout.MAX_NODES,
        part_ctype="float" if part_elem(stage, 16 // ctx["vec"], bool(epilogue)) == 4
        else ctx["ctype"],
        sym_layout=sym_layout_struct(), **_epilogue_ctx(epilogue, ctx["vec"]), **ctx)
