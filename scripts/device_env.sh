# Sourced by scripts/device.sh: the environment every mixcc process on a remote GPU machine
# needs. Multicast stays off (docs/DESIGN.md section 5); lark comes from the carried
# .whl folder; kernels built here come from the carried .mxcache when the keys match, or
# from .mxcache.txz (the same, xz-compressed to a seventh: a full prebuild of the suite's
# modules is larger than the 64 MiB a call carries).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mixcc-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export MIXCC_CACHE_DIR=${MIXCC_CACHE_DIR:-$PWD/.mxcache}
if [ -f .mxcache.txz ]; then
  tar xJf .mxcache.txz --no-same-owner || exit 1
fi

# start_mps: an MPS daemon with the pipe and log directories of this machine's scripts,
# stopped (quit) when the calling script exits.
start_mps() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && echo "MPS started"
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
}
