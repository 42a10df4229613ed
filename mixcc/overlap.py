"""Whether tensors share memory: the checks of a call's x, out and epilogue tensors
(mixcc/api.py) and of what the fused epilogue may run in place (mixcc/fused.py)."""

from __future__ import annotations

import torch


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a's and b's byte ranges intersect (tensors on different devices never do)."""
    if a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements: same start, element count and dtype."""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype


def overlaps_partly(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b share memory without being the same elements."""
    return not same_elements(a, b) and overlaps(a, b)


__all__ = ["overlaps", "overlaps_partly", "same_elements"]
