"""Baselines the benchmark runs beside mixcc, in the same processes (docs/DESIGN.md
section 6):

- `nccl1`: NCCL (or gloo) in one world collective for the two combined presets on a
  (dp, tp) mesh: all_gather then a local sum over tp (allreduce_allgather), or
  all_to_all then a local sum (reducescatter_allreduce).
- `symm_one_shot` / `symm_two_shot`: torch's symmetric-memory allreduce for plain
  allreduce(tp) when tp is the whole world (CUDA only; no multicast needed).

The two-call NCCL composition is mixcc's own `reference` backend. Each factory
returns fn(x, out) -> out, or raises Unavailable with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from . import presets
from .mesh import Mesh

# torch >= 2.13 names it all_gather_single; older releases only have all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BASELINES = ("nccl1", "symm_one_shot", "symm_two_shot")


class Unavailable(Exception):
    """The baseline does not apply to this program, mesh or machine."""


def _dp_tp(mesh: Mesh) -> tuple[int, int]:
    if mesh.names != ("dp", "tp"):
        raise Unavailable(f"needs a mesh with axes (dp, tp), got {mesh.names}")
    return mesh.sizes[0], mesh.sizes[1]


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the local sums: float32, or float64 for float64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def one_call(program: str, mesh: Mesh, group: dist.ProcessGroup | None = None) -> Fn:
    """The combined presets as one world collective plus a local sum (fp32 accumulate,
    fp64 for fp64)."""
    dp, tp = _dp_tp(mesh)
    world = dp * tp
    d_of = [r // tp for r in range(world)]
    if program == presets.ALLREDUCE_ALLGATHER:
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            buf = x.new_empty((world * x.shape[0], *x.shape[1:]))
            _all_gather(buf, x, group=group)
            summed = buf.view(dp, tp, *x.shape).to(_acc(x.dtype)).sum(1)
            out.copy_(summed.reshape(out.shape))
            return out
        return fn
    if program == presets.REDUCESCATTER_ALLREDUCE:
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            chunks = x.chunk(dp)
            send = torch.cat([chunks[d_of[q]] for q in range(world)])
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=group)
            out.copy_(recv.view(world, *out.shape).to(_acc(x.dtype)).sum(0))
            return out
        return fn
    raise Unavailable("one-call composition exists for allreduce_allgather and "
                      "reducescatter_allreduce only")


def symm_mem_allreduce(program: str, mesh: Mesh, algorithm: str, shape: torch.Size,
                       dtype: torch.dtype, group: dist.ProcessGroup | None = None) -> Fn:
    """torch symmetric-memory one_shot / two_shot allreduce (sum) over the whole group."""
    reason = _symm_refusal(program, mesh, dtype, "nccl" in str(dist.get_backend(group)))
    if reason:
        raise Unavailable(reason)
    import torch.distributed._symmetric_memory as symm_mem

    pg = group if group is not None else dist.group.WORLD
    name = pg.group_name
    buf = symm_mem.empty(shape, dtype=dtype, device=torch.device("cuda"))
    symm_mem.rendezvous(buf, name)
    if algorithm == "one_shot":
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            buf.copy_(x)
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", name, out)
            return out
    else:
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            buf.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", name)
            out.copy_(buf)
            return out
    return fn


def _symm_refusal(program: str, mesh: Mesh, dtype: torch.dtype, nccl: bool) -> str | None:
    if program != presets.ALLREDUCE or mesh.group_size(("tp",)) != mesh.world_size:
        return "symmetric-memory baseline: allreduce(tp) with tp = world only"
    if not torch.cuda.is_available() or not nccl:
        return "symmetric-memory baseline needs CUDA and one GPU per rank (NCCL)"
    if dtype not in (torch.bfloat16, torch.float32):
        return "symmetric-memory allreduce supports bfloat16 and float32"
    return None


def unavailable_reason(name: str, program: str, mesh: Mesh, dtype: torch.dtype, *,
                       nccl: bool) -> str | None:
    """Why baseline `name` cannot run `program` (resolved text), or None. Needs no process
    group, so the launcher can check before spawning; `nccl`: one GPU per rank on NCCL."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    if name == "nccl1":
        try:
            one_call(program, mesh)
        except Unavailable as e:
            return str(e)
        return None
    return _symm_refusal(program, mesh, dtype, nccl)


def make(name: str, program: str, mesh: Mesh, shape: torch.Size, dtype: torch.dtype,
         group: dist.ProcessGroup | None = None) -> Fn:
    if name == "nccl1":
        return one_call(program, mesh, group)
    if name in ("symm_one_shot", "symm_two_shot"):
        return symm_mem_allreduce(program, mesh, name.removeprefix("symm_"), shape, dtype,
                                  group)
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
