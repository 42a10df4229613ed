"""Registered buffers: `mixcc.empty` hands out tensors that every peer of the node has
mapped, so that a one-shot stage reads such an input in place instead of staging a copy
of it (docs/DESIGN.md, "Registered buffers"). Ordinary tensors keep working everywhere."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .codegen.layout import DEFAULT_WORKSPACE_BYTES

# The pool of a group's runtime, made by its first mixcc.empty: 1 GiB of device memory
# per rank unless pool_bytes says otherwise (the README and `explain` state it).
DEFAULT_POOL_BYTES = 1 << 30


def empty(shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype | None = None, *,
          group: dist.ProcessGroup | None = None, pool_bytes: int | None = None
          ) -> torch.Tensor:
    """An uninitialised tensor of `shape` and `dtype` (default torch's default dtype) on
    the current CUDA device, inside the registered pool of `group`'s runtime (default
    WORLD). The first call on a group creates the pool of `pool_bytes` (default 1 GiB per
    rank) and is collective: every rank of the group must make it. Later calls are local,
    and ranks may allocate different sizes in different orders. Its memory returns to the
    pool when the tensor and all its views are gone."""
    from .runtime import existing_runtime, get_runtime

    if not torch.cuda.is_available():
        raise RuntimeError("mixcc.empty needs a CUDA device")
    dtype = dtype or torch.get_default_dtype()
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    device = torch.cuda.current_device()
    rt = existing_runtime(group, device) or get_runtime(group, device,
                                                        DEFAULT_WORKSPACE_BYTES, 5.0)
    if rt.pool is None:
        rt.open_pool(DEFAULT_POOL_BYTES if pool_bytes is None else int(pool_bytes))
    elif pool_bytes is not None and rt.pool.rounded(int(pool_bytes)) != rt.pool.nbytes:
        raise ValueError(f"pool_bytes={pool_bytes}: the group's registered pool already "
                         f"exists with {rt.pool.nbytes} bytes")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    block = rt.pool.allocate(nbytes)
    raw = torch.as_tensor(block, device=torch.device("cuda", device))
    return raw[:nbytes].view(dtype).view(shape)


__all__ = ["DEFAULT_POOL_BYTES", "empty"]
