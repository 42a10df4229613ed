"""The launch ABI of generated stage modules: one definition that the template (a C
struct rendered from FIELDS) and the loader (a ctypes.Structure built from FIELDS) both
come from. Every module exports `mixcc_abi_version()`, which returns VERSION as rendered
into it; the loader refuses a module whose version differs (a stale cache entry or a
module built by another mixcc)."""

from __future__ import annotations

import ctypes
import functools
import hashlib

from ..errors import MixccError

# (name, C type). One struct serves every stage kind; a kind ignores the fields it does
# not use (the loader leaves them zero).
FIELDS: tuple[tuple[str, str], ...] = (
    ("in_ptr", "const void*"),
    ("out_ptr", "void*"),
    ("unit_elems", "long long"),  # elements per unit (rows / units x trailing dims)
    ("cols", "long long"),  # columns of every unit one block handles per chunk
    ("share_cap", "long long"),  # hierarchical: elements of one column-share slot
    ("n_chunks", "int"),
    ("nblocks", "int"),
    ("algo", "int"),  # intra: 0 one-shot, 1 two-shot, 2 push, 3 LL, 4 copy engines
    ("wide", "int"),  # 1: 16-byte accesses (unit_elems and both pointers allow them)
    ("depth", "int"),  # hierarchical: chunks in flight (1 = no pipelining)
    ("rank", "int"),
    ("peers", "char* const*"),  # IPC workspace base of every rank (0 where unmapped)
    ("epochs", "unsigned*"),  # [MAX_BLOCKS] IPC epochs, [MAX_BLOCKS] NVSHMEM sequence, CE word
    ("data_off", "long long"),
    ("region_bytes", "long long"),
    ("sym", "char*"),  # NVSHMEM symmetric workspace (this PE's address of it)
    ("sym_region_bytes", "long long"),
    ("timeout_ns", "unsigned long long"),
    ("err", "void*"),
    ("stream", "void*"),
    ("fp", "unsigned int"),  # debug mode: this call's fingerprint (0: off; mixcc/debug.py)
    ("pool_peers", "char* const*"),  # registered pool base of every rank (0: none)
    ("in_off", "long long"),  # one-shot: 0, or 1 + the input's offset in my pool / 16
    ("roles", "int"),  # LL: blocks per column chunk, one per output unit (0, 1: one in all)
    ("epi_h", "long long"),  # fused epilogue: the row width (0: off; mixcc/ops.py)
    *((f"epi{i}", "const void*") for i in range(6)),  # its tensors, by slot (ops.EPI_SLOTS)
)

_CTYPES = {
    "const void*": ctypes.c_void_p, "void*": ctypes.c_void_p, "char* const*": ctypes.c_void_p,
    "unsigned*": ctypes.c_void_p, "char*": ctypes.c_void_p, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
}

VERSION = int(hashlib.sha256(repr(FIELDS).encode()).hexdigest()[:7], 16)


def c_struct(name: str = "LaunchArgs") -> str:
    """The C definition of the struct, for the templates."""
    body = "\n".join(f"  {ctype} {field};" for field, ctype in FIELDS)
    return f"struct {name} {{\n{body}\n}};"


class LaunchArgs(ctypes.Structure):
    _fields_ = [(name, _CTYPES[ctype]) for name, ctype in FIELDS]


class AbiMismatch(MixccError, RuntimeError):
    """A loaded module was built for another launch ABI."""


@functools.cache
def _checked(lib: ctypes.CDLL) -> None:
    lib.mixcc_abi_version.restype = ctypes.c_int
    got = lib.mixcc_abi_version()
    if got != VERSION:
        raise AbiMismatch(f"module {lib._name} has launch ABI {got}, this mixcc expects "
                          f"{VERSION}: clear the kernel cache (MIXCC_CACHE_DIR)")


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check the module's ABI version and declare the signatures of `mixcc_launch` and
    `mixcc_blocks_per_sm` (the fewest blocks of its kernels one SM holds at once)."""
    _checked(lib)
    lib.mixcc_launch.argtypes = [ctypes.POINTER(LaunchArgs)]
    lib.mixcc_launch.restype = ctypes.c_int
    lib.mixcc_blocks_per_sm.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.mixcc_blocks_per_sm.restype = ctypes.c_int
    return lib


def bind_ce(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare an intra stage module's copy-engine entry points: `mixcc_ce_init()` and
    `mixcc_ce_launch(args, copies, n_copies, pool_bases)` (templates/stage_kernel.cu.j2)."""
    lib.mixcc_ce_init.argtypes = []
    lib.mixcc_ce_init.restype = ctypes.c_int
    lib.mixcc_ce_launch.argtypes = [ctypes.POINTER(LaunchArgs), ctypes.c_void_p, ctypes.c_int,
                                    ctypes.c_void_p]
    lib.mixcc_ce_launch.restype = ctypes.c_int
    return lib
