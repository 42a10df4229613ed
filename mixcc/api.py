"""Public API: compile a program for a mesh and a process group, call it on tensors."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import debug, fused, nvshmem, ops, precision, torch_ops, tune
from .codegen import layout
from .codegen.layout import DEFAULT_SYMMETRIC_BYTES, DEFAULT_WORKSPACE_BYTES
from .codegen.lower import lower
from .codegen.plan import HierStage, Plan
from .errors import CompileError
from .expert import Combine, Dispatch, compile_ep
from .ir.build import build, check_dtype, check_rows
from .ir.nodes import IR
from .ir.parser import parse
from .ir.passes import optimize
from .mesh import Mesh
from .overlap import overlaps, overlaps_partly
from .presets import resolve
from .reference import ReferenceRunner
from .tuning import thresholds

BACKENDS = ("auto", "reference", "fused")


def _group_size(group: dist.ProcessGroup | None) -> int | None:
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_world_size(group)


class Collective:
    """A compiled program. Call it as `out = coll(x)` or `coll(x, out=buf)`.

    Every rank of the group must compile the same programs in the same order and
    call them in the same order (as with NCCL communicators).
    """

    def __init__(self, program: str, mesh: Mesh, ir: IR, optimized: IR, plan: Plan, *,
                 dtype: torch.dtype | None, group: dist.ProcessGroup | None, backend: str,
                 options: dict):
        self.program, self.mesh, self.dtype, self.group = program, mesh, dtype, group
        self.backend = backend
        self.ast = parse(program)
        self.ir, self.optimized_ir, self.plan = ir, optimized, plan
        self.options = options
        self._sums = precision.sums(optimized.ops)  # the program adds ranks' values
        self._reference: ReferenceRunner | None = None
        self._fused: dict[torch.dtype, fused.FusedRunner] = {}
        self._auto: dict[torch.dtype, str] = {}  # backend "auto" picks, per CUDA dtype
        self._dtype_ok: set[torch.dtype] = set()
        # validated call signatures -> (backend, output shape, fast call or None): a
        # repeated call with the same kind of tensors skips the checks (host overhead)
        self._seen: dict[tuple, tuple] = {}  # signature -> (backend, shape, fast call)
        self._torch_op_handle = torch_ops.register(self)  # names it in mixcc::run
        if debug.enabled(options.get("debug")):
            debug.register(program, len(plan.stages))
        if _group_size(group) is not None:
            self.rank = dist.get_rank(group)
            self._reference = ReferenceRunner(plan, self.rank, group)
        else:
            self.rank = 0

    # -- shapes -----------------------------------------------------------------
    def output_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        """Output shape for an input of `shape`; ValueError if its rows do not divide."""
        shape = tuple(shape)
        if len(shape) == 0:
            raise ValueError("shape must have at least one dimension (rows), got ()")
        rows = shape[0]
        if rows % self.ir.granularity:
            raise ValueError(
                f"x.shape[0] (rows) = {rows} must be divisible by {self.ir.granularity} "
                f"for program {self.program!r}"
            )
        factor = self.ir.row_factor  # a Fraction: integer arithmetic is cheaper per call
        return torch.Size((rows * factor.numerator // factor.denominator, *shape[1:]))

    # -- explain ----------------------------------------------------------------
    def _epilogue_kernel(self) -> str:
        """Which kernel of the last stage runs a fused epilogue, and from what."""
        if isinstance(self.plan.stages[-1], HierStage):
            return ("hierarchical kernel (in its step D, from the local owners' fp32 shares; "
                    "auto runs NCCL and the torch ops from the size its table gives) ")
        if self.options.get("algorithm") == "two_shot":
            return "two-shot kernel (in its gather, from the owners' fp32 shares) "
        return "one-shot kernel "

    def _auto_lines(self, key: thresholds.Key | None, tune_arch: str | None):
        """explain's per-stage lines of auto's choice by size (fused.auto_lines), with the
        tuning table's entries of each stage where the dtype and build arch are known."""
        resolved = thresholds.resolve(key)
        elem = torch.empty((), dtype=self.dtype).element_size() if self.dtype else None
        entries = tune.load() if self.dtype is not None and tune_arch else {}
        dname = str(self.dtype).removeprefix("torch.")

        def lines(i: int, stage) -> list[str]:
            tuned = {}
            if entries:
                prefix = tune.stage_prefix(fused.tuning_key(stage, self.dtype), dname,
                                           self.mesh.world_size, tune_arch)
                tuned = {int(k[len(prefix):]): v for k, v in entries.items()
                         if k.startswith(prefix) and k[len(prefix):].isdigit()}
            return fused.auto_lines(i, stage, self.plan, resolved, elem, tuned,
                                    str(tune.table_path()), self.ir.epilogue)

        return resolved, lines

    def explain(self, key: thresholds.Key | None = None, tune_arch: str | None = None
                ) -> str:
        """The program, its IR, its plan and what auto runs each stage with at each size,
        from the thresholds of `key` (arch, topology, world: None, the built-in rule) and
        the tuning table's entries for build arch `tune_arch` (e.g. "sm_90a")."""
        elem = torch.empty((), dtype=self.dtype).element_size() if self.dtype else None
        resolved, auto = self._auto_lines(key, tune_arch)
        ast = "\n".join(
            f"  {s}  @ line {s.pos.line}, column {s.pos.column}"
            for s in (*self.ast.stmts, *self.ast.epilogue)
        )
        epi = ""
        if self.ir.epilogue:
            why = fused.epilogue_refusal(self.plan, self.ir.epilogue)
            how = (f"the fused backend runs it after the kernels as torch ops: {why}" if why
                   else "the fused backend runs it inside the last stage's "
                   + self._epilogue_kernel()
                   + f"(rows kept whole per block) for rows of at most {ops.EPI_MAX_HIDDEN} "
                   "elements in 16-byte packs whose workspace region holds a row, with "
                   "named tensors of x's dtype (misaligned or aliasing ones through "
                   "copies); otherwise as torch ops after the kernels, from their fp32 "
                   "result")
            epi = ("\nepilogue: " + "; ".join(str(e) for e in self.ir.epilogue)
                   + f" (row-wise in fp32 after the last stage; the reference backend runs "
                   f"it as torch ops; {how})")
        return (
            f"program: {self.program}\nmesh: {self.mesh}\n"
            f"AST:\n{ast}\n"
            f"IR: {self.ir}\n"
            f"IR after passes: {self.optimized_ir}\n"
            f"auto's thresholds: {resolved.source}\n"
            f"plan ({'one node: IPC only' if self.plan.one_node else 'crosses nodes'}):\n"
            + self.plan.describe(elem, self.options["workspace_bytes"],
                                 self.options["symmetric_bytes"],
                                 self.options["pipeline_depth"], auto)
            + epi + "\n"
            + precision.explain(self.plan, self.optimized_ir, self.options,
                                fused.hier_nccl_min_bytes(self.plan, self.ir.epilogue,
                                                          resolved.values),
                                resolved.values.row_split_min_bytes
                                if resolved.values.ll_epi_max_bytes else None)
        )

    # -- calls ------------------------------------------------------------------
    def _choose(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        if not x.is_cuda:
            return "reference"
        pick = self._auto.get(x.dtype)
        if pick is None:
            reason = fused.unavailable_reason(self.plan, self.mesh, self.options, x.dtype)
            if reason and not self.plan.one_node and nvshmem.available():
                _warn_once(f"mixcc: {self.program!r} runs on the reference backend (chains of "
                           f"torch.distributed calls): {reason}")
            elif reason and self.options.get("batch_invariant") and self._sums:
                _warn_once(f"mixcc: batch_invariant=True does not hold for {self.program!r}: "
                           f"the reference backend runs it (NCCL's reduction order) because "
                           f"{reason}")
            pick = self._auto[x.dtype] = "reference" if reason else "fused"
        return pick

    def _by_size(self, backend: str, x: torch.Tensor) -> str:
        """auto on a validated CUDA input: the reference backend (NCCL) where the tuning
        table measured it faster at this size, else `backend`."""
        if self.backend == "auto" and backend == "fused" and self._fused_runner(
                x).prefers_reference(x.numel() * x.element_size()):
            return "reference"
        return backend

    def _expected_device(self, backend: str, x: torch.Tensor) -> torch.device:
        if backend == "fused" or x.is_cuda:
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _check(self, x: object, out: object | None, backend: str) -> torch.Size:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.dtype is not None and x.dtype != self.dtype:
            raise TypeError(f"x.dtype must be {self.dtype} (compiled for it), got {x.dtype}")
        if x.dtype not in self._dtype_ok:
            try:
                check_dtype(x.dtype, {o.redop for o in self.ir.ops if o.coll != "allgather"})
            except CompileError as e:
                raise TypeError(f"x.dtype: {e}") from None
            self._dtype_ok.add(x.dtype)
        if x.dim() == 0:
            raise ValueError("x must have at least one dimension (rows), got a 0-d tensor")
        if not x.is_contiguous():
            raise ValueError("x must be contiguous; call x.contiguous() first")
        dev = self._expected_device(backend, x)
        if x.device != dev:
            raise ValueError(
                f"x.device must be {dev} (the device of the process group / current CUDA "
                f"device for backend {backend!r}), got {x.device}"
            )
        shape = self.output_shape(x.shape)
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
            want = ops.output_dtype(self.ir.epilogue, x.dtype)
            if out.dtype != want:
                same = " (same as x)" if want == x.dtype else " (the program ends in quant)"
                raise TypeError(f"out.dtype must be {want}{same}, got {out.dtype}")
            if out.shape != shape:
                raise ValueError(f"out.shape must be {tuple(shape)}, got {tuple(out.shape)}")
            if out.device != x.device:
                raise ValueError(f"out.device must be {x.device} (same as x), got {out.device}")
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
            _check_overlap(x, out)
        return shape

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None,
                 **tensors: torch.Tensor) -> torch.Tensor:
        """Run the program on this rank's `x`; returns `out` (allocated when None). The
        tensors an epilogue names are keyword arguments (`coll(x, residual=r, weight=w)`)."""
        if tensors or self.ir.epilogue:
            return self._call_epilogue(x, out, tensors)
        if torch.compiler.is_compiling():  # torch.compile: one custom op, see torch_ops.py
            if not torch_ops.in_op_impl():
                return torch_ops.traced_call(self, x, out)
        if type(x) is torch.Tensor and (out is None or type(out) is torch.Tensor):
            # the current device too: a CUDA call launches on it (checked the first time)
            cur = _current_device() if x.is_cuda else -1
            sig = (x.shape, x.dtype, x.device, cur, x.is_contiguous(), None) if out is None \
                else (x.shape, x.dtype, x.device, cur, x.is_contiguous(), out.shape,
                      out.dtype, out.device, out.is_contiguous())
            seen = self._seen.get(sig)
            if seen is not None:  # validated before: only the overlap of x and out is new
                if out is not None:
                    _check_overlap(x, out)
                if seen[2] is not None:
                    return seen[2](x, out)
                backend, shape = seen[0], seen[1]
            else:
                backend = self._choose(x)
                shape = self._check(x, out, backend)
                backend = self._by_size(backend, x)
                fast = None
                if backend == "fused":
                    fast = self._fused_runner(x).fast_call(x, shape)
                if len(self._seen) >= 256:  # many shapes: forget the oldest
                    del self._seen[next(iter(self._seen))]
                self._seen[sig] = (backend, shape, fast)
        else:
            backend = self._choose(x) if isinstance(x, torch.Tensor) else self.backend
            shape = self._check(x, out, backend)
            backend = self._by_size(backend, x)
        return self._execute(x, out, backend, shape)

    def _execute(self, x: torch.Tensor, out: torch.Tensor | None, backend: str,
                 shape: torch.Size) -> torch.Tensor:
        """The collectives on validated input, on `backend`."""
        if backend == "fused":
            return self._fused_runner(x)(x, out, shape)
        if self._reference is None:
            if self.mesh.world_size != 1:
                raise RuntimeError(
                    "torch.distributed is not initialized: call "
                    "torch.distributed.init_process_group before running a collective"
                )
            y = x.clone()
        elif x.is_cuda:  # NCCL: its own order, in the dtype (explain says so)
            y = self._reference.run(x)
        else:  # gloo: in fp32 where the program sums 16-bit values, rounded once
            y = self._reference.run(precision.accumulation_input(x, self._sums))
            y = y.to(x.dtype)
        if out is None:
            return y.reshape(shape)
        out.copy_(y.reshape(shape))
        return out

    def _call_epilogue(self, x: torch.Tensor, out: torch.Tensor | None,
                       tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A call of a program with epilogue statements: on the fused backend inside the
        last stage's kernel where FusedRunner.epilogue_hidden and epilogue_call allow it,
        else the collectives and then the epilogue as torch ops in fp32 (mixcc/ops.py)."""
        if not self.ir.epilogue:
            raise TypeError(f"unexpected keyword tensor(s) {sorted(tensors)}: the program "
                            f"{self.program!r} has no epilogue statement")
        if torch.compiler.is_compiling() and not torch_ops.in_op_impl():
            return torch_ops.traced_call(self, x, out, tensors)
        backend = self._choose(x) if isinstance(x, torch.Tensor) else self.backend
        shape = self._check(x, out, backend)
        self._check_tensors(x, out, shape, tensors)
        backend = self._by_size(backend, x)
        out_dtype = ops.output_dtype(self.ir.epilogue, x.dtype)
        if backend == "fused":
            runner = self._fused_runner(x)
            hidden = runner.epilogue_hidden(shape, tensors)
            if hidden:  # the last stage's grid keeps rows whole, on every rank
                if out is None:
                    out = torch.empty(shape, dtype=out_dtype, device=x.device)
                return runner.epilogue_call(x, out, shape, hidden, tensors)
            # the torch ops below start from the collective's fp32 result (one rounding)
            xw = precision.accumulation_input(x, self._sums)
            y = self._fused_runner(xw)(xw, None, shape)
        else:
            y = self._execute(precision.accumulation_input(x, self._sums), None,
                              backend, shape)
        res = ops.run_epilogue(y, self.ir.epilogue, tensors, out_dtype)
        if out is None:
            return res
        out.copy_(res)
        return out

    def epilogue_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(names the epilogue writes, names it only reads), each in program order."""
        written = tuple(dict.fromkeys(e.name for e in self.ir.epilogue
                                      if ops.EPILOGUES[e.op].writes))
        read = tuple(n for n in dict.fromkeys(e.name for e in self.ir.epilogue)
                     if n not in written)
        return written, read

    def _check_tensors(self, x: torch.Tensor, out: torch.Tensor | None, shape: torch.Size,
                       tensors: dict[str, torch.Tensor]) -> None:
        """Every keyword tensor the epilogue names, before anything runs."""
        names = dict.fromkeys(e.name for e in self.ir.epilogue)
        unknown = sorted(set(tensors) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword tensor(s) {unknown}; the program names "
                            f"{list(names)}")
        for e in self.ir.epilogue:
            entry = ops.EPILOGUES[e.op]
            if e.name not in tensors:
                raise TypeError(f"missing keyword tensor {e.name!r} (for {e})")
            t = tensors[e.name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{e.name} must be a torch.Tensor (for {e}), got "
                                f"{type(t).__name__}")
            if t.device != x.device:
                raise ValueError(f"{e.name}.device must be {x.device} (same as x), got "
                                 f"{t.device}")
            if entry.needs_float32:
                if t.dtype != torch.float32 or t.numel() != 1:
                    raise ValueError(f"{e.name} must be a float32 tensor of one element (the "
                                     f"scale of {e}), got {t.dtype} with {t.numel()} elements")
                continue
            if not t.is_floating_point():
                raise TypeError(f"{e.name}.dtype must be a floating-point dtype (for {e}), "
                                f"got {t.dtype}")
            want = entry.shape(tuple(shape))
            if isinstance(want, str):
                raise ValueError(f"{e}: {want}")
            if tuple(t.shape) != want:
                raise ValueError(f"{e.name}.shape must be {want} (for {e}), got "
                                 f"{tuple(t.shape)}")
            if entry.writes:
                for other, what in ((x, "x"), (out, "out")):
                    if other is not None and overlaps_partly(t, other):
                        raise ValueError(f"{e.name} (written by {e}) overlaps {what} "
                                         f"partially: pass {what} itself or a separate tensor")
        stored: list[tuple[str, object]] = []  # (name, statement) of each store so far
        for e in self.ir.epilogue:
            if ops.EPILOGUES[e.op].writes:
                stored.append((e.name, e))
                continue
            for name, st in stored:  # fused kernels read every tensor before any store
                if name != e.name and overlaps(tensors[name], tensors[e.name]):
                    raise ValueError(f"{e.name} (read by {e}) overlaps {name}, which {st} "
                                     "writes before it: pass separate tensors")

    def _fused_runner(self, x: torch.Tensor) -> fused.FusedRunner:
        runner = self._fused.get(x.dtype)
        if runner is None:
            check_fused(self.program, self.plan, self.mesh, self.options, x.dtype)
            runner = self._fused[x.dtype] = fused.FusedRunner(
                self.plan, self.mesh, self.group, self.options, x.dtype, self.program,
                self.ir.epilogue)
        return runner

    def check(self) -> None:
        """Raise mixcc.CollectiveTimeout if a device-side wait of this collective's runtime
        timed out, or mixcc.CollectiveMismatch if debug mode found mismatched calls (calls
        check this themselves before launching)."""
        for runner in self._fused.values():
            runner.rt.check()

    def close(self) -> None:
        """Drop this collective's kernels (the shared runtime stays with its group;
        mixcc.close_all() releases it)."""
        self._fused.clear()
        self._seen.clear()


def _current_device() -> int:
    get = getattr(torch._C, "_cuda_getDevice", None)  # the cheap private accessor, if any
    return get() if get is not None else torch.cuda.current_device()


def check_fused_options(workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                        symmetric_bytes: int = DEFAULT_SYMMETRIC_BYTES,
                        pipeline_depth: int = 2) -> None:
    """compile()'s bounds on the fused backend's workspaces and pipeline depth
    (ValueError); `mixcc bench` checks its flags of those names with it."""
    if workspace_bytes < layout.MIN_WORKSPACE_BYTES:
        raise ValueError(f"workspace_bytes must be >= {layout.MIN_WORKSPACE_BYTES}, got "
                         f"{workspace_bytes}")
    if symmetric_bytes < layout.min_symmetric_bytes():
        raise ValueError(f"symmetric_bytes must be >= {layout.min_symmetric_bytes()}, got "
                         f"{symmetric_bytes}")
    if pipeline_depth not in (1, 2, 3):
        raise ValueError(f"pipeline_depth must be 1, 2 or 3, got {pipeline_depth!r}")


def _check_overlap(x: torch.Tensor, out: torch.Tensor) -> None:
    """In place only on the same storage range: out is x itself or does not overlap it."""
    if overlaps_partly(x, out):
        raise ValueError("out must be x itself (in place) or not overlap x")


def compile(  # noqa: A001 - the public name the contract asks for
    program: str,
    mesh: Mesh,
    *,
    dtype: torch.dtype | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    rows: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    algorithm: str = "auto",
    pipeline_depth: int = 2,
    symmetric_bytes: int = DEFAULT_SYMMETRIC_BYTES,
    timeout_s: float = 5.0,
    max_blocks: int | None = None,
    multicast: bool = False,
    debug: bool | None = None,
    abort_on_error: bool | None = None,
    batch_invariant: bool | None = None,
) -> Collective | Dispatch | Combine:
    """Compile `program` (text or preset name) for `mesh` over `group` (default WORLD).

    Mesh rank r is rank r of `group`. `rows`, when given, is checked at compile time.
    `backend`: "auto" (fused where it applies, else reference), "reference" or "fused".
    Fused options: `workspace_bytes` (IPC workspace per rank, fixed), `algorithm` ("auto",
    "one_shot", "two_shot", "push", "ll"; one-node stages; auto also runs a size on the
    reference backend where the tuning table measured NCCL faster), `pipeline_depth`
    (chunks in flight in a cross-node stage, 1-3; 1 = no overlap), `symmetric_bytes`
    (NVSHMEM workspace per rank, fixed), `timeout_s` for every device-side wait,
    `max_blocks` (further capped so that the blocks of every rank sharing a GPU fit on it
    at once).
    `debug` (default: MIXCC_DEBUG) makes every fused call carry a fingerprint of
    (collective, shape, dtype, call count) that ranks compare at their first barrier:
    mismatched calls raise CollectiveMismatch naming both sides. `abort_on_error`
    (default: MIXCC_ABORT_ON_ERROR) makes the runtime's watchdog abort the process when a
    device-side wait times out (it always logs it). A timed-out call's output, and that
    of every later call on the runtime, is undefined.
    `multicast=True` asks for the NVLink multicast transport: it is refused when
    NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 or NVSHMEM_DISABLE_NVLS=1
    is set, and is not built otherwise; mixcc never creates a multicast object.
    `batch_invariant` (default: MIXCC_BATCH_INVARIANT) makes the fused backend's results
    bitwise independent of the number of rows, the algorithm, the chunking, the blocks and
    the placement of ranks on nodes; auto then never hands a sum to NCCL (docs/DESIGN.md,
    "Precision").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if algorithm not in ("auto", *fused.ALGORITHMS):
        raise ValueError(f"algorithm must be auto, one_shot, two_shot, push or ll, got "
                         f"{algorithm!r}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a mixcc.Mesh, got {type(mesh).__name__}")
    size = _group_size(group)
    if size is not None and size != mesh.world_size:
        raise ValueError(
            f"mesh has {mesh.world_size} ranks but the process group has {size}; "
            "mesh rank r must be group rank r"
        )
    check_fused_options(workspace_bytes, symmetric_bytes, pipeline_depth)
    text = resolve(program)
    ast = parse(text)
    if ast.ep is not None:  # dispatch / combine: mixcc/expert.py
        return compile_ep(ast, mesh, dtype=dtype, group=group, backend=backend,
                          timeout_s=timeout_s)
    ir = build(ast, mesh, dtype)
    if rows is not None:
        check_rows(ir, rows, text)
    optimized = optimize(ir, mesh)
    batch_invariant = precision.batch_invariant_enabled(batch_invariant)
    plan = lower(optimized, mesh, batch_invariant)
    options = {
        "workspace_bytes": workspace_bytes,
        "algorithm": algorithm,
        "pipeline_depth": pipeline_depth,
        "symmetric_bytes": symmetric_bytes,
        "timeout_s": float(timeout_s),
        "max_blocks": max_blocks,
        "multicast": multicast,
        "debug": debug,
        "abort_on_error": abort_on_error,
        "batch_invariant": batch_invariant,
    }
    coll = Collective(text, mesh, ir, optimized, plan, dtype=dtype, group=group,
                      backend=backend, options=options)
    if backend == "fused" or multicast:
        check_fused(text, plan, mesh, options, dtype)
    return coll


def check_fused(program: str, plan: Plan, mesh: Mesh, options: dict,
                dtype: torch.dtype | None) -> None:
    """Raise ValueError with the reason when the fused backend cannot run the program."""
    reason = fused.unavailable_reason(plan, mesh, options, dtype)
    if reason is not None:
        raise ValueError(f"backend='fused' cannot run {program!r}: {reason}")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


__all__ = ["Collective", "compile"]
