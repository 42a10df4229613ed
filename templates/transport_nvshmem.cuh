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
//
// The symmetric workspace (SymWorkspace below; mixcc/codegen/layout.py): signal words
// [block][set][src PE], credit words [block][PE], the local sent words [block][PE][set],
// the blame word, then per (set, block) a region of send parts [node][slot] followed by
// received parts [node][slot], each of `share_cap` elements. Every word has one writer.
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

// L: the module's layout constants, rendered from mixcc/codegen/layout.py
// (render.sym_layout_struct): MAX_RANKS, MAX_BLOCKS, NSETS, SIG_BYTES, CREDIT_BYTES,
// SYM_DATA_OFFSET, SYM_BLAME_OFFSET. T: the element type. A: the launch arguments (sym,
// sym_region_bytes, share_cap). Addresses are symmetric: the same on every PE.
template <typename L, typename T>
struct SymWorkspace {
  // Part `slot` of node `node` in the send (recv false) or receive parts of (set, block);
  // nodes x parts: the stage's NODES and MAX_PARTS.
  template <typename A>
  static __device__ __forceinline__ T* part(const A& a, int set, unsigned block, bool recv,
                                            int node, int slot, int nodes, int parts) {
    char* base = a.sym + L::SYM_DATA_OFFSET +
                 ((long long)set * L::MAX_BLOCKS + block) * a.sym_region_bytes;
    const long long idx = (recv ? nodes * parts : 0) + (long long)node * parts + slot;
    return reinterpret_cast<T*>(base) + idx * a.share_cap;
  }

  // The signal word of (block, set) that PE src_pe sets when its part has arrived.
  template <typename A>
  static __device__ __forceinline__ uint64_t* signal_word(const A& a, int set, unsigned block,
                                                          int src_pe) {
    return reinterpret_cast<uint64_t*>(a.sym) +
           ((long long)block * L::NSETS + set) * L::MAX_RANKS + src_pe;
  }

  // The credit word of `block` that PE pe sets once it has consumed what this PE put.
  template <typename A>
  static __device__ __forceinline__ uint64_t* credit_word(const A& a, unsigned block, int pe) {
    return reinterpret_cast<uint64_t*>(a.sym + L::SIG_BYTES) + (long long)block * L::MAX_RANKS +
           pe;
  }

  template <typename A>
  static __device__ __forceinline__ const uint64_t* blame_word(const A& a) {
    return reinterpret_cast<const uint64_t*>(a.sym + L::SYM_BLAME_OFFSET);
  }

  // Local: the sequence number this PE last put into buffer set `set` of PE `dst`.
  template <typename A>
  static __device__ __forceinline__ unsigned* sent_word(const A& a, unsigned block, int dst,
                                                        int set) {
    return reinterpret_cast<unsigned*>(a.sym + L::SIG_BYTES + L::CREDIT_BYTES) +
           ((long long)block * L::MAX_RANKS + dst) * L::NSETS + set;
  }
};

}  // namespace nvs
}  // namespace mixcc
