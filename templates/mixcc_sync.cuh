// mixcc synchronisation primitives: flags with epochs, per-block cross-rank barriers,
// timeouts that report instead of hanging.
//
// Memory-order reasoning (PTX memory model):
//  * A producer block writes its workspace region with plain stores, then
//    bar.sync (__syncthreads) makes those writes precede, in causality order, the
//    flag store that one thread issues next.
//  * That flag store is st.release.sys: release at system scope is cumulative, so
//    every write that precedes it in causality order (the whole block's staging
//    writes, via the barrier) is visible to any thread that observes the flag.
//  * The consumer spins with ld.acquire.sys on its own copy of the flag (the peer
//    wrote it through a CUDA IPC mapping). Acquire orders the spinning thread's
//    later accesses after the observation; the following bar.sync extends that to
//    the whole block.
//  * Peer data is then read with ld.global.cg (L2 only, never L1): a stale L1 line
//    from a previous epoch at the same address can never be returned.
//  * Flags only grow (one epoch per chunk and barrier stage), so a wait is
//    "flag >= epoch" in wrapping arithmetic and no flag is ever reset: CUDA graph
//    replays keep working without host-side state.
#pragma once
#include <stdint.h>

namespace mixcc {

struct ErrorRecord {           // host-mapped; written once by the first timed-out thread
  volatile int status;         // 0 ok, 1 timeout
  volatile int rank, peer, stage, block;
  volatile unsigned epoch;
};

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void st_release_sys(unsigned* p, unsigned v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned ld_acquire_sys(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Record a timed-out wait in `err` (the first writer wins). Stages: 0 input barrier,
// 1 result barrier, 2 inter-node data (NVSHMEM signal), 3 inter-node credit.
__device__ __forceinline__ void record_timeout(ErrorRecord* err, int rank, int peer, int stage,
                                               int block, unsigned epoch) {
  if (atomicCAS((int*)&err->status, 0, 1) == 0) {
    err->rank = rank;
    err->peer = peer;
    err->stage = stage;
    err->block = block;
    err->epoch = epoch;
    __threadfence_system();
  }
}

// Another wait of this runtime already timed out: every later wait gives up at once, so
// kernels queued behind a failed one return instead of each waiting its own timeout.
__device__ __forceinline__ bool runtime_failed(const ErrorRecord* err) {
  return *(volatile const int*)&err->status != 0;
}

// Spin until load() >= value in wrapping uint32 arithmetic. On timeout (or when the
// runtime already failed), record (rank, peer, stage, block, value) and return false.
template <typename Load>
__device__ __forceinline__ bool spin_until(Load load, unsigned value, uint64_t timeout_ns,
                                           ErrorRecord* err, int rank, int peer, int stage,
                                           int block) {
  if ((int)(load() - value) >= 0) return true;
  const uint64_t start = globaltimer_ns();
  unsigned n = 0;
  while ((int)(load() - value) < 0) {
    if ((++n & 1023) == 0 && runtime_failed(err)) return false;
    if (globaltimer_ns() - start > timeout_ns) {
      record_timeout(err, rank, peer, stage, block, value);
      return false;
    }
  }
  return true;
}

// Spin until *flag >= epoch (a peer's IPC store, acquire at system scope).
__device__ __forceinline__ bool wait_flag(const unsigned* flag, unsigned epoch,
                                          uint64_t timeout_ns, ErrorRecord* err, int rank,
                                          int peer, int stage, int block) {
  return spin_until([flag] { return ld_acquire_sys(flag); }, epoch, timeout_ns, err, rank,
                    peer, stage, block);
}

// Cross-rank barrier of block `block` at (stage, epoch) with `nbrs` (no self).
// flags(r) is rank r's flag array: [block][stage][source rank]. Returns false on
// timeout (the caller must leave the kernel: the workspace is no longer consistent).
template <int MAX_RANKS>
__device__ __forceinline__ bool block_barrier(unsigned* const* flags, int rank,
                                              const int* nbrs, int n_nbrs, int block,
                                              int stage, unsigned epoch, uint64_t timeout_ns,
                                              ErrorRecord* err) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();  // all staging writes of this block precede the release below
  const int slot = (block * 2 + stage) * MAX_RANKS;
  if ((int)threadIdx.x < n_nbrs) {
    const int p = nbrs[threadIdx.x];
    st_release_sys(flags[p] + slot + rank, epoch);
    if (!wait_flag(flags[rank] + slot + p, epoch, timeout_ns, err, rank, p, stage, block))
      failed = 1;
  }
  __syncthreads();  // extends each acquire to the whole block
  return failed == 0;
}

}  // namespace mixcc
