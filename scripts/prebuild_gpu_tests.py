"""Fill the kernel cache with the modules the GPU suite (tests/gpu) loads, nvcc in
parallel, so that a time-limited run on a remote GPU machine spends its time running
tests (carry the cache, CONTRIBUTING.md):

    MIXCC_CACHE_DIR=.mxcache python3 scripts/prebuild_gpu_tests.py --arch sm_90a

Worlds 2 and 4 one node, 2 and 4 ranks on two simulated nodes (NVSHMEM, when its wheel is
installed), the NaN, block-cap, epilogue and reliability programs, then the negative control's
broken modules (`--no-mutate` skips them). MIXCC_SEED and MIXCC_FUZZ_PROGRAMS must be
those of the test run (the fuzzed programs depend on them; shapes do not).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests", "gpu"), os.path.join(HERE, "..", "tests"),
                os.path.join(HERE, "..")]

from gpu_helpers import ladder  # noqa: E402
from gpu_helpers.ranks import env_int  # noqa: E402
from test_block_cap_gpu import BLOCK_CAP_PROGRAM  # noqa: E402
from test_epilogue_gpu import AR_AG, LAYER, QUANT, STORE_AG, WORLD8  # noqa: E402
from test_nan_gpu import MESHES, PROGRAMS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=None, help="e.g. sm_90a (default: this machine's GPU)")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--nodes", default="2:1,4:2", help="world:ranks_per_node pairs ('' none)")
    ap.add_argument("--no-mutate", action="store_true")
    args = ap.parse_args()
    from mixcc import nvshmem

    worlds = [int(w) for w in args.worlds.split(",")]
    nodes: dict[int, list[int]] = {}
    for pair in filter(None, args.nodes.split(",") if nvshmem.available() is None else []):
        w, rpn = (int(v) for v in pair.split(":"))
        nodes.setdefault(w, []).append(rpn)
    extra = [(p, MESHES[w], w) for w in MESHES for p in PROGRAMS]
    extra += [(BLOCK_CAP_PROGRAM, [("dp", 2), ("tp", 4)], 8)]
    # the epilogue tests' programs (test_epilogue_gpu.py): two GPUs, and four ranks
    extra += [(LAYER, [("dp", 1), ("tp", 2)], 2), (QUANT, [("dp", 1), ("tp", 2)], 2),
              (AR_AG, [("dp", 2), ("tp", 1)], 2), (STORE_AG, [("dp", 2), ("tp", 1)], 2)] \
        if 2 in worlds else []
    extra += [(prog, [("dp", 2), ("tp", 2)], rpn) for prog in (LAYER, AR_AG)
              for rpn in (4, 2)] + [(QUANT, [("dp", 1), ("tp", 4)], 4)] if 4 in worlds else []
    # the epilogue in the hierarchical kernel: the two GPUs as two nodes, two nodes of two
    extra += [(LAYER, [("dp", 1), ("tp", 2)], 1), (AR_AG, [("dp", 2), ("tp", 1)], 1)] \
        if 1 in nodes.get(2, []) else []
    extra += [(QUANT, [("dp", 1), ("tp", 4)], 2)] if 2 in nodes.get(4, []) else []
    # world 8 under MPS: one node, and two nodes of four (with NVSHMEM)
    extra += [(prog, axes, rpn) for prog, axes in WORLD8 for rpn in ((8, 4) if nodes else (8,))]
    for w in worlds:  # reliability runs
        extra += [("allreduce(tp)", [("dp", 1), ("tp", w)], w),
                  ("allgather(tp)", [("dp", 1), ("tp", w)], w)]
        extra += [("allreduce(world)", [("w", w)], w // 2)] if w // 2 in nodes.get(w, []) else []
    cfg = {"seed": env_int("MIXCC_SEED", 1), "fuzz_programs": env_int("MIXCC_FUZZ_PROGRAMS", 1)}
    ladder.prebuild(worlds, nodes, cfg, args.arch, extra)
    if not args.no_mutate:
        ladder.prebuild(worlds, {}, {**cfg, "mutate": True}, args.arch)


if __name__ == "__main__":
    main()
