#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200): the fused backend's cross-node stages
# (IPC inside a node, NVSHMEM between nodes) with nodes simulated by ranks_per_node on
# one GPU: N processes share it under MPS. Correctness against the float64 oracle, the
# --mutate negative control, then the pipelining bench (depth 1 vs 2 vs 3).
# Call with carry [".whl"] (lark wheel). Modules are built there (NVSHMEM device link).
#   bash scripts/device_nvshmem.sh smoke|w4|w8|final
set -u
source "$(dirname "$0")/device_env.sh"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}  # one host: P2P only
nvidia-smi -L; nvcc --version | tail -1
python3 -c "import torch, importlib.metadata as m; print('torch', torch.__version__, \
  'nvshmem', m.version('nvidia-nvshmem-cu13'))"
start_mps
filter() { grep -v "^W1\|FutureWarning\|warnings.warn\|UserWarning"; }
check() { python3 scripts/gpu_check.py "$@" 2>&1 | filter; }
case "${1:-w4}" in
  smoke) timeout 300 python3 scripts/gpu_check.py --worlds 4 --nodes 4:2 --fuzz 1 2>&1 \
           | tee "$OUT/smoke.log" | filter ;;
  w4) timeout 300 python3 scripts/gpu_check.py --worlds 4 --nodes 4:2 --fuzz 3 --seed 11 2>&1 \
        | tee "$OUT/gpu_check_w4_nodes.log" | filter
      timeout 120 python3 scripts/gpu_check.py --worlds 4 --nodes 4:2 --fuzz 1 --skip-one-node \
        --mutate 2>&1 | tee "$OUT/mutate_w4.log" | filter | tail -n 16
      timeout 150 python3 scripts/hier_bench.py --world 4 --rpn 2 2>&1 \
        | tee "$OUT/hier_bench_w4.log" | filter ;;
  final) timeout 200 python3 scripts/gpu_check.py --worlds 4 --nodes 4:2 --fuzz 3 --seed 13 \
           --skip-one-node 2>&1 | tee "$OUT/gpu_check_w4_nodes.log" | filter | tail -n 16
         "$0" w8 ;;
  w8) timeout 400 python3 scripts/gpu_check.py --worlds 8 --nodes 8:4,8:2 --fuzz 2 --seed 12 \
        --skip-one-node 2>&1 | tee "$OUT/gpu_check_w8_nodes.log" | filter
      timeout 150 python3 scripts/hier_bench.py --world 8 --rpn 4 2>&1 \
        | tee "$OUT/hier_bench_w8.log" | filter ;;
esac
