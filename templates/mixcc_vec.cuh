// 16-byte vector packs, conversion to fp32 accumulators and the three reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace mixcc {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one access: 16 bytes when N * sizeof(T) == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Plain load (own memory, or the caller's input tensor).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// Load of a peer's workspace: L2 only (see mixcc_sync.cuh).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_cg(const T* p) {
  Pack<T, N> r;
  if constexpr (sizeof(Pack<T, N>) == 16) {
    int4 q = __ldcg(reinterpret_cast<const int4*>(p));
    r = *reinterpret_cast<Pack<T, N>*>(&q);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (sizeof(T) == 4) {
        float f = __ldcg(reinterpret_cast<const float*>(p) + i);
        r.v[i] = *reinterpret_cast<T*>(&f);
      } else {
        unsigned short s = __ldcg(reinterpret_cast<const unsigned short*>(p) + i);
        r.v[i] = *reinterpret_cast<T*>(&s);
      }
    }
  }
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

enum class Op { kSum, kMax, kMin };

// acc = first term, then combine the others in table order (the same on every rank).
template <Op OP>
__device__ __forceinline__ float first(float x, float coef) {
  return OP == Op::kSum ? coef * x : x;
}
template <Op OP>
__device__ __forceinline__ float combine(float acc, float x, float coef) {
  if constexpr (OP == Op::kSum) return fmaf(coef, x, acc);
  else if constexpr (OP == Op::kMax) return fmaxf(acc, x);
  else return fminf(acc, x);
}

}  // namespace mixcc
