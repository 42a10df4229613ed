"""The precision contract (docs/DESIGN.md, "Precision"): inputs taken as given; every sum
accumulates in fp32 in one fixed order per element (the terms in table order: ranks in
group order); an epilogue runs in fp32 on the fp32 result; the output is rounded once to
its dtype and each stored tensor once to its own. `batch_invariant` removes every choice
that would change a row's bits with the shape of the call or the placement of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .codegen.plan import HierStage, Plan
from .ir.nodes import IR

ENV = "MIXCC_BATCH_INVARIANT"


def batch_invariant_enabled(option: bool | None) -> bool:
    """The compile option when given, else MIXCC_BATCH_INVARIANT (1, true or yes)."""
    if option is not None:
        return bool(option)
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def sums(steps: Iterable) -> bool:
    """Whether collectives (IR ops or plan steps: `coll`, `redop`) add values of several
    ranks (a sum's order and roundings matter; max and min are exact in any order)."""
    return any(s.coll in ("allreduce", "reducescatter") and s.redop == "sum" for s in steps)


def accumulation_input(x: torch.Tensor, summed: bool) -> torch.Tensor:
    """x as a collective whose result stays in fp32 should see it: converted to fp32 (exact)
    where the program sums (`summed`, from sums()) 16-bit values, else x itself. Used where
    torch ops follow the collective (an epilogue not fused into the kernel) and by the
    reference backend on gloo, so that the result is rounded once, at the end."""
    if summed and x.is_floating_point() and x.element_size() < 4:
        return x.float()
    return x


def explain(plan: Plan, ir: IR, options: dict, nccl_from: int | None,
            row_split_from: int | None = None) -> str:
    """The precision lines of `explain`: the contract, and each place where a row's bits
    may depend on the call (the row count, the size, the placement), or that there is none.
    `nccl_from`: bytes per rank from which auto without a tuning table runs the plan on
    NCCL (fused.hier_nccl_min_bytes), or None; `row_split_from`: the row bytes from which
    the LL kernel may split a row over blocks (None: never)."""
    lines = ["precision: fp32 accumulation, terms in group order, one rounding to the "
             "output's dtype (and one per stored tensor); epilogues in fp32 on the fp32 "
             "result"]
    if not sums(ir.ops):
        lines.append("  no sums: every path gives the same bits (batch invariant)")
        return "\n".join(lines)
    where = []
    if options.get("batch_invariant"):
        lines.append("  batch_invariant: a row's bits do not depend on the row count, the "
                     "algorithm, the chunking, the blocks or the placement on nodes; auto "
                     "never runs a sum on NCCL")
    else:
        if nccl_from is not None:
            where.append(f"auto runs calls of at least {nccl_from >> 20} MiB per rank on NCCL "
                         "(its own order, partial sums rounded to the dtype)")
        where.append("a tuning table (mixcc tune) may pick NCCL for some sizes")
        if any(e.op == "rmsnorm" for e in ir.epilogue) and plan.one_node \
                and row_split_from is not None:
            where.append(f"the LL kernel splits rows of {row_split_from >> 10} KiB or more "
                         "over blocks when the call has few rows: rmsnorm then adds its sum "
                         "of squares in another order")
        if not plan.one_node and any(isinstance(st, HierStage) for st in plan.stages):
            where.append("a cross-node stage adds each node's terms first: the bits differ "
                         "from those of the same ranks on one node")
        lines.append("  the bits may depend on the call where: " + "; ".join(where)
                     + " (batch_invariant=True removes each)")
    lines.append("  the reference backend reduces with torch.distributed: on gloo in fp32, "
                 "rounded once; on NCCL in the dtype, in NCCL's order (an epilogue: in fp32)")
    return "\n".join(lines)


__all__ = ["ENV", "accumulation_input", "batch_invariant_enabled", "explain", "sums"]
