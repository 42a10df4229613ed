"""Debug mode: call fingerprints that the fused kernels compare at their input barrier
(docs/DESIGN.md, "Reliability").

A fingerprint is 32 bits: [31:24] the program stage (a hash of its text and stage
index), [23:20] the dtype, [19:8] a hash of the shape, [7:0] the runtime's call count.
Each rank publishes it with the barrier flag and compares its peers' with its own; a
mismatch stops the call with `CollectiveMismatch` instead of wrong data or a timeout.
The fields are decoded on the host from what this process knows: every program stage
it compiled (ranks compile the same programs, as with NCCL communicators), the shapes
it ran, its own call count. Off by default; when off the launch carries fp = 0 and the
kernels skip the check.
"""

from __future__ import annotations

import os
import zlib

import torch

ENV = "MIXCC_DEBUG"
DTYPE_CODES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_STAGES: dict[int, tuple[str, int, int]] = {}  # stage code -> (program, stage, stages)
_SHAPES: dict[int, tuple[int, ...]] = {}  # shape code -> the last shape seen with it


def enabled(option: bool | None) -> bool:
    """The compile option when given, else MIXCC_DEBUG (1, true, yes or detail)."""
    if option is not None:
        return bool(option)
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "detail")


def stage_code(program: str, stage: int) -> int:
    return zlib.crc32(f"{program}#{stage}".encode()) & 0xFF


def shape_code(shape: tuple[int, ...]) -> int:
    return zlib.crc32(repr(tuple(shape)).encode()) & 0xFFF


def register(program: str, n_stages: int) -> None:
    """Remember the stages of a compiled program, to name a peer's call later."""
    for i in range(n_stages):
        _STAGES.setdefault(stage_code(program, i), (program, i, n_stages))


def fingerprint(program: str, stage: int, dtype: torch.dtype, shape: tuple[int, ...],
                count: int) -> int:
    """The nonzero 32-bit fingerprint of one stage launch."""
    d = DTYPE_CODES.index(dtype) if dtype in DTYPE_CODES else 15
    s = shape_code(shape)
    _SHAPES[s] = tuple(shape)
    fp = stage_code(program, stage) << 24 | d << 20 | s << 8 | (count & 0xFF)
    return fp or 1 << 20  # 0 means "off"


def describe(fp: int, mine: int | None = None) -> str:
    """A reader's account of fingerprint `fp` (compared with this rank's `mine`)."""
    code, d, s, count = fp >> 24, fp >> 20 & 0xF, fp >> 8 & 0xFFF, fp & 0xFF
    stage = _STAGES.get(code)
    what = (f"{stage[0]!r}" + (f" (stage {stage[1] + 1} of {stage[2]})" if stage[2] > 1 else "")
            if stage else f"a program this rank never compiled (code {code:#04x})")
    dtype = str(DTYPE_CODES[d]).removeprefix("torch.") if d < len(DTYPE_CODES) else "?"
    if mine is not None and s == (mine >> 8 & 0xFFF):
        shape = "the same shape"
    elif s in _SHAPES:
        shape = f"shape {_SHAPES[s]}"
    else:
        shape = "a shape this rank never ran"
    return f"{what}, {dtype}, {shape}, call #{count} (mod 256) [fingerprint {fp:#010x}]"
