#!/usr/bin/env bash
# One device call (nvidia-h100-x1 / nvidia-h200): the fused backend's one-GPU ladder step.
# Several processes share the GPU through CUDA IPC, under MPS; then a short fused bench.
# Call with carry [".whl", ".mxcache"] (lark wheel; prebuilt modules, optional).
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L; nvcc --version | tail -1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# Build times: a cold cache, then the same again (cache hits).
for pass in cold hit; do
  echo "prebuild ($pass cache):"
  TIMEFORMAT="  wall %R s"
  time (MIXCC_CACHE_DIR=/tmp/mixcc-cold python3 -m mixcc prebuild --mesh dp=2,tp=4 \
    --dtype bfloat16 2>&1 | sed 's/  \/.*$//')
done
start_mps
python3 scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log" | grep -v "^W1\|FutureWarning\|warnings.warn"
python3 -m mixcc bench --world-size 2 --backend fused,reference,nccl1 --program allreduce_allgather \
  --program reducescatter_allreduce --max-rows 256 --iters 10 --repeats 5 --out "$OUT/bench_1gpu" \
  2>&1 | grep -v "^\[\|FutureWarning\|warnings.warn" | tee "$OUT/bench_1gpu.log"
python3 scripts/host_overhead.py 2>&1 | grep -v "Warning\|warn" | tee "$OUT/host_overhead.log"
