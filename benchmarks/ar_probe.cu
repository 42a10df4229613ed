// Allreduce-shaped peer probe for two GPUs in one process (diagnostic, not part of mixcc):
// how close can a kernel get to the link at a given size? fp32 data, out = in0 + in1 on both
// GPUs, with several variants (stores only, pull in place, pipelined pull with flags).
// Build: nvcc -arch=sm_90a -O3 -std=c++17 -o ar_probe benchmarks/ar_probe.cu
// Run:   ./ar_probe 128 [ITERS]   (MiB per rank; ITERS launches back to back per timing,
// default 1). Rows whose size does not divide by the grid (grid 132, nch 48) leave a tail
// unreduced: WRONG there is expected.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

constexpr int T = 512;
// Flag values of consecutive launches are STEP apart (more than any launch's chunks; 2^32 /
// STEP launches before the unsigned flags would wrap).
constexpr unsigned STEP = 1u << 12;
__device__ __forceinline__ float4 add4(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
__device__ __forceinline__ void st_release_sys(unsigned* p, unsigned v) { asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory"); }
__device__ __forceinline__ void st_relaxed_sys(unsigned* p, unsigned v) { asm volatile("st.relaxed.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory"); }
__device__ __forceinline__ unsigned ld_acquire_sys(const unsigned* p) { unsigned v; asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ unsigned ld_relaxed_sys(const unsigned* p) { unsigned v; asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }

// out = in + peer_in over block-contiguous ranges (a pull one-shot with the input in place).
template <int UNR>
__global__ void __launch_bounds__(T, 1) pull_ar(float4* out, const float4* in, const float4* pin, long long n) {
  long long per = n / gridDim.x, b0 = blockIdx.x * per;
  for (long long v = threadIdx.x; v < per; v += UNR * T) {
    float4 x[UNR], y[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) if (v + u * T < per) { x[u] = __ldcg(pin + b0 + v + u * T); y[u] = __ldcg(in + b0 + v + u * T); }
#pragma unroll
    for (int u = 0; u < UNR; ++u) if (v + u * T < per) out[b0 + v + u * T] = add4(x[u], y[u]);
  }
}
// dst = src over block-contiguous ranges (push when dst is the peer's).
template <int UNR>
__device__ __forceinline__ void copy_range(float4* d, const float4* s, long long per, int tid, int nt) {
  for (long long v = tid; v < per; v += UNR * nt) {
    float4 x[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) if (v + u * nt < per) x[u] = __ldcg(s + v + u * nt);
#pragma unroll
    for (int u = 0; u < UNR; ++u) if (v + u * nt < per) d[v + u * nt] = x[u];
  }
}
template <int UNR>
__device__ __forceinline__ void add_range(float4* o, const float4* a, const float4* b, long long per, int tid, int nt) {
  for (long long v = tid; v < per; v += UNR * nt) {
    float4 x[UNR], y[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) if (v + u * nt < per) { x[u] = __ldcg(a + v + u * nt); y[u] = __ldcg(b + v + u * nt); }
#pragma unroll
    for (int u = 0; u < UNR; ++u) if (v + u * nt < per) o[v + u * nt] = add4(x[u], y[u]);
  }
}
__global__ void __launch_bounds__(T, 1) push_all(float4* prec, const float4* in, long long n) {
  long long per = n / gridDim.x; copy_range<4>(prec + blockIdx.x * per, in + blockIdx.x * per, per, threadIdx.x, T);
}
__global__ void __launch_bounds__(T, 1) reduce_all(float4* out, const float4* in, const float4* rec, long long n) {
  long long per = n / gridDim.x, b = blockIdx.x * per; add_range<2>(out + b, in + b, rec + b, per, threadIdx.x, T);
}

// Pipelined push: NCH channels; channel ch owns [ch*per, (ch+1)*per) in chunks of C packs.
// Sender block ch pushes chunk c into the peer's ring slot c % K, then releases
// data[ch] = base + c + 1 on the peer; receiver block ch waits for its data flag, reduces
// in + slot into out, and returns credit[ch] = base + c + 1 to the peer's sender.
// SPLIT 0: sender and receiver are separate blocks (grid 2 x NCH); 1: warp halves of one block.
// FLAG 0: st.release.sys; 1: __threadfence_system + st.relaxed.sys.
struct Pipe { float4 *out; const float4 *in; float4 *ring, *pring; unsigned *flags, *pflags; long long n; int nch, C, K; unsigned base; int chain; };
// chain: a launch of the same shape ran just before on both GPUs with base - STEP (ITERS > 1):
// the first K chunks wait until the peer has consumed all of it before reusing its slots.
template <int SPLIT, int FLAG>
__global__ void __launch_bounds__(T, 1) push_pipe(Pipe p) {
  const bool sender = SPLIT == 0 ? blockIdx.x < p.nch : threadIdx.x < T / 2;
  const int ch = SPLIT == 0 ? blockIdx.x % p.nch : blockIdx.x;
  const int nt = SPLIT == 0 ? T : T / 2;
  const int tid = SPLIT == 0 ? threadIdx.x : threadIdx.x % (T / 2);
  const long long per = p.n / p.nch, b0 = ch * per;
  const int nchunks = (int)((per + p.C - 1) / p.C);
  unsigned* data = p.flags + ch * 32;         // written by the peer's sender
  unsigned* credit = p.flags + (p.nch + ch) * 32;  // written by the peer's receiver
  auto bar = [&]() { if (SPLIT == 0) __syncthreads(); else asm volatile("bar.sync %0, %1;" :: "r"(sender ? 1 : 2), "r"(T / 2) : "memory"); };
  for (int c = 0; c < nchunks; ++c) {
    const long long c0 = (long long)c * p.C, len = p.C < per - c0 ? p.C : per - c0;
    float4* slot = (sender ? p.pring : p.ring) + ((long long)ch * p.K + c % p.K) * p.C;
    if (sender) {
      if (tid == 0 && c >= p.K) while (ld_acquire_sys(credit) < p.base + c - p.K + 1) {}
      if (tid == 0 && c < p.K && p.chain) while (ld_acquire_sys(credit) < p.base - STEP + nchunks) {}
      bar();
      copy_range<4>(slot, p.in + b0 + c0, len, tid, nt);
      bar();
      if (tid == 0) {
        if (FLAG == 0) st_release_sys(p.pflags + ch * 32, p.base + c + 1);
        else { __threadfence_system(); st_relaxed_sys(p.pflags + ch * 32, p.base + c + 1); }
      }
    } else {
      if (tid == 0) while (ld_acquire_sys(data) < p.base + c + 1) {}
      bar();
      add_range<2>(p.out + b0 + c0, p.in + b0 + c0, slot, len, tid, nt);
      bar();
      if (tid == 0) st_release_sys(p.pflags + (p.nch + ch) * 32, p.base + c + 1);
    }
  }
}
// Pipelined pull (added after the 2026-11-30 runs, not run yet): each rank stages chunk c
// of its input into slot c % K of its own ring, then releases staged[ch] = base + c + 1
// on the peer; the peer waits for it, loads the slot (out = in + the peer's slot) and
// returns read[ch] = base + c + 1, after which the slot may be staged again. SPLIT 0: one
// role does stage, wait, pull per chunk (mixcc's one-shot, with a ring); 1: stager and
// puller warp halves, so staging runs up to K chunks ahead of the pulls.
template <int SPLIT>
__global__ void __launch_bounds__(T, 1) pull_pipe(Pipe p) {
  const bool stager = SPLIT == 0 || threadIdx.x < T / 2;
  const bool puller = SPLIT == 0 || threadIdx.x >= T / 2;
  const int ch = blockIdx.x, nt = SPLIT == 0 ? T : T / 2;
  const int tid = SPLIT == 0 ? threadIdx.x : threadIdx.x % (T / 2);
  const long long per = p.n / p.nch, b0 = ch * per;
  const int nchunks = (int)((per + p.C - 1) / p.C);
  unsigned* staged = p.flags + 16384 + ch * 32;       // the peer staged its chunk (peer writes)
  unsigned* read = p.flags + 16384 + 8192 + ch * 32;  // the peer read my chunk (peer writes)
  auto bar = [&](int id) {
    if (SPLIT == 0) __syncthreads();
    else asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(T / 2) : "memory");
  };
  for (int c = 0; c < nchunks; ++c) {
    const long long c0 = (long long)c * p.C, len = p.C < per - c0 ? p.C : per - c0;
    const long long slot = ((long long)ch * p.K + c % p.K) * p.C;
    if (stager) {
      if (tid == 0 && c >= p.K) while (ld_acquire_sys(read) < p.base + c - p.K + 1) {}
      if (tid == 0 && c < p.K && p.chain) while (ld_acquire_sys(read) < p.base - STEP + nchunks) {}
      bar(1);
      copy_range<4>(p.ring + slot, p.in + b0 + c0, len, tid, nt);
      bar(1);
      if (tid == 0) st_release_sys(p.pflags + 16384 + ch * 32, p.base + c + 1);
    }
    if (puller) {
      if (tid == 0) while (ld_acquire_sys(staged) < p.base + c + 1) {}
      bar(2);
      add_range<2>(p.out + b0 + c0, p.in + b0 + c0, p.pring + slot, len, tid, nt);
      bar(2);
      if (tid == 0) st_release_sys(p.pflags + 16384 + 8192 + ch * 32, p.base + c + 1);
    }
  }
}
__global__ void count_bad(const float4* out, long long n, float want, unsigned long long* bad) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float4 v = out[i]; if (v.x != want || v.y != want || v.z != want || v.w != want) atomicAdd(bad, 1ull);
  }
}
__global__ void fill(float4* a, long long n, float v) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) a[i] = make_float4(v, v, v, v);
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  const size_t bytes = (argc > 1 ? atoll(argv[1]) : 128ll) << 20; const long long n = bytes / 16;
  const int iters = argc > 2 ? atoi(argv[2]) : 1;  // launches back to back per timing
  const size_t ring_bytes = 64ull << 20;
  float4 *in[2], *out[2], *rec[2], *ring[2]; unsigned* flags[2]; unsigned long long* bad[2];
  for (int d = 0; d < 2; ++d) {
    CK(cudaSetDevice(d)); CK(cudaDeviceEnablePeerAccess(1 - d, 0));
    CK(cudaMalloc(&in[d], bytes)); CK(cudaMalloc(&out[d], bytes)); CK(cudaMalloc(&rec[d], bytes)); CK(cudaMalloc(&ring[d], ring_bytes));
    CK(cudaMalloc(&flags[d], 1 << 20)); CK(cudaMemset(flags[d], 0, 1 << 20)); CK(cudaMalloc(&bad[d], 8));
    fill<<<264, 512>>>(in[d], n, (float)(d + 1)); CK(cudaDeviceSynchronize());
  }
  cudaStream_t st[2]; cudaEvent_t e0[2], e1[2];
  for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaStreamCreateWithFlags(&st[d], cudaStreamNonBlocking)); CK(cudaEventCreate(&e0[d])); CK(cudaEventCreate(&e1[d])); }
  unsigned base = 0;
  int chain = 0;
  auto run = [&](const char* name, auto launch, bool check) {
    std::vector<float> ts;
    for (int it = 0; it < 6; ++it) {
      for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaMemsetAsync(out[d], 0, bytes, st[d])); }
      for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaStreamSynchronize(st[d])); }
      for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaEventRecord(e0[d], st[d])); }
      for (int i = 0; i < iters; ++i) {
        chain = it > 0 || i > 0;
        for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); launch(d); CK(cudaGetLastError()); }
        base += STEP;
      }
      for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaEventRecord(e1[d], st[d])); }
      float worst = 0;
      for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaStreamSynchronize(st[d])); float ms; CK(cudaEventElapsedTime(&ms, e0[d], e1[d])); worst = std::max(worst, ms); }
      if (it) ts.push_back(worst * 1e3f / iters);
    }
    std::sort(ts.begin(), ts.end());
    unsigned long long nb[2] = {0, 0};
    if (check) for (int d = 0; d < 2; ++d) { CK(cudaSetDevice(d)); CK(cudaMemset(bad[d], 0, 8)); count_bad<<<264, 512>>>(out[d], n, 3.f, bad[d]); CK(cudaMemcpy(&nb[d], bad[d], 8, cudaMemcpyDeviceToHost)); }
    printf("%-52s %8.1f us  %6.1f GB/s  %s\n", name, ts[ts.size() / 2], bytes / (ts[ts.size() / 2] * 1e-6) / 1e9,
           check ? (nb[0] + nb[1] ? "WRONG" : "ok") : "-");
  };
  printf("bytes per rank %zu MiB, %d launches per timing\n", bytes >> 20, iters);
  for (int g : {64, 128, 132}) {
    char nm[96]; snprintf(nm, sizeof nm, "pull in place unr2 grid %d", g);
    run(nm, [&](int d) { pull_ar<2><<<g, T, 0, st[d]>>>(out[d], in[d], in[1 - d], n); }, true);
    snprintf(nm, sizeof nm, "pull in place unr4 grid %d", g);
    run(nm, [&](int d) { pull_ar<4><<<g, T, 0, st[d]>>>(out[d], in[d], in[1 - d], n); }, true);
  }
  for (int g : {32, 64, 128}) {
    char nm[96]; snprintf(nm, sizeof nm, "push only grid %d", g);
    run(nm, [&](int d) { push_all<<<g, T, 0, st[d]>>>(rec[1 - d], in[d], n); }, false);
  }
  run("local reduce only grid 128", [&](int d) { reduce_all<<<128, T, 0, st[d]>>>(out[d], in[d], rec[d], n); }, false);
  run("push 64 then reduce 128 (two kernels)", [&](int d) { push_all<<<64, T, 0, st[d]>>>(rec[1 - d], in[d], n); reduce_all<<<128, T, 0, st[d]>>>(out[d], in[d], rec[d], n); }, false);
  for (int split : {0, 1})
    for (int nch : {64, 128})
      for (int ckb : {64, 128}) {
        const int C = ckb * 1024 / 16, K = 4;
        if ((long long)nch * K * C * 16 > (long long)ring_bytes) continue;
        char nm[96]; snprintf(nm, sizeof nm, "pull pipe %s nch %3d chunk %3d KiB K %d", split ? "warps " : "one   ", nch, ckb, K);
        run(nm, [&](int d) {
          Pipe p{out[d], in[d], ring[d], ring[1 - d], flags[d], flags[1 - d], n, nch, C, K, base, chain};
          if (split) pull_pipe<1><<<nch, T, 0, st[d]>>>(p); else pull_pipe<0><<<nch, T, 0, st[d]>>>(p);
        }, true);
      }
  for (int split : {0, 1})
    for (int nch : {16, 32, 48, 64, 128})
      for (int ckb : {64, 256}) {
        if (split == 0 && nch > 64) continue;
        for (int K : {2, 4}) {
          const int C = ckb * 1024 / 16;
          if ((long long)nch * K * C * 16 > (long long)ring_bytes) continue;
          for (int flag : {0, 1}) {
            if (flag == 1 && (K != 4 || ckb != 64)) continue;
            char nm[96]; snprintf(nm, sizeof nm, "pipe %s nch %3d chunk %3d KiB K %d %s", split ? "warps " : "blocks", nch, ckb, K, flag ? "fence+relaxed" : "release");
            run(nm, [&](int d) {
              Pipe p{out[d], in[d], ring[d], ring[1 - d], flags[d], flags[1 - d], n, nch, C, K, base, chain};
              const int grid = split ? nch : 2 * nch;
              if (split) { if (flag) push_pipe<1, 1><<<grid, T, 0, st[d]>>>(p); else push_pipe<1, 0><<<grid, T, 0, st[d]>>>(p); }
              else { if (flag) push_pipe<0, 1><<<grid, T, 0, st[d]>>>(p); else push_pipe<0, 0><<<grid, T, 0, st[d]>>>(p); }
            }, true);
          }
        }
      }
  return 0;
}
