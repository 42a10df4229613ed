"""The five standard programs over mesh axes (dp, tp) (docs/DESIGN.md section 2)."""

from __future__ import annotations

ALLREDUCE = "allreduce(tp)"
ALLGATHER = "allgather(dp)"
REDUCESCATTER = "reducescatter(dp)"
ALLREDUCE_ALLGATHER = "allreduce(tp); allgather(dp)"
REDUCESCATTER_ALLREDUCE = "reducescatter(dp); allreduce(tp)"

PRESETS: dict[str, str] = {
    "allreduce": ALLREDUCE,
    "allgather": ALLGATHER,
    "reducescatter": REDUCESCATTER,
    "allreduce_allgather": ALLREDUCE_ALLGATHER,
    "reducescatter_allreduce": REDUCESCATTER_ALLREDUCE,
}


def resolve(name_or_program: str) -> str:
    """A preset's program text, or the argument itself when it is not a preset name."""
    return PRESETS.get(name_or_program, name_or_program)
