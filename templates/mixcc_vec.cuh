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
  } else if constexpr (sizeof(Pack<T, N>) % 16 == 0) {  // e.g. 8 fp32 values: 16 bytes at a time
    int4 q[sizeof(Pack<T, N>) / 16];
#pragma unroll
    for (int i = 0; i < (int)(sizeof(Pack<T, N>) / 16); ++i)
      q[i] = __ldcg(reinterpret_cast<const int4*>(p) + i);
    memcpy(&r, q, sizeof(r));
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

// 16, 8 or 4 bytes as one global store of whole words (st.global.v4 / v2 / b32). Written
// as PTX: nvcc split a plain uint4 (or float4, or 16-bit class type) assignment into 4-byte
// stores in push_kernel's copies and the reduce's output, and into 2-byte stores in the
// epilogue. Split stores cost the remote ones most (push's sender: commit d6da35d). Every
// pointer passed here is global memory (workspaces, peers' IPC mappings, tensors).
__device__ __forceinline__ void st_v4(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(Pack<T, N>) == 16) {
    uint4 w;
    memcpy(&w, &v, 16);
    st_v4(p, w.x, w.y, w.z, w.w);
  } else if constexpr (sizeof(Pack<T, N>) == 8) {
    uint2 w;
    memcpy(&w, &v, 8);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
  } else if constexpr (sizeof(Pack<T, N>) == 4) {
    unsigned w;
    memcpy(&w, &v, 4);
    asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(w) : "memory");
  } else {
    *reinterpret_cast<Pack<T, N>*>(p) = v;
  }
}

// The VEC fp32 values rounded to T and stored as one 16-byte store (st_v4). 16-bit types
// convert in pairs (one cvt.rn.bf16x2 / f16x2 per two values): rounding each value with
// from_f32 and calling store() gives the same bits with twice the conversions and more
// register spills (ptxas -v), and slowed bf16 push's receive reduce (commit 9f2e3ce).
// Every reduction's output goes through here.
__device__ __forceinline__ unsigned bits(__nv_bfloat162 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ unsigned bits(__half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ __nv_bfloat162 pair(float a, float b, __nv_bfloat16*) {
  return __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ __half2 pair(float a, float b, __half*) { return __floats2half2_rn(a, b); }

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* p, const float (&v)[VEC]) {
  if constexpr (sizeof(T) == 4 && VEC == 4) {
    st_v4(p, __float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
          __float_as_uint(v[3]));
  } else if constexpr (sizeof(T) == 2 && VEC == 8) {
    st_v4(p, bits(pair(v[0], v[1], p)), bits(pair(v[2], v[3], p)), bits(pair(v[4], v[5], p)),
          bits(pair(v[6], v[7], p)));
  } else {
    Pack<T, VEC> x;
#pragma unroll
    for (int e = 0; e < VEC; ++e) x.v[e] = from_f32<T>(v[e]);
    store<T, VEC>(p, x);
  }
}

enum class Op { kSum, kMax, kMin };

// max/min that propagate NaN as torch.maximum / torch.amax do: a NaN operand gives NaN
// (fmaxf/fminf would return the other operand). One PTX instruction from sm_80 on.
__device__ __forceinline__ float max_nan(float a, float b) {
#if __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}
__device__ __forceinline__ float min_nan(float a, float b) {
#if __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? a + b : fminf(a, b);
#endif
}

// acc = first term, then combine the others in table order (the same on every rank).
// Sums follow IEEE in fp32 (no fast-math flags; coefficients are integers >= 1), so
// inf + -inf and any NaN term give NaN, as torch's sum of the same values does.
template <Op OP>
__device__ __forceinline__ float first(float x, float coef) {
  return OP == Op::kSum ? coef * x : x;
}
template <Op OP>
__device__ __forceinline__ float combine(float acc, float x, float coef) {
  if constexpr (OP == Op::kSum) return fmaf(coef, x, acc);
  else if constexpr (OP == Op::kMax) return max_nan(acc, x);
  else return min_nan(acc, x);
}

}  // namespace mixcc
