"""The custom op a fused site becomes: `mixcc::fusion_chain(x, tensors, key)`.

`key` is a JSON text that holds everything the op needs (program, mesh, group name,
backend and options, the row width of the epilogue, the shape factor and the dtypes of
the tensors it writes), so a graph that the FX graph cache brings back in another
process still runs: the Collective is compiled from the key the first time a process
calls it, and every rank calls its sites in graph order, as compile() asks. The op is
functional: the tensors that the program's store statements write are new outputs
(returned after the program's output), never mutated inputs.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cache

import torch

from .. import torch_ops
from ..mesh import Mesh


@dataclass(frozen=True)
class Spec:
    """A decoded key."""

    program: str
    axes: tuple[tuple[str, int], ...]
    ranks_per_node: int
    group: str | None  # the mesh's process group by name; None: the default group
    backend: str
    options: tuple[tuple[str, object], ...]
    hidden: int  # > 0: x and the row tensors are viewed as [-1, hidden] (an epilogue)
    factor: tuple[int, int]  # output rows = input rows * num // den
    out_dtype: str
    read: tuple[tuple[str, bool], ...]  # (name, viewed as rows) for each input tensor
    written: tuple[tuple[str, str], ...]  # (name, dtype) for each stored tensor

    def key(self) -> str:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"mixcc::fusion_chain: unknown dtype {name!r} in the key")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@cache
def decode(key: str) -> Spec:
    d = json.loads(key)
    return Spec(program=d["program"], axes=tuple((a, int(s)) for a, s in d["axes"]),
                ranks_per_node=int(d["ranks_per_node"]), group=d["group"],
                backend=d["backend"], options=tuple((k, v) for k, v in d["options"]),
                hidden=int(d["hidden"]), factor=(int(d["factor"][0]), int(d["factor"][1])),
                out_dtype=d["out_dtype"], read=tuple((n, bool(r)) for n, r in d["read"]),
                written=tuple((n, t) for n, t in d["written"]))


_collectives: dict[str, object] = {}
_lock = threading.Lock()


def collective(key: str):
    """The Collective for `key`, compiled on first use in this process."""
    coll = _collectives.get(key)
    if coll is None:
        from ..api import compile as mixcc_compile

        spec = decode(key)
        group = None
        if spec.group is not None:
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(spec.group)
        with _lock:
            coll = _collectives.get(key)
            if coll is None:
                coll = mixcc_compile(spec.program, Mesh(spec.axes, spec.ranks_per_node),
                                     group=group, backend=spec.backend, **dict(spec.options))
                _collectives[key] = coll
    return coll


def clear() -> None:
    """Forget the Collectives compiled for keys (before destroying the process groups)."""
    _collectives.clear()


def _out_shape(spec: Spec, x: torch.Tensor) -> tuple:
    num, den = spec.factor
    if spec.hidden:
        return (x.numel() // spec.hidden * num // den, spec.hidden)
    return (x.shape[0] * num // den, *x.shape[1:])


@torch.library.custom_op("mixcc::fusion_chain", mutates_args=())
def fusion_chain(x: torch.Tensor, tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """Run the program of `key` on `x` with the named tensors `tensors` (in the key's read
    order); returns [output, *stored tensors]."""
    spec = decode(key)
    coll = collective(key)
    xx = x.contiguous()
    if spec.hidden:
        xx = xx.view(-1, spec.hidden)
    kw: dict[str, torch.Tensor] = {}
    for (name, rows), t in zip(spec.read, tensors, strict=True):
        kw[name] = t.contiguous().view(-1, spec.hidden) if rows else t
    shape = _out_shape(spec, x)
    written = [torch.empty(shape, dtype=_dtype(dt), device=x.device) for _, dt in spec.written]
    for (name, _), t in zip(spec.written, written, strict=True):
        kw[name] = t
    torch_ops._local.depth = getattr(torch_ops._local, "depth", 0) + 1
    try:
        out = coll(xx, **kw)
    finally:
        torch_ops._local.depth -= 1
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone()  # a custom op's output must not alias its input
    return [out, *written]


@fusion_chain.register_fake
def _fusion_chain_fake(x: torch.Tensor, tensors: list[torch.Tensor], key: str
                       ) -> list[torch.Tensor]:
    spec = decode(key)
    shape = _out_shape(spec, x)
    return [x.new_empty(shape, dtype=_dtype(spec.out_dtype)),
            *(x.new_empty(shape, dtype=_dtype(dt)) for _, dt in spec.written)]


__all__ = ["Spec", "clear", "collective", "decode", "dtype_name", "fusion_chain"]
