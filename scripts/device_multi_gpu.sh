#!/usr/bin/env bash
# One device call on a multi-GPU kind (nvidia-h200-x2/-x4/-x8), issue 4:
#  1. correctness, one process per GPU: fused vs the NCCL reference vs the float64 oracle
#     (presets, fuzzed programs, simulated nodes, 3 dtypes, graph replay, timeout);
#  2. the benchmark: CUDA graphs, max over ranks of the median, bf16, hidden 7168,
#     rows 1..4096, fused beside NCCL's two-call composition (reference), NCCL in one
#     call (nccl1) and, for plain allreduce, torch symmetric memory one_shot/two_shot.
# Call with carry [".whl", ".mxcache"]. NEVER RUN YET: no multi-GPU kind was lent.
set -u
source "$(dirname "$0")/device_env.sh"
N=$(nvidia-smi -L | wc -l)
nvidia-smi -L; nvidia-smi topo -m; nvcc --version | tail -1
worlds=$(python3 -c "print(','.join(str(w) for w in (2, 4, 8) if w <= $N))")
python3 scripts/gpu_check.py --pg nccl --worlds "$worlds" --fuzz 6 2>&1 \
  | grep -v "FutureWarning\|warnings.warn" | tee "$OUT/gpu_check.log"
bench() {  # name, then mixcc bench arguments
  local name=$1; shift
  python3 -m mixcc bench --world-size "$N" --dtype bfloat16 --hidden 7168 --min-rows 1 \
    --max-rows 4096 --iters 20 --repeats 10 --out "$OUT/$name" "$@" 2>&1 \
    | grep -v "^\[\|FutureWarning\|warnings.warn" > "$OUT/$name.log"
  tail -n 3 "$OUT/$name.log"
}
for dp in 2 4 8; do
  [ $((N % dp)) -eq 0 ] || continue
  bench "bench_dp${dp}_tp$((N / dp))" --mesh "dp=$dp,tp=$((N / dp))" \
    --program allreduce_allgather --program reducescatter_allreduce \
    --backend fused,reference,nccl1
done
bench "bench_allreduce_tp$N" --mesh "dp=1,tp=$N" --program allreduce \
  --backend fused,reference,symm_one_shot,symm_two_shot
# The device tool returns at most 8 files: pack everything into one archive.
(cd "$OUT" && tar czf /tmp/results.tgz --exclude=results.tgz . && find . -type f -delete \
  && mv /tmp/results.tgz .)
