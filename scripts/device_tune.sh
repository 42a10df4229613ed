#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200), issue 8 item 3: `mixcc tune` for the
# programs and worlds of scripts/device_bench_mps.sh (bf16, hidden 1024, 16 KiB..64 MiB per rank):
# allreduce(world) at worlds 2, 4, 8; the combined presets and their statements (what the
# `separate` baseline runs) at worlds 4 and 8. The table goes to $OUT/tune_table.json
# (MIXCC_TUNE_TABLE); commit it and point MIXCC_TUNE_TABLE at it for the bench.
#   bash scripts/device_tune.sh [--quick]        # carry [".whl"]
set -u -o pipefail
source "$(dirname "$0")/device_env.sh"
export MIXCC_TUNE_TABLE=${MIXCC_TUNE_TABLE:-$OUT/tune_table.json}
if [ "${1:-}" = "--quick" ]; then
  AR_WORLDS="2"; C_WORLDS="4"; MAX=256K; TIMES=(--iters 5 --repeats 2)
else
  AR_WORLDS="2 4 8"; C_WORLDS="4 8"; MAX=64M; TIMES=(--iters 10 --repeats 3)
fi
nvidia-smi -L
start_mps
filter() { grep -v "^W1\|FutureWarning\|warnings.warn\|UserWarning\|^\["; }
SECONDS=0
for tp in 1 2 4; do
  progs=(--program 'allreduce(world)')
  [ "$tp" -gt 1 ] && progs+=(--program allreduce_allgather --program reducescatter_allreduce
                             --program 'allreduce(tp)' --program 'allgather(dp)'
                             --program 'reducescatter(dp)')
  python3 -m mixcc prebuild --mesh "dp=2,tp=$tp" --dtype bfloat16,float32 "${progs[@]}" \
    > "$OUT/prebuild_tp$tp.log" 2>&1 &
done
wait
echo "prebuild: ${SECONDS} s"
for w in $AR_WORLDS; do
  timeout 300 python3 -m mixcc tune --world-size "$w" --program 'allreduce(world)' \
    --max-bytes "$MAX" "${TIMES[@]}" 2>&1 | filter | tee -a "$OUT/tune.log"
  echo "tune allreduce(world) w$w done at ${SECONDS} s"
done
for w in $C_WORLDS; do
  timeout 400 python3 -m mixcc tune --world-size "$w" --program allreduce_allgather \
    --program reducescatter_allreduce --program 'allreduce(tp)' --program 'allgather(dp)' \
    --program 'reducescatter(dp)' --max-bytes "$MAX" "${TIMES[@]}" 2>&1 | filter \
    | tee -a "$OUT/tune.log"
  echo "tune presets w$w done at ${SECONDS} s"
done
echo "total: ${SECONDS} s"
