"""NVSHMEM for the fused backend's inter-node steps (docs/DESIGN.md, "Transports").

Bootstrapped from the torch.distributed group passed to `compile`: rank 0 of the group
makes a unique id, the group broadcasts it as an object (gloo, NCCL-only and
"cpu:gloo,cuda:nccl" groups alike, and groups that are not the world), and every rank
initialises NVSHMEM with PE = its rank in the group. The symmetric workspace has a fixed
size. One NVSHMEM instance serves a process, so one group at a time uses it.

Every module that links NVSHMEM's device library (each hierarchical stage) has its own
device state: `bind_module` initialises it with the same unique id before first use.
NVSHMEM_DISABLE_NVLS=1 is left as the caller set it (mixcc never asks for multicast).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
import torch.distributed as dist

from .codegen import spec
from .codegen.build import build, device_arch
from .codegen.spec import NVSHMEM_MISSING, nvshmem_spec
from .paths import runtime_source_dir


class NvshmemError(RuntimeError):
    """NVSHMEM is missing or one of its calls failed."""


def available() -> str | None:
    """None when NVSHMEM can be used here, else the reason."""
    return None if spec.find_nvshmem() is not None else NVSHMEM_MISSING


def build_library(arch: str):
    """Build (or find in the cache) the native NVSHMEM runtime library for `arch`."""
    src = (runtime_source_dir() / "mixcc_nvshmem.cu").read_text()
    return build(nvshmem_spec("nvshmem_rt", src, arch))


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_library(device_arch()).path))
    vp, i = ctypes.c_void_p, ctypes.c_int
    for name, args in {"mixcc_nv_uniqueid": [vp], "mixcc_module_init": [vp, i, i],
                       "mixcc_nv_malloc": [ctypes.c_size_t, ctypes.POINTER(vp)],
                       "mixcc_nv_free": [vp], "mixcc_nv_finalize": [],
                       "mixcc_nv_uniqueid_size": [], "mixcc_nv_my_pe": [],
                       "mixcc_nv_n_pes": []}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise NvshmemError(f"mixcc NVSHMEM runtime: {what} failed with status {status}")


class NvshmemRuntime:
    """NVSHMEM initialised over one process group, with a fixed symmetric workspace."""

    def __init__(self, group: dist.ProcessGroup | None, symmetric_bytes: int):
        if spec.find_nvshmem() is None:
            raise NvshmemError(NVSHMEM_MISSING)
        self.group, self.symmetric_bytes = group, symmetric_bytes
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # NVSHMEM reserves 1 GiB of heap per PE unless told otherwise: ask for what the
        # workspace needs (a user's own setting wins).
        os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(symmetric_bytes + (64 << 20)))
        lib = _library()
        uid = ctypes.create_string_buffer(lib.mixcc_nv_uniqueid_size())
        if self.rank == 0:
            _check(lib.mixcc_nv_uniqueid(uid), "nvshmemx_get_uniqueid")
        box = [uid.raw]
        dist.broadcast_object_list(box, group_src=0, group=group)
        self.uid = ctypes.create_string_buffer(box[0], len(box[0]))
        self._bound: set[int] = set()
        self.bind_module(lib)
        ptr = ctypes.c_void_p()
        _check(lib.mixcc_nv_malloc(symmetric_bytes, ctypes.byref(ptr)), "nvshmem_malloc")
        self.sym = ptr.value
        self._closed = False

    def bind_module(self, lib: ctypes.CDLL) -> None:
        """Initialise NVSHMEM's device state in `lib` (once per module; collective)."""
        if id(lib) in self._bound:
            return
        lib.mixcc_module_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.mixcc_module_init.restype = ctypes.c_int
        _check(lib.mixcc_module_init(self.uid, self.rank, self.world),
               f"NVSHMEM initialisation of {getattr(lib, '_name', 'a module')}")
        self._bound.add(id(lib))

    def close(self) -> None:
        """Free the symmetric workspace and finalise NVSHMEM (collective over the group)."""
        if self._closed:
            return
        self._closed = True
        torch.cuda.synchronize()
        lib = _library()
        _check(lib.mixcc_nv_free(self.sym), "nvshmem_free")
        _check(lib.mixcc_nv_finalize(), "nvshmem_finalize")


_NVSHMEM: NvshmemRuntime | None = None


def get(group: dist.ProcessGroup | None, symmetric_bytes: int) -> NvshmemRuntime:
    """The process's NVSHMEM runtime, initialised over `group` on first use."""
    global _NVSHMEM
    if _ABANDONED:
        raise NvshmemError("NVSHMEM was abandoned after a failure (a peer timed out or "
                           "died); start a new process to run cross-node programs again")
    if _NVSHMEM is None or _NVSHMEM._closed:
        _NVSHMEM = NvshmemRuntime(group, symmetric_bytes)
        return _NVSHMEM
    if (_NVSHMEM.group or dist.group.WORLD) is not (group or dist.group.WORLD):
        raise NvshmemError("NVSHMEM is already initialised over another process group; one "
                           "group per process can run cross-node fused programs")
    if _NVSHMEM.symmetric_bytes != symmetric_bytes:
        raise ValueError(f"symmetric_bytes={symmetric_bytes} differs from the "
                         f"{_NVSHMEM.symmetric_bytes} NVSHMEM was set up with")
    return _NVSHMEM


def close() -> None:
    """Release NVSHMEM (collective); no-op when it was never used."""
    global _NVSHMEM
    if _NVSHMEM is not None:
        rt, _NVSHMEM = _NVSHMEM, None
        rt.close()


def abandon() -> None:
    """Forget NVSHMEM without its collective finalize (peers gone or failed): the
    process's exit releases it. A later cross-node collective in this process fails
    with a clear error instead of re-initialising over a broken instance."""
    global _NVSHMEM, _ABANDONED
    if _NVSHMEM is not None:
        _NVSHMEM, _ABANDONED = None, True


_ABANDONED = False
