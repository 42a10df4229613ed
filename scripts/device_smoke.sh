#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200): a short check after kernel or launcher
# changes. Under MPS: what SM count a rank sees with and without an MPS thread limit,
# the one-node ladder at worlds 4 and 8 (fuzz 1), the cross-node smoke (4 ranks as 2 x 2),
# NaN propagation of the fused kernels, and the host overhead of one eager call.
# Call with carry [".whl"].
set -u
source "$(dirname "$0")/device_env.sh"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
nvidia-smi -L
start_mps
filter() { grep -v "^W1\|FutureWarning\|warnings.warn\|UserWarning"; }
for pct in "" 25 12; do
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct python3 -c "import torch; \
print('MPS thread percentage ${pct:-unset}: SMs seen', \
torch.cuda.get_device_properties(0).multi_processor_count)"
done
python3 -m mixcc prebuild --mesh dp=2,tp=4 --dtype bfloat16 2>&1 | tail -2
timeout 240 python3 scripts/gpu_check.py --worlds 4,8 --fuzz 1 --seed 21 2>&1 \
  | tee "$OUT/ladder.log" | filter | tail -n 25
timeout 200 python3 scripts/gpu_check.py --worlds 4 --nodes 4:2 --fuzz 1 --skip-one-node 2>&1 \
  | tee "$OUT/nodes.log" | filter | tail -n 20
timeout 150 python3 scripts/nan_check.py 2>&1 | tee "$OUT/nan_check.log" | filter | tail -n 8
timeout 60 python3 scripts/host_overhead.py 2>&1 | tee "$OUT/host_overhead.log" | filter
