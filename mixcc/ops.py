"""The epilogue op registry: each row-wise op that may follow a program's last collective
is defined here once (docs/DESIGN.md, "Epilogues"): its grammar name, the shape, dtype and
device rule of its named tensor, and its reference implementation in fp32. The parser,
the IR builder, the call checks and the backends look ops up here.

Semantics (v: the program's output as fp32, one row per leading index, the last dim the
row): add(T): v = v + T; store(T): T[...] = v rounded to T's dtype; rmsnorm(T, eps=E):
v = v * rsqrt(mean(v^2 over the row) + E) * T; quant(fp8_e4m3, S): the output is
saturate(v / S) as torch.float8_e4m3fn (last statement only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_EPS = 1e-6
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
QUANT_FORMATS = {"fp8_e4m3": getattr(torch, "float8_e4m3fn", None)}


@dataclass(frozen=True)
class EpilogueOp:
    """One registry entry. `shape(out_shape)` is the named tensor's expected shape, or a
    string saying why the output cannot take this op; `apply(v, t, stmt)` is the fp32
    reference (returns the new v; `store` writes t in place)."""

    name: str
    doc: str
    shape: Callable[[tuple[int, ...]], tuple[int, ...] | str]
    apply: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
    needs_float32: bool = False  # the named tensor must be float32 (quant's scale)
    last_only: bool = False  # must be the program's last statement
    writes: bool = False  # writes its named tensor in place
    # The fused form (templates/mixcc_epilogue.cuh): `cuda_load` reads what the op needs
    # of its tensor into {p} (the kernel hoists it above the reduction unless an earlier
    # store wrote that tensor), `cuda` applies the op; {t} is the tensor's pointer, {eps}
    # the statement's eps as a C float.
    cuda: str = ""
    cuda_load: str = ""


def _same(out_shape: tuple[int, ...]) -> tuple[int, ...]:
    return out_shape


def _row(out_shape: tuple[int, ...]) -> tuple[int, ...] | str:
    if len(out_shape) != 2:
        return f"rmsnorm needs a 2-D output (rows x hidden), this one has shape {out_shape}"
    return (out_shape[1],)


def _add(v: torch.Tensor, t: torch.Tensor, _: object) -> torch.Tensor:
    return v + t.float()


def _store(v: torch.Tensor, t: torch.Tensor, _: object) -> torch.Tensor:
    t.copy_(v.to(t.dtype))
    return v


def _rmsnorm(v: torch.Tensor, t: torch.Tensor, stmt: object) -> torch.Tensor:
    eps = getattr(stmt, "eps", None)
    eps = DEFAULT_EPS if eps is None else eps
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps) * t.float()


def _quant(v: torch.Tensor, t: torch.Tensor, _: object) -> torch.Tensor:
    return (v / t.float().reshape(())).clamp(-FP8_MAX, FP8_MAX)


EPILOGUES: dict[str, EpilogueOp] = {op.name: op for op in (
    EpilogueOp("add", "v = v + NAME (NAME: the output's shape)", _same, _add,
               cuda="mixcc::epi_add(row, {p});",
               cuda_load="mixcc::Pack<T, VEC_WIDE> {p}[EPI_PACKS]; "
                         "mixcc::epi_load<true>(row, {t}, {p});"),
    EpilogueOp("store", "NAME[...] = v (in place, rounded to NAME's dtype)", _same, _store,
               writes=True, cuda="mixcc::epi_store(row, {t});"),
    EpilogueOp("rmsnorm", "v = v * rsqrt(mean(v^2) + eps) * NAME (NAME: [hidden])", _row,
               _rmsnorm, cuda="mixcc::epi_rmsnorm<THREADS>(row, {p}, {eps}, red);",
               cuda_load="mixcc::Pack<T, VEC_WIDE> {p}[EPI_PACKS]; "
                         "mixcc::epi_load<false>(row, {t}, {p});"),
    EpilogueOp("quant", "out = saturate(v / NAME) as float8_e4m3fn (NAME: float32 scale, "
               "one element)", lambda _: (1,), _quant, needs_float32=True, last_only=True,
               cuda="mixcc::epi_quant(row, {p});",
               cuda_load="const float {p} = *static_cast<const float*>({t});"),
)}

# Fusion into the kernels (docs/DESIGN.md, "Epilogues"): a row of up to this many elements
# lives in the registers of one block (32 fp32 values per thread at 512 threads), and a
# statement names at most EPI_SLOTS distinct tensors (the launch ABI's epi0..epi5).
EPI_MAX_HIDDEN = 16384
EPI_SLOTS = 6


def epilogue_slots(epilogue: tuple) -> tuple[str, ...]:
    """The distinct tensor names of an epilogue, in order of first use (slot i: epi{i})."""
    return tuple(dict.fromkeys(e.name for e in epilogue))


def epilogue_cuda(epilogue: tuple) -> tuple[list[str], list[str]]:
    """The fused epilogue as CUDA: (loads hoisted above the reduction, the statements in
    program order). A statement's load stays in place, just before it, when an earlier
    store wrote its tensor (it must see the stored value)."""
    slots = epilogue_slots(epilogue)
    hoisted, body, stored = [], [], set()
    for i, e in enumerate(epilogue):
        op = EPILOGUES[e.op]
        eps = DEFAULT_EPS if getattr(e, "eps", None) is None else e.eps
        args = {"t": f"a.epi{slots.index(e.name)}", "p": f"pre{i}", "eps": f"{float(eps)!r}f"}
        if op.cuda_load:
            (body if e.name in stored else hoisted).append(op.cuda_load.format(**args))
        body.append(op.cuda.format(**args))
        if op.writes:
            stored.add(e.name)
    return hoisted, body


def output_dtype(epilogue: tuple, dtype: torch.dtype) -> torch.dtype:
    """The call's output dtype: fp8 after quant, else the input's."""
    if epilogue and epilogue[-1].op == "quant":
        return QUANT_FORMATS[epilogue[-1].fmt]
    return dtype


def run_epilogue(y: torch.Tensor, epilogue: tuple, tensors: dict[str, torch.Tensor],
                 out_dtype: torch.dtype) -> torch.Tensor:
    """The reference epilogue: `y` (the collective's output) through every statement in
    fp32, rounded once to `out_dtype` at the end."""
    v = y.float()
    for st in epilogue:
        v = EPILOGUES[st.op].apply(v, tensors[st.name], st)
    return v.to(out_dtype)


__all__ = ["DEFAULT_EPS", "EPILOGUES", "EPI_MAX_HIDDEN", "EPI_SLOTS", "QUANT_FORMATS",
           "EpilogueOp", "epilogue_cuda", "epilogue_slots", "output_dtype", "run_epilogue"]
