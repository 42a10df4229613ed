"""The five standard programs over mesh axes (dp, tp) (docs/DESIGN.md section 2), and
their epilogue forms (mixcc/ops.py), which take keyword tensors at the call."""

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


# A transformer layer's end: the TP allreduce, the residual add kept in `residual`, the
# RMSNorm with `weight` (coll(x, residual=r, weight=w)); and the same for the DP-attention
# layout (allreduce over tp, then allgather over dp).
ALLREDUCE_ADD_RMSNORM = "allreduce(tp); add(residual); store(residual); rmsnorm(weight)"
ALLREDUCE_ALLGATHER_ADD_RMSNORM = ("allreduce(tp); allgather(dp); add(residual); "
                                   "store(residual); rmsnorm(weight)")

EPILOGUE_PRESETS: dict[str, str] = {
    "allreduce_add_rmsnorm": ALLREDUCE_ADD_RMSNORM,
    "allreduce_allgather_add_rmsnorm": ALLREDUCE_ALLGATHER_ADD_RMSNORM,
}


def resolve(name_or_program: str) -> str:
    """A preset's program text, or the argument itself when it is not a preset name."""
    return PRESETS.get(name_or_program) or EPILOGUE_PRESETS.get(name_or_program,
                                                                 name_or_program)
