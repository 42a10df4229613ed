"""mixcc: a declarative collective compiler for mixed tensor/data parallelism.

    import mixcc
    mesh = mixcc.Mesh({"dp": 2, "tp": 4})
    coll = mixcc.compile("allreduce(tp); allgather(dp)", mesh)
    out = coll(x)
"""

from . import presets, runtime
from .api import Collective, compile
from .buffers import empty
from .errors import CollectiveMismatch, CollectiveTimeout, CompileError, MixccError, ParseError
from .mesh import Mesh


def close_all(barrier: bool = True) -> None:
    """Release every fused runtime of this process (IPC workspaces, peer mappings, NVSHMEM).
    Call it on every rank before destroying the process groups; after a peer died it
    works without that peer. Nothing to do when no fused collective ever ran."""
    runtime.close_all(barrier)


def __getattr__(name: str):
    # The fusion pass imports torch._inductor: loaded on first use only.
    if name in ("FusionPass", "compile_model"):
        from . import fusion

        return getattr(fusion, name)
    raise AttributeError(f"module 'mixcc' has no attribute {name!r}")


__all__ = [
    "Collective",
    "CollectiveMismatch",
    "CollectiveTimeout",
    "CompileError",
    "FusionPass",
    "Mesh",
    "MixccError",
    "close_all",
    "ParseError",
    "compile",
    "compile_model",
    "empty",
    "presets",
]
__version__ = "0.1.0"
