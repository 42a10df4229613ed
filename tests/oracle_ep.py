"""An independent float64 oracle for dispatch and combine (docs/DESIGN.md, "Expert
parallelism"), written apart from mixcc/expert.py and importing nothing of mixcc: it
rebuilds every rank's tokens, routing and expert outputs from seeds and computes what
each rank of a group must receive and get back.

Semantics: rank i of a group (its position in the group's order) holds experts
[i*L, (i+1)*L), L = E / |G|. Local expert j of rank i receives, in slots 0.., the tokens
routed to expert i*L + j, ordered by the source's position in the group, then token
index. combine gives y[t] = sum over k of w[t, k] * expert_out[slot of (t, k)], entries
with id -1 skipped.
"""

from __future__ import annotations

import torch

from oracle import group_of, layout

MODES = ("random", "skewed", "one", "empty")
FP8_MAX = 448.0
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def make_case(seed: int, rank: int, mode: str, tokens: int, hidden: int, experts: int,
              topk: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (T, H), topk_idx (T, K), topk_weights (T, K) float32) of one rank.

    random: K distinct experts per token, about one entry in seven -1; skewed: experts
    drawn with weights 1/(e+1)^2 (a few experts get most tokens); one: every token to
    expert seed % E in column seed % K, the other entries -1; empty: every entry -1.
    idx is int32 for odd seeds, int64 for even ones; the weight of every -1 entry is NaN."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    x = torch.randn((tokens, hidden), generator=g).to(dtype)
    w = (torch.rand((tokens, topk), generator=g) * 2 - 0.5).float()
    if mode == "random":
        idx = torch.stack([torch.randperm(experts, generator=g)[:topk]
                           for _ in range(tokens)]) if tokens else \
            torch.empty((0, topk), dtype=torch.int64)
        idx[torch.rand(idx.shape, generator=g) < 1 / 7] = -1
    elif mode == "skewed":
        p = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 2
        idx = torch.stack([torch.multinomial(p, topk, replacement=False, generator=g)
                           for _ in range(tokens)]) if tokens else \
            torch.empty((0, topk), dtype=torch.int64)
        idx[torch.rand(idx.shape, generator=g) < 0.1] = -1
    elif mode == "one":
        idx = torch.full((tokens, topk), -1, dtype=torch.int64)
        idx[:, seed % topk] = seed % experts
    else:
        idx = torch.full((tokens, topk), -1, dtype=torch.int64)
    w = torch.where(idx < 0, float("nan"), w)  # a -1 entry's weight must never be read
    return x, idx.to(torch.int32 if seed % 2 else torch.int64), w


def make_expert_out(seed: int, rank: int, local: int, slots: int, hidden: int,
                    dtype: torch.dtype, counts: list[int] | None = None) -> torch.Tensor:
    """What a rank's experts return: fresh random values of recv_x's shape; NaN in the
    slots at and past counts[j] (they must never be read)."""
    g = torch.Generator().manual_seed(seed * 104729 + rank + 17)
    out = torch.randn((local, slots, hidden), generator=g).to(dtype)
    for j, c in enumerate(counts or []):
        out[j, c:] = float("nan")
    return out


def group(mesh_axes: list[tuple[str, int]], rank: int, axes: list[str] | None) -> list[int]:
    """The members of `rank`'s group over `axes`, in group order."""
    return group_of(layout(mesh_axes), rank, axes, mesh_axes)


def routed(inputs: list[tuple], experts: int) -> dict[int, list[tuple[int, int, int]]]:
    """expert -> [(source position, token, k)] in slot order. `inputs` by position."""
    out: dict[int, list[tuple[int, int, int]]] = {e: [] for e in range(experts)}
    for s, (_, idx, _) in enumerate(inputs):
        for t in range(idx.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                if e >= 0:
                    out[e].append((s, t, k))
    for e in out:
        out[e].sort()
    return out


def expected_dispatch(inputs: list[tuple], experts: int, pos: int
                      ) -> tuple[list[int], list[torch.Tensor]]:
    """(recv_count per local expert, the rows each local expert receives in slot order)
    for the member at position `pos` of a group whose members' inputs are `inputs`."""
    n = len(inputs)
    local = experts // n
    r = routed(inputs, experts)
    counts, rows = [], []
    for j in range(local):
        lst = r[pos * local + j]
        counts.append(len(lst))
        hidden = inputs[0][0].shape[1]
        rows.append(torch.stack([inputs[s][0][t] for s, t, _ in lst]) if lst else
                    torch.empty((0, hidden), dtype=inputs[0][0].dtype))
    return counts, rows


def expected_combine(inputs: list[tuple], outs: list[torch.Tensor], experts: int, pos: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the sum of |terms| behind each element) in float64 for the member at `pos`;
    `outs` are every member's expert outputs, by position."""
    n = len(inputs)
    local = experts // n
    r = routed(inputs, experts)
    slot = {}
    for e, lst in r.items():
        for i, (s, t, k) in enumerate(lst):
            slot[(s, t, k)] = (e // local, e % local, i)
    x, idx, w = inputs[pos]
    y = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if int(idx[t, k]) < 0:
                continue
            owner, j, i = slot[(pos, t, k)]
            term = float(w[t, k]) * outs[owner][j, i].double()
            y[t] += term
            mag[t] += term.abs()
    return y, mag


def expected_combine_fp32(inputs: list[tuple], outs: list[torch.Tensor], experts: int,
                          pos: int, dtype: torch.dtype) -> torch.Tensor:
    """combine's result in its stated order: per token, acc = 0 in fp32, then for k
    ascending (ids -1 skipped) acc = acc + w[t, k] * out (the product rounded to fp32,
    then the sum), rounded once to `dtype`. Bit for bit what an implementation without
    fused multiply-adds returns."""
    n = len(inputs)
    local = experts // n
    r = routed(inputs, experts)
    slot = {}
    for e, lst in r.items():
        for i, (s, t, k) in enumerate(lst):
            slot[(s, t, k)] = (e // local, e % local, i)
    x, idx, w = inputs[pos]
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if int(idx[t, k]) >= 0:
                owner, j, i = slot[(pos, t, k)]
                y[t] = y[t] + w[t, k].float() * outs[owner][j, i].float()
    return y.to(dtype)


def combine_mismatch(got: torch.Tensor, y: torch.Tensor, mag: torch.Tensor, topk: int,
                     dtype: torch.dtype) -> str | None:
    """fp32 products and K-term fp32 sums (each rounding at most 2^-24 of the terms'
    magnitude), then one rounding to `dtype` (relative, or the subnormal step)."""
    if tuple(got.shape) != tuple(y.shape):
        return f"shape {tuple(got.shape)} != expected {tuple(y.shape)}"
    if got.dtype != dtype:
        return f"dtype {got.dtype} != {dtype}"
    tol = 2.0**-24 * (topk + 2) * mag + EPS[dtype] * y.abs() + TINY[dtype]
    bad = (got.double() - y).abs() > tol
    if bad.any() or torch.isnan(got.double()).any():
        i = int(bad.flatten().nonzero()[0]) if bad.any() else -1
        return (f"{int(bad.sum())} of {bad.numel()} elements differ; first at {i}: got "
                f"{got.flatten()[i].item()}, expected {y.flatten()[i].item()}")
    return None


def fp8_expected(row: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scale per block: max(amax / 448, 2^-126), 1 for an all-zero block; the bound
    on |q * scale - x| per element: 2^-4 relative in e4m3's normal range, 2^-9 x scale
    below it) in float64 for one token row."""
    v = row.double().view(-1, block)
    amax = v.abs().amax(-1)
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(2.0**-126), torch.ones_like(amax))
    tol = v.abs() * 2.0**-4 + scale[:, None] * 2.0**-9
    return scale, tol.view(-1)
