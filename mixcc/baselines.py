"""Baselines the benchmark runs beside mixcc, in the same processes (docs/DESIGN.md
section 6):

- `nccl1`: NCCL (or gloo) in one world collective for the two combined presets on a
  (dp, tp) mesh: all_gather then a local sum over tp (allreduce_allgather), or
  all_to_all then a local sum (reducescatter_allreduce).
- `symm_one_shot` / `symm_two_shot`: torch's symmetric-memory allreduce (sum) for a
  program of one allreduce over the whole world (CUDA only; no multicast needed): x is
  copied into the symmetric buffer inside the timed call. `symm_one_shot_nocopy` /
  `symm_two_shot_nocopy`: the kernel alone, the input already in the buffer (`load`).
  One GPU per rank on NCCL, or ranks sharing one GPU (gloo; torch then needs
  TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1, which `mixcc bench` sets).
- `separate`: the program as separate mixcc calls, one fused Collective per statement,
  chained through intermediate buffers (what a caller without mixcc's fusion runs).
- `peer_copy`: not a collective but the link's own time at this size, the bound a
  target such as "85% of the peer copy" is read against: at world 2 with one GPU per
  rank, each rank copies from its peer's symmetric buffer the bytes the program moves
  over the link per rank (its bus bytes), by the copy engine (a torch copy of a
  contiguous tensor: cudaMemcpyAsync), both ranks at once. `mixcc bench` neither checks
  its output nor takes it as a row's best.

The two-call NCCL composition is mixcc's own `reference` backend. Each factory
returns fn(x, out) -> out, or raises Unavailable with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from . import presets
from .ir.build import build
from .ir.parser import parse
from .mesh import Mesh

# torch >= 2.13 names it all_gather_single; older releases only have all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SYMM = ("symm_one_shot", "symm_two_shot", "symm_one_shot_nocopy", "symm_two_shot_nocopy")
LINK = ("peer_copy",)  # bounds, not results: never checked, never a ratio's best
BASELINES = ("nccl1", *SYMM, *LINK, "separate")
SHAPE_FREE = ("nccl1", "separate")  # one fn serves every input shape


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


class KernelOnly:
    """A baseline whose timed call reads its input from its own buffer: `load(x)` puts
    x there (before a check or a timing); the call ignores its `x` argument."""

    def __init__(self, buf: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]):
        self.buf, self.kernel = buf, kernel

    def load(self, x: torch.Tensor) -> None:
        self.buf.copy_(x)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.kernel(out)


def _symm_buffer(shape: tuple[int, ...], dtype: torch.dtype,
                 group: dist.ProcessGroup | None) -> tuple[torch.Tensor, object, str]:
    """A torch symmetric-memory buffer of `shape` on the group, rendezvoused: (buffer, its
    handle, the group's name); Unavailable where torch cannot make one."""
    import torch.distributed._symmetric_memory as symm_mem

    pg = group if group is not None else dist.group.WORLD
    name = pg.group_name
    try:  # collective: a failure here is the same on every rank (machine or torch)
        buf = symm_mem.empty(shape, dtype=dtype, device=torch.device("cuda"))
        hdl = symm_mem.rendezvous(buf, name)
    except RuntimeError as e:
        raise Unavailable(f"torch symmetric memory failed on this group "
                          f"({dist.get_backend(group)}): {str(e).splitlines()[0]}") from None
    return buf, hdl, name


def symm_mem_allreduce(program: str, mesh: Mesh, algorithm: str, shape: torch.Size,
                       dtype: torch.dtype, group: dist.ProcessGroup | None = None, *,
                       copy: bool = True) -> Fn:
    """torch symmetric-memory one_shot / two_shot allreduce (sum) over the whole group;
    `copy`: x is copied into the symmetric buffer inside the call, else KernelOnly."""
    cuda = torch.cuda.is_available()
    nccl = cuda and "nccl" in str(dist.get_backend(group))
    one_gpu = cuda and torch.cuda.device_count() == 1
    reason = _symm_refusal(program, mesh, dtype, nccl=nccl, one_gpu=one_gpu)
    if reason:
        raise Unavailable(reason)
    buf, _, name = _symm_buffer(shape, dtype, group)
    ops = torch.ops.symm_mem
    if algorithm == "one_shot":
        def one_shot(out: torch.Tensor) -> torch.Tensor:
            ops.one_shot_all_reduce_out(buf, "sum", name, out)
            return out
        kernel = one_shot
    else:
        two_out = getattr(ops, "two_shot_all_reduce_out", None)

        def two_shot(out: torch.Tensor) -> torch.Tensor:
            if two_out is not None:  # reduces in the buffer, gathers into out
                two_out(buf, "sum", name, out)
            else:  # older torch: in place in the buffer
                ops.two_shot_all_reduce_(buf, "sum", name)
                out.copy_(buf)
            return out
        kernel = two_shot
    if not copy:
        return KernelOnly(buf, kernel)

    def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        buf.copy_(x)
        return kernel(out)
    return fn


def peer_copy(mesh: Mesh, shape: torch.Size, dtype: torch.dtype, bus_factor: float,
              group: dist.ProcessGroup | None = None) -> Fn:
    """The peer copy of `bus_factor` x the input's bytes (see the module docstring); the
    call returns `out` untouched."""
    reason = _peer_copy_refusal(mesh, nccl=torch.cuda.is_available()
                                and "nccl" in str(dist.get_backend(group)))
    if reason:
        raise Unavailable(reason)
    elems = max(1, round(shape.numel() * bus_factor))
    buf, hdl, _ = _symm_buffer((elems,), dtype, group)
    peer = hdl.get_buffer(1 - dist.get_rank(group), (elems,), dtype)
    local = torch.empty_like(buf)

    def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        local.copy_(peer)
        return out
    fn.keep = (buf, hdl)  # the mapping lives as long as the call
    return fn


def _peer_copy_refusal(mesh: Mesh, *, nccl: bool) -> str | None:
    if mesh.world_size != 2 or not nccl:
        return "peer_copy: two ranks with a GPU each (NCCL) only"
    return None


def _world_allreduce(program: str, mesh: Mesh) -> bool:
    """Whether `program` is one sum allreduce over every rank of the mesh."""
    ops = build(parse(program), mesh).ops
    return (len(ops) == 1 and ops[0].coll == "allreduce" and ops[0].redop == "sum"
            and mesh.group_size(ops[0].axes) == mesh.world_size)


def _symm_refusal(program: str, mesh: Mesh, dtype: torch.dtype, *, nccl: bool,
                  one_gpu: bool = False) -> str | None:
    """`nccl`: one GPU per rank; `one_gpu`: every rank on the one GPU (no CUDA call here:
    the launcher must not initialise CUDA)."""
    if not _world_allreduce(program, mesh):
        return "symmetric-memory baseline: one sum allreduce over the whole world only"
    if not (nccl or one_gpu):
        return ("symmetric-memory baseline needs CUDA: one GPU per rank (NCCL) or every "
                "rank on one GPU")
    if dtype not in (torch.bfloat16, torch.float32):
        return "symmetric-memory allreduce supports bfloat16 and float32"
    return None


def separate(program: str, mesh: Mesh, dtype: torch.dtype,
             group: dist.ProcessGroup | None = None) -> Fn:
    """The program as one compiled fused mixcc Collective per statement, chained."""
    from .api import compile as mixcc_compile

    stmts = parse(program).stmts
    if len(stmts) < 2:
        raise Unavailable("separate calls need a program of several statements")
    try:
        colls = [mixcc_compile(str(s), mesh, dtype=dtype, group=group, backend="fused")
                 for s in stmts]
    except ValueError as e:
        raise Unavailable(str(e)) from None
    bufs: dict[torch.Size, list[torch.Tensor]] = {}

    def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mids = bufs.get(x.shape)
        if mids is None:  # the first call per shape (eager, before any graph capture)
            bufs.clear()
            mids, shape = [], x.shape
            for c in colls[:-1]:
                shape = c.output_shape(shape)
                mids.append(x.new_empty(shape))
            bufs[x.shape] = mids
        y = x
        for c, mid in zip(colls[:-1], mids, strict=True):
            y = c(y, out=mid)
        return colls[-1](y, out=out)
    return fn


def unavailable_reason(name: str, program: str, mesh: Mesh, dtype: torch.dtype, *,
                       nccl: bool, one_gpu: bool = False) -> str | None:
    """Why baseline `name` cannot run `program` (resolved text), or None. Needs no process
    group, so the launcher can check before spawning; `nccl`: one GPU per rank on NCCL;
    `one_gpu`: every rank on one GPU (gloo). `separate` is also refused where the fused
    backend cannot run (the caller checks that)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    if name == "nccl1":
        try:
            one_call(program, mesh)
        except Unavailable as e:
            return str(e)
        return None
    if name == "separate":
        if len(parse(program).stmts) < 2:
            return "separate calls need a program of several statements"
        return None
    if name in LINK:
        return _peer_copy_refusal(mesh, nccl=nccl)
    return _symm_refusal(program, mesh, dtype, nccl=nccl, one_gpu=one_gpu)


def make(name: str, program: str, mesh: Mesh, shape: torch.Size, dtype: torch.dtype,
         group: dist.ProcessGroup | None = None, bus_factor: float = 1.0) -> Fn:
    """The call of baseline `name` for inputs of `shape` (any shape: SHAPE_FREE ones);
    `bus_factor`: the program's bus bytes per input byte (peer_copy's size)."""
    if name in LINK:
        return peer_copy(mesh, shape, dtype, bus_factor, group)
    if name == "nccl1":
        return one_call(program, mesh, group)
    if name == "separate":
        return separate(program, mesh, dtype, group)
    if name in SYMM:
        alg = name.removeprefix("symm_").removesuffix("_nocopy")
        return symm_mem_allreduce(program, mesh, alg, shape, dtype, group,
                                  copy=not name.endswith("_nocopy"))
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
