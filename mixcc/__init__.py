"""mixcc: a declarative collective compiler for mixed tensor/data parallelism.

    import mixcc
    mesh = mixcc.Mesh({"dp": 2, "tp": 4})
    coll = mixcc.compile("allreduce(tp); allgather(dp)", mesh)
    out = coll(x)
"""

from . import presets
from .api import Collective, compile
from .errors import CollectiveMismatch, CollectiveTimeout, CompileError, MixccError, ParseError
from .mesh import Mesh

__all__ = [
    "Collective",
    "CollectiveMismatch",
    "CollectiveTimeout",
    "CompileError",
    "Mesh",
    "MixccError",
    "ParseError",
    "compile",
    "presets",
]
__version__ = "0.1.0"
