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
- `nccl_symm` / `nccl_symm_nocopy`: NCCL's symmetric-memory kernels (NCCL 2.27+) for a
  program of one collective over the whole world (allreduce, allgather, reducescatter;
  one GPU per rank on NCCL): the input and output live in a torch memory pool registered
  as NCCL windows (`ProcessGroupNCCL.register_mem_pool(pool, symm)`), and the call is the
  plain torch.distributed collective on them, which NCCL then runs with its symmetric
  kernels. `nccl_symm` copies x into the input window inside the timed call;
  `nccl_symm_nocopy` finds it there (`load`; an allreduce then runs in place). Both leave
  the result in the output window. Where the installed NCCL or torch lacks them,
  nccl_symm_support() says why and the bench reports the rows as n/a.
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
NCCL_SYMM = ("nccl_symm", "nccl_symm_nocopy")
LINK = ("peer_copy",)  # bounds, not results: never checked, never a ratio's best
BASELINES = ("nccl1", *SYMM, *NCCL_SYMM, *LINK, "separate")
NCCL_SYMM_MIN = (2, 27, 0)  # the first NCCL with window registration and symmetric kernels
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


def nccl_version() -> tuple[int, int, int] | None:
    """The NCCL version torch runs with (no CUDA call), or None where torch has no NCCL."""
    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):  # a CPU build has no _nccl_version
        return None
    return (int(v[0]), int(v[1]), int(v[2]))


def nccl_symm_support() -> str | None:
    """Why NCCL's symmetric kernels cannot be reached through this torch and NCCL, or None.

    Needs NCCL 2.27+ and torch's ProcessGroupNCCL with a memory allocator and
    register_mem_pool taking the symmetric flag. No process group nor CUDA call: the
    launcher asks before spawning, the results script before running."""
    ver = f"torch {torch.__version__}"
    if not dist.is_available() or not dist.is_nccl_available():
        return f"{ver} is built without NCCL"
    v = nccl_version()
    if v is None:
        return f"{ver} does not report its NCCL version"
    if v < NCCL_SYMM_MIN:
        return (f"NCCL {'.'.join(map(str, v))} has no symmetric kernels (they came with "
                f"NCCL {'.'.join(map(str, NCCL_SYMM_MIN))})")
    pg = getattr(dist, "ProcessGroupNCCL", None)
    register = getattr(pg, "register_mem_pool", None)
    if register is None or not hasattr(pg, "mem_allocator"):
        return f"{ver} has no ProcessGroupNCCL.register_mem_pool / mem_allocator"
    if not _takes_symm_flag(register):
        return (f"{ver}: ProcessGroupNCCL.register_mem_pool takes no symmetric flag, so "
                "it cannot register NCCL windows")
    return None


def _takes_symm_flag(register: object) -> bool:
    """Whether a pybind register_mem_pool takes (pool, symm): its signature line names
    the flag, or shows a second, bool argument where the binding names none."""
    doc = getattr(register, "__doc__", None) or ""
    head = doc.split(") ->")[0]
    return "symm" in head or "arg1: bool" in head


def _nccl_symm_refusal(program: str, mesh: Mesh, dtype: torch.dtype, *,
                       nccl: bool) -> str | None:
    """Why the program cannot be an NCCL symmetric-kernel baseline (before the machine)."""
    ops = [op for op in build(parse(program), mesh).ops if mesh.group_size(op.axes) > 1]
    if len(ops) != 1 or mesh.group_size(ops[0].axes) != mesh.world_size:
        return "NCCL symmetric-kernel baseline: one collective over the whole world only"
    if not nccl:
        return "NCCL symmetric kernels need one GPU per rank (the NCCL process group)"
    op = ops[0]
    if op.coll != "allgather" and (op.redop != "sum" or dtype not in (
            torch.bfloat16, torch.float16, torch.float32)):
        return ("NCCL's symmetric allreduce and reducescatter: sum of bfloat16, float16 or "
                "float32 only")
    return None


class NcclWindows:
    """NCCL's own collective on buffers in a torch memory pool registered as NCCL windows
    (see the module docstring); `close()` deregisters them (collective: every rank)."""

    def __init__(self, coll: str, shape: torch.Size, dtype: torch.dtype,
                 group: dist.ProcessGroup | None, copy: bool):
        pg = group if group is not None else dist.group.WORLD
        n = dist.get_world_size(group)
        dev = torch.device("cuda", torch.cuda.current_device())
        rows = {"allgather": shape[0] * n, "reducescatter": shape[0] // n}.get(coll, shape[0])
        self.coll, self.group, self.copy = coll, group, copy
        # torch registers windows only on a communicator that exists: one collective first
        dist.all_reduce(torch.zeros(1, device=dev), group=group)
        try:  # collective: the same verdict on every rank (same NCCL, same driver)
            self.backend = pg._get_backend(dev)
            self.pool = torch.cuda.MemPool(self.backend.mem_allocator)
            with torch.cuda.use_mem_pool(self.pool):
                self.src = torch.zeros(shape, dtype=dtype, device=dev)
                self.dst = self.src if coll == "allreduce" else torch.zeros(
                    (rows, *shape[1:]), dtype=dtype, device=dev)
            self.backend.register_mem_pool(self.pool, True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise Unavailable(f"registering NCCL windows failed: "
                              f"{str(e).strip().splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
        self.registered = True

    def load(self, x: torch.Tensor) -> None:
        self.src.copy_(x)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.copy:
            self.src.copy_(x)
        if self.coll == "allreduce":
            dist.all_reduce(self.src, group=self.group)
        elif self.coll == "allgather":
            dist.all_gather_into_tensor(self.dst, self.src, group=self.group)
        else:
            dist.reduce_scatter_tensor(self.dst, self.src, group=self.group)
        return self.dst

    def close(self) -> None:
        """Deregister the windows and free the buffers (call on every rank at once)."""
        if self.registered:
            torch.cuda.synchronize()
            self.backend.deregister_mem_pool(self.pool)
            self.registered = False
        self.src = self.dst = None  # type: ignore[assignment]


def nccl_symm(program: str, mesh: Mesh, shape: torch.Size, dtype: torch.dtype,
              group: dist.ProcessGroup | None = None, *, copy: bool = True) -> NcclWindows:
    """NCCL's collective for `program` on registered windows (see the module docstring)."""
    nccl = torch.cuda.is_available() and "nccl" in str(dist.get_backend(group))
    reason = _nccl_symm_refusal(program, mesh, dtype, nccl=nccl) or nccl_symm_support()
    if reason:
        raise Unavailable(reason)
    op = next(o for o in build(parse(program), mesh).ops if mesh.group_size(o.axes) > 1)
    return NcclWindows(op.coll, shape, dtype, group, copy)


def machine_refusal(name: str, *, nccl: bool = True) -> str | None:
    """Why baseline `name` is absent from this machine, whatever the program: what its
    torch or NCCL lacks, or (NCCL's symmetric kernels) a placement without one GPU per
    rank (`nccl` False). `mixcc bench` reports it as n/a, never as an error. No process
    group nor CUDA call."""
    if name in NCCL_SYMM:
        why = nccl_symm_support()
        if why is None and not nccl:
            why = "NCCL symmetric kernels need one GPU per rank (here ranks share GPUs)"
        return why
    if name in SYMM or name in LINK:
        return symm_mem_support()
    return None


def symm_mem_support() -> str | None:
    """Why torch's symmetric memory (its one-shot / two-shot allreduce) is absent, or None."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as e:
        return f"torch {torch.__version__} has no symmetric memory ({e})"
    if not hasattr(symm_mem, "rendezvous"):
        return f"torch {torch.__version__} has no symmetric-memory rendezvous"
    try:
        torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018 - the op's presence
    except (AttributeError, RuntimeError):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_out"
    return None


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
    backend cannot run (the caller checks that); what the machine's torch or NCCL lacks
    is machine_refusal's answer."""
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
    if name in NCCL_SYMM:
        return _nccl_symm_refusal(program, mesh, dtype, nccl=nccl)
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
    if name in NCCL_SYMM:
        return nccl_symm(program, mesh, shape, dtype, group, copy=name == "nccl_symm")
    if name in SYMM:
        alg = name.removeprefix("symm_").removesuffix("_nocopy")
        return symm_mem_allreduce(program, mesh, alg, shape, dtype, group,
                                  copy=not name.endswith("_nocopy"))
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
