// Row-wise epilogue ops fused after a one-shot reduction (docs/DESIGN.md, "Epilogues";
// the registry in mixcc/ops.py names one function here per op). A row (the output's last
// dimension, H elements, P = H / VEC packs) is held by a group of `tpr` threads of the
// block in fp32 registers: thread `lt` of the group holds packs lt, lt + tpr, ... Every
// thread of the block calls each op, live or not, because rmsnorm synchronises the block.
#pragma once
#include <cuda_fp8.h>
#include "mixcc_vec.cuh"

namespace mixcc {

template <typename T, int VEC, int PACKS>
struct Row {
  float v[PACKS][VEC];
  int lt, tpr, P, H;
  long long off;  // element offset of the row in output-shaped tensors
  bool live;      // this thread's group holds a row in this pass
  __device__ __forceinline__ bool has(int k) const { return live && lt + k * tpr < P; }
  __device__ __forceinline__ int col(int k) const { return (lt + k * tpr) * VEC; }
};

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
  const T* base = static_cast<const T*>(t) + (ROW ? r.off : 0);
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

// rmsnorm(W, eps): v = v * rsqrt(mean(v^2 over the row) + eps) * W
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
