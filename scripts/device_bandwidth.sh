#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issues 14 and 16), one process per GPU on NCCL:
#   check   the pytest GPU suite's correctness ladder on the two GPUs: every intra
#           algorithm, in place, graph replay, the NCCL reference, the two GPUs as two
#           nodes (tests/gpu/test_ladder_gpu.py -k "2gpu and not mps")
#   ar      allreduce 8 KiB..256 MiB per rank: auto, each fused algorithm, NCCL, torch
#           symmetric memory two-shot (with and without its copy) and one-shot
#   coll    allgather, reducescatter and both presets on dp=2,tp=1 and dp=1,tp=2
#           (COLL_BACKENDS: mixcc's rows and NCCL's, default auto, auto:registered (the
#           copy engines for allgathers from 16 MiB), one-shot, push, and peer_copy)
#   nodes   the two GPUs as two nodes (ranks_per_node 1): allreduce(dp), allgather(dp)
#   regions the nodes programs from 4 MiB at several (IPC workspace, NVSHMEM workspace,
#           pipeline depth): what bigger chunks give the cross-node stage (issue 14 item 5)
#   regions1  allreduce on one node from 4 MiB at IPC workspaces of 64M, 256M and 1G
#   tune    mixcc tune for allreduce on NCCL (NCCL a candidate), then the ar sweep with
#           that table (auto against the fixed algorithms and NCCL)
#   gpu     the whole pytest GPU suite (python -m pytest tests/gpu; MIXCC_* counts from
#           the environment, README "GPU checks")
#   mps     GPU 0 alone: the suite's tests whose ranks share a GPU under MPS (the fixture
#           starts and stops the daemon), the mutate control and the block cap among them
#   epi     the epilogue tests (one-shot, two-shot, hierarchical step D) and the epilogue
#           bench (fused against mixcc's and NCCL's collective + a compiled epilogue;
#           EPI_BENCH=0: the tests only)
#   epi2s   the epilogue bench's one-node cases with the two-shot kernel (epilogue in its
#           gather)
#   prebuild  the suite's kernels that the carried cache lacks (the NVSHMEM modules are
#           too large to carry), nvcc on every core; run it before the others
#           (PREBUILD_ARGS: e.g. "--worlds 2 --nodes 2:1 --no-mutate" for a subset)
# Usage: scripts/device_bandwidth.sh STEP... (default: check ar). Carry [".whl",
# ".mxcache.txz"] (or ".mxcache" when it is under 64 MiB). Prebuild on the CPU machine first:
#   MIXCC_CACHE_DIR=.mxcache python3 scripts/prebuild_gpu_tests.py --arch sm_90a
#   tar cf - --exclude='.mxcache/modules/hier-*' .mxcache | xz > .mxcache.txz
set -u
source "$(dirname "$0")/device_env.sh"
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
nvidia-smi -L
MAX=${MAX:-256M}
bench() {  # name, then mixcc bench arguments; the pivot table (printed last) to stdout
  local name=$1; shift
  timeout "${BENCH_TIMEOUT:-590}" python3 -m mixcc bench --world-size 2 --dtype bfloat16 --hidden 4096 --iters 20 \
    --repeats 5 --min-bytes "${MIN:-8K}" --max-bytes "$MAX" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  sed -n '/^# oop time/,$p' "$OUT/$name.log" | grep -v "^wrote\|^note"
}
suite() {  # name, then pytest arguments: the log to $OUT/pytest_NAME.log, its tail here
  local name=$1; shift
  timeout "${SUITE_TIMEOUT:-560}" python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 \
    | grep -v "Warning\|warnings.warn" | tee "$OUT/pytest_$name.log" | tail -n 25
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check ar)
for step in "${steps[@]}"; do
  case $step in
    check) suite check -k "2gpu and not mps" tests/gpu/test_ladder_gpu.py ;;
    ar)
      bench ar --mesh dp=1,tp=2 --program allreduce --backend "${AR_BACKENDS:-\
auto,auto:registered,fused:one_shot,fused:push,reference,symm_two_shot,symm_two_shot_nocopy}" ;;
    coll)
      bench coll_dp2 --mesh dp=2,tp=1 --program allgather --program reducescatter \
        --program allreduce_allgather --program reducescatter_allreduce \
        --backend "${COLL_BACKENDS:-auto,auto:registered,fused:one_shot,fused:push,reference,peer_copy},nccl1"
      bench coll_tp2 --mesh dp=1,tp=2 --program allreduce_allgather \
        --program reducescatter_allreduce --backend \
        "${COLL_BACKENDS:-auto,fused:one_shot,fused:push,reference}" ;;
    nodes)
      bench nodes --mesh dp=2,tp=1 --ranks-per-node 1 --program "allreduce(dp)" \
        --program "allgather(dp)" --backend auto,fused,reference ;;
    regions)
      python3 -m mixcc prebuild --program "allreduce(dp)" --program "allgather(dp)" \
        --mesh dp=2,tp=1 --ranks-per-node 1 --dtype bfloat16 > "$OUT/regions_prebuild.log" 2>&1
      IFS=';' read -ra cfgs <<< "${REGIONS:-64M 32M 2;64M 64M 2;256M 256M 2;256M 256M 3;1G 1G 2}"
      for c in "${cfgs[@]}"; do
        set -- $c
        MIN=4M MAX=64M bench "regions_$1_$2_$3" --mesh dp=2,tp=1 --ranks-per-node 1 \
          --program "allreduce(dp)" --program "allgather(dp)" --backend fused,reference \
          --workspace-bytes "$1" --symmetric-bytes "$2" --pipeline-depth "$3" | grep -v "^#"
      done ;;
    regions1)
      for ws in ${REGIONS1:-64M 256M 1G}; do
        MIN=4M MAX=64M bench "regions1_$ws" --mesh dp=1,tp=2 --program allreduce \
          --backend fused:one_shot,fused:push,reference --workspace-bytes "$ws" | grep -v "^#"
      done ;;
    gpu) suite gpu tests/gpu ;;
    tune)
      export MIXCC_TUNE_TABLE=$OUT/tune_table.json
      python3 -m mixcc tune --world-size 2 --mesh dp=1,tp=2 --program allreduce \
        --dtype bfloat16 --hidden 4096 --min-bytes "${TUNE_MIN:-64K}" --max-bytes "$MAX" \
        --iters 10 --repeats 3 2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/tune.log"
      bench ar_tuned --mesh dp=1,tp=2 --program allreduce --backend \
        auto,fused:one_shot,fused:push,fused:two_shot,reference ;;
    mps) CUDA_VISIBLE_DEVICES=0 suite mps -k "mps or block_cap" tests/gpu ;;
    epi)
      suite epi tests/gpu/test_epilogue_gpu.py
      if [ "${EPI_BENCH:-1}" != 0 ]; then
        timeout "${BENCH_TIMEOUT:-300}" python3 -m mixcc.bench_epilogue --world-size 2 \
          --hidden 4096,8192 --max-rows 512 --repeats 5 --out "$OUT/epi" > "$OUT/epi.log" 2>&1
        grep "^|" "$OUT/epi.log"
      fi ;;
    epi2s)
      timeout "${BENCH_TIMEOUT:-300}" python3 -m mixcc.bench_epilogue --world-size 2 \
        --hidden 4096,8192 --max-rows 512 --repeats 5 --algorithm two_shot \
        --case ar_add_rmsnorm --case ar_add_rmsnorm_quant --out "$OUT/epi2s" > "$OUT/epi2s.log" 2>&1
      grep "^|" "$OUT/epi2s.log" ;;
    prebuild)
      python3 scripts/prebuild_gpu_tests.py --arch "${ARCH:-sm_90a}" ${PREBUILD_ARGS:-} \
        > "$OUT/prebuild.log" 2>&1
      grep "prebuild:" "$OUT/prebuild.log" ;;
  esac
  (cd "$OUT" && tar czf "/tmp/results-$step.tgz" --exclude="*.tgz" . && mv "/tmp/results-$step.tgz" .)
done
(cd "$OUT" && find . -type f ! -name "*.tgz" -delete)  # a few archives: the call returns few files
