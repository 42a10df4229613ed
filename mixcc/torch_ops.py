"""torch.compile support: a collective call is one opaque custom op, `mixcc::run`.

While torch.compile traces, `Collective.__call__` hands over to `traced_call`, which
emits `torch.ops.mixcc.run(x, handle)` instead of tracing into process groups and
kernel launches, so a model that calls `coll(x)` compiles with `fullgraph=True`. The
fake (meta) implementation gives the output shape (`coll.output_shape`); the real one
runs the collective eagerly. `handle` names the Collective in a registry of weak
references; every Collective gets its handle when it is built, as a plain int attribute,
so Dynamo reads it as a constant (guarded on the collective) without calling anything:
passing the Collective itself to a constant-folded function fails in torch 2.11's Dynamo
(AsPythonConstantNotImplementedError). `out=` is
the op's result copied into `out` (the op itself never aliases or mutates its input).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .api import Collective

_registry: dict[int, weakref.ref] = {}
_next_handle = itertools.count(1)
_lock = threading.Lock()
_local = threading.local()  # .depth: real implementations running on this thread


def register(coll: Collective) -> int:
    """A new registry handle for `coll` (Collective.__init__ stores it)."""
    with _lock:
        h = next(_next_handle)
        _registry[h] = weakref.ref(coll, lambda _, h=h: _registry.pop(h, None))
    return h


def handle_of(coll: Collective) -> int:
    """The registry handle of `coll`."""
    return coll._torch_op_handle


def _lookup(handle: int) -> Collective:
    ref = _registry.get(handle)
    coll = ref() if ref is not None else None
    if coll is None:
        raise RuntimeError(f"mixcc::run: no collective with handle {handle} (the Collective "
                           "was garbage collected; keep it alive while the model runs)")
    return coll


@torch.compiler.assume_constant_result
def in_op_impl() -> bool:
    """Whether the real implementation of mixcc::run is running on this thread: then
    Collective.__call__ must take its eager path, even inside a compile session."""
    return getattr(_local, "depth", 0) > 0


@torch.library.custom_op("mixcc::run", mutates_args=())
def run(x: torch.Tensor, handle: int) -> torch.Tensor:
    """Run collective `handle` on this rank's `x`; a new tensor of its output shape."""
    coll = _lookup(handle)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        y = coll(x)  # in_op_impl() is True: the eager path, never this op again
    finally:
        _local.depth -= 1
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        y = y.clone()  # a custom op's output must not alias its input
    return y


@run.register_fake
def _run_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    coll = _lookup(handle)
    if coll.dtype is not None and x.dtype != coll.dtype:
        raise TypeError(f"x.dtype must be {coll.dtype} (compiled for it), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (rows), got a 0-d tensor")
    return x.new_empty(coll.output_shape(x.shape))


@torch.library.custom_op("mixcc::run_epilogue", mutates_args=("written",))
def run_epilogue(x: torch.Tensor, written: list[torch.Tensor], read: list[torch.Tensor],
                 handle: int) -> torch.Tensor:
    """Run collective `handle` with an epilogue: `written` are the tensors its store
    statements update in place, `read` the others, each in Collective.epilogue_names
    order; a new tensor of its output shape and dtype."""
    coll = _lookup(handle)
    w_names, r_names = coll.epilogue_names()
    kw = dict(zip(w_names, written, strict=True)) | dict(zip(r_names, read, strict=True))
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        return coll(x, **kw)  # the eager path: a fresh output tensor
    finally:
        _local.depth -= 1


@run_epilogue.register_fake
def _run_epilogue_fake(x: torch.Tensor, written: list[torch.Tensor], read: list[torch.Tensor],
                       handle: int) -> torch.Tensor:
    from .ops import output_dtype

    coll = _lookup(handle)
    return x.new_empty(coll.output_shape(x.shape),
                       dtype=output_dtype(coll.ir.epilogue, x.dtype))


def traced_call(coll: Collective, x: torch.Tensor, out: torch.Tensor | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """What `coll(x, out, **tensors)` records while torch.compile traces."""
    if tensors:
        w_names, r_names = coll.epilogue_names()
        y = torch.ops.mixcc.run_epilogue(x, [tensors[n] for n in w_names],
                                         [tensors[n] for n in r_names], coll._torch_op_handle)
    else:
        y = torch.ops.mixcc.run(x, coll._torch_op_handle)
    if out is None:
        return y
    if out.shape != y.shape:
        raise ValueError(f"out.shape must be {tuple(y.shape)}, got {tuple(out.shape)}")
    return out.copy_(y)


__all__ = ["handle_of", "in_op_impl", "register", "run", "run_epilogue", "traced_call"]
