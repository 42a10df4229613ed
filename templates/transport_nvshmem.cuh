// The NVSHMEM transport of mixcc's inter-node steps (docs/DESIGN.md, "Transports").
//
// put:    nvshmemx_putmem_signal_block: the block copies (P2P) or posts (IB) its share,
//         then the signal word at the destination is SET to the chunk's sequence number
//         once the data is delivered (NVSHMEM orders the signal after the data). It
//         returns when the source may be reused; delivery completes asynchronously.
// wait:   one thread polls the local signal word with ld.acquire.sys (the signal is
//         written by a peer's store or by the NIC) until it reaches the sequence number,
//         with the runtime's timeout; a __syncthreads then extends the acquire to the
//         block, and the data is read with ld.global.cg (L2 only, never a stale L1 line).
// credit: after a chunk's received parts are consumed, the receiver SETs its credit
//         word at each sender to that sequence number; before a sender puts into a
//         receiver's buffer set again it waits until the credit reaches the sequence
//         number it last put into that set (kept locally per receiver and set).
// Sequence numbers grow by one per chunk of a hierarchical kernel (per block, the same
// on every rank), so a signal or credit is compared in wrapping uint32 arithmetic and
// never reset: CUDA graph replays need no host-side state.
#pragma once
#include <nvshmem.h>
#include <nvshmemx.h>
#include <stdint.h>

#include "mixcc_sync.cuh"

namespace mixcc {
namespace nvs {

__device__ __forceinline__ unsigned ld_acquire_sys_lo(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return (unsigned)v;
}

// Wait for a signal from PE `peer`; `blame` is the symmetric address of the blame word,
// read on `peer` now and then where it is load/store reachable (nvshmem_ptr: P2P): a peer
// that gave up on a third PE never signals. Over a network transport the word is not
// read (a get from a dead PE could itself hang); the wait then runs to its own timeout
// and names `peer`.
__device__ __forceinline__ bool wait_signal(const uint64_t* sig, unsigned seq,
                                            uint64_t timeout_ns, ErrorRecord* err, int rank,
                                            int peer, int stage, int block,
                                            const uint64_t* blame) {
  const volatile uint64_t* remote =
      static_cast<const volatile uint64_t*>(nvshmem_ptr(blame, peer));
  return spin_until([sig] { return ld_acquire_sys_lo(sig); }, seq, timeout_ns, err, rank, peer,
                    stage, block, [remote] { return remote ? (unsigned)*remote : 0u; });
}

// Collective over the block: every thread calls it with the same arguments.
__device__ __forceinline__ void put_signal_block(void* dst, const void* src, size_t bytes,
                                                 uint64_t* sig, unsigned seq, int pe) {
  nvshmemx_putmem_signal_block(dst, src, bytes, sig, (uint64_t)seq, NVSHMEM_SIGNAL_SET, pe);
}

__device__ __forceinline__ void signal(uint64_t* sig, unsigned seq, int pe) {
  nvshmemx_signal_op(sig, (uint64_t)seq, NVSHMEM_SIGNAL_SET, pe);
}

}  // namespace nvs
}  // namespace mixcc
