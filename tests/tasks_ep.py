"""Per-rank bodies of the dispatch/combine tests (importable by the rank pool's workers);
each returns "" when this rank's results match the float64 oracle (tests/oracle_ep.py)."""

from __future__ import annotations

import time

import torch
from oracle_ep import (
    combine_mismatch,
    expected_combine,
    expected_combine_fp32,
    expected_dispatch,
    fp8_expected,
    group,
    make_case,
    make_expert_out,
)

import mixcc

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def programs(gaxes: list[str] | None, experts: int, topk: int, max_tokens: int | None,
             capacity: int | None, block: int | None) -> tuple[str, str]:
    """(dispatch program, combine program); block None: no fp8 wire, 0: a scale per
    token, else scale_block."""
    g = "world" if gaxes is None else "*".join(gaxes)
    args = f"experts={experts}, topk={topk}"
    if max_tokens is not None:
        args += f", max_tokens={max_tokens}"
    if capacity is not None:
        args += f", capacity={capacity}"
    if block is not None:
        args += ", wire=fp8_e4m3" + (f", scale_block={block}" if block else "")
    return f"dispatch({g}, {args})", f"combine({g})"


def check_ep(rank: int, world: int, pg, mesh_axes: list, gaxes: list[str] | None,
             experts: int, topk: int, max_tokens: int | None, capacity: int | None,
             block: int | None, dtype_name: str, seeds: list[int], mode: str,
             tokens: list[list[int]], hidden: int, device: str = "cpu",
             backend: str = "auto", timeout_s: float = 120) -> str:
    """Dispatch then combine once per seed (new routing each time, the same compiled
    pair), every output against the oracle; tokens[i][r]: rank r's T in call i. With
    device "cuda" the tensors live on the current CUDA device."""
    dtype = DTYPES[dtype_name]
    mesh = mixcc.Mesh(mesh_axes)
    dp, cp = programs(gaxes, experts, topk, max_tokens, capacity, block)
    d = mixcc.compile(dp, mesh, dtype=dtype, group=pg, timeout_s=timeout_s, backend=backend)
    c = mixcc.compile(cp, mesh, dtype=dtype, group=pg, timeout_s=timeout_s, backend=backend)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else \
        torch.device("cpu")
    members = group(mesh_axes, rank, gaxes)
    pos, n = members.index(rank), len(members)
    local = experts // n
    msgs = []
    for call, seed in enumerate(seeds):
        inputs = [make_case(seed, m, mode, tokens[call][m], hidden, experts, topk, dtype)
                  for m in members]
        x, idx, w = (t.to(dev, copy=True) for t in inputs[pos])
        slots = capacity or (max_tokens or tokens[call][rank]) * n
        bufs = None
        if call == 1:  # preallocated outputs, filled with garbage first
            wire = torch.float8_e4m3fn if block is not None else dtype
            bufs = [torch.full((local, slots, hidden), 3.0, device=dev).to(wire)]
            if block is not None:
                bufs.append(torch.full((local, slots, hidden // (block or hidden)), -1.0,
                                       device=dev))
            bufs.append(torch.full((local,), -7, dtype=torch.int32, device=dev))
        res = d(x, topk_idx=idx, topk_weights=w, out=bufs)
        if bufs is not None and any(a is not b for a, b in zip(res, bufs, strict=False)):
            msgs.append(f"call {call}: out= tensors were not the ones returned")
        if block is None:
            recv_x, recv_count, handle = res
            scale = None
        else:
            recv_x, scale, recv_count, handle = res
            scale = scale.cpu()
        if recv_x.device != dev or recv_count.device != dev:
            msgs.append(f"call {call}: outputs on {recv_x.device}, {recv_count.device}")
        recv_x, recv_count = recv_x.cpu(), recv_count.cpu()
        counts, rows = expected_dispatch(inputs, experts, pos)
        want_dtype = torch.float8_e4m3fn if block is not None else dtype
        if tuple(recv_x.shape) != (local, slots, hidden) or recv_x.dtype != want_dtype:
            msgs.append(f"call {call}: recv_x {tuple(recv_x.shape)} {recv_x.dtype}, expected "
                        f"{(local, slots, hidden)} {want_dtype}")
            continue
        if recv_count.dtype != torch.int32 or recv_count.tolist() != counts:
            msgs.append(f"call {call}: recv_count {recv_count.tolist()} ({recv_count.dtype}), "
                        f"expected {counts}")
            continue
        for j in range(local):
            got = recv_x[j, :counts[j]]
            if block is None:
                if not torch.equal(got, rows[j]):
                    msgs.append(f"call {call}: expert {j}'s rows differ")
                continue
            blk = block or hidden
            for i in range(counts[j]):
                want_s, tol = fp8_expected(rows[j][i], blk)
                got_s = scale[j, i].double()
                if not torch.allclose(got_s, want_s, rtol=2.0**-20, atol=0):
                    msgs.append(f"call {call}: expert {j} slot {i}: scales differ")
                    break
                deq = (got[i].double().view(-1, blk) * got_s[:, None]).view(-1)
                if ((deq - rows[j][i].double()).abs() > tol).any():
                    msgs.append(f"call {call}: expert {j} slot {i}: fp8 values off")
                    break
        outs = [make_expert_out(seed, m, local, slots, hidden, dtype,
                                expected_dispatch(inputs, experts, p)[0])
                for p, m in enumerate(members)]
        y_buf = None if bufs is None else torch.full((tokens[call][rank], hidden), float("nan"),
                                                     device=dev).to(dtype)
        y = c(outs[pos].to(dev, copy=True), handle=handle, out=y_buf)
        if y_buf is not None and y is not y_buf:
            msgs.append(f"call {call}: combine's out= was not returned")
        y = y.cpu()
        want, mag = expected_combine(inputs, outs, experts, pos)
        m = combine_mismatch(y, want, mag, topk, dtype)
        if m:
            msgs.append(f"call {call}: combine: {m}")
        elif device == "cpu" and not torch.equal(
                y, expected_combine_fp32(inputs, outs, experts, pos, dtype)):
            msgs.append(f"call {call}: combine is within rounding but not bit for bit the "
                        "fp32 sum in k order")
        for name, a, b in (("x", x, inputs[pos][0]), ("topk_idx", idx, inputs[pos][1]),
                           ("topk_weights", w, inputs[pos][2])):
            if not (torch.equal(a.cpu(), b) or (b.is_floating_point() and torch.allclose(
                    a.cpu(), b, rtol=0, atol=0, equal_nan=True))):
                msgs.append(f"call {call}: {name} was modified")
    return "; ".join(msgs)


def _raises(fn, kind: type, *needles: str) -> str:
    """'' when fn() raises `kind` with every needle in its message, else what happened."""
    try:
        fn()
    except kind as e:
        missing = [s for s in needles if s not in str(e)]
        return f"message lacks {missing}: {e}" if missing else ""
    except Exception as e:  # noqa: BLE001 - report what came instead
        return f"raised {type(e).__name__}: {e}"
    return "did not raise"


def check_overflow(rank: int, world: int, pg, experts: int, capacity: int, seed: int) -> str:
    """Every token of every rank to one expert, past its capacity: every rank raises the
    same ValueError naming the expert and its count, then a call that fits still runs."""
    mesh = mixcc.Mesh({"ep": world})
    dp, _ = programs(["ep"], experts, 2, 8, capacity, None)
    d = mixcc.compile(dp, mesh, dtype=torch.float32, group=pg, timeout_s=120)
    x, idx, w = make_case(seed, rank, "one", 8, 4, experts, 2, torch.float32)
    e = seed % experts
    total = 8 * world
    msg = _raises(lambda: d(x, topk_idx=idx, topk_weights=w), ValueError,
                  f"expert {e} ", f"receive {total} tokens", f"capacity={capacity}")
    if msg:
        return msg
    x, idx, w = make_case(seed, rank, "one", capacity // world, 4, experts, 2, torch.float32)
    recv_x, recv_count, _ = d(x, topk_idx=idx, topk_weights=w)
    if int(recv_count.sum()) != (capacity // world) * world * (rank == e // (experts // world)):
        return f"the call after the overflow got recv_count {recv_count.tolist()}"
    return ""


BAD_INPUTS = {  # name -> (how rank `bad` spoils its input, exception, words of its message)
    "id_range": (lambda x, i, w: (x, i.fill_(99), w), ValueError, "is not an expert id"),
    "id_negative": (lambda x, i, w: (x, i.fill_(-2), w), ValueError, "is not an expert id"),
    "duplicate": (lambda x, i, w: (x, torch.tensor([[1, 1]] * x.shape[0]), w), ValueError,
                  "names expert 1 twice"),
    "too_many_tokens": (lambda x, i, w: (torch.zeros(9, 4), torch.zeros(9, 2, dtype=torch.long),
                                         torch.zeros(9, 2)), ValueError, "max_tokens=8"),
    "x_dtype": (lambda x, i, w: (x.double(), i, w), TypeError, "x.dtype"),
    "idx_dtype": (lambda x, i, w: (x, i.float(), w), TypeError, "topk_idx.dtype"),
    "w_dtype": (lambda x, i, w: (x, i, w.half()), TypeError, "topk_weights.dtype"),
    "w_shape": (lambda x, i, w: (x, i, w[:, :1]), ValueError, "topk_weights.shape"),
    "x_1d": (lambda x, i, w: (x[0], i, w), ValueError, "x must be 2-D"),
    "x_strided": (lambda x, i, w: (x.t().contiguous().t(), i, w), ValueError, "contiguous"),
    "hidden": (lambda x, i, w: (torch.zeros(x.shape[0], 6), i, w), ValueError,
               "hidden) differs across the group"),
    "idx_device": (lambda x, i, w: (x, i.to("meta"), w), ValueError, "topk_idx.device"),
    "x_device": (lambda x, i, w: (x.to("meta"), i, w), ValueError, "x.device"),
}


def check_tokens_differ(rank: int, world: int, pg) -> str:
    """Without max_tokens every rank must pass the same T: each raises, naming every T."""
    mesh = mixcc.Mesh({"ep": world})
    d = mixcc.compile("dispatch(ep, experts=4, topk=2)", mesh, dtype=torch.float32,
                      group=pg, timeout_s=120)
    x, idx, w = make_case(2, rank, "random", 3 + rank, 4, 4, 2, torch.float32)
    want = ", ".join(f"{r}: {3 + r}" for r in range(world))
    return _raises(lambda: d(x, topk_idx=idx, topk_weights=w), ValueError,
                   "needs the same T on every rank", want)


def check_bad_input(rank: int, world: int, pg, name: str, bad: int) -> str:
    """Rank `bad` passes a spoiled input: every rank raises (the bad rank its own cause,
    the others naming it; for `hidden` all the same message) and the next good call runs."""
    mesh = mixcc.Mesh({"ep": world})
    d = mixcc.compile("dispatch(ep, experts=8, topk=2, max_tokens=8)", mesh,
                      dtype=torch.float32, group=pg, timeout_s=120)
    x, idx, w = make_case(5, rank, "random", 5, 4, 8, 2, torch.float32)
    spoil, kind, words = BAD_INPUTS[name]
    args = spoil(x.clone(), idx.clone(), w.clone()) if rank == bad else (x, idx, w)
    if name == "hidden" or rank == bad:
        if name == "hidden" and rank != bad:
            kind = ValueError
        msg = _raises(lambda: d(args[0], topk_idx=args[1], topk_weights=args[2]), kind, words)
    else:
        msg = _raises(lambda: d(*args), ValueError, f"rank(s) [{bad}]", "rejected")
    if msg:
        return msg
    recv_x, recv_count, h = d(x, topk_idx=idx, topk_weights=w)
    want, _ = expected_dispatch([make_case(5, r, "random", 5, 4, 8, 2, torch.float32)
                                 for r in range(world)], 8, rank)
    return "" if recv_count.tolist() == want else f"good call after: {recv_count.tolist()}"


def check_handles(rank: int, world: int, pg) -> str:
    """combine's checks of its handle, expert_out and out: a handle of a dispatch over
    another group, of another call on another rank, expert_out of the wrong shape or
    dtype, out of the wrong shape; dispatch's out of the wrong dtype or arity; each raises
    on every rank, and a good combine runs after."""
    mesh = mixcc.Mesh({"a": 2, "b": world // 2})
    da = mixcc.compile("dispatch(a, experts=4, topk=2, max_tokens=4)", mesh,
                       dtype=torch.float32, group=pg, timeout_s=120)
    cb = mixcc.compile("combine(b)", mesh, dtype=torch.float32, group=pg, timeout_s=120)
    ca = mixcc.compile("combine(a)", mesh, dtype=torch.float32, group=pg, timeout_s=120)
    x, idx, w = make_case(9, rank, "random", 4, 8, 4, 2, torch.float32)
    r1, _, h1 = da(x, topk_idx=idx, topk_weights=w)
    _, _, h2 = da(x, topk_idx=idx, topk_weights=w)
    first = group([("a", 2), ("b", world // 2)], rank, ["a"])[0]
    msgs = [_raises(lambda: cb(r1, handle=h1), ValueError, "dispatch over a",
                    "combine runs over b"),
            _raises(lambda: ca(r1, handle=h1 if rank == first else h2), ValueError,
                    "handles of different dispatch calls"),
            _raises(lambda: ca(r1[:, :-1], handle=h1), ValueError, "expert_out.shape"),
            _raises(lambda: ca(r1.double(), handle=h1), TypeError, "expert_out.dtype"),
            _raises(lambda: ca(r1, handle="h"), TypeError, "EPHandle"),
            _raises(lambda: ca(r1, handle=h1, out=torch.empty(4, 7)), ValueError,
                    "out must be a torch.float32 tensor of shape (4, 8)"),
            _raises(lambda: da(x, topk_idx=idx, topk_weights=w, out=(r1,)), TypeError,
                    "out must be a tuple (recv_x, recv_count)"),
            _raises(lambda: da(x, topk_idx=idx, topk_weights=w,
                               out=(r1, torch.zeros(2, dtype=torch.int64))), TypeError,
                    "out's recv_count.dtype must be torch.int32")]
    if rank == first:  # only the group's first passes a bad shape: the other names it
        msgs.append(_raises(lambda: ca(r1[:, :-1], handle=h1), ValueError, "expert_out.shape"))
    else:
        msgs.append(_raises(lambda: ca(r1, handle=h1), ValueError, f"rank(s) [{first}]"))
    y = ca(r1, handle=h1)
    msgs.append("" if y.shape == x.shape else f"good combine after: shape {tuple(y.shape)}")
    return "; ".join(f"check {i}: {m}" for i, m in enumerate(msgs) if m)


def check_other_dispatch(rank: int, world: int, pg) -> str:
    """Two dispatch objects compiled from the same text: a handle of one passed on one
    rank while the others pass the other's (same call number, other routing) is refused
    on every rank before any token moves; the consistent combine runs after."""
    mesh = mixcc.Mesh({"ep": world})
    text = "dispatch(ep, experts=6, topk=2, max_tokens=4)"
    d1 = mixcc.compile(text, mesh, dtype=torch.float32, group=pg, timeout_s=20)
    d2 = mixcc.compile(text, mesh, dtype=torch.float32, group=pg, timeout_s=20)
    c = mixcc.compile("combine(ep)", mesh, dtype=torch.float32, group=pg, timeout_s=20)
    x1, idx1, w1 = make_case(21, rank, "skewed", 4, 8, 6, 2, torch.float32)
    x2, idx2, w2 = make_case(22, rank, "random", 3, 8, 6, 2, torch.float32)
    _, _, h1 = d1(x1, topk_idx=idx1, topk_weights=w1)
    r2, _, h2 = d2(x2, topk_idx=idx2, topk_weights=w2)
    if (h1.tag, h1.call) == (h2.tag, h2.call):
        return f"both objects give handles tagged {h1.tag:08x}, call {h1.call}"
    msg = _raises(lambda: c(r2, handle=h1 if rank == 0 else h2), ValueError,
                  "handles of different dispatch calls")
    y = c(r2, handle=h2)
    if msg or y.shape != x2.shape:
        return msg or f"good combine after: shape {tuple(y.shape)}"
    return ""


def check_dead_peer(rank: int, world: int, pg, timeout_s: float, device: str = "cpu") -> str:
    """Rank 1 never calls: rank 0's dispatch raises CollectiveTimeout naming rank 1 within
    about timeout_s (plus the grace that looks for the missing ranks)."""
    mesh = mixcc.Mesh({"ep": world})
    d = mixcc.compile("dispatch(ep, experts=4, topk=1)", mesh, dtype=torch.float32,
                      group=pg, timeout_s=timeout_s)
    if rank != 0:
        return ""
    x, idx, w = make_case(3, rank, "random", 4, 4, 4, 1, torch.float32)
    if device == "cuda":
        x, idx, w = x.cuda(), idx.cuda(), w.cuda()
    t0 = time.monotonic()
    try:
        d(x, topk_idx=idx, topk_weights=w)
    except mixcc.CollectiveTimeout as e:
        took = time.monotonic() - t0
        if e.peer != 1 or "rank 1" not in str(e) or "dispatch" not in str(e):
            return f"the timeout names peer {e.peer}: {e}"
        if took > timeout_s + 10:
            return f"took {took:.1f} s for a timeout of {timeout_s} s"
        return ""
    except Exception as e:  # noqa: BLE001
        return f"raised {type(e).__name__}: {e}"
    return "did not raise"
