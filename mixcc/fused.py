"""The fused backend: generated CUDA for one-node programs over CUDA IPC.

`should_use` is the predicate `auto` asks; `check_applicable` raises the reason
when `backend="fused"` cannot run a program. Each fused plan stage becomes one
kernel launch on the current stream; every launch is CUDA-graph capturable (the
first call per dtype renders, builds and allocates, so make it before capture).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .codegen import layout
from .codegen.build import build_module, device_arch, find_nvcc
from .codegen.render import CTYPES, render_stage

# One-shot reads every source from every consumer: n x the bytes but one barrier.
# Two-shot moves ~2(n-1)/n of the bytes with a second barrier (a few us). Past about
# 512 KiB per rank the bytes dominate on NVLink-class links, so auto switches there.
TWO_SHOT_MIN_BYTES = 512 << 10
MULTICAST_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def _current_stream(device: int) -> int:
    """The raw current stream of `device`: torch's fast private accessor (a few us cheaper
    per call than building a Stream object), else the public API."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def multicast_refusal() -> str | None:
    """Why multicast must not be used here, or None."""
    bad = [v for v in MULTICAST_ENV
           if os.environ.get(v) == ("0" if v == "NCCL_NVLS_ENABLE" else "1")]
    return f"multicast is disabled on this machine ({', '.join(bad)} set)" if bad else None


def unavailable_reason(coll, dtype: torch.dtype | None) -> str | None:
    """Why the fused backend cannot run `coll` for `dtype`, or None if it can."""
    if coll.options.get("multicast"):
        refusal = multicast_refusal()
        if refusal:
            return f"the multicast transport was requested but {refusal}"
        return "the multicast transport is not built (use the default ipc transport)"
    if not coll.plan.one_node:
        return (f"its groups cross nodes (ranks_per_node={coll.mesh.ranks_per_node}); the fused "
                "backend has no inter-node transport yet")
    if dtype is not None and dtype not in CTYPES:
        return f"dtype {dtype} is not one of {list(CTYPES)}"
    if coll.mesh.world_size > layout.MAX_RANKS:
        return f"it has {coll.mesh.world_size} ranks (at most {layout.MAX_RANKS})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if coll.mesh.world_size > 1 and not dist.is_initialized():
        return "torch.distributed is not initialized"
    return None


def shares_reduction(stage) -> bool:
    """Whether two-shot splits a real reduction among owners. For pure data movement
    (allgather) two-shot only doubles the remote traffic, so auto never picks it."""
    return any(len(t.terms) > 1 and t.owners > 1
               for rs in stage.schedules["two_shot"].ranks for t in rs.reduce)


def should_use(coll, dtype: torch.dtype) -> bool:
    return unavailable_reason(coll, dtype) is None


def check_applicable(coll, dtype: torch.dtype | None) -> None:
    reason = unavailable_reason(coll, dtype)
    if reason is not None:
        raise ValueError(f"backend='fused' cannot run {coll.program!r}: {reason}")


def load_stage(source: str, arch: str) -> tuple[ctypes.CDLL, float, bool]:
    built = build_module(source, "stage", arch)
    lib = ctypes.CDLL(str(built.path))
    vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.mixcc_launch.argtypes = [i, i, vp, vp, ll, ll, i, i, vp, vp, i, ll, ll,
                                 ctypes.c_ulonglong, vp, vp]
    lib.mixcc_launch.restype = i
    return lib, built.seconds, built.cached


class FusedRunner:
    """The fused kernels of one collective for one dtype, bound to the shared runtime."""

    def __init__(self, coll, dtype: torch.dtype):
        from .runtime import get_runtime, native

        check_applicable(coll, dtype)
        self.coll, self.dtype = coll, dtype
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.vec = 16 // self.elem
        opts = coll.options
        self.algorithm = opts["algorithm"]
        self.timeout_ns = int(opts["timeout_s"] * 1e9)
        self.max_blocks = min(opts["max_blocks"] or layout.MAX_BLOCKS, layout.MAX_BLOCKS)
        self.device = torch.cuda.current_device()
        native()
        self.rt = get_runtime(coll.group, self.device, opts["workspace_bytes"],
                              opts["timeout_s"])
        arch = device_arch()
        self.stages = []
        self.build_seconds = 0.0
        for stage in coll.plan.stages:
            lib, secs, _ = load_stage(render_stage(stage, dtype), arch)
            self.build_seconds += secs
            self.stages.append((stage, lib))
        # per-stage facts the hot path needs, computed once
        self._shares_reduction = [shares_reduction(st) for st, _ in self.stages]
        self._peers = self.rt.peers.data_ptr()
        self._epochs = self.rt.epochs.data_ptr()
        self._param_cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def _params(self, i: int, unit_elems: int, nbytes: int) -> tuple[int, int, int, int]:
        """(algorithm, columns per block, chunks, blocks) for stage i; the same on every
        rank for the same shape, as the barriers require."""
        stage = self.stages[i][0]
        two = self.algorithm == "two_shot" or (
            self.algorithm == "auto" and nbytes >= TWO_SHOT_MIN_BYTES and self._shares_reduction[i])
        units = stage.lmap.in_units + (stage.schedules["two_shot"].slots if two else 0)
        cols = self.rt.region_bytes // (units * self.elem) // self.vec * self.vec
        if cols < self.vec:
            raise ValueError(
                f"workspace_bytes={self.rt.workspace_bytes} is too small for {units} units "
                "per block region; raise workspace_bytes"
            )
        nblocks = max(1, min(self.max_blocks, math.ceil(unit_elems / (layout.THREADS * self.vec))))
        return int(two), cols, math.ceil(unit_elems / (nblocks * cols)), nblocks

    def _launch(self, i: int, x: torch.Tensor, dst: torch.Tensor, inner: int) -> None:
        unit_elems = x.shape[0] // self.stages[i][0].lmap.in_units * inner
        if unit_elems == 0:
            return
        key = (i, unit_elems)
        params = self._param_cache.get(key)
        if params is None:
            params = self._param_cache[key] = self._params(i, unit_elems,
                                                           x.numel() * self.elem)
        algo, cols, n_chunks, nblocks = params
        wide = int(unit_elems % self.vec == 0 and x.data_ptr() % 16 == 0
                   and dst.data_ptr() % 16 == 0)
        rc = self.stages[i][1].mixcc_launch(
            algo, wide, x.data_ptr(), dst.data_ptr(), unit_elems, cols, n_chunks, nblocks,
            self._peers, self._epochs, self.rt.rank, layout.DATA_OFFSET, self.rt.region_bytes,
            self.timeout_ns, self.rt.err_dev, _current_stream(self.device),
        )
        if rc != 0:
            from .runtime import cuda_check

            cuda_check(rc, f"launch of fused stage {i}")

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None, shape: torch.Size
                 ) -> torch.Tensor:
        """Run on validated input; `shape` is the output shape."""
        self.rt.check()
        self.rt.timeout_s = self.timeout_ns / 1e9
        if out is None:
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
        inner = math.prod(x.shape[1:])
        if not self.stages:
            if out.data_ptr() != x.data_ptr():
                out.copy_(x)
            return out
        cur = x
        for i, (stage, _) in enumerate(self.stages):
            last = i == len(self.stages) - 1
            n_out = len(stage.lmap.out_units[0])
            rows = cur.shape[0] // stage.lmap.in_units * n_out
            dst = out if last else torch.empty((rows, *x.shape[1:]), dtype=x.dtype,
                                               device=x.device)
            self._launch(i, cur, dst, inner)
            cur = dst
        return out


def prebuild(programs: list[str], mesh, dtypes: list[torch.dtype], arch: str | None = None
             ) -> Iterator[str]:
    """Compile the runtime and every fused stage of `programs` ahead of time."""
    from .api import compile as mixcc_compile
    from .runtime import build_native

    arch = arch or device_arch()
    b = build_native(arch)
    yield f"runtime  {'cached' if b.cached else f'built in {b.seconds:.1f} s'}  {b.path}"
    for prog in programs:
        coll = mixcc_compile(prog, mesh, backend="reference")
        if not coll.plan.one_node:
            yield f"{coll.program}: skipped (crosses nodes: no fused stage)"
            continue
        for dtype in dtypes:
            for stage in coll.plan.stages:
                b = build_module(render_stage(stage, dtype), "stage", arch)
                how = "cached" if b.cached else f"built in {b.seconds:.1f} s"
                yield f"{coll.program} [{str(dtype).removeprefix('torch.')}]  {how}  {b.path}"
