"""The reference backend: a plan run step by step with torch.distributed.

NCCL on CUDA tensors, gloo on CPU tensors. Each subgroup is a c10d backend built
directly on the default store under a name derived from its global ranks, created
once when a collective is compiled (a rendezvous of its members only) and shared by
every collective that needs the same ranks. (torch's `new_group` needs either every
rank of the world or, with local synchronisation, members that created equally many
groups before; neither holds for collectives over arbitrary parent groups.)
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist

from .codegen.plan import Plan, Step

_REDOPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_TIMEOUT = timedelta(seconds=300)

# (kind, sorted global ranks) -> backend object (ProcessGroupGloo / ProcessGroupNCCL)
_GROUPS: dict[tuple[str, tuple[int, ...]], object] = {}
_generation = 0


def clear_groups() -> None:
    """Forget the cached subgroups (call on every rank before destroying the process group)."""
    global _generation
    _GROUPS.clear()
    _generation += 1


def _kinds(group: dist.ProcessGroup | None) -> list[str]:
    name = str(dist.get_backend(group)).lower()
    kinds = [k for k in ("gloo", "nccl") if k in name]
    return kinds or ["gloo"]


def subgroup(kind: str, group: dist.ProcessGroup | None, members: tuple[int, ...]) -> object:
    """The `kind` backend over `members` (ranks of `group`), created once, then shared."""
    parent = group if group is not None else dist.group.WORLD
    ranks = tuple(sorted(dist.get_global_rank(parent, m) if parent is not dist.group.WORLD
                         else m for m in members))
    key = (kind, ranks)
    if key not in _GROUPS:
        me = dist.get_rank()
        store = dist.PrefixStore(
            f"mixcc/{_generation}/{kind}/{'_'.join(map(str, ranks))}",
            dist.distributed_c10d._get_default_store(),
        )
        if kind == "nccl":
            pg = dist.ProcessGroupNCCL(store, ranks.index(me), len(ranks))
        else:
            pg = dist.ProcessGroupGloo(store, ranks.index(me), len(ranks), _TIMEOUT)
        _GROUPS[key] = pg
    return _GROUPS[key]


class ReferenceRunner:
    """Runs `plan` for mesh rank `rank` of `group`."""

    def __init__(self, plan: Plan, rank: int, group: dist.ProcessGroup | None):
        self.plan, self.rank, self.group = plan, rank, group
        kinds = _kinds(group)
        self._steps: list[tuple[Step, tuple[int, ...], dict[str, object]]] = []
        for step in plan.steps:
            if step.coll == "permute":
                self._steps.append((step, step.perms[rank], {}))
                continue
            members = next(g for g in step.groups if rank in g)
            pgs = {k: subgroup(k, group, members) for k in kinds} if len(members) > 1 else {}
            self._steps.append((step, members, pgs))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The program's output for input `x` (a new tensor)."""
        kind = "nccl" if x.is_cuda else "gloo"
        y = x
        for step, members, pgs in self._steps:
            if step.coll == "permute":
                blocks = y.chunk(len(members))
                y = torch.cat([blocks[p] for p in members])
            elif pgs:
                if kind not in pgs:
                    raise ValueError(
                        f"x is on {x.device} but the process group has no {kind} backend"
                    )
                y = _run_step(step, members, pgs[kind], y)
        return y.clone() if y is x else y


def _run_step(step: Step, members: tuple[int, ...], pg, x: torch.Tensor) -> torch.Tensor:
    order = sorted(members)  # backend rank order
    n = len(members)
    x = x.contiguous()
    nan_flags = step.redop != "sum" and x.is_floating_point()
    if step.coll == "allreduce":
        y = _with_nan_flags(x, 1, step.redop) if nan_flags else x.clone()
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDOPS[step.redop]
        pg.allreduce([y], opts).wait()
        return _apply_nan_flags(y.view(-1), x.shape) if nan_flags else y
    if step.coll == "allgather":
        buf = x.new_empty((n * x.shape[0], *x.shape[1:]))
        pg._allgather_base(buf, x).wait()
        chunks = buf.chunk(n)
        return torch.cat([chunks[order.index(m)] for m in members])
    # reducescatter: backend rank q receives the block of member order[q]
    blocks = x.chunk(n)
    src = torch.cat([blocks[members.index(m)] for m in order])
    shape = (x.shape[0] // n, *x.shape[1:])
    if nan_flags:
        src = _with_nan_flags(src, n, step.redop).view(-1)
        y = x.new_empty(2 * math.prod(shape))
    else:
        y = x.new_empty(shape)
    opts = dist.ReduceScatterOptions()
    opts.reduceOp = _REDOPS[step.redop]
    pg._reduce_scatter_base(y, src, opts).wait()
    return _apply_nan_flags(y, shape) if nan_flags else y


# gloo (std::max/std::min) and NCCL (fmaxf/fminf, __hmax/__hmin) do not propagate NaN
# through max/min: a NaN is kept or dropped depending on where it meets the other
# values. torch.amax/amin give NaN wherever a term is NaN, so max/min steps on floating
# tensors reduce a NaN flag (1 for max, -1 for min, else 0) in the same collective: each
# of the n blocks is sent as [data, flags], and NaN is put wherever a flag came back set.
def _with_nan_flags(x: torch.Tensor, n: int, redop: str) -> torch.Tensor:
    flags = torch.isnan(x).to(x.dtype)
    if redop == "min":
        flags.neg_()
    return torch.cat([x.reshape(n, -1), flags.reshape(n, -1)], dim=1)


def _apply_nan_flags(y: torch.Tensor, shape) -> torch.Tensor:
    """y = [data, flags] reduced (one block): the data, NaN where a flag is set."""
    m = y.numel() // 2
    return y[:m].masked_fill(y[m:] != 0, float("nan")).view(shape)
