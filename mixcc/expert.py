"""Expert parallelism: the `dispatch` and `combine` statements (docs/DESIGN.md, "Expert
parallelism"): their checks against the mesh, the call checks, the handle that carries
a dispatch's routing to its combine, and the reference backend on torch.distributed.

    d = mixcc.compile("dispatch(ep, experts=64, topk=8, max_tokens=128)", mesh)
    recv_x, recv_count, handle = d(x, topk_idx=idx, topk_weights=w)
    y = mixcc.compile("combine(ep)", mesh)(expert_out, handle=handle)

Rank i of a group G (its position in G's order) holds experts [i*L, (i+1)*L) with
L = experts / |G|. recv_x is (L, S, H): for each local expert its tokens in slots
0..recv_count[j]-1, ordered by source rank (position in G), then token index; S is
`capacity` when given, else max_tokens * |G| (max_tokens defaults to the call's T, the
same on every rank). Slots at and past recv_count[j] hold unspecified values.
combine returns y (T, H) in x's dtype: y[t] = sum over k ascending of w[t, k] *
expert_out[slot of (t, k)] in fp32, entries with idx -1 skipped, rounded once.

The reference backend runs a call in two steps on the group's subgroup (gloo for CPU
tensors, NCCL for CUDA tensors): an exchange of one small integer row per rank (its
status, shape, dtype and token count per expert), then one all_to_all_single with
splits carrying one row per (token, expert) pair. Every check that depends on another
rank (capacity, hidden size, T without max_tokens) is decided from the exchanged rows,
so every rank raises the same error together and no data has moved; a rank whose own
input is wrong (ids out of range, an expert twice in a row, T > max_tokens, dtypes,
shapes, devices) still takes part in the exchange, raises its own message, and the
others raise naming it. Only a call whose x is not a tensor raises locally at once.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import ops
from .errors import CollectiveTimeout, CompileError
from .ir.ast import EPStmt, Program
from .ir.build import group_axes
from .mesh import Mesh
from .reference import _kinds, subgroup

EP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
WIRE_FP8 = "fp8_e4m3"
_HEAD = 5  # exchange row: status, T, H, dtype code, scale block; then counts per expert
# (class, program, global ranks) -> the serial of the last object built for it
_SERIALS: dict[tuple[str, str, tuple[int, ...]], int] = {}


@dataclass(frozen=True)
class EPSpec:
    """A dispatch or combine statement resolved against a mesh."""

    kind: str  # "dispatch" | "combine"
    axes: tuple[str, ...]
    group_size: int
    experts: int = 0
    topk: int = 0
    max_tokens: int | None = None
    capacity: int | None = None
    wire: str | None = None  # None: x's dtype; "fp8_e4m3": fp8 with float32 scales
    scale_block: int | None = None  # fp8 scale granularity (None: one scale per token)

    @property
    def local_experts(self) -> int:
        return self.experts // self.group_size

    def slots(self, tokens: int) -> int:
        """Slots per local expert for calls of `tokens` rows per rank (max_tokens when
        set): `capacity`, else tokens x |G|."""
        if self.capacity is not None:
            return self.capacity
        return (self.max_tokens or tokens) * self.group_size


def _err(msg: str, text: str, st: EPStmt, arg: str | None = None) -> CompileError:
    a = st.arg(arg) if arg else None
    p = a.pos if a is not None else st.pos
    return CompileError(msg, text, p.line, p.column, p.width)


def build_spec(program: Program, mesh: Mesh, dtype: torch.dtype | None = None) -> EPSpec:
    """Check an expert-parallel program against `mesh` and `dtype`; CompileError."""
    st, text = program.ep, program.text
    assert st is not None
    axes = group_axes(st.axes, mesh, text)
    n = mesh.group_size(axes)
    if dtype is not None and dtype not in EP_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in EP_DTYPES)
        raise CompileError(f"{st.kind} moves floating-point tokens: dtype must be one of "
                           f"{names}, got {dtype}", text)
    if st.kind == "combine":
        return EPSpec("combine", axes, n)
    args = {a.name: a.value for a in st.args}
    experts, topk = int(args["experts"]), int(args["topk"])
    if experts % n:
        raise _err(f"experts={experts} must be divisible by the size {n} of the group "
                   f"{st.group_text()} (each rank holds experts/{n} experts)", text, st,
                   "experts")
    if topk > experts:
        raise _err(f"topk={topk} must be at most experts={experts} (a token picks distinct "
                   "experts)", text, st, "topk")
    wire = args.get("wire")
    if wire is not None and ops.QUANT_FORMATS.get(str(wire)) is None:
        raise _err(f"wire={wire} needs a torch with {wire} tensors", text, st, "wire")
    return EPSpec("dispatch", axes, n, experts, topk, args.get("max_tokens"),
                  args.get("capacity"), wire, args.get("scale_block"))


@dataclass(eq=False)
class EPHandle:
    """What combine needs of one dispatch call on this rank: the routing (a copy of
    topk_idx and topk_weights), the call shape, the order this rank sent its (token,
    expert) pairs in, the slot of every row it received, and the split sizes. A handle
    is tied to its dispatch (tag), the call (call) and the rank; combine checks all of
    them. It holds no reference to the caller's tensors."""

    tag: int
    call: int
    rank: int
    members: tuple[int, ...]
    spec: EPSpec
    tokens: int
    hidden: int
    slots: int
    dtype: torch.dtype
    device: torch.device
    topk_idx: torch.Tensor  # (T, K) int64 copy
    topk_weights: torch.Tensor  # (T, K) float32 copy
    pair_order: torch.Tensor  # pair index t*K+k of each sent row, in send order
    dst: torch.Tensor  # flat slot (j*S + slot) of each received row, in receive order
    send_splits: list[int]  # rows sent to each backend rank
    recv_splits: list[int]  # rows received from each backend rank
    recv_count: torch.Tensor = field(repr=False)

    def __repr__(self) -> str:
        return (f"EPHandle(dispatch call {self.call} of {self.spec.kind} over "
                f"{'*'.join(self.spec.axes)}, rank {self.rank}, T={self.tokens}, "
                f"H={self.hidden}, slots={self.slots}, {self.dtype})")


class _EPBase:
    """Shared by Dispatch and Combine: the group, its subgroup backends, the exchange."""

    def __init__(self, program: str, mesh: Mesh, spec: EPSpec, ast: Program, *,
                 dtype: torch.dtype | None, group: dist.ProcessGroup | None,
                 timeout_s: float):
        self.program, self.mesh, self.spec, self.ast = program, mesh, spec, ast
        self.dtype, self.group, self.timeout_s = dtype, group, float(timeout_s)
        self.backend = "reference"
        self.calls = 0
        self._pgs: dict[str, object] = {}
        self._dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self._dist else 0
        self.members = mesh.group_members(self.rank, spec.axes)
        self.index = self.members.index(self.rank)
        # the subgroup's backend ranks are the members sorted by global rank
        if self._dist:
            parent = group if group is not None else dist.group.WORLD
            glob = [dist.get_global_rank(parent, m) if parent is not dist.group.WORLD else m
                    for m in self.members]
        else:
            glob = list(self.members)
        by_global = sorted(range(len(glob)), key=lambda i: glob[i])
        self.q_of = [by_global.index(i) for i in range(len(glob))]  # group index -> q
        self.i_of = by_global  # backend rank q -> group index
        if self._dist and len(self.members) > 1:
            self._pgs = {k: subgroup(k, group, self.members) for k in _kinds(group)}
        # the serial tells apart objects compiled from the same text over the same ranks:
        # each member constructs them in the same order, so the count agrees
        key = (type(self).__name__, program, tuple(glob))
        self.serial = _SERIALS[key] = _SERIALS.get(key, -1) + 1
        self.tag = zlib.crc32(f"{program}|{glob}|{self.serial}".encode()) & 0x7FFFFFFF

    # -- the reference backend's two steps ---------------------------------------
    def _pg(self, device: torch.device):
        kind = "nccl" if device.type == "cuda" else "gloo"
        pg = self._pgs.get(kind)
        if pg is None:
            raise ValueError(f"tensors are on {device} but the process group has no {kind} "
                             "backend")
        return pg

    def _ready(self, t: torch.Tensor) -> None:
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{self.spec.kind} on the reference backend reads the token "
                               "counts on the host, so it cannot be captured in a CUDA graph "
                               "(the fused dispatch/combine kernels, not built yet, are meant "
                               "to be)")
        if not self._dist and self.mesh.world_size != 1:
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group before running "
                               f"{self.spec.kind}")

    def _wait(self, work, stage: str) -> None:
        """Wait for `work` at most timeout_s; on a timeout name the members that never
        arrived (each rank that did records its arrival in the store as it gives up)."""
        try:
            work.wait(timedelta(seconds=self.timeout_s))
            return
        except Exception as e:  # gloo and NCCL raise their own errors on a timeout
            cause = e
        store = dist.distributed_c10d._get_default_store()
        key = f"mixcc/ep/{self.tag}/{self.calls}/"
        try:
            store.set(key + str(self.rank), stage)
        except Exception:
            raise cause from None
        deadline = time.monotonic() + min(2.0, self.timeout_s)
        missing = [m for m in self.members if m != self.rank]
        while missing and time.monotonic() < deadline:
            try:
                missing = [m for m in missing if not store.check([key + str(m)])]
            except Exception:
                break
            time.sleep(0.05)
        if not missing:  # every member got here: not a missing peer, the backend's error
            raise cause
        raise CollectiveTimeout(self.rank, missing[0], f"{self.spec.kind}: {stage}", 0,
                                self.calls, self.timeout_s) from cause

    def _exchange(self, row: torch.Tensor) -> torch.Tensor:
        """Every member's `row` (int64), indexed by position in the group."""
        n = len(self.members)
        if n == 1:
            return row.view(1, -1).clone()
        buf = row.new_empty(n * row.numel())
        self._wait(self._pg(row.device)._allgather_base(buf, row), "exchange of counts")
        # buf's row q is backend rank q's; the member at group position i is q_of[i]
        return buf.view(n, -1)[self.q_of]

    def _all_to_all(self, send: torch.Tensor, send_splits: list[int],
                    recv_splits: list[int], stage: str) -> torch.Tensor:
        """Rows of `send` (bytes) to each backend rank; the rows received, by backend rank."""
        recv = send.new_empty((sum(recv_splits), send.shape[1]))
        if len(self.members) == 1:
            recv.copy_(send)
            return recv
        work = self._pg(send.device).alltoall_base(recv, send, recv_splits, send_splits,
                                                   dist.AllToAllOptions())
        self._wait(work, stage)
        return recv

    def _device_ok(self, t: torch.Tensor) -> str | None:
        if t.is_cuda:
            cur = torch.device("cuda", torch.cuda.current_device())
            if t.device != cur:
                return f"must be on the current CUDA device {cur}, got {t.device}"
        elif t.device.type != "cpu":
            return f"must be on the CPU or the current CUDA device, got {t.device}"
        return None

    def _raise_together(self, table: torch.Tensor, mine: BaseException | None) -> None:
        """After the exchange: raise on every rank when any member rejected its input."""
        bad = [self.members[i] for i in range(table.shape[0]) if int(table[i, 0])]
        if mine is not None:
            others = [b for b in bad if b != self.rank]
            also = f" (rank(s) {others} rejected theirs too)" if others else ""
            raise type(mine)(f"{mine}{also}; nothing was sent, every rank of the group "
                             "raises") from None
        if bad:
            raise ValueError(f"{self.spec.kind}: rank(s) {bad} of the group rejected their "
                             "input (each names the cause); nothing was sent, every rank of "
                             "the group raises")

    # -- explain ------------------------------------------------------------------
    def _explain_head(self) -> str:
        st = self.ast.ep
        groups = self.mesh.partition(self.spec.axes)
        shown = ", ".join(str(list(g)) for g in groups[:4]) + (" ..." if len(groups) > 4
                                                               else "")
        from .ir.passes import scope_of

        where = {"intra": "inside one node", "inter": "one rank per node",
                 "hier": "equal parts on several nodes", "flat": "across nodes unevenly"}
        scope = scope_of(tuple(self.spec.axes), self.mesh)
        return (f"program: {self.program}\nmesh: {self.mesh}\n"
                f"AST:\n  {st}  @ line {st.pos.line}, column {st.pos.column}\n"
                f"group {'*'.join(self.spec.axes)}: {self.spec.group_size} ranks, "
                f"{len(groups)} group(s): {shown}; {scope} ({where[scope]})\n")

    def check(self) -> None:
        """Nothing to check: the reference backend raises its timeouts in the call."""

    def close(self) -> None:
        """Nothing held beyond the shared subgroups (reference.clear_groups drops them)."""


class Dispatch(_EPBase):
    """A compiled `dispatch(G, experts=E, topk=K, ...)`. Call it as
    `recv_x, recv_count, handle = d(x, topk_idx=idx, topk_weights=w)`; with
    wire=fp8_e4m3 as `recv_x, recv_scale, recv_count, handle = d(...)`."""

    def output_shapes(self, tokens: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """The shapes a call with `tokens` rows (max_tokens when set) of `hidden` returns."""
        sp = self.spec
        out = {"recv_x": (sp.local_experts, sp.slots(tokens), hidden),
               "recv_count": (sp.local_experts,)}
        if sp.wire:
            blk = sp.scale_block or hidden
            out["recv_scale"] = (sp.local_experts, sp.slots(tokens), hidden // blk)
        return out

    def out_names(self) -> tuple[str, ...]:
        """The names of the tensors a call returns before the handle, in order."""
        return ("recv_x", "recv_scale", "recv_count") if self.spec.wire else \
            ("recv_x", "recv_count")

    def _check_out(self, x: torch.Tensor, out: object) -> BaseException | None:
        """`out`: the tensors a call would return, preallocated (as output_shapes)."""
        names = self.out_names()
        if not isinstance(out, tuple | list) or len(out) != len(names):
            return TypeError(f"out must be a tuple ({', '.join(names)}), got "
                             f"{type(out).__name__}")
        shapes = self.output_shapes(self.spec.max_tokens or x.shape[0], x.shape[1])
        wire = ops.QUANT_FORMATS[self.spec.wire] if self.spec.wire else x.dtype
        dtypes = {"recv_x": wire, "recv_scale": torch.float32, "recv_count": torch.int32}
        for name, t in zip(names, out, strict=True):
            if not isinstance(t, torch.Tensor):
                return TypeError(f"out's {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtypes[name]:
                return TypeError(f"out's {name}.dtype must be {dtypes[name]}, got {t.dtype}")
            if tuple(t.shape) != shapes[name]:
                return ValueError(f"out's {name}.shape must be {shapes[name]}, got "
                                  f"{tuple(t.shape)}")
            if t.device != x.device:
                return ValueError(f"out's {name}.device must be {x.device} (same as x), got "
                                  f"{t.device}")
            if not t.is_contiguous():
                return ValueError(f"out's {name} must be contiguous")
        return None

    def _check(self, x: torch.Tensor, idx: object, w: object, out: object = None
               ) -> BaseException | None:
        """This rank's own input problems (the first found), or None."""
        sp = self.spec
        if self.dtype is not None and x.dtype != self.dtype:
            return TypeError(f"x.dtype must be {self.dtype} (compiled for it), got {x.dtype}")
        if x.dtype not in EP_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in EP_DTYPES)
            return TypeError(f"x.dtype must be one of {names}, got {x.dtype}")
        if x.dim() != 2:
            return ValueError(f"x must be 2-D (tokens, hidden), got shape {tuple(x.shape)}")
        if not x.is_contiguous():
            return ValueError("x must be contiguous; call x.contiguous() first")
        why = self._device_ok(x)
        if why:
            return ValueError(f"x.device {why}")
        if len(self.members) > 1 and x.is_cuda and "nccl" not in self._pgs:
            return ValueError(f"x is on {x.device} but the process group has no NCCL backend "
                              "(CUDA tensors need one)")
        tokens, hidden = x.shape
        if hidden < 1:
            return ValueError("x.shape[1] (hidden) must be >= 1")
        if sp.max_tokens is not None and tokens > sp.max_tokens:
            return ValueError(f"x has {tokens} tokens, more than max_tokens={sp.max_tokens}")
        if sp.wire and hidden % (sp.scale_block or hidden):
            return ValueError(f"x.shape[1] (hidden) = {hidden} must be divisible by "
                              f"scale_block={sp.scale_block}")
        for name, t, dts in (("topk_idx", idx, (torch.int32, torch.int64)),
                             ("topk_weights", w, (torch.float32,))):
            if not isinstance(t, torch.Tensor):
                return TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in dts:
                want = " or ".join(str(d) for d in dts)
                return TypeError(f"{name}.dtype must be {want}, got {t.dtype}")
            if tuple(t.shape) != (tokens, sp.topk):
                return ValueError(f"{name}.shape must be (T, topk) = {(tokens, sp.topk)}, "
                                  f"got {tuple(t.shape)}")
            if t.device != x.device:
                return ValueError(f"{name}.device must be {x.device} (same as x), got "
                                  f"{t.device}")
        ids = idx.to(torch.int64)
        bad = (ids < -1) | (ids >= sp.experts)
        if bool(bad.any()):
            t, k = (int(v) for v in bad.nonzero()[0])
            return ValueError(f"topk_idx[{t}, {k}] = {int(ids[t, k])} is not an expert id: "
                              f"expected -1 (no expert) or 0..{sp.experts - 1}")
        if sp.topk > 1 and tokens:
            srt = ids.sort(dim=1).values
            dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
            if bool(dup.any()):
                t = int(dup.any(dim=1).nonzero()[0])
                e = int(srt[t, 1:][dup[t]][0])
                return ValueError(f"topk_idx row {t} names expert {e} twice: a token's "
                                  "experts must be distinct (use -1 for unused entries)")
        return None if out is None else self._check_out(x, out)

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_weights: torch.Tensor, *, out: tuple | None = None) -> tuple:
        """Send each token of `x` (T, H) to the ranks of its experts `topk_idx` (T, K;
        -1: none); `topk_weights` (T, K) float32 is kept in the handle for combine.
        `out`: preallocated (recv_x[, recv_scale], recv_count) of output_shapes(M, H),
        filled and returned (slots past recv_count left as they were)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self._ready(x)
        sp = self.spec
        mine = self._check(x, topk_idx, topk_weights, out)
        row = torch.zeros(_HEAD + sp.experts, dtype=torch.int64)
        if mine is None:
            tokens, hidden = x.shape
            ids = topk_idx.to(torch.int64).cpu()
            row[:_HEAD] = torch.tensor([0, tokens, hidden, _DTYPE_CODE[x.dtype],
                                        sp.scale_block or 0])
            sel = ids[ids >= 0]
            row[_HEAD:] = torch.bincount(sel, minlength=sp.experts)
        else:
            row[0] = 1
        dev = x.device if x.is_cuda and "nccl" in self._pgs else torch.device("cpu")
        table = self._exchange(row.to(dev)).cpu()
        self.calls += 1
        self._raise_together(table, mine)
        tokens, hidden = x.shape
        self._agree(table)
        counts = table[:, _HEAD:]  # (n, E): tokens each member sends to each expert
        slots = sp.slots(int(table[:, 1].max()))
        totals = counts.sum(0)
        over = (totals > slots).nonzero().flatten().tolist()
        if over:
            e = over[0]
            more = f" (and {len(over) - 1} more experts)" if len(over) > 1 else ""
            what = f"capacity={sp.capacity}" if sp.capacity else f"{slots} slots"
            raise ValueError(f"dispatch: expert {e} (on rank {self.members[e // sp.local_experts]}"
                             f" of the group) would receive {int(totals[e])} tokens, more than "
                             f"its {what}{more}; nothing was sent, every rank of the group "
                             "raises")
        return self._run(x, topk_idx, topk_weights, counts, slots, out)

    def _agree(self, table: torch.Tensor) -> None:
        """Shape facts every member must share, from the exchanged rows."""
        for col, what in ((2, "x.shape[1] (hidden)"), (3, "x.dtype")):
            vals = table[:, col].tolist()
            if len(set(vals)) > 1:
                names = {v: k for k, v in _DTYPE_CODE.items()}
                shown = {self.members[i]: (str(names[v]) if col == 3 else v)
                         for i, v in enumerate(vals)}
                raise ValueError(f"dispatch: {what} differs across the group: {shown} (rank: "
                                 "value); nothing was sent, every rank of the group raises")
        if self.spec.max_tokens is None and len(set(table[:, 1].tolist())) > 1:
            shown = {self.members[i]: int(v) for i, v in enumerate(table[:, 1])}
            raise ValueError(f"dispatch without max_tokens needs the same T on every rank, got "
                             f"{shown} (rank: T); pass max_tokens=M to allow T <= M per rank; "
                             "nothing was sent, every rank of the group raises")

    def _payload(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The bytes of each token as sent ((T, row bytes) uint8) and the data bytes in a
        row (the rest: fp8 scales)."""
        sp = self.spec
        if sp.wire is None:
            nbytes = x.shape[1] * x.element_size()
            return x.view(torch.uint8).reshape(x.shape[0], nbytes), nbytes
        q, scale = quantize_fp8(x, sp.scale_block or x.shape[1])
        return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1), x.shape[1]

    def _run(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
             counts: torch.Tensor, slots: int, out: tuple | None) -> tuple:
        sp = self.spec
        n, el = sp.group_size, sp.local_experts
        tokens, hidden = x.shape
        dev = x.device
        ids = idx.to(torch.int64).reshape(-1)
        valid = ids >= 0
        pairs = valid.nonzero().flatten()
        e = ids[pairs]
        q = torch.tensor(self.q_of, dtype=torch.int64, device=dev)[e // el]
        key = (q * el + e % el) * max(tokens, 1) + pairs // sp.topk
        order = pairs[key.argsort()]
        send_splits = torch.bincount(q, minlength=n).tolist()
        payload, data_bytes = self._payload(x)
        send = payload[order // sp.topk]
        me = self.index
        mine = counts[:, me * el:(me + 1) * el]  # (n, L): what each source sends me
        recv_splits = [int(mine[self.i_of[qq]].sum()) for qq in range(n)]
        recv = self._all_to_all(send, send_splits, recv_splits, "token exchange")
        # the received rows come by backend rank, then local expert, then token; slot
        # bases are ordered by the source's position in the group
        base = torch.cumsum(mine, 0) - mine  # (n, L) first slot of each source per expert
        src = torch.tensor(self.i_of, dtype=torch.int64)  # backend rank -> group position
        blk_count = mine[src].reshape(-1)
        blk_dst = (torch.arange(el).repeat(n) * slots + base[src].reshape(-1))
        blk_start = torch.cumsum(blk_count, 0) - blk_count
        total = int(blk_count.sum())
        offs = torch.arange(total) - torch.repeat_interleave(blk_start, blk_count)
        dst = (torch.repeat_interleave(blk_dst, blk_count) + offs).to(dev)
        counted = mine.sum(0).to(torch.int32).to(dev)
        out_dtype = ops.QUANT_FORMATS[sp.wire] if sp.wire else x.dtype
        nblk = hidden // (sp.scale_block or hidden)
        if out is None:
            recv_x = torch.zeros((el, slots, hidden), dtype=out_dtype, device=dev)
            scale = torch.zeros((el, slots, nblk), dtype=torch.float32, device=dev) \
                if sp.wire else None
            recv_count = counted
        else:
            recv_x, scale, recv_count = out[0], out[1] if sp.wire else None, out[-1]
            recv_count.copy_(counted)
        recv_x.view(torch.uint8).reshape(el * slots, data_bytes)[dst] = recv[:, :data_bytes]
        handle = EPHandle(self.tag, self.calls, self.rank, self.members, sp, tokens, hidden,
                          slots, x.dtype, dev, idx.to(torch.int64).clone(),
                          w.to(torch.float32).clone(), order, dst, send_splits, recv_splits,
                          counted.clone())
        if scale is None:
            return recv_x, recv_count, handle
        scale.view(torch.uint8).reshape(el * slots, nblk * 4)[dst] = recv[:, data_bytes:]
        return recv_x, scale, recv_count, handle

    def explain(self, hidden: int | None = None) -> str:
        sp = self.spec
        n, el = sp.group_size, sp.local_experts
        m = str(sp.max_tokens) if sp.max_tokens else "T (the call's, equal on every rank)"
        s = str(sp.capacity) if sp.capacity else f"max_tokens x {n} = {m} x {n}"
        elem = torch.empty((), dtype=self.dtype).element_size() if self.dtype else None
        wire = (f"fp8_e4m3 with one float32 scale per {sp.scale_block} elements"
                if sp.scale_block else "fp8_e4m3 with one float32 scale per token") \
            if sp.wire else "x's dtype"
        lines = [self._explain_head().rstrip("\n"),
                 f"experts: {sp.experts}, {el} per rank (rank i of the group holds "
                 f"[i*{el}, (i+1)*{el})); topk {sp.topk}; max_tokens {m}",
                 f"slots per local expert S: {s}" + ("" if sp.capacity else
                                                     " (capacity=C bounds it)"),
                 f"wire: {wire}",
                 "returns: recv_x (" + f"{el}, S, H)" + (", recv_scale" if sp.wire else "")
                 + f", recv_count ({el},) int32, handle",
                 "plan (reference backend, torch.distributed on the group's subgroup):",
                 f"  1. exchange: all_gather of one int64 row of {_HEAD + sp.experts} per "
                 "rank (status, T, H, dtype, token count per expert); every rank checks "
                 "capacity and shapes from it and raises together",
                 "  2. all_to_all_single with splits: one row per (token, expert) pair, "
                 "ordered by destination, local expert, token; placed by slot",
                 "fused backend: not built for dispatch/combine; auto runs the reference "
                 "backend"]
        if hidden:
            row = hidden * (1 if sp.wire else (elem or 0))
            scales = (hidden // (sp.scale_block or hidden)) * 4 if sp.wire else 0
            if not row:
                lines.append("workspace: give a dtype to size recv_x")
            elif sp.capacity or sp.max_tokens:
                slots = sp.slots(sp.max_tokens or 1)
                nbytes = el * slots * (row + scales)
                lines.append(f"workspace: recv_x{' and recv_scale' if sp.wire else ''} for "
                             f"H={hidden}: {el} x {slots} slots x {row + scales} B = "
                             f"{_human(nbytes)} per rank")
            else:
                lines.append(f"workspace: recv_x for H={hidden}: {el} x (T x {n}) slots x "
                             f"{row + scales} B per rank (T the call's)")
            lines.append("  the reference backend allocates it per call, with send and receive "
                         f"buffers of {row + scales} B per (token, expert) pair; the handle "
                         "keeps the routing and the slot of each pair")
        return "\n".join(lines)


class Combine(_EPBase):
    """A compiled `combine(G)`. Call it as `y = c(expert_out, handle=handle)`."""

    def __call__(self, expert_out: torch.Tensor, handle: EPHandle, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """y[t] = sum over k of w[t, k] * expert_out[slot of (t, k)] in fp32, k ascending,
        topk_idx -1 skipped, rounded once to x's dtype; (T, H), written into `out` when
        given (and returned)."""
        if not isinstance(expert_out, torch.Tensor):
            raise TypeError(f"expert_out must be a torch.Tensor, got "
                            f"{type(expert_out).__name__}")
        if not isinstance(handle, EPHandle):
            raise TypeError(f"handle must be the EPHandle a dispatch returned, got "
                            f"{type(handle).__name__}")
        self._ready(expert_out)
        mine = self._check(expert_out, handle, out)
        row = torch.tensor([0 if mine is None else 1, handle.tag, handle.call,
                            handle.hidden], dtype=torch.int64)
        dev = expert_out.device if expert_out.is_cuda and "nccl" in self._pgs \
            else torch.device("cpu")
        table = self._exchange(row.to(dev)).cpu()
        self.calls += 1
        self._raise_together(table, mine)
        if len({(int(a), int(b)) for a, b in table[:, 1:3].tolist()}) > 1:
            shown = {self.members[i]: f"call {int(c)} of dispatch {int(t):08x}"
                     for i, (t, c) in enumerate(table[:, 1:3].tolist())}
            raise ValueError(f"combine: the ranks pass handles of different dispatch calls: "
                             f"{shown}; every rank must combine the same call; nothing was "
                             "sent, every rank of the group raises")
        y = self._run(expert_out, handle)
        if out is None:
            return y
        out.copy_(y)
        return out

    def _check(self, out: torch.Tensor, h: EPHandle, y: object = None
               ) -> BaseException | None:
        sp = h.spec
        if h.members != self.members or h.rank != self.rank or \
                tuple(sp.axes) != tuple(self.spec.axes):
            return ValueError(f"handle comes from a dispatch over {'*'.join(sp.axes)} "
                              f"(members {list(h.members)}, rank {h.rank}); this combine "
                              f"runs over {'*'.join(self.spec.axes)} (members "
                              f"{list(self.members)}, rank {self.rank})")
        if self.dtype is not None and h.dtype != self.dtype:
            return TypeError(f"handle is of a dispatch of {h.dtype} tokens; this combine was "
                             f"compiled for {self.dtype}")
        if out.dtype != h.dtype:
            return TypeError(f"expert_out.dtype must be {h.dtype} (the dtype of the "
                             f"dispatched x), got {out.dtype}")
        want = (sp.local_experts, h.slots, h.hidden)
        if tuple(out.shape) != want:
            return ValueError(f"expert_out.shape must be {want} (recv_x's shape of the "
                              f"handle's dispatch call), got {tuple(out.shape)}")
        if out.device != h.device:
            return ValueError(f"expert_out.device must be {h.device} (the handle's), got "
                              f"{out.device}")
        if not out.is_contiguous():
            return ValueError("expert_out must be contiguous; call .contiguous() first")
        if y is not None:
            if not isinstance(y, torch.Tensor):
                return TypeError(f"out must be a torch.Tensor or None, got {type(y).__name__}")
            if y.dtype != h.dtype or tuple(y.shape) != (h.tokens, h.hidden) or \
                    y.device != h.device:
                return ValueError(f"out must be a {h.dtype} tensor of shape "
                                  f"{(h.tokens, h.hidden)} on {h.device} (x's), got "
                                  f"{y.dtype} {tuple(y.shape)} on {y.device}")
        return None

    def _run(self, out: torch.Tensor, h: EPHandle) -> torch.Tensor:
        flat = out.reshape(h.spec.local_experts * h.slots, h.hidden)
        send = flat[h.dst].view(torch.uint8).reshape(h.dst.numel(),
                                                     h.hidden * out.element_size())
        back = self._all_to_all(send, h.recv_splits, h.send_splits, "token return")
        k = h.spec.topk
        rows = torch.zeros((h.tokens * k, h.hidden), dtype=torch.float32, device=h.device)
        rows[h.pair_order] = back.view(h.dtype).reshape(back.shape[0], h.hidden).float()
        rows = rows.view(h.tokens, k, h.hidden)
        valid = (h.topk_idx >= 0).unsqueeze(-1)
        acc = torch.zeros((h.tokens, h.hidden), dtype=torch.float32, device=h.device)
        for j in range(k):  # k ascending, fp32, one rounding at the end
            term = h.topk_weights[:, j, None] * rows[:, j]
            acc = acc + torch.where(valid[:, j], term, 0.0)
        return acc.to(h.dtype)

    def explain(self, hidden: int | None = None) -> str:
        return "\n".join([
            self._explain_head().rstrip("\n"),
            "input: expert_out of recv_x's shape and x's dtype, and the handle of the "
            "dispatch call (same group)",
            "output: y (T, H) in x's dtype: sum over k ascending of w[t, k] * "
            "expert_out[slot of (t, k)] in fp32, idx -1 skipped, rounded once",
            "plan (reference backend, torch.distributed on the group's subgroup):",
            "  1. exchange: all_gather of one int64 row of 4 per rank (status, dispatch "
            "tag and call, H); mismatched handles raise on every rank",
            "  2. all_to_all_single with the dispatch's splits reversed: each received row "
            "goes back to its source; the weighted sum runs on the source rank",
            "fused backend: not built for dispatch/combine; auto runs the reference backend",
        ])


def quantize_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, H) as float8_e4m3fn with one float32 scale per `block` elements of a row:
    scale = max(amax(|block|) / 448, the smallest normal float32) (1 where the block is
    all zero; the floor keeps a tiny block's scale from underflowing to 0 or to a
    subnormal that rounds q past 448), q = x / scale. Returns (q (T, H), scale (T, H //
    block))."""
    t, hdim = x.shape
    v = x.float().view(t, hdim // block, block)
    amax = v.abs().amax(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax > 0, (amax / ops.FP8_MAX).clamp_min(tiny), torch.ones_like(amax))
    q = (v / scale.unsqueeze(-1)).clamp(-ops.FP8_MAX, ops.FP8_MAX)
    return q.view(t, hdim).to(ops.QUANT_FORMATS[WIRE_FP8]), scale.contiguous()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def compile_ep(program: Program, mesh: Mesh, *, dtype: torch.dtype | None,
               group: dist.ProcessGroup | None, backend: str,
               timeout_s: float) -> Dispatch | Combine:
    """mixcc.compile's route for a dispatch or combine program."""
    spec = build_spec(program, mesh, dtype)
    if backend == "fused":
        raise ValueError(f"backend='fused' cannot run {program.text!r}: the fused "
                         "dispatch/combine kernels are not built; backend='auto' or "
                         "'reference' runs it on torch.distributed")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    cls = Dispatch if spec.kind == "dispatch" else Combine
    return cls(program.text, mesh, spec, program, dtype=dtype, group=group,
               timeout_s=timeout_s)


__all__ = ["Combine", "Dispatch", "EPHandle", "EPSpec", "build_spec", "compile_ep",
           "quantize_fp8"]
