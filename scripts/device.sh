#!/usr/bin/env bash
# One remote run on a GPU machine: the GPU test suite, then this machine's results folder, and a short
# table of both printed last. Steps, in the order given (default: gpu results):
#   prebuild  the suite's kernels that the carried cache lacks, nvcc on every core
#             (PREBUILD_ARGS: e.g. "--worlds 2 --no-mutate" for a subset)
#   gpu       the whole GPU suite: python3 -m pytest tests/gpu (a test skips, with the
#             reason, where this machine lacks its GPUs, nvcc, NVSHMEM or MPS)
#   mps       GPU 0 alone: the suite's tests whose ranks share a GPU under MPS
#   results   scripts/perf_results.py: docs/perf/<setup>/ made under $OUT/perf (every
#             benchmark's CSV, JSON, PNG and RESULTS.md); RESULTS_ARGS adds its flags
#             (e.g. "--quick", "--setup h200x2-nvlink", "--only allreduce,allgather")
#   tune      mixcc tune for allreduce over every rank here; table in $OUT/tune_table.json
# A call has 600 s: the suite stops at SUITE_TIMEOUT (default 300 s), and the results get
# what is left of BUDGET (default 570 s), cutting a benchmark there (RESULTS.md says so).
# MIXCC_COMMIT names the commit in RESULTS.md (the copy on the device has no .git):
#   MIXCC_COMMIT=<hash> bash scripts/device.sh gpu results
# Carry [".whl", ".mxcache.txz"] (device_env.sh unpacks them). What comes back: one
# archive per step (results-<step>.tgz: logs, and the results folder to copy into docs/perf).
set -u
source "$(dirname "$0")/device_env.sh"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
nvidia-smi -L
BUDGET=${BUDGET:-570}
suite() {  # name, then pytest arguments: the log to $OUT/pytest_NAME.log, its tail here
  local name=$1; shift
  timeout "${SUITE_TIMEOUT:-300}" python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 \
    | grep -v "Warning\|warnings.warn" | tee "$OUT/pytest_$name.log" | tail -n 25
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gpu results)
for step in "${steps[@]}"; do
  case $step in
    prebuild)
      python3 scripts/prebuild_gpu_tests.py --arch "${ARCH:-sm_90a}" ${PREBUILD_ARGS:-} \
        > "$OUT/prebuild.log" 2>&1
      grep "prebuild:" "$OUT/prebuild.log" ;;
    gpu) suite gpu tests/gpu ;;
    mps) CUDA_VISIBLE_DEVICES=0 suite mps -k "mps or block_cap" tests/gpu ;;
    results)
      left=$((BUDGET - SECONDS))
      python3 scripts/perf_results.py --out-root "$OUT/perf" --budget-s "$left" \
        ${MIXCC_COMMIT:+--commit "$MIXCC_COMMIT"} ${RESULTS_ARGS:-} 2>&1 \
        | tee "$OUT/results.log" ;;
    tune)
      export MIXCC_TUNE_TABLE=$OUT/tune_table.json
      n=$(nvidia-smi -L | grep -c "^GPU"); [ "$n" -lt 2 ] && n=2
      timeout "${TUNE_TIMEOUT:-300}" python3 -m mixcc tune --world-size "$n" \
        --mesh "dp=1,tp=$n" --program allreduce --dtype bfloat16 --hidden 4096 \
        --min-bytes "${TUNE_MIN:-16K}" --max-bytes "${TUNE_MAX:-64M}" --iters 10 \
        --repeats 3 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/tune.log" ;;
    *) echo "device.sh: unknown step '$step' (prebuild gpu mps results tune)"; exit 2 ;;
  esac
  (cd "$OUT" && tar czf "/tmp/results-$step.tgz" --exclude="*.tgz" . \
    && mv "/tmp/results-$step.tgz" . && find . -type f ! -name "*.tgz" -delete \
    && find . -mindepth 1 -type d -empty -delete)
done
echo; echo "== summary (${SECONDS} s)"
for step in "${steps[@]}"; do
  case $step in
    gpu|mps)
      line=$(tar xzf "$OUT/results-$step.tgz" -O "./pytest_$step.log" 2>/dev/null \
               | grep -E "^=* ?[0-9]+ (passed|failed|skipped|error)" | tail -n 1)
      echo "pytest $step: ${line:-no summary line (cut at SUITE_TIMEOUT?)}" ;;
    results) tar xzf "$OUT/results-results.tgz" -O ./results.log 2>/dev/null \
               | sed -n '/^benchmark /,$p' ;;
  esac
done
