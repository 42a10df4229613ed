#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200) after the blame-word change: the dead-peer
# trials (IPC 20, NVSHMEM 5), the watchdog and the mismatch checks of
# scripts/reliability_check.py; the one-node ladder at world 4 (fuzz 1); then the combined
# presets at world 4, fused vs the program as separate mixcc calls, with the tuning table
# of MIXCC_TUNE_TABLE.     bash scripts/device_final.sh     # carry [".whl"]
set -u
source "$(dirname "$0")/device_env.sh"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_REMOTE_TRANSPORT=none
start_mps
filter() { grep -v "^W1\|FutureWarning\|warnings.warn\|UserWarning\|^\["; }
SECONDS=0
(python3 scripts/gpu_check.py --worlds 4 --fuzz 1 --seed 31 --prebuild-only >/dev/null 2>&1;
 python3 -m mixcc prebuild --mesh dp=2,tp=2 --dtype bfloat16 --program allreduce_allgather \
   --program reducescatter_allreduce --program 'allreduce(tp)' --program 'allgather(dp)' \
   --program 'reducescatter(dp)' > /dev/null 2>&1) &
for what in kill watchdog mismatch; do
  timeout 200 python3 scripts/reliability_check.py "$what" --logdir "$OUT/rel_$what" 2>&1 \
    | filter | grep -v "^  trial" | tee -a "$OUT/reliability.log" | grep "PASS\|FAIL\|reliability_check"
  echo "$what done at ${SECONDS} s"
done
wait
timeout 120 python3 scripts/gpu_check.py --worlds 4 --fuzz 1 --seed 31 2>&1 | filter \
  | tee "$OUT/ladder.log" | tail -n 16
echo "ladder done at ${SECONDS} s"
timeout 200 python3 -m mixcc bench --world-size 4 --program allreduce_allgather \
  --program reducescatter_allreduce --backend fused,separate --dtype bfloat16 --hidden 1024 \
  --min-bytes 16K --max-bytes 64M --iters 10 --repeats 5 --out "$OUT/bench_combined_w4" 2>&1 \
  | filter | tee "$OUT/bench_combined_w4.log" | tail -n 60
echo "total ${SECONDS} s"
