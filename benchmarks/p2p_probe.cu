// Peer bandwidth probe (diagnostic, not part of mixcc): GPU0 <-> GPU1 over 256 MiB with
// several access patterns (SM stores, SM loads, the copy engine; one way and both ways).
// Build: nvcc -arch=sm_90a -O3 -std=c++17 -o p2p_probe benchmarks/p2p_probe.cu; run: ./p2p_probe
#include <cstdio>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

template <int UNR, int MODE>  // MODE 0: st (push), 1: ld (pull), 2: st.volatile, 3: st.global.cg? (st.cg)
__global__ void k(int4* __restrict__ dst, const int4* __restrict__ src, long long n) {
  long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (UNR - 1) * stride < n; i += UNR * stride) {
    int4 x[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) x[u] = __ldcg(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      if (MODE == 2) { int4* p = dst + i + u * stride; asm volatile("st.volatile.global.v4.s32 [%0], {%1,%2,%3,%4};" :: "l"(p), "r"(x[u].x), "r"(x[u].y), "r"(x[u].z), "r"(x[u].w) : "memory"); }
      else if (MODE == 3) __stcg(dst + i + u * stride, x[u]);
      else dst[i + u * stride] = x[u];
    }
  }
}
// Per-block contiguous chunk variant (like the kernels: block b owns a contiguous range)
template <int UNR>
__global__ void kb(int4* __restrict__ dst, const int4* __restrict__ src, long long n) {
  long long per = n / gridDim.x;
  const int4* s = src + blockIdx.x * per; int4* d = dst + blockIdx.x * per;
  for (long long v = threadIdx.x; v + (UNR - 1) * blockDim.x < per; v += UNR * blockDim.x) {
    int4 x[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) x[u] = __ldcg(s + v + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < UNR; ++u) d[v + u * blockDim.x] = x[u];
  }
}

int main() {
  const size_t bytes = 256ull << 20; long long n = bytes / 16;
  int4 *a[2], *b[2];
  for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaDeviceEnablePeerAccess(1 - d, 0));
    CK(cudaMalloc(&a[d], bytes)); CK(cudaMalloc(&b[d], bytes)); CK(cudaMemset(a[d], 1, bytes)); CK(cudaMemset(b[d], 0, bytes)); }
  cudaStream_t st[2]; cudaEvent_t e0[2], e1[2];
  for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaStreamCreate(&st[d])); CK(cudaEventCreate(&e0[d])); CK(cudaEventCreate(&e1[d])); }
  auto run = [&](const char* name, int blocks, int threads, bool bidir, auto launch) {
    for (int it = 0; it < 2; ++it) {
      for (int d = 0; d < (bidir ? 2 : 1); ++d) { CK(cudaSetDevice(d)); CK(cudaEventRecord(e0[d], st[d])); launch(d); CK(cudaEventRecord(e1[d], st[d])); }
      for (int d = 0; d < (bidir ? 2 : 1); ++d) { CK(cudaSetDevice(d)); CK(cudaStreamSynchronize(st[d])); CK(cudaGetLastError()); }
    }
    float ms = 0; CK(cudaSetDevice(0)); CK(cudaEventElapsedTime(&ms, e0[0], e1[0]));
    printf("%-34s blocks %4d thr %4d %s  %8.1f us  %6.1f GB/s per direction\n", name, blocks, threads, bidir ? "bidir" : "one  ", ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  };
  for (int bidir = 0; bidir < 2; ++bidir) {
    run("copy engine (cudaMemcpyPeerAsync)", 0, 0, bidir, [&](int d) { CK(cudaMemcpyPeerAsync(b[1 - d], 1 - d, a[d], d, bytes, st[d])); });
    int cfg[][2] = {{32, 512}, {64, 512}, {132, 512}, {32, 1024}, {16, 512}};
    for (auto& c : cfg) {
      run("push st.v4 unr4 (grid-stride)", c[0], c[1], bidir, [&](int d) { CK(cudaSetDevice(d)); k<4, 0><<<c[0], c[1], 0, st[d]>>>(b[1 - d], a[d], n); });
      run("push st.v4 unr4 (block chunk)", c[0], c[1], bidir, [&](int d) { CK(cudaSetDevice(d)); kb<4><<<c[0], c[1], 0, st[d]>>>(b[1 - d], a[d], n); });
      run("pull ld.cg unr4 (grid-stride)", c[0], c[1], bidir, [&](int d) { CK(cudaSetDevice(d)); k<4, 1><<<c[0], c[1], 0, st[d]>>>(b[d], a[1 - d], n); });
    }
    run("push st.volatile unr4", 32, 512, bidir, [&](int d) { CK(cudaSetDevice(d)); k<4, 2><<<32, 512, 0, st[d]>>>(b[1 - d], a[d], n); });
    run("push st.cg unr4", 32, 512, bidir, [&](int d) { CK(cudaSetDevice(d)); k<4, 3><<<32, 512, 0, st[d]>>>(b[1 - d], a[d], n); });
    run("push st.v4 unr8", 32, 512, bidir, [&](int d) { CK(cudaSetDevice(d)); k<8, 0><<<32, 512, 0, st[d]>>>(b[1 - d], a[d], n); });
    run("pull ld.cg unr8", 32, 512, bidir, [&](int d) { CK(cudaSetDevice(d)); k<8, 1><<<32, 512, 0, st[d]>>>(b[d], a[1 - d], n); });
    run("local copy unr4", 32, 512, bidir, [&](int d) { CK(cudaSetDevice(d)); k<4, 0><<<32, 512, 0, st[d]>>>(b[d], a[d], n); });
  }
  return 0;
}
