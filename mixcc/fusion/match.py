"""Finding collective sites and the chains around them in a post-grad FX graph.

Pure functions over `torch.fx` nodes: `find_sites` lists every collective of the graph;
`match_chain` grows a site into the longest chain of collectives joined by views, then
the longest epilogue after it (add of a residual, the sum written back, RMSNorm in any of
its decomposed forms, a static fp8 quant), and checks that no value inside the match is
used outside it except the two it exports (the output, and the residual sum when other
nodes read it). What does not pass stays in the graph as it was.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch
import torch.fx as fx

aten = torch.ops.aten
prims = torch.ops.prims

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0


def _functional():
    return torch.ops._c10d_functional


def collective_kinds() -> dict:
    """Functional collective op -> mixcc statement."""
    f = _functional()
    return {f.all_reduce.default: "allreduce",
            f.all_gather_into_tensor.default: "allgather",
            f.reduce_scatter_tensor.default: "reducescatter"}


def other_collectives() -> dict:
    """Collective ops the pass reports but does not replace -> a short reason."""
    out: dict = {}
    f = _functional()
    for name, why in (("all_reduce_", "in-place functional all_reduce_"),
                      ("all_reduce_coalesced", "coalesced collective"),
                      ("all_reduce_coalesced_", "coalesced collective"),
                      ("all_gather_into_tensor_coalesced", "coalesced collective"),
                      ("all_gather_into_tensor_out", "all_gather with out="),
                      ("reduce_scatter_tensor_coalesced", "coalesced collective"),
                      ("all_to_all_single", "all_to_all is not a mixcc statement"),
                      ("broadcast", "broadcast is not a mixcc statement"),
                      ("broadcast_", "broadcast is not a mixcc statement")):
        op = getattr(f, name, None)
        if op is not None:
            for ov in op.overloads():
                out[getattr(op, ov)] = why
    c10d = getattr(torch.ops, "c10d", None)
    for name in ("allreduce_", "allgather_", "_allgather_base_", "reduce_scatter_",
                 "_reduce_scatter_base_", "broadcast_", "alltoall_", "alltoall_base_"):
        op = getattr(c10d, name, None) if c10d is not None else None
        if op is not None:
            for ov in op.overloads():
                out[getattr(op, ov)] = "a c10d op (not a functional collective)"
    return out


@dataclass
class Site:
    """One collective of the graph."""

    index: int
    node: fx.Node
    op: str  # the torch op's name
    coll: str | None  # mixcc statement, None when unsupported
    redop: str | None
    group: str | None  # group_name
    wait: fx.Node | None
    reason: str | None = None  # why it cannot be replaced, found while parsing


REDOPS = {"sum": "sum", "max": "max", "min": "min"}


def find_sites(graph: fx.Graph) -> list[Site]:
    kinds, others = collective_kinds(), other_collectives()
    wait = _functional().wait_tensor.default
    sites: list[Site] = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        name = str(n.target)
        if n.target in kinds:
            coll = kinds[n.target]
            redop = None if coll == "allgather" else str(n.args[1])
            group = str(n.args[-1])
            waits = [u for u in n.users if u.target is wait]
            reason = None
            if redop is not None and redop not in REDOPS:
                reason = f"unsupported reduce op {redop!r} (mixcc has sum, max, min)"
            elif len(waits) != 1 or len(n.users) != 1:
                reason = "its output is used other than through one wait_tensor"
            sites.append(Site(len(sites), n, name, coll, redop, group,
                              waits[0] if len(waits) == 1 else None, reason))
        elif n.target in others:
            sites.append(Site(len(sites), n, name, None, None, None, None,
                              f"unsupported op: {others[n.target]}"))
    return sites


# -- seeing through views and casts ---------------------------------------------------

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.alias.default}
_CASTS = {prims.convert_element_type.default}


def _val(n: object):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is_view(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in _VIEWS:
        return True
    if n.target is aten.clone.default:  # a contiguous copy
        mf = n.kwargs.get("memory_format")
        return mf in (None, torch.contiguous_format, torch.preserve_format)
    return False


def _is_cast(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in _CASTS:
        return isinstance(n.args[1], torch.dtype) and n.args[1].is_floating_point \
            and n.args[1] is not FP8
    if n.target is aten._to_copy.default:
        dt = n.kwargs.get("dtype")
        extra = set(n.kwargs) - {"dtype", "layout", "device", "memory_format"}
        src, dst = _val(n.args[0]), _val(n)
        same_dev = src is not None and dst is not None and src.device == dst.device
        return (dt is not None and dt.is_floating_point and dt is not FP8 and not extra
                and same_dev)
    return False


def _single_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def follow(n: fx.Node, casts: bool) -> tuple[fx.Node, list[fx.Node]]:
    """From `n`, the last node of the run of single-user views (and casts, if allowed)."""
    path: list[fx.Node] = []
    while True:
        u = _single_user(n)
        if u is None or u.args[0] is not n or not (_is_view(u) or (casts and _is_cast(u))):
            return n, path
        path.append(u)
        n = u


# -- matches ------------------------------------------------------------------------

@dataclass
class Match:
    """A chain of collectives and its epilogue, ready to replace."""

    sites: list[Site]
    nodes: list[fx.Node]  # every node replaced (the collectives, waits, views, epilogue)
    x: fx.Node  # the first collective's input
    final: fx.Node  # the node whose value the program's output replaces
    epilogue: list[tuple[str, str, object]] = field(default_factory=list)
    # (statement, tensor name, extra: eps / node), in program order
    inputs: list[tuple[str, fx.Node, bool]] = field(default_factory=list)
    # (name, node, viewed as rows) for the tensors the program reads
    stored: fx.Node | None = None  # the residual sum whose other users read the store
    hidden: int = 0
    note: str | None = None  # why the epilogue stopped short, if it did

    def program(self, axes: list[tuple[str, ...]]) -> str:
        stmts = []
        for site, ax in zip(self.sites, axes, strict=True):
            op = f", op={site.redop}" if site.redop not in (None, "sum") else ""
            stmts.append(f"{site.coll}({'*'.join(ax)}{op})")
        for stmt, name, extra in self.epilogue:
            if stmt == "rmsnorm":
                stmts.append(f"rmsnorm({name}, eps={_eps_text(float(extra))})")
            elif stmt == "quant":
                stmts.append(f"quant(fp8_e4m3, {name})")
            else:
                stmts.append(f"{stmt}({name})")
        return "; ".join(stmts)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _eps_text(eps: float) -> str:
    """The shortest decimal text of eps as fp32 (the epilogue runs in fp32): the graph
    holds 1e-6 as the double nearest its fp32 value, 9.999999974752427e-07."""
    want = _f32(eps)
    for digits in range(1, 18):
        text = f"{eps:.{digits}g}"
        if _f32(float(text)) == want:
            return text
    return repr(eps)


def grow_chain(site: Site, by_node: dict[fx.Node, Site]) -> list[Site]:
    """`site` and the collectives that its value flows into alone, through views."""
    chain = [site]
    while True:
        end, _ = follow(chain[-1].wait, casts=False)
        nxt = _single_user(end)
        s = by_node.get(nxt) if nxt is not None else None
        if s is None or s.reason is not None or s.coll is None or nxt.args[0] is not end:
            return chain
        chain.append(s)


def _chain_nodes(chain: list[Site]) -> tuple[list[fx.Node], fx.Node]:
    nodes: list[fx.Node] = []
    for i, s in enumerate(chain):
        nodes += [s.node, s.wait]
        end, path = follow(s.wait, casts=False)
        if i + 1 < len(chain):
            nodes += path
    return nodes, chain[-1].wait


def _other(n: fx.Node, a: object) -> object:
    args = n.args
    return args[1] if args[0] is a else args[0]


def _shape(n: object) -> tuple | None:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _static(shape: tuple | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _match_add(v: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """v (through views/casts) + residual of the same shape: (add node, residual, path)."""
    end, path = follow(v, casts=True)
    u = _single_user(end)
    if u is None or u.target is not aten.add.Tensor or len(u.args) != 2 or u.kwargs:
        return None
    r = _other(u, end)
    if not isinstance(r, fx.Node) or r is end:
        return None
    if _shape(r) is None or _shape(r) != _shape(u) or not _val(r).is_floating_point():
        return None
    return u, r, path


@dataclass
class _Norm:
    nodes: list[fx.Node]
    out: fx.Node
    weight: fx.Node
    eps: float


def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps aten.rms_norm uses when given None: that of its computation dtype (fp32
    for fp16, bf16 and fp32 inputs, fp64 for fp64), not that of the input's dtype."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _dt(n: object) -> torch.dtype | None:
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _dtname(dt: torch.dtype | None) -> str:
    return str(dt).removeprefix("torch.")


def _norm_dtype_note(norm: _Norm, dt: torch.dtype) -> str | None:
    """Why `norm` cannot run in the program's dtype `dt`, or None when it can."""
    if _dt(norm.weight) != dt:
        return (f"the RMSNorm weight is {_dtname(_dt(norm.weight))}, the collective's dtype "
                f"{_dtname(dt)}")
    if _dt(norm.out) != dt:
        return (f"the RMSNorm output is {_dtname(_dt(norm.out))}, the collective's dtype "
                f"{_dtname(dt)}")
    return None


def _users(n: fx.Node, target) -> list[fx.Node]:
    return [u for u in n.users if u.target is target]


def _match_rmsnorm(h: fx.Node) -> _Norm | None:
    """The RMSNorm of `h` over its last dim, decomposed or whole, with a [hidden] weight."""
    shape = _shape(h)
    if shape is None or len(shape) < 1 or not isinstance(shape[-1], int):
        return None
    nd = len(shape)
    # whole forms first
    for u in h.users:
        if u.target is aten.rms_norm.default and u.args[0] is h:
            ns, w = u.args[1], u.args[2] if len(u.args) > 2 else u.kwargs.get("weight")
            eps = u.args[3] if len(u.args) > 3 else u.kwargs.get("eps")
            if list(ns) != [shape[-1]] or not isinstance(w, fx.Node):
                continue
            if eps is None:
                eps = default_rms_eps(_val(h).dtype)
            return _Norm([u], u, w, float(eps))
    # decomposed: hx = h or h cast; hx * rsqrt(mean(hx^2, -1, keepdim) + eps) [cast] * w
    candidates = [h] + [u for u in h.users if _is_cast(u) and u.args[0] is h]
    for hx in candidates:
        for sq in hx.users:
            if sq.target is aten.pow.Tensor_Scalar and sq.args[0] is hx and sq.args[1] == 2:
                pass
            elif sq.target is aten.mul.Tensor and sq.args[0] is hx and sq.args[1] is hx:
                pass
            else:
                continue
            mean = _single_user(sq)
            if mean is None or mean.target is not aten.mean.dim:
                continue
            dims = list(mean.args[1]) if len(mean.args) > 1 else []
            keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            if dims not in ([-1], [nd - 1]) or not keep or mean.kwargs.get("dtype"):
                continue
            add = _single_user(mean)
            if add is None or add.target not in (aten.add.Tensor, aten.add.Scalar) \
                    or add.args[0] is not mean or not isinstance(add.args[1], (int, float)) \
                    or add.kwargs:
                continue
            eps = float(add.args[1])
            rs = _single_user(add)
            if rs is None or rs.target is not aten.rsqrt.default:
                continue
            mul = _single_user(rs)
            if mul is None or mul.target is not aten.mul.Tensor or _other(mul, rs) is not hx:
                continue
            end, path = follow(mul, casts=True)
            mw = _single_user(end)
            if mw is None or mw.target is not aten.mul.Tensor or len(mw.args) != 2:
                continue
            w = _other(mw, end)
            if not isinstance(w, fx.Node) or _shape(w) != (shape[-1],) \
                    or not _val(w).is_floating_point() or _shape(mw) != shape:
                continue
            nodes = ([hx] if hx is not h else []) + [sq, mean, add, rs, mul, *path, mw]
            return _Norm(nodes, mw, w, eps)
    return None


def _match_quant(y: fx.Node) -> tuple[list[fx.Node], fx.Node, fx.Node] | None:
    """saturate(y / scale) as float8_e4m3fn: (nodes, output, scale)."""
    if FP8 is None:
        return None
    end, path = follow(y, casts=True)
    div = _single_user(end)
    if div is None or div.target is not aten.div.Tensor or div.args[0] is not end:
        return None
    s = div.args[1]
    sv = _val(s)
    if not isinstance(s, fx.Node) or sv is None or sv.dtype != torch.float32 or sv.numel() != 1:
        return None
    nodes = [*path, div]
    cur = div
    lo = hi = None
    while True:
        u = _single_user(cur)
        if u is None:
            return None
        if u.target is aten.clamp.default and u.args[0] is cur:
            lo = u.args[1] if len(u.args) > 1 else u.kwargs.get("min")
            hi = u.args[2] if len(u.args) > 2 else u.kwargs.get("max")
        elif u.target is aten.clamp_min.default and u.args[0] is cur:
            lo = u.args[1]
        elif u.target is aten.clamp_max.default and u.args[0] is cur:
            hi = u.args[1]
        elif u.target is prims.convert_element_type.default and u.args[1] is FP8:
            if lo is None or hi is None or float(lo) != -FP8_MAX or float(hi) != FP8_MAX:
                return None
            return [*nodes, u], u, s
        else:
            return None
        nodes.append(u)
        cur = u


def _norm_before(x: fx.Node) -> tuple[fx.Node, _Norm, list[fx.Node]] | None:
    """The RMSNorm whose output reaches `x` through views: (its input h, the norm, the
    views)."""
    path: list[fx.Node] = []
    n = x
    while _is_view(n) and isinstance(n.args[0], fx.Node):
        path.append(n)
        n = n.args[0]
    if n.op != "call_function":
        return None
    heads: list[fx.Node] = []
    if n.target is aten.rms_norm.default and isinstance(n.args[0], fx.Node):
        heads.append(n.args[0])
    elif n.target is aten.mul.Tensor:
        for a in n.args:
            while isinstance(a, fx.Node) and _is_cast(a):
                a = a.args[0]
            if isinstance(a, fx.Node) and a.target is aten.mul.Tensor:
                for b in a.args:
                    if isinstance(b, fx.Node) and b.target is not aten.rsqrt.default:
                        heads.append(b.args[0] if _is_cast(b) else b)
    for h in heads:
        norm = _match_rmsnorm(h)
        if norm is not None and norm.out is n:
            return h, norm, path
    return None


def _match_prologue(base: Match) -> Match | None:
    """An RMSNorm just before a chain of allgathers moves after them (a row-wise op
    commutes with gathering rows): the DP-attention order, norm then allgather(dp)."""
    if any(s.coll != "allgather" for s in base.sites):
        return None
    found = _norm_before(base.x)
    if found is None:
        return None
    h, norm, path = found
    shape = _shape(h)
    if shape is None or not isinstance(shape[-1], int):
        return None
    if _dt(h) != _dt(base.x) or _norm_dtype_note(norm, _dt(h)) is not None:
        return None  # the program would read or write another dtype than the graph's
    nodes = [*norm.nodes, *reversed(path), *base.nodes]
    m = Match(base.sites, nodes, h, base.final, [("rmsnorm", "weight", norm.eps)],
              [("weight", norm.weight, False)], None, shape[-1])
    return m if _closed(nodes, {base.final}) is None else None


def _closed(nodes: list[fx.Node], exports: set[fx.Node]) -> fx.Node | None:
    """A node of `nodes` (not in `exports`) with a user outside `nodes`, or None."""
    inside = set(nodes)
    for n in nodes:
        if n in exports:
            continue
        if any(u not in inside for u in n.users):
            return n
    return None


def match_chain(chain: list[Site], epilogue: bool = True) -> tuple[Match | None, str | None]:
    """The longest valid match of `chain` (shortening the epilogue first, then the chain),
    with a note on what stopped it short; (None, reason) when nothing is valid."""
    while chain:
        nodes, last = _chain_nodes(chain)
        x = chain[0].node.args[0]
        base = Match(list(chain), nodes, x, last)
        leak = _closed(nodes, {last})  # every node but the last wait stays inside
        if leak is not None:
            reason = (f"{leak.name}, between the collectives, is used outside the chain")
            if len(chain) == 1:
                return None, reason
            chain = chain[:-1]
            continue
        note = None
        if epilogue:
            full, note = _match_epilogue(base)
            if full is not None:
                full.note = note
                return full, None
        end, path = follow(last, casts=False)
        base.nodes = nodes + path
        base.final = end
        base.note = note
        if _closed(base.nodes, {end}) is not None:
            base.nodes, base.final = nodes, last
        if epilogue:
            moved = _match_prologue(base)
            if moved is not None:
                moved.note = "the RMSNorm before the allgather moved after it"
                return moved, None
        return base, None
    return None, "no collective"


def _match_epilogue(base: Match) -> tuple[Match | None, str | None]:
    """The longest epilogue after base's last wait: add [store] [rmsnorm [quant]]."""
    last = base.final
    added = _match_add(last)
    if added is None:
        return None, None
    add, resid, vpath = added
    # the program runs in x's dtype and reads and writes every row tensor in it: a cast
    # seen through before the add must leave the sum in that dtype
    dt = _dt(base.x)
    if _dt(resid) != dt:
        return None, (f"epilogue stops: residual is {_dtname(_dt(resid))}, the collective's "
                      f"dtype {_dtname(dt)}")
    if _dt(add) != dt:
        return None, (f"epilogue stops: the residual sum is {_dtname(_dt(add))}, the "
                      f"collective's dtype {_dtname(dt)}")
    nodes = base.nodes + vpath + [add]
    hidden = _shape(add)[-1] if _shape(add) else None
    if not isinstance(hidden, int):
        return None, "the residual sum's last dim is not static"
    stages: list[Match] = []
    m = Match(base.sites, nodes, base.x, add, [("add", "residual", None)],
              [("residual", resid, True)], None, hidden)
    stages.append(m)
    norm = _match_rmsnorm(add)
    note = None
    if norm is not None:
        note = _norm_dtype_note(norm, dt)
        if note is not None:
            note = f"epilogue stops before the RMSNorm: {note}"
            norm = None
    if norm is not None:
        n_nodes = nodes + norm.nodes
        store = [u for u in add.users if u not in set(n_nodes)]
        epi = [("add", "residual", None)]
        if store:
            epi.append(("store", "resid_out", None))
        epi.append(("rmsnorm", "weight", norm.eps))
        inputs = [("residual", resid, True), ("weight", norm.weight, False)]
        m2 = Match(base.sites, n_nodes, base.x, norm.out, epi, inputs,
                   add if store else None, hidden)
        stages.append(m2)
        q = _match_quant(norm.out)
        if q is not None:
            q_nodes, q_out, scale = q
            m3 = Match(base.sites, n_nodes + q_nodes, base.x, q_out,
                       [*epi, ("quant", "scale", None)], [*inputs, ("scale", scale, False)],
                       m2.stored, hidden)
            stages.append(m3)
    for m in reversed(stages):
        exports = {m.final} | ({m.stored} if m.stored is not None else set())
        leak = _closed(m.nodes, exports)
        if leak is None:
            return m, note
        note = f"the epilogue stops before {leak.name}'s step: {leak.name} is used elsewhere"
    return None, note


__all__ = ["Match", "Site", "collective_kinds", "find_sites", "follow", "grow_chain",
           "match_chain"]
