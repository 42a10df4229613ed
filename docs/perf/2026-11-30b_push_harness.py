"""Diagnostic kept as a record (docs/PERF.md, 2026-11-30 second session), not part of mixcc:
mixcc's real stage kernels for allreduce(tp) on two GPUs driven from ONE process (peer
access instead of CUDA IPC, no torch.distributed), with variants of the rendered source,
to compare push and the one-shot with docs/perf/2026-11-30b_ar_probe.cu.

    MIXCC_CACHE_DIR=.mxcache python3 docs/perf/2026-11-30b_push_harness.py build  # CPU
    python3 docs/perf/2026-11-30b_push_harness.py run        # two GPUs, carry .mxcache

Variants: base (as rendered); nocheck (spins without the periodic error-record and blame
reads); notimer (nor the timeout's timer); contig (each block takes contiguous chunks
instead of chunk c at (c x grid + block)). The first run had base/nocheck/notimer at 16
and 128 MiB, the second (after the store fix) base/contig at 32 and 128 MiB.

Added after those runs, not run yet (`run next`): noread (push's receivers do not wait
for the local senders to have read the chunk's input: out of place only); barsync (push's
role barriers are bar.sync, not bar.red.or); send3 (three quarters of the threads send);
fp32 (the module and data in fp32); and the one-shot with 128 and 256 KiB regions (a
larger workspace: fewer chunks, so fewer barriers). Their run (third session): only fp32
moved push (498 -> 416 us at 128 MiB), and send3 slowed it (614): the receivers' reduce
bounds it. `build c` / `run c` (after reductions store through mixcc::store_f32, paired
conversions): base, perelem (the per-value conversions of before), unr4 (four packs per
thread in flight in two-term reduces), recv58 (push: 5/8 of the threads receive) and
fp32, for push and the one-shot."""

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
NEXT = len(sys.argv) > 2 and sys.argv[2] == "next"
THIRD = len(sys.argv) > 2 and sys.argv[2] == "c"
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
    out = {"base": base, "nocheck": with_sync(base, no_check),
           "notimer": with_sync(base, no_check, no_timer),
           "contig": base.replace(INTERLEAVED, CONTIGUOUS)}
    if THIRD:
        out = {"base": base, "fp32": render_stage(STAGE, torch.float32),
               "perelem": base.replace(
                   "mixcc::store_f32<T, VEC>(dst + (long long)(v0 + u * NT) * VEC, acc[u]);",
                   "mixcc::Pack<T, VEC> r;\n#pragma unroll\n for (int e = 0; e < VEC; ++e) "
                   "r.v[e] = mixcc::from_f32<T>(acc[u][e]);\n mixcc::store<T, VEC>(dst + "
                   "(long long)(v0 + u * NT) * VEC, r);"),
               "unr4": base.replace("constexpr int UNR = B <= 2 ? 2 : 1;",
                                    "constexpr int UNR = B <= 2 ? 4 : 1;"),
               "recv58": base.replace("SEND_THREADS = THREADS / 2,",
                                      "SEND_THREADS = THREADS / 8 * 3,")}
        for k in ("perelem", "unr4", "recv58"):
            assert out[k] != base, k
        return out
    if NEXT:
        out["noread"] = base.replace("while (chunks_read <= c && !failed) {", "while (false) {")
        out["barsync"] = base.replace("if (bar_any(BAR_SEND, SEND_THREADS, failed)) return;",
                                      "bar_sync(BAR_SEND, SEND_THREADS);").replace(
            "if (bar_any(BAR_RECV, RECV_THREADS, failed)) return;",
            "bar_sync(BAR_RECV, RECV_THREADS);")
        out["send3"] = base.replace("SEND_THREADS = THREADS / 2,",
                                    "SEND_THREADS = THREADS / 4 * 3,")
        out["fp32"] = render_stage(STAGE, torch.float32)
        for k in ("noread", "barsync", "send3", "fp32"):
            assert out[k] != base, k
    return out


def specs() -> dict[str, BuildSpec]:
    return {k: BuildSpec("stage", s, "sm_90a") for k, s in variants().items()}


class TwoGpus:
    """Workspaces, peer tables, epochs and error records of ranks 0 and 1 in one process."""

    def __init__(self, ws_bytes: int = layout.DEFAULT_WORKSPACE_BYTES) -> None:
        cudart = ctypes.CDLL("libcudart.so.13")
        for d in range(2):
            torch.cuda.set_device(d)
            rc = cudart.cudaDeviceEnablePeerAccess(1 - d, 0)
            assert rc in (0, 704), rc  # 704: already enabled
            cudart.cudaGetLastError()  # clear 704, which torch would otherwise raise next
        self.ws_bytes = ws_bytes
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
             reps: int = 5, dt: torch.dtype = DT) -> tuple[float, bool, tuple]:
        """Median us per call (max over the two GPUs), whether the result is exact, grid."""
        es = torch.empty((), dtype=dt).element_size()
        n = nbytes // es
        xs = [torch.randn(n, device=d).to(dt) for d in range(2)]
        outs = [torch.empty_like(x) for x in xs]
        if cols is None:
            cols = (push_cols(STAGE, es, self.region) if algo == 2
                    else intra_cols(STAGE, algo == 1, es, self.region))
        nb, nch, cols = grid(n, cols, es, layout.MAX_BLOCKS)
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
        ref = (xs[0].float() + xs[1].to(0).float()).to(dt)
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
    if THIRD:
        for size in (32 << 20, 128 << 20):
            for name in libs:
                dt = torch.float32 if name == "fp32" else DT
                for algo, label in ((2, "push"), (0, "one-shot")):
                    if name == "recv58" and algo == 0:
                        continue
                    t, ok, g = gpus.time(libs[name], algo, size, dt=dt)
                    print(f"{size >> 20:4d} MiB {name:8s} {label:8s} {t:8.1f} us ok={ok} "
                          f"grid={g}", flush=True)
        return
    if NEXT:
        for size in (32 << 20, 128 << 20):
            for name in ("base", "noread", "barsync", "send3", "fp32"):
                dt = torch.float32 if name == "fp32" else DT
                t, ok, g = gpus.time(libs[name], 2, size, dt=dt)
                print(f"{size >> 20:4d} MiB {name:8s} push {t:8.1f} us ok={ok} grid={g}",
                      flush=True)
        del gpus
        for region_kib in (128, 256):
            big = TwoGpus(layout.DATA_OFFSET + 2 * layout.NSETS * layout.MAX_BLOCKS
                          * (region_kib << 10))
            for size in (32 << 20, 128 << 20):
                t, ok, g = big.time(libs["base"], 0, size)
                print(f"{size >> 20:4d} MiB one-shot, {region_kib} KiB regions {t:8.1f} us "
                      f"ok={ok} grid={g}", flush=True)
            del big
        return
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
