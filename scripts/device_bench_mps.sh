#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200), issue 8 item 1: `mixcc bench` on one GPU
# with 2, 4 and 8 processes under MPS, which mixcc bench starts and stops itself (this
# script starts none). bf16, hidden 1024 (2 KiB rows: every size exact), device time by
# CUDA graphs, each repeat the max over ranks, median and min/max over repeats:
#  1. allreduce(world), 16 KiB..64 MiB per rank, worlds 2, 4, 8: fused (auto, one_shot,
#     two_shot; out-of-place and in place) vs torch symmetric memory one_shot / two_shot,
#     with the copy into the symmetric buffer and kernel only (*_nocopy);
#  2. allreduce_allgather and reducescatter_allreduce, 16 KiB..64 MiB, worlds 4, 8: fused
#     vs the program as separate mixcc calls (`separate`);
#  3. the same presets with nccl1 (gloo on CPU tensors on one GPU: timing cpu, never
#     compared with GPU rows), 16 KiB..1 MiB (gloo is slow past that).
# Writes $OUT/bench_mps.{csv,json}, $OUT/bench_mps_<program>_w<world>.png (one per program
# and world), each step's own files and log; prints the table and a summary.
#
#   bash scripts/device_bench_mps.sh [--quick]     # carry [".whl"]; ".mxcache" optional
#
# --quick: a smoke test (worlds 2, 4 / 4, sizes to 256 KiB, 5 calls x 3 repeats).
# Kernels are built first, one prebuild per mesh in parallel (the bench then hits the
# cache); prebuilding into .mxcache elsewhere (--arch sm_90a) and carrying it saves that.
set -u -o pipefail
source "$(dirname "$0")/device_env.sh"
# The full sweep takes more than one 10-minute device call (measured 2026-11-25: worlds 2
# and 4 of the allreduce step alone about 8 minutes). Split it with STEPS (allreduce,
# combined, nccl1) and AR_WORLDS / C_WORLDS, e.g. STEPS=allreduce AR_WORLDS=8, or shorten
# it with REPEATS (default 10), MIN and MAX (the smallest and largest size, default 16K
# and 64M) and AR_BACKENDS (the allreduce step's --backend list); --quick keeps its own
# REPEATS and MAX.
if [ "${1:-}" = "--quick" ]; then
  AR_WORLDS=${AR_WORLDS:-2,4}; C_WORLDS=${C_WORLDS:-4}; MAX=256K; NCCL1_MAX=64K
  TIMES=(--iters 5 --repeats 3)
else
  AR_WORLDS=${AR_WORLDS:-2,4,8}; C_WORLDS=${C_WORLDS:-4,8}; MAX=${MAX:-64M}; NCCL1_MAX=1M
  TIMES=(--iters 20 --repeats "${REPEATS:-10}")
fi
STEPS=${STEPS:-allreduce,combined,nccl1}
nvidia-smi -L; nvcc --version | tail -1
python3 -c "import torch; print('torch', torch.__version__)"
pipe=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}
[ -e "$pipe/control" ] && echo "MPS is already running ($pipe): mixcc bench uses it as it is"
SECONDS=0
for tp in 1 2 4; do  # the default mesh of worlds 2, 4, 8: dp=2,tp=N/2
  progs=(--program 'allreduce(world)')
  [ "$tp" -gt 1 ] && progs+=(--program allreduce_allgather --program reducescatter_allreduce
                             --program 'allreduce(tp)' --program 'allgather(dp)'
                             --program 'reducescatter(dp)')
  python3 -m mixcc prebuild --mesh "dp=2,tp=$tp" --dtype bfloat16 "${progs[@]}" \
    > "$OUT/prebuild_tp$tp.log" 2>&1 &
done
wait
echo "prebuild: ${SECONDS} s ($(cat "$OUT"/prebuild_tp*.log | grep -c 'built in') built)"

step() {  # name, then mixcc bench arguments
  local name=$1; shift
  case ",$STEPS," in *",${name#bench_mps_},"*) ;; *) echo "$name: skipped (STEPS)"; return;; esac
  python3 -m mixcc bench --dtype bfloat16 --hidden 1024 --min-bytes "${MIN:-16K}" "${TIMES[@]}" \
    --out "$OUT/$name" "$@" 2>&1 | grep --line-buffered -v "^\[\|FutureWarning\|warnings.warn" \
    > "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc at ${SECONDS} s"
  [ "$rc" -eq 0 ] || tail -n 20 "$OUT/$name.log"
}
step bench_mps_allreduce --world-size "$AR_WORLDS" --program 'allreduce(world)' \
  --max-bytes "$MAX" --backend "${AR_BACKENDS:-fused,fused:one_shot,fused:two_shot,symm_one_shot,symm_two_shot,symm_one_shot_nocopy,symm_two_shot_nocopy}"
step bench_mps_combined --world-size "$C_WORLDS" --program allreduce_allgather \
  --program reducescatter_allreduce --max-bytes "$MAX" --backend fused,separate
step bench_mps_nccl1 --world-size "$C_WORLDS" --program allreduce_allgather \
  --program reducescatter_allreduce --max-bytes "$NCCL1_MAX" --backend nccl1
grep -h "^skip:\|^note:\|^warning:" "$OUT"/bench_mps_*.log | sort -u

python3 - "$OUT" <<'EOF'
import math, os, sys
from mixcc import bench
out = sys.argv[1]
rows = []
for name in ("allreduce", "combined", "nccl1"):
    path = os.path.join(out, f"bench_mps_{name}.json")
    if os.path.exists(path):
        rows += bench.read_rows(path)
if not rows:
    sys.exit("no rows")
bench.add_ratios(rows)
for path in bench.write_outputs(rows, os.path.join(out, "bench_mps")):
    print("wrote", path)
r0 = rows[0]
print(f"\n{r0.device}, {r0.setup}, {r0.dtype}; time: median of {r0.repeats} repeats of "
      f"{r0.iters} calls (each the max over ranks), min/max over repeats")
print(f"{'world':>5} " + bench.header())
for r in rows:
    print(f"{r.world:>5} " + bench.format_row(r))
print("\nfused rows: time / best baseline (min .. max over sizes; < 1 is faster)")
for (prog, world), rs in bench.plot_groups(rows).items():
    for be in bench.FUSED:
        for mode in ("oop", "ip"):
            ratios = [r.ratio for r in rs if r.backend == be and r.mode == mode
                      and math.isfinite(r.ratio)]
            wrong = sum(max(r.errors, 0) for r in rs if r.backend == be and r.mode == mode)
            if ratios:
                print(f"  {prog:<34} w{world} {be:<15} {mode:<3} {min(ratios):.2f} .. "
                      f"{max(ratios):.2f}  ({len(ratios)} sizes, {wrong} wrong)")
EOF
echo "total: ${SECONDS} s"
