// Row-wise epilogue ops fused after a one-shot reduction (docs/DESIGN.md, "Epilogues";
// the registry in mixcc/ops.py names one function here per op). A row (the output's last
// dimension, H elements, P = H / VEC packs) is held by a group of `tpr` threads of the
// block in fp32 registers: thread `lt` of the group holds packs lt, lt + tpr, ... Every
// thread of the block calls each op, live or not, because rmsnorm synchronises the block.
#pragma once
#include <cuda_fp8.h>
#include "mixcc_sync.cuh"
#include "mixcc_vec.cuh"

namespace mixcc {

constexpr int STAGE_ROW_SUM = 8;  // the error record's stage code (mixcc/runtime.py STAGE_NAMES)

// A row split over n blocks of one rank (the LL row pass, plan.ll_row_split): this block
// holds its j-th part; the parts' sums of squares meet in the first block's slots of the
// rank's workspace (layout.py, ROWSUM_OFFSET), tagged with that block's epoch for the call.
struct RowShare {
  int n = 1, j = 0;
  unsigned long long* slots = nullptr;
  unsigned tag = 0;
  uint64_t timeout_ns = 0;
  ErrorRecord* err = nullptr;
  int rank = 0, peer = 0;            // a timed-out exchange blames `peer`: the row's lines
  const unsigned* blame = nullptr;  // come from it (its blame word)
};

template <typename T, int VEC, int PACKS>
struct Row {
  float v[PACKS][VEC];
  int lt, tpr, P, H;  // P: the packs of the row this block holds; H: the row's width
  int c0 = 0;         // the first column of the row this block holds (a split row)
  long long off;      // element offset of the row (this block's part) in output-shaped tensors
  bool live;          // this thread's group holds a row in this pass
  bool failed = false;  // a split row's sum did not arrive: nothing is output
  RowShare share;
  __device__ __forceinline__ bool has(int k) const { return live && lt + k * tpr < P; }
  __device__ __forceinline__ int col(int k) const { return (lt + k * tpr) * VEC; }
};

// The sum of `s` (the same on every thread of the block) over a split row's n blocks,
// added in block order so that each of them gets the same value: thread 0 publishes its
// block's (tag, s) in one relaxed 64-bit word and spins on the others' (spin_until: a
// timeout is recorded, never waited out); the block reads the total from shared memory.
// False when a wait timed out. Every thread of the block calls it.
__device__ __forceinline__ bool share_sum(float& s, const RowShare& sh) {
  __shared__ float total;
  __shared__ int good;
  if (threadIdx.x == 0) {
    st_relaxed_gpu64(sh.slots + sh.j, ((unsigned long long)sh.tag << 32) | __float_as_uint(s));
    float t = 0.f;
    int ok = 1;
    for (int b = 0; b < sh.n; ++b) {
      float v = s;
      if (b != sh.j) {
        const unsigned long long* w = sh.slots + b;
        unsigned long long word = 0;  // the tag and the sum, read together
        ok &= spin_until([w, &word] { word = ld_relaxed_gpu64(w); return (unsigned)(word >> 32); },
                         sh.tag, sh.timeout_ns, sh.err, sh.rank, sh.peer, STAGE_ROW_SUM,
                         (int)blockIdx.x, [&] { return *(volatile const unsigned*)sh.blame; });
        v = __uint_as_float((unsigned)word);
      }
      t += v;
    }
    total = t;
    good = ok;
  }
  __syncthreads();
  s = total;
  const bool ok = good != 0;
  __syncthreads();  // total and good are reused by the next call
  return ok;
}

// The sum of `s` over the thread's row group, the same on each of its threads, in one
// fixed order: a butterfly within each warp, then the group's warps in index order.
// `red` is shared, one float per warp of the block.
template <int THREADS>
__device__ __forceinline__ float group_sum(float s, int tpr, float* red) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  red[threadIdx.x / 32] = s;
  __syncthreads();
  const int wpg = tpr / 32, first = (int)threadIdx.x / tpr * wpg;
  float t = 0.f;
  for (int w = 0; w < wpg; ++w) t += red[first + w];
  __syncthreads();  // red is reused by the next call
  return t;
}

// The packs of a named tensor this thread's row needs, loaded ahead of use (the kernel
// issues these loads with the reduction's, so that their latencies overlap): ROW, an
// output-shaped tensor (the row's own elements); else a [H] tensor (the row's columns).
template <bool ROW, typename T, int VEC, int PACKS>
__device__ __forceinline__ void epi_load(const Row<T, VEC, PACKS>& r, const void* t,
                                         Pack<T, VEC> (&p)[PACKS]) {
  const T* base = static_cast<const T*>(t) + (ROW ? r.off : r.c0);
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
    if (r.has(k)) p[k] = load<T, VEC>(base + r.col(k));
}

// add(T): v = v + T
template <typename T, int VEC, int PACKS>
__device__ __forceinline__ void epi_add(Row<T, VEC, PACKS>& r, const Pack<T, VEC> (&p)[PACKS]) {
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
    if (r.has(k))
#pragma unroll
      for (int e = 0; e < VEC; ++e) r.v[k][e] += to_f32(p[k].v[e]);
}

// store(T): T[...] = v rounded to T
template <typename T, int VEC, int PACKS>
__device__ __forceinline__ void epi_store(Row<T, VEC, PACKS>& r, const void* t) {
  T* p = static_cast<T*>(const_cast<void*>(t)) + r.off;
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
    if (r.has(k)) store_f32<T, VEC>(p + r.col(k), r.v[k]);
}

// rmsnorm(W, eps): v = v * rsqrt(mean(v^2 over the row) + eps) * W (a split row: the
// mean over its blocks' parts, share_sum)
template <int THREADS, typename T, int VEC, int PACKS>
__device__ __forceinline__ void epi_rmsnorm(Row<T, VEC, PACKS>& r, const Pack<T, VEC> (&w)[PACKS],
                                            float eps, float* red) {
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
    if (r.has(k))
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss = fmaf(r.v[k][e], r.v[k][e], ss);
  ss = group_sum<THREADS>(ss, r.tpr, red);
  if (r.share.n > 1 && !share_sum(ss, r.share)) r.failed = true;
  const float s = rsqrtf(ss / (float)r.H + eps);
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
    if (r.has(k))
#pragma unroll
      for (int e = 0; e < VEC; ++e) r.v[k][e] = r.v[k][e] * s * to_f32(w[k].v[e]);
}

// quant(fp8_e4m3, S): v = v / S (the output saturates to +-448 and keeps NaN)
template <typename T, int VEC, int PACKS>
__device__ __forceinline__ void epi_quant(Row<T, VEC, PACKS>& r, float scale) {
#pragma unroll
  for (int k = 0; k < PACKS; ++k)
#pragma unroll
    for (int e = 0; e < VEC; ++e) r.v[k][e] = r.v[k][e] / scale;
}

// The row into the output: rounded to T, or to float8_e4m3fn (round to nearest even,
// saturating to the largest finite value, NaN kept) after quant.
template <bool FP8, typename T, int VEC, int PACKS>
__device__ __forceinline__ void epi_output(const Row<T, VEC, PACKS>& r, void* out) {
  if (r.failed) return;
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    if (!r.has(k)) continue;
    if constexpr (FP8) {
      static_assert(VEC % 2 == 0, "fp8 pairs");
      Pack<__nv_fp8x2_storage_t, VEC / 2> q;
#pragma unroll
      for (int e = 0; e < VEC; e += 2)
        q.v[e / 2] = __nv_cvt_float2_to_fp8x2(make_float2(r.v[k][e], r.v[k][e + 1]),
                                              __NV_SATFINITE, __NV_E4M3);
      store<__nv_fp8x2_storage_t, VEC / 2>(reinterpret_cast<__nv_fp8x2_storage_t*>(
          static_cast<unsigned char*>(out) + r.off + r.col(k)), q);
    } else {
      store_f32<T, VEC>(static_cast<T*>(out) + r.off + r.col(k), r.v[k]);
    }
  }
}

}  // namespace mixcc
