"""Diagnostic kept as a record (docs/PERF.md, 2026-11-30 second session), not part of mixcc:
mixcc's real stage kernels for allreduce(tp) on two GPUs driven from ONE process (peer
access instead of CUDA IPC, no torch.distributed), with variants of the rendered source,
to compare push and the one-shot with docs/perf/2026-11-30b_ar_probe.cu.

    MIXCC_CACHE_DIR=.mxcache python3 docs/perf/2026-11-30b_push_harness.py build  # CPU
    python3 docs/perf/2026-11-30b_push_harness.py run        # two GPUs, carry .mxcache

Variants: base (as rendered); nocheck (spins without the periodic error-record and blame
reads); notimer (nor the timeout's timer); contig (each block takes contiguous chunks
instead of chunk c at (c x grid + block)). The first run had base/nocheck/notimer at 16
and 128 MiB, the second (after the store fix) base/contig at 32 and 128 MiB."""

from __future__ import annotations

import ctypes
import statistics
import sys

import torch

import mixcc
from mixcc.codegen import abi, layout
from mixcc.codegen.build import build
from mixcc.codegen.plan import grid, intra_cols, push_cols
from mixcc.codegen.render import render_stage
from mixcc.codegen.spec import BuildSpec
from mixcc.paths import templates_dir
from mixcc.runtime import _ErrorRecord, native

MESH = mixcc.Mesh([("dp", 1), ("tp", 2)])
STAGE = mixcc.compile("allreduce(tp)", MESH, backend="reference").plan.stages[0]
DT = torch.bfloat16
INTERLEAVED = "col0 = ((long long)c * gridDim.x + block) * S;"
CONTIGUOUS = "col0 = ((long long)block * a.n_chunks + c) * S;"


def with_sync(src: str, *edits: tuple[str, str]) -> str:
    """The source with mixcc_sync.cuh inlined and edited."""
    hdr = (templates_dir() / "mixcc_sync.cuh").read_text().replace("#pragma once", "")
    for old, new in edits:
        hdr = hdr.replace(old, new)
    return src.replace('#include "mixcc_sync.cuh"', hdr)


def variants() -> dict[str, str]:
    base = render_stage(STAGE, DT)
    no_check = ("if ((++n & 1023) == 0) {", "if (false) {")
    no_timer = ("if (globaltimer_ns() - start > timeout_ns) {", "if (false) {")
    return {"base": base, "nocheck": with_sync(base, no_check),
            "notimer": with_sync(base, no_check, no_timer),
            "contig": base.replace(INTERLEAVED, CONTIGUOUS)}


def specs() -> dict[str, BuildSpec]:
    return {k: BuildSpec("stage", s, "sm_90a") for k, s in variants().items()}


class TwoGpus:
    """Workspaces, peer tables, epochs and error records of ranks 0 and 1 in one process."""

    def __init__(self) -> None:
        cudart = ctypes.CDLL("libcudart.so.13")
        for d in range(2):
            torch.cuda.set_device(d)
            rc = cudart.cudaDeviceEnablePeerAccess(1 - d, 0)
            assert rc in (0, 704), rc  # 704: already enabled
        self.ws_bytes = layout.DEFAULT_WORKSPACE_BYTES
        self.region = layout.region_bytes(self.ws_bytes)
        ws = [torch.zeros(self.ws_bytes, dtype=torch.uint8, device=d) for d in range(2)]
        self.ws, self.peers, self.epochs, self.errs = ws, [], [], []
        for d in range(2):
            p = torch.zeros(layout.MAX_RANKS, dtype=torch.int64)
            p[0], p[1] = ws[0].data_ptr(), ws[1].data_ptr()
            self.peers.append(p.to(d))
            self.epochs.append(torch.zeros(2 * layout.MAX_BLOCKS, dtype=torch.int32, device=d))
            host, dev = ctypes.c_void_p(), ctypes.c_void_p()
            torch.cuda.set_device(d)
            size = ctypes.sizeof(_ErrorRecord)
            assert native().mixcc_rt_host_alloc(size, ctypes.byref(host), ctypes.byref(dev)) == 0
            ctypes.memset(host, 0, size)
            self.errs.append(dev.value)

    def time(self, lib, algo: int, nbytes: int, cols: int | None = None, iters: int = 20,
             reps: int = 5) -> tuple[float, bool, tuple]:
        """Median us per call (max over the two GPUs), whether the result is exact, grid."""
        n = nbytes // 2
        xs = [torch.randn(n, device=d).to(DT) for d in range(2)]
        outs = [torch.empty_like(x) for x in xs]
        if cols is None:
            cols = (push_cols(STAGE, 2, self.region) if algo == 2
                    else intra_cols(STAGE, algo == 1, 2, self.region))
        nb, nch, cols = grid(n, cols, 2, layout.MAX_BLOCKS)
        args = []
        for d in range(2):
            a = abi.LaunchArgs()
            a.in_ptr, a.out_ptr, a.unit_elems = xs[d].data_ptr(), outs[d].data_ptr(), n
            a.cols, a.n_chunks, a.nblocks, a.algo, a.wide, a.rank = cols, nch, nb, algo, 1, d
            a.peers, a.epochs = self.peers[d].data_ptr(), self.epochs[d].data_ptr()
            a.data_off, a.region_bytes = layout.DATA_OFFSET, self.region
            a.timeout_ns, a.err = 10 * 10**9, self.errs[d]
            a.stream = torch.cuda.current_stream(d).cuda_stream
            args.append(a)

        def once() -> None:
            for d in range(2):
                torch.cuda.set_device(d)
                assert lib.mixcc_launch(ctypes.byref(args[d])) == 0

        once()
        for d in range(2):
            torch.cuda.synchronize(d)
        ref = (xs[0].float() + xs[1].to(0).float()).to(DT)
        ok = torch.equal(outs[0], ref) and torch.equal(outs[1].to(0), ref)
        ts = []
        for _ in range(reps):
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(2)]
            for d in range(2):
                torch.cuda.set_device(d)
                ev[d][0].record(torch.cuda.current_stream(d))
            for _ in range(iters):
                once()
            for d in range(2):
                torch.cuda.set_device(d)
                ev[d][1].record(torch.cuda.current_stream(d))
            for d in range(2):
                torch.cuda.synchronize(d)
            ts.append(max(ev[d][0].elapsed_time(ev[d][1]) for d in range(2)) * 1e3 / iters)
        return statistics.median(ts), ok, (nb, nch, cols)


def main() -> None:
    if sys.argv[1] == "build":
        for k, sp in specs().items():
            print(k, build(sp).path)
        return
    libs = {k: abi.bind(ctypes.CDLL(str(build(sp).path))) for k, sp in specs().items()}
    gpus = TwoGpus()
    for size in (32 << 20, 128 << 20):
        for name, lib in libs.items():
            for algo, label in ((0, "one-shot"), (2, "push")):
                t, ok, g = gpus.time(lib, algo, size)
                print(f"{size >> 20:4d} MiB {name:8s} {label:8s} {t:8.1f} us "
                      f"{size / t / 1e3:6.1f} GB/s ok={ok} grid={g}", flush=True)
        for name in ("base", "contig"):
            t, ok, g = gpus.time(libs[name], 2, size, cols=16384)
            print(f"{size >> 20:4d} MiB {name} push cols 16384 {t:8.1f} us ok={ok} grid={g}")


if __name__ == "__main__":
    main()
