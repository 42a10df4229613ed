"""Python half of the shared runtime (native half: runtime/mixcc_runtime.cu).

One Runtime per (process group, device), shared by every fused collective compiled
on that group: a fixed-size workspace per rank (independent of message size), the
workspaces of the peers on the same host mapped through CUDA IPC handles exchanged
with an object collective of the group (no files, no sockets), per-block epoch and
NVSHMEM sequence counters on the device (graph-safe) and a host-mapped error record
that device-side timeouts fill. A watchdog thread per runtime polls that record, logs a
failure as soon as it happens and, when asked, aborts the process (docs/DESIGN.md,
"Reliability"). Cross-node stages add NVSHMEM (mixcc/nvshmem.py).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import socket
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from . import debug
from .codegen import layout
from .codegen.build import Built, build_module, device_arch
from .errors import CollectiveMismatch, CollectiveTimeout
from .paths import runtime_source_dir


def build_native(arch: str) -> Built:
    """Build (or find in the cache) the native runtime library for `arch`."""
    src = (runtime_source_dir() / "mixcc_runtime.cu").read_text()
    return build_module(src, "runtime", arch)


@functools.lru_cache(maxsize=1)
def native() -> ctypes.CDLL:
    """The runtime library, built on first use for this GPU (torch's CUDA loaded first)."""
    torch.cuda.init()
    lib = ctypes.CDLL(str(build_native(device_arch()).path))
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs = {
        "mixcc_rt_alloc": [i, sz, ctypes.POINTER(vp)],
        "mixcc_rt_free": [i, vp],
        "mixcc_rt_ipc_handle": [i, vp, ctypes.c_char_p],
        "mixcc_rt_ipc_open": [i, ctypes.c_char_p, ctypes.POINTER(vp)],
        "mixcc_rt_ipc_close": [i, vp],
        "mixcc_rt_host_alloc": [sz, ctypes.POINTER(vp), ctypes.POINTER(vp)],
        "mixcc_rt_host_free": [vp],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.mixcc_rt_error_string.argtypes = [ctypes.c_int]
    lib.mixcc_rt_error_string.restype = ctypes.c_char_p
    return lib


def cuda_check(rc: int, what: str) -> None:
    if rc != 0:
        msg = native().mixcc_rt_error_string(rc).decode()
        raise RuntimeError(f"mixcc runtime: {what} failed: CUDA error {rc} ({msg})")


class _ErrorRecord(ctypes.Structure):  # mirrors mixcc::ErrorRecord in mixcc_sync.cuh
    _fields_ = [("status", ctypes.c_int), ("rank", ctypes.c_int), ("peer", ctypes.c_int),
                ("stage", ctypes.c_int), ("block", ctypes.c_int), ("epoch", ctypes.c_uint),
                ("mine_fp", ctypes.c_uint), ("peer_fp", ctypes.c_uint), ("via", ctypes.c_int),
                ("blame_ipc", ctypes.c_void_p), ("blame_sym", ctypes.c_void_p),
                ("claim", ctypes.c_int)]


ABORT_ENV = "MIXCC_ABORT_ON_ERROR"
# The watchdog's polling period: a failure is logged (or the process aborted) at most this
# long after the device recorded it; reading the host-mapped record costs ~nothing.
WATCHDOG_PERIOD_S = 0.05
log = logging.getLogger("mixcc")


def abort_enabled(option: bool | None) -> bool:
    """The compile option when given, else MIXCC_ABORT_ON_ERROR (1, true or yes)."""
    if option is not None:
        return bool(option)
    return os.environ.get(ABORT_ENV, "").strip().lower() in ("1", "true", "yes")


class _Block:
    """One allocation of a registered pool, shown to torch through
    __cuda_array_interface__: torch's tensor (and every view of it) keeps this object
    alive, and its range returns to the pool once the last of them is gone."""

    def __init__(self, pool: Pool, offset: int, nbytes: int):
        self.pool, self.offset, self.nbytes = pool, offset, nbytes
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (pool.base + offset, False),
            "version": 3, "strides": None}

    def __del__(self) -> None:
        try:
            self.pool.release(self.offset, self.nbytes)
        except Exception:  # interpreter shutdown: the process exit frees the memory
            pass


class Pool:
    """A runtime's registered pool: device memory that every peer of the node has mapped,
    so that a one-shot stage reads an input lying in it in place (docs/DESIGN.md,
    "Registered buffers"). First-fit allocation in ALIGN-byte steps. A released range is
    reused only once the work queued on the releasing stream is done (an event), as
    torch's allocator does; one released during CUDA graph capture is never reused (the
    graph may replay). The memory is freed once the runtime closed and no tensor over it
    remains."""

    ALIGN = 256

    def __init__(self, device: int, nbytes: int):
        if not 0 < nbytes <= layout.MAX_POOL_BYTES:
            raise ValueError(f"pool_bytes must be in 1..{layout.MAX_POOL_BYTES}, got {nbytes}")
        self.device, self.nbytes = device, self.rounded(nbytes)
        ptr = ctypes.c_void_p()
        cuda_check(native().mixcc_rt_alloc(device, self.nbytes, ctypes.byref(ptr)),
                   "cudaMalloc of the registered pool")
        self.base: int = ptr.value
        self._free = [(0, self.nbytes)]  # sorted (offset, size) ranges
        self._pending: list[tuple[int, int, object]] = []  # released, work maybe queued
        self._live = 0  # blocks handed out and not yet released
        self._closed = self._kept = False
        self._lock = threading.Lock()
        _POOLS[self.base] = self

    @classmethod
    def rounded(cls, nbytes: int) -> int:
        """`nbytes` rounded up to whole ALIGN-byte steps (at least one)."""
        return max(cls.ALIGN, -(-nbytes // cls.ALIGN) * cls.ALIGN)

    def contains(self, ptr: int, nbytes: int) -> str | None:
        """'in' if [ptr, ptr + nbytes) lies inside the pool, 'partly' if it overlaps its
        edge, None if it does not touch it."""
        lo, hi = self.base, self.base + self.nbytes
        if ptr >= hi or ptr + nbytes <= lo:
            return None
        return "in" if lo <= ptr and ptr + nbytes <= hi else "partly"

    def _take(self, need: int) -> int | None:
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                self._free[i:i + 1] = [(off + need, size - need)] if size > need else []
                self._live += 1
                return off
        return None

    def _settle(self, wait: bool) -> None:
        """Return released ranges whose queued work is done (all of them, waiting, with
        `wait`) to the free list, coalesced."""
        keep = []
        for off, size, event in self._pending:
            if event is not None and (wait or event.query()):
                if wait:
                    event.synchronize()
                self._free.append((off, size))
            else:
                keep.append((off, size, event))
        self._pending = keep
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self._free = merged

    def allocate(self, nbytes: int) -> _Block:
        need = self.rounded(nbytes)
        with self._lock:
            if self._closed:
                raise RuntimeError("the registered pool's runtime is closed")
            self._settle(wait=False)
            off = self._take(need)
            if off is None and self._pending:
                self._settle(wait=True)
                off = self._take(need)
            if off is not None:
                return _Block(self, off, need)
        raise ValueError(f"the registered pool ({self.nbytes} bytes) has no free range of "
                         f"{need} bytes: free mixcc.empty tensors, or pass a larger "
                         "pool_bytes to the first mixcc.empty of the group")

    def _release_event(self) -> object:
        """An event after the work queued so far on the current stream, or None while that
        stream is capturing a graph (the range then stays out of use)."""
        if torch.cuda.is_current_stream_capturing():
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def release(self, offset: int, nbytes: int) -> None:
        event = self._release_event()
        with self._lock:
            self._pending.append((offset, nbytes, event))
            self._live -= 1
            done = self._closed and self._live == 0
        if done:
            self._free_memory()

    def close(self, keep: bool) -> None:
        """The runtime closes: no new block; the memory goes once no tensor uses it (never
        after a failure, `keep`: a surviving peer may still read it)."""
        with self._lock:
            self._closed, self._kept = True, keep
            done = self._live == 0
        if done:
            self._free_memory()

    def _free_memory(self) -> None:
        if not self.base or self._kept or torch.cuda.is_current_stream_capturing():
            return  # kept for a surviving peer, or freed with the process
        for _, _, event in self._pending:
            if event is not None:
                event.synchronize()
        _POOLS.pop(self.base, None)
        native().mixcc_rt_free(self.device, self.base)
        self.base = 0


_POOLS: dict[int, Pool] = {}  # base address -> live pool, of every runtime of the process


def pool_of(ptr: int, nbytes: int) -> tuple[Pool | None, str | None]:
    """The live registered pool that [ptr, ptr + nbytes) touches, and how ('in' or
    'partly'), or (None, None)."""
    for pool in list(_POOLS.values()):
        how = pool.contains(ptr, nbytes)
        if how:
            return pool, how
    return None, None


class Runtime:
    """Workspace, peer mappings, epochs and error record of one (group, device).

    Use `get_runtime`; `close()` (collective when the group is still alive) releases
    the mappings and memory; a Runtime is also a context manager.
    """

    def __init__(self, group: dist.ProcessGroup | None, device: int, workspace_bytes: int,
                 timeout_s: float):
        self.group, self.device, self.workspace_bytes = group, device, workspace_bytes
        self.timeout_s = timeout_s  # of the last launch, for the error message
        self._key: tuple[int, int] | None = None
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        if self.world > layout.MAX_RANKS:
            raise ValueError(f"a runtime serves at most {layout.MAX_RANKS} ranks, "
                             f"the group has {self.world}")
        if layout.region_bytes(workspace_bytes) < 512:
            raise ValueError(f"workspace_bytes={workspace_bytes} is too small")
        lib = native()
        self.region_bytes = layout.region_bytes(workspace_bytes)
        self._closed = False
        self._opened: list[int] = []
        self._ws: int | None = None
        self._err_host: int | None = None
        ws = ctypes.c_void_p()
        cuda_check(lib.mixcc_rt_alloc(device, workspace_bytes, ctypes.byref(ws)), "cudaMalloc")
        self._ws = ws.value
        handle = ctypes.create_string_buffer(64)
        cuda_check(lib.mixcc_rt_ipc_handle(device, self._ws, handle), "cudaIpcGetMemHandle")
        props = torch.cuda.get_device_properties(device)
        # Under an MPS client limit (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) the SM count a
        # rank sees is already its own share; otherwise ranks on one GPU split its SMs.
        own_share = bool(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"))
        mine = (handle.raw, socket.gethostname(), str(getattr(props, "uuid", device)),
                props.multi_processor_count, own_share)
        if self.world > 1:
            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, mine, group=group)
        else:
            everyone = [mine]
        self.hosts = [e[1] for e in everyone]
        # Blocks that spin on each other must all be resident at once: the SMs of a GPU
        # are shared by every rank of this group on it. The same value on every rank.
        devices = [(e[1], e[2]) for e in everyone]
        self.ranks_on_device = max(devices.count(d) for d in devices)
        self.sms_per_rank = min(e[3] if e[4] else e[3] // self.ranks_on_device
                                for e in everyone)
        ptrs = []
        for r, (h, host, *_) in enumerate(everyone):
            if r == self.rank:
                ptrs.append(self._ws)
                continue
            if host != self.hosts[self.rank]:  # another host: reached through NVSHMEM only
                ptrs.append(0)
                continue
            p = ctypes.c_void_p()
            cuda_check(lib.mixcc_rt_ipc_open(device, h, ctypes.byref(p)),
                       f"cudaIpcOpenMemHandle of rank {r}")
            self._opened.append(p.value)
            ptrs.append(p.value)
        dev = torch.device("cuda", device)
        self._ptrs = ptrs
        self.peers = torch.tensor(ptrs, dtype=torch.int64, device=dev)
        # [MAX_BLOCKS] IPC epochs, [MAX_BLOCKS] NVSHMEM chunk sequence numbers, then the
        # copy-engine mode's word (templates/stage_kernel.cu.j2, ce_start_kernel)
        self.epochs = torch.zeros(2 * layout.MAX_BLOCKS + 1, dtype=torch.int32, device=dev)
        # the registered pool (open_pool, mixcc.empty): none until asked for
        self.pool: Pool | None = None
        self._pool_opened: list[int] = []
        self.pool_peers = torch.zeros(self.world, dtype=torch.int64, device=dev)
        self.pool_bases = (ctypes.c_longlong * self.world)()  # the same, on the host
        self.pool_same_size = False
        host, dptr = ctypes.c_void_p(), ctypes.c_void_p()
        cuda_check(lib.mixcc_rt_host_alloc(ctypes.sizeof(_ErrorRecord), ctypes.byref(host),
                                           ctypes.byref(dptr)), "cudaHostAlloc")
        self._err_host, self.err_dev = host.value, dptr.value
        self._err = _ErrorRecord.from_address(self._err_host)
        self._err.blame_ipc = self._ws + layout.BLAME_OFFSET
        self.abort_on_error = False  # set by get_runtime (any collective may ask)
        self.calls = 0  # debug mode: the call count that goes into fingerprints
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="mixcc-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def failed(self) -> bool:
        """Whether a device-side wait of this runtime timed out or found a mismatch."""
        return self._err is not None and self._err.status != 0

    def error(self) -> Exception | None:
        """The exception the recorded failure stands for, or None."""
        e = self._err
        if e is None or not e.status:
            return None
        if e.status == 2:
            return CollectiveMismatch(e.rank, e.peer, debug.describe(e.mine_fp),
                                      debug.describe(e.peer_fp, e.mine_fp))
        return CollectiveTimeout(e.rank, e.peer, STAGE_NAMES[e.stage], e.block, e.epoch,
                                 self.timeout_s, e.via - 1 if e.via else None)

    def set_symmetric_blame(self, address: int) -> None:
        """Where this rank publishes whom it blames for NVSHMEM peers to read."""
        self._err.blame_sym = address

    def _watch(self) -> None:
        """Watchdog: log a failure the moment the device records it (asynchronous error
        handling, as NCCL's); with abort_on_error, abort the process after logging."""
        while not self._stop.wait(WATCHDOG_PERIOD_S):
            err = self.error()
            if err is None:
                continue
            abort = self.abort_on_error
            log.error("mixcc watchdog (rank %d, pid %d): %s The output of the failed call "
                      "and of every later call on this runtime is undefined.%s",
                      self.rank, os.getpid(), err,
                      " Aborting the process (abort_on_error / MIXCC_ABORT_ON_ERROR)."
                      if abort else "")
            if abort:
                for h in log.handlers + logging.getLogger().handlers:
                    h.flush()
                sys.stderr.flush()
                os.abort()
            return

    def check(self) -> None:
        """Raise CollectiveTimeout if a device-side wait of this runtime timed out, or
        CollectiveMismatch if debug mode found mismatched calls."""
        if self._closed:
            raise RuntimeError("this mixcc runtime is closed")
        err = self.error()
        if err is not None:
            raise err

    def check_node(self, members: list[int]) -> None:
        """Raise unless every rank of `members` (this rank's node per the mesh) is mapped."""
        missing = [r for r in members if int(self._ptrs[r]) == 0]
        if missing:
            raise RuntimeError(
                f"the mesh puts ranks {missing} on the node of rank {self.rank}, but they run "
                f"on other hosts ({sorted({self.hosts[r] for r in missing})}); set the "
                "mesh's ranks_per_node to the ranks per host")

    def open_pool(self, nbytes: int) -> Pool:
        """Create this runtime's registered pool of `nbytes` and map every peer's
        (collective: every rank of the group calls it once, at the same point of its call
        sequence). All or nothing: if any rank fails to allocate or map, every rank
        releases what it made and raises the same error."""
        if self.pool is not None:
            return self.pool
        lib = native()
        pool, handle, err = None, b"", ""
        try:
            pool = Pool(self.device, nbytes)
            h = ctypes.create_string_buffer(64)
            cuda_check(lib.mixcc_rt_ipc_handle(self.device, pool.base, h),
                       "cudaIpcGetMemHandle of the registered pool")
            handle = h.raw
        except (RuntimeError, ValueError) as e:
            err = f"rank {self.rank}: {e}"
        everyone = self._gather((handle, err, pool.nbytes if pool is not None else 0))
        errors = [e for _, e, _ in everyone if e]
        ptrs, opened = [], []
        if not errors:
            try:
                for r, (h, _, _) in enumerate(everyone):
                    if r == self.rank:
                        ptrs.append(pool.base)
                    elif int(self._ptrs[r]) == 0:  # another host: never read in place
                        ptrs.append(0)
                    else:
                        p = ctypes.c_void_p()
                        cuda_check(lib.mixcc_rt_ipc_open(self.device, h, ctypes.byref(p)),
                                   f"cudaIpcOpenMemHandle of rank {r}'s registered pool")
                        opened.append(p.value)
                        ptrs.append(p.value)
            except RuntimeError as e:
                err = f"rank {self.rank}: {e}"
            errors = [e for e in self._gather(err) if e]
        if errors:
            for p in opened:
                lib.mixcc_rt_ipc_close(self.device, p)
            if pool is not None:
                pool.close(keep=False)
            raise RuntimeError("mixcc: the registered pool could not be made on every rank: "
                               + "; ".join(errors))
        self._pool_opened = opened
        self.pool_peers.copy_(torch.tensor(ptrs, dtype=torch.int64))
        self.pool_bases[:] = ptrs
        # the copy-engine mode reads a peer's pool at this rank's offset (checked on the
        # device before the data is used), so only where no pool is smaller than this one
        self.pool_same_size = all(n == pool.nbytes for _, _, n in everyone)
        self.pool = pool
        return pool

    def _gather(self, obj: object) -> list:
        """`obj` of every rank of the group (an object collective), in rank order."""
        if self.world == 1:
            return [obj]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def close(self, barrier: bool = True) -> bool:
        """Release peer mappings and memory; returns whether this runtime failed or found
        a failed peer while closing (then NVSHMEM must not be finalised either).

        First this rank's queued kernels finish (after a failure they return at once).
        With `barrier` (while the group lives) the ranks then meet through the group's
        store, so that no peer still reads this workspace when it is freed: each rank
        posts whether its runtime failed. A failed rank posts and goes on (a peer may be
        dead: it waits for nobody); a healthy rank waits for every rank's post (at most
        CLOSE_WAIT_S) and keeps its workspace when any rank failed or did not post, so a
        rank that completed a call another timed out on is not left waiting. A kept
        workspace is released by the process exit: a surviving peer may still write into
        it. Without `barrier` only a failure seen here keeps the workspace."""
        if self._closed:
            return False
        self._closed = True
        lib = native()
        failures = []
        keep_workspace = True
        try:
            torch.cuda.synchronize(self.device)  # queued kernels return once one failed
            keep_workspace = self.failed()  # decided after the kernels ran, not before
            if barrier and self.world > 1 and dist.is_initialized():
                keep_workspace = self._meet(keep_workspace)
        finally:
            self._stop.set()
            self._watchdog.join()  # it may log the failure the synchronize revealed
            for p in self._opened:
                failures.append(("cudaIpcCloseMemHandle", lib.mixcc_rt_ipc_close(self.device, p)))
            self._opened = []
            for p in self._pool_opened:
                failures.append(("cudaIpcCloseMemHandle", lib.mixcc_rt_ipc_close(self.device, p)))
            self._pool_opened = []
            if self.pool is not None:
                self.pool.close(keep=keep_workspace)
                self.pool = None
            if self._ws and not keep_workspace:
                failures.append(("cudaFree", lib.mixcc_rt_free(self.device, self._ws)))
            self._ws = None
            if self._err_host:
                self._err = None
                failures.append(("cudaFreeHost", lib.mixcc_rt_host_free(self._err_host)))
                self._err_host = None
            if self._key is not None:
                _RUNTIMES.pop(self._key, None)
        for what, rc in failures:  # everything was released first; now report
            cuda_check(rc, what)
        return keep_workspace

    def _meet(self, failed: bool) -> bool:
        """The closing meeting (see close); returns whether to keep the workspace."""
        store = _store()
        if store is None:  # no store to meet through: a barrier, skipped after a failure
            if failed:
                return True
            try:
                dist.barrier(group=self.group)
                return False
            except Exception as e:  # a peer is gone
                log.warning("mixcc: rank %d: the closing barrier failed (%s)", self.rank, e)
                return True
        name = getattr(self.group or dist.group.WORLD, "group_name", "world")
        n = _CLOSES[name] = _CLOSES.get(name, 0) + 1  # the same count on every rank
        key = f"mixcc/close/{name}/{n}"
        store.set(f"{key}/{self.rank}", "1" if failed else "0")
        if failed:
            return True
        try:
            keys = [f"{key}/{r}" for r in range(self.world)]
            store.wait(keys, timedelta(seconds=CLOSE_WAIT_S))
            return any(store.get(k) != b"0" for k in keys)
        except Exception as e:  # a peer never came: keep what it might still touch
            log.warning("mixcc: rank %d: not every rank reached close() within %g s (%s); "
                        "keeping this rank's workspace until the process exits", self.rank,
                        CLOSE_WAIT_S, e)
            return True

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# How long a healthy rank waits in close() for the other ranks to post theirs: they may
# still be finishing other work; a rank that never comes (dead) costs this much once.
CLOSE_WAIT_S = 60.0
_CLOSES: dict[str, int] = {}  # closes per group name: the store keys of the meeting


def _store():
    """The default process group's store (the meeting place of close), or None."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except Exception:
        return None


# Stage codes of the device error record (templates/mixcc_sync.cuh).
STAGE_NAMES = ("input", "result", "inter-node data", "inter-node credit", "push data",
               "push credit", "LL data", "copy-engine words", "epilogue row sum")

_RUNTIMES: dict[tuple[int, int], Runtime] = {}


def existing_runtime(group: dist.ProcessGroup | None, device: int) -> Runtime | None:
    """The runtime of (group, device) if one was created, whatever its workspace size."""
    return _RUNTIMES.get((id(group if group is not None else dist.group.WORLD), device))


def get_runtime(group: dist.ProcessGroup | None, device: int, workspace_bytes: int,
                timeout_s: float, abort_on_error: bool = False) -> Runtime:
    """The runtime of (group, device), created on first use (a collective call)."""
    key = (id(group if group is not None else dist.group.WORLD), device)
    rt = _RUNTIMES.get(key)
    if rt is None:
        rt = Runtime(group, device, workspace_bytes, timeout_s)
        rt._key = key
        _RUNTIMES[key] = rt
    elif rt.workspace_bytes != workspace_bytes:
        raise ValueError(
            f"workspace_bytes={workspace_bytes} differs from the {rt.workspace_bytes} of the "
            "runtime already serving this group: one fixed workspace per (group, device)"
        )
    rt.abort_on_error = rt.abort_on_error or abort_on_error
    return rt


def close_all(barrier: bool = True) -> None:
    """Close every runtime (call on every rank before destroying the process groups)."""
    from . import nvshmem

    failed = False
    errors = []
    for rt in list(_RUNTIMES.values()):
        try:
            failed |= rt.close(barrier=barrier)
        except RuntimeError as e:  # release the others first
            failed = True
            errors.append(e)
    _RUNTIMES.clear()
    # NVSHMEM's free and finalize are collective: not without the peers, and not after a
    # failure (a peer may be dead); the process's exit releases it then.
    if failed:
        nvshmem.abandon()
    elif barrier:
        nvshmem.close()
    if errors:
        raise errors[0]


def _close_at_exit() -> None:
    # Peers may be gone already: no barrier. The CUDA context may be tearing down too,
    # so a failed release here is not worth a traceback at interpreter exit.
    try:
        close_all(barrier=False)
    except RuntimeError:
        pass


atexit.register(_close_at_exit)
