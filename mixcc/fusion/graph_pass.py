"""`FusionPass`: the Inductor post-grad pass that turns collective chains into mixcc
programs, and `compile_model`, torch.compile with it (docs/DESIGN.md, "The fusion pass")."""

from __future__ import annotations

import hashlib
import json
import logging
import operator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..api import BACKENDS
from ..errors import CompileError
from ..ir.build import build, check_dtype
from ..ir.parser import parse
from ..mesh import Mesh
from . import groups as groups_mod
from .match import FP8, Match, _shape, _val, find_sites, grow_chain, match_chain
from .op import Spec, dtype_name

log = logging.getLogger("mixcc.fusion")

COMPILE_OPTIONS = ("workspace_bytes", "algorithm", "pipeline_depth", "symmetric_bytes",
                   "timeout_s", "max_blocks", "debug", "abort_on_error")


@dataclass
class SiteReport:
    """What the pass did with one collective of one graph."""

    graph: int
    index: int
    op: str
    group: str | None
    ranks: tuple[int, ...] | None
    replaced: bool
    program: str | None = None
    reason: str | None = None  # why it was left alone, or why the epilogue stopped short

    def __str__(self) -> str:
        where = f"graph {self.graph} site {self.index}: {self.op}"
        if self.group is not None:
            where += f" over group {self.group!r}"
            if self.ranks is not None:
                where += f" (ranks {list(self.ranks)})"
        if self.replaced:
            text = f"{where}: replaced by {self.program!r}"
            return text + (f" ({self.reason})" if self.reason else "")
        return f"{where}: left alone: {self.reason}"


def _source_files() -> tuple[Path, ...]:
    """Every file the rewrite's result can depend on: mixcc's Python sources and the
    IR grammar, sorted."""
    root = Path(__file__).resolve().parent.parent
    files = sorted([*root.rglob("*.py"), root / "ir" / "grammar.lark"])
    return tuple(files)


def _read_source(path: Path) -> bytes:
    return path.read_bytes()


def _source_hash() -> str:
    """A hash of mixcc's version and of each source file's path (relative to the
    package) and contents."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"mixcc {_version()}".encode())
    for p in _source_files():
        data = _read_source(p)
        h.update(f"\0{p.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _version() -> str:
    import mixcc

    return str(getattr(mixcc, "__version__", ""))


def _topology() -> list:
    """The process groups of this rank by description and rank pattern (relative to
    their first rank), without their names: DeviceMesh names groups from a counter that
    can differ between ranks, and every rank of an SPMD program must get the same uuid."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    out = []
    try:
        from torch.distributed.distributed_c10d import _world

        for pg in list(_world.pg_names):
            ranks = dist.get_process_group_ranks(pg)
            out.append((str(getattr(pg, "group_desc", "")), [r - ranks[0] for r in ranks]))
    except Exception:  # private structures moved: the world size alone
        out.append(("world", [dist.get_world_size()]))
    return sorted(out)


class FusionPass(CustomGraphPass):
    """Finds chains of functional collectives (with a residual add, the sum written back,
    RMSNorm and a static fp8 quant after them) in a post-grad graph and replaces each by
    one mixcc program. Use it as

        torch.compile(model, options={"post_grad_custom_post_pass": mixcc.FusionPass(mesh)})

    `mesh`: a mixcc.Mesh or a torch DeviceMesh over ranks 0..N-1 of `group` (default: the
    world); None derives one from the groups the graph uses. `backend` and the other
    keywords go to mixcc.compile. `epilogue=False` replaces the collectives only.
    `report()` lists every site found, replaced or not and why."""

    def __init__(self, mesh: Any = None, *, group: dist.ProcessGroup | None = None,
                 backend: str = "auto", epilogue: bool = True, **compile_options: Any):
        if mesh is not None and not isinstance(mesh, Mesh):
            if hasattr(mesh, "mesh_dim_names") and hasattr(mesh, "mesh"):
                mesh = Mesh.from_device_mesh(mesh)
            else:
                raise TypeError(f"mesh must be a mixcc.Mesh, a DeviceMesh or None, got "
                                f"{type(mesh).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        unknown = sorted(set(compile_options) - set(COMPILE_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; FusionPass takes mesh, group, "
                            f"backend, epilogue and mixcc.compile's {list(COMPILE_OPTIONS)}")
        if not isinstance(epilogue, bool):
            raise TypeError(f"epilogue must be a bool, got {type(epilogue).__name__}")
        # the group by name: Inductor pickles its config, and a ProcessGroup does not pickle
        self.group_name: str | None = None if group is None else str(group.group_name)
        self.mesh, self.backend = mesh, backend
        self.epilogue = epilogue
        self.options = dict(sorted(compile_options.items()))
        self.sites: list[SiteReport] = []
        self.graphs = 0

    # -- CustomGraphPass ---------------------------------------------------------------
    def _config(self) -> dict:
        mesh = None if self.mesh is None else [list(zip(self.mesh.names, self.mesh.sizes,
                                                        strict=True)), self.mesh.ranks_per_node]
        return {"mesh": mesh, "group": self.group_name,
                "backend": self.backend, "epilogue": self.epilogue,
                "options": {k: repr(v) for k, v in self.options.items()},
                "topology": _topology()}

    def uuid(self) -> str:
        """A hash of this pass's sources, its settings and the process groups' layout:
        equal in every process that would rewrite a graph the same way."""
        extra = json.dumps(self._config(), sort_keys=True, default=str)
        return hashlib.sha256(f"{_source_hash()}\0{extra}".encode()).hexdigest()

    def __call__(self, graph: fx.Graph) -> None:
        index = self.graphs
        self.graphs += 1
        reports = fuse_graph(graph, self, index)
        self.sites += reports
        if reports:
            done = sum(r.replaced for r in reports)
            programs = sorted({r.program for r in reports if r.replaced and r.program})
            log.info("mixcc.fusion: graph %d: %d collective site(s), %d replaced%s%s", index,
                     len(reports), done, (": " + " | ".join(programs)) if programs else "",
                     "" if done == len(reports) else "; left alone: " + "; ".join(
                         f"site {r.index} ({r.reason})" for r in reports if not r.replaced))
            for r in reports:
                log.debug("%s", r)

    # -- results ------------------------------------------------------------------
    def report(self) -> str:
        """Every collective site found so far, replaced or not, with the program it
        became or the reason it was left alone."""
        if not self.sites:
            return f"mixcc.FusionPass: {self.graphs} graph(s), no collective site found"
        done = sum(r.replaced for r in self.sites)
        head = (f"mixcc.FusionPass: {self.graphs} graph(s), {len(self.sites)} collective "
                f"site(s), {done} replaced")
        return "\n".join([head, *(f"  {r}" for r in self.sites)])


# -- the rewrite -------------------------------------------------------------------------

def _mesh_ranks(group_name: str | None) -> list[int]:
    if group_name is None:
        return list(range(dist.get_world_size()))
    return list(groups_mod.group_ranks(group_name))


def _known(cond: Any) -> bool:
    """True only when `cond` (a bool or a symbolic bool) holds for every shape."""
    if isinstance(cond, bool):
        return cond
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(cond)


def fuse_graph(graph: fx.Graph, cfg: FusionPass, index: int) -> list[SiteReport]:
    """Rewrite `graph` in place; one report per collective site."""
    sites = find_sites(graph)
    if not sites:
        return []
    ranks: dict[int, tuple[int, ...]] = {}
    mesh: Mesh | None = cfg.mesh
    general = None
    if not (dist.is_available() and dist.is_initialized()):
        general = "torch.distributed is not initialized"
    else:
        descs = []
        for s in sites:
            if s.group is None:
                continue
            try:
                ranks[s.index] = groups_mod.group_ranks(s.group)
                descs.append((groups_mod.group_desc(s.group), ranks[s.index]))
            except Exception as e:  # a name the process does not know
                s.reason = s.reason or f"cannot resolve group {s.group!r}: {e}"
        mesh_ranks = _mesh_ranks(cfg.group_name)
        if mesh is None:
            mesh = groups_mod.derive_mesh(descs, len(mesh_ranks))
            if mesh is None:
                general = "no mesh given and none could be derived from the groups"
        if mesh is not None and mesh.world_size != len(mesh_ranks):
            general = (f"{mesh} has {mesh.world_size} ranks but its process group has "
                       f"{len(mesh_ranks)}; pass group=")
        if general is None and dist.get_rank() not in mesh_ranks:
            general = "this rank is not in the mesh's process group"
    if general is None:
        me = mesh_ranks.index(dist.get_rank())
        pos = {g: i for i, g in enumerate(mesh_ranks)}
        axes: dict[int, tuple[str, ...]] = {}
        for s in sites:
            if s.reason is not None:
                continue
            members = ranks[s.index]
            if any(g not in pos for g in members):
                s.reason = f"group {s.group!r} has ranks outside the mesh's process group"
                continue
            ax = groups_mod.axes_of(mesh, me, [pos[g] for g in members],
                                    ordered=s.coll != "allreduce")
            if ax is None:
                s.reason = (f"group {s.group!r} (ranks {list(members)}) is not an axis or a "
                            f"product of axes of {mesh}")
                continue
            xv = _val(s.node.args[0])
            if xv is None:
                s.reason = "no shape information on the collective's input"
                continue
            try:
                check_dtype(xv.dtype, {s.redop} if s.redop else set())
            except CompileError as e:
                s.reason = f"unsupported dtype: {e.args[0] if e.args else e}"
                continue
            axes[s.index] = ax
    else:
        for s in sites:
            s.reason = s.reason or general
    reports: dict[int, SiteReport] = {}
    by_node = {s.node: s for s in sites if s.reason is None}
    for s in sites:
        if s.index in reports:
            continue
        if s.reason is not None:
            reports[s.index] = SiteReport(index, s.index, s.op, s.group, ranks.get(s.index),
                                          False, reason=s.reason)
            continue
        try:  # matching only reads the graph: a surprise there leaves the site alone
            chain = grow_chain(s, by_node)
            m, reason = match_chain(chain, cfg.epilogue)
        except Exception as e:  # noqa: BLE001 - reported, the graph is unchanged
            log.warning("mixcc.fusion: matching site %d failed: %r", s.index, e)
            m, reason = None, f"the matcher failed: {e!r}"
        program = None
        if m is not None:
            program = m.program([axes[c.index] for c in m.sites])
            reason = _rewrite(graph, m, program, mesh, cfg)
            if reason is not None and m.epilogue:  # try the collectives alone
                m, _ = match_chain(m.sites, epilogue=False)
                if m is not None:
                    program = m.program([axes[c.index] for c in m.sites])
                    reason2 = _rewrite(graph, m, program, mesh, cfg)
                    if reason2 is None:
                        m.note = f"epilogue not fused: {reason}"
                        reason = None
                    else:
                        reason = reason2
        if m is None or reason is not None:
            reports[s.index] = SiteReport(index, s.index, s.op, s.group, ranks.get(s.index),
                                          False, reason=reason)
            continue
        for c in m.sites:
            note = m.note if c is m.sites[0] else f"in the chain of site {s.index}"
            reports[c.index] = SiteReport(index, c.index, c.op, c.group, ranks.get(c.index),
                                          True, program=program, reason=note)
    if any(r.replaced for r in reports.values()):
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(graph)
        graph.lint()
    return [reports[i] for i in sorted(reports)]


def _descendants(nodes: set[fx.Node]) -> set[fx.Node]:
    """Every node outside `nodes` that reads, directly or not, a value of `nodes`."""
    seen: set[fx.Node] = set()
    todo = [u for n in nodes for u in n.users if u not in nodes]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo += [u for u in n.users if u not in seen and u not in nodes]
    return seen


def _fake_mode(vals: list):
    from torch._guards import detect_fake_mode

    return detect_fake_mode(vals)


def _rewrite(graph: fx.Graph, m: Match, program: str, mesh: Mesh, cfg: FusionPass
             ) -> str | None:
    """Replace `m` by one mixcc::fusion_chain call; the reason when it cannot (the graph
    is then untouched)."""
    xv = _val(m.x)
    inside = set(m.nodes)
    downstream = _descendants(inside)
    for name, t, _ in m.inputs:
        if t in inside or t in downstream:
            return f"the {name} tensor depends on the collective's result"
    try:
        ir = build(parse(program), mesh, xv.dtype)
    except CompileError as e:
        return f"mixcc refuses {program!r}: {e.args[0] if e.args else e}"
    factor = Fraction(ir.row_factor)
    quant = bool(m.epilogue) and m.epilogue[-1][0] == "quant"
    out_dtype = FP8 if quant else xv.dtype
    # the program reads and writes in x's dtype: another dtype would be a silent cast
    for name, t, _ in m.inputs:
        want = torch.float32 if name == "scale" else xv.dtype
        if _val(t) is None or _val(t).dtype != want:
            return f"the {name} tensor is not {dtype_name(want)}"
    for t in [m.final] + ([m.stored] if m.stored is not None else []):
        want = out_dtype if t is m.final else xv.dtype
        if _val(t) is None or _val(t).dtype != want:
            return f"the value replaced is not {dtype_name(want)}"
    if m.hidden:
        if not _known(xv.numel() % m.hidden == 0):
            return f"the input's size is not a multiple of the row width {m.hidden}"
        rows = xv.numel() // m.hidden
    else:
        if xv.dim() == 0:
            return "a 0-d input"
        rows = xv.shape[0]
    if ir.granularity > 1 and not _known(rows % ir.granularity == 0):
        return f"the input's rows are not known to divide by {ir.granularity}"
    fv = _val(m.final)
    final_shape = _shape(m.final)
    if fv is None or final_shape is None or not all(isinstance(d, int) for d in final_shape[1:]):
        return "the output's trailing dims are not static"
    written = []
    if m.stored is not None:
        sshape = _shape(m.stored)
        if sshape is None or not all(isinstance(d, int) for d in sshape[1:]):
            return "the residual sum's trailing dims are not static"
        written.append(("resid_out", dtype_name(_val(m.stored).dtype)))
    spec = Spec(program=program, axes=tuple(zip(mesh.names, mesh.sizes, strict=True)),
                ranks_per_node=mesh.ranks_per_node,
                group=cfg.group_name,
                backend=cfg.backend, options=tuple(cfg.options.items()), hidden=m.hidden,
                factor=(factor.numerator, factor.denominator), out_dtype=dtype_name(out_dtype),
                read=tuple((n, rows_) for n, _, rows_ in m.inputs), written=tuple(written))
    key = spec.key()
    fake = _fake_mode([xv, *(_val(t) for _, t, _ in m.inputs)])
    if fake is None:
        return "the graph carries no fake tensors to give the new nodes their shapes"
    op = torch.ops.mixcc.fusion_chain.default
    with graph.inserting_before(m.final):
        tensors = [t for _, t, _ in m.inputs]
        call = graph.call_function(op, (m.x, tensors, key))
        with fake:
            vals = op(xv, [_val(t) for t in tensors], key)
        call.meta["val"] = vals
        outs = []
        for i, target in enumerate([m.final] + ([m.stored] if m.stored is not None else [])):
            g = graph.call_function(operator.getitem, (call, i))
            g.meta["val"] = vals[i]
            tv = _val(target)
            cur, cv = g, vals[i]
            if tuple(cv.shape) != tuple(tv.shape):
                shape = [-1, *tv.shape[1:]]
                cur = graph.call_function(torch.ops.aten.reshape.default, (cur, shape))
                with fake:
                    cv = torch.ops.aten.reshape.default(cv, shape)
                cur.meta["val"] = cv
            if cv.dtype != tv.dtype:
                cur = graph.call_function(torch.ops.prims.convert_element_type.default,
                                          (cur, tv.dtype))
                with fake:
                    cv = torch.ops.prims.convert_element_type.default(cv, tv.dtype)
                cur.meta["val"] = cv
            outs.append(cur)
    m.final.replace_all_uses_with(outs[0])
    if m.stored is not None:
        m.stored.replace_all_uses_with(outs[1], delete_user_cb=lambda u: u not in inside)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(m.nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    return None


class _Chain(CustomGraphPass):
    """A user's post-grad pass(es), then the fusion pass, as one pass (older torch takes
    one pass in post_grad_custom_post_pass, not a list). Its uuid is None, so Inductor
    skips its graph cache, when one of them is a plain function without a uuid."""

    def __init__(self, prior: Any, fp: FusionPass):
        self.passes = [*(prior if isinstance(prior, (list, tuple)) else [prior]), fp]

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> str | None:
        ids = [p.uuid() if hasattr(p, "uuid") else None for p in self.passes]
        return None if any(i is None for i in ids) else json.dumps(
            [i.hex() if isinstance(i, bytes) else str(i) for i in ids])


def compile_model(model: Any, mesh: Any = None, *, fusion: dict | None = None,
                  **torch_compile_kwargs: Any) -> Any:
    """torch.compile(model, ...) with a FusionPass(mesh, **fusion) as Inductor's post-grad
    custom pass. `mode=` is turned into the Inductor options it stands for (torch.compile
    takes mode or options, not both). The pass is the result's `mixcc_fusion` attribute."""
    fp = FusionPass(mesh, **(fusion or {}))
    kw = dict(torch_compile_kwargs)
    options = dict(kw.pop("options", None) or {})
    mode = kw.pop("mode", None)
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, kw.get("dynamic")), **options}
    prior = options.get("post_grad_custom_post_pass")
    options["post_grad_custom_post_pass"] = fp if prior is None else _Chain(prior, fp)
    compiled = torch.compile(model, options=options, **kw)
    try:
        compiled.mixcc_fusion = fp
    except AttributeError:  # pragma: no cover - an object that takes no attributes
        pass
    return compiled


__all__ = ["FusionPass", "SiteReport", "compile_model", "fuse_graph"]
