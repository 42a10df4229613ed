"""The fused backend (generated CUDA): not built yet."""

from __future__ import annotations

import torch


def should_use(coll: object, dtype: torch.dtype) -> bool:
    return False


def check_applicable(coll: object, dtype: torch.dtype | None) -> None:
    raise NotImplementedError(
        "backend='fused' needs the generated-CUDA runtime (templates/, runtime/), "
        "which is not built yet; use backend='reference' or 'auto'"
    )


class FusedRunner:
    def __init__(self, coll: object, dtype: torch.dtype):
        check_applicable(coll, dtype)
