// The CUDA IPC transport of mixcc's stages (docs/DESIGN.md, "Transports"): where a block's
// data, flags and words lie in a rank's workspace (mixcc/codegen/layout.py), addressed
// from any rank of the node through the peers' base pointers (`a.peers`, mapped by CUDA
// IPC). The memory orders of the flags are in mixcc_sync.cuh.
//
// pull:       rank r stages its input into its own region of (set, block); after a
//             barrier its neighbours load it (one-shot, two-shot, hierarchical IPC steps).
// push:       a sender stores into its own area of the consumer's push region of (set,
//             block), then releases the consumer's data flag; the consumer returns a
//             credit once it has read the area (push_kernel).
// ll:         a sender stores 16-byte lines, 8 bytes of data and the epoch twice, into its
//             own area of the consumer's LL region of (set, block); the consumer polls
//             the lines themselves, so no flag round trip is paid (NCCL's LL protocol:
//             each 8-byte half, data and epoch, is written and read as a whole). No
//             credits: the LL kernel runs only where every rank it writes to also writes
//             to it, so a rank one set ahead has seen its consumer finish the set before
//             (ll_kernel).
// registered: a rank publishes the offset of its input in its registered pool as a
//             64-bit word (epoch << 32 | word) to its neighbours, who then load the input
//             in place (mixcc/fused.py REG_MIN_BYTES says when).
#pragma once
#include <stdint.h>

#include "mixcc_sync.cuh"

namespace mixcc {
namespace ipc {

// L: the module's layout constants, rendered from mixcc/codegen/layout.py
// (render.ipc_layout_struct): MAX_RANKS, MAX_BLOCKS, NSETS, PUSH_FLAG_OFFSET,
// SENT_OFFSET, REG_OFFSET, ROWSUM_OFFSET, ROW_SPLIT_MAX. T: the element type. A: the
// launch arguments (peers, data_off, region_bytes).
template <typename L, typename T>
struct Workspace {
  // Rank r's pull region of (set, block).
  template <typename A>
  static __device__ __forceinline__ T* region(const A& a, int r, int set, int block) {
    return reinterpret_cast<T*>(a.peers[r] + a.data_off +
                                ((long long)set * L::MAX_BLOCKS + block) * a.region_bytes);
  }

  // Rank r's push region of (set, block), sender area `area` of `senders` (the push area
  // follows the pull area; each region is cut into equal sender areas of 16-byte units).
  template <typename A>
  static __device__ __forceinline__ T* push_region(const A& a, int r, int set, int block,
                                                   int area, int senders) {
    const long long area_bytes = a.region_bytes / senders / 16 * 16;
    return reinterpret_cast<T*>(a.peers[r] + a.data_off +
                                ((long long)(L::NSETS + set) * L::MAX_BLOCKS + block) *
                                    a.region_bytes +
                                area * area_bytes);
  }

  // The lines of rank r's LL region of (set, block), sender area `area` of `senders`.
  template <typename A>
  static __device__ __forceinline__ uint4* ll_region(const A& a, int r, int set, int block,
                                                     int area, int senders) {
    const long long area_bytes = L::LL_REGION_BYTES / senders / 16 * 16;
    return reinterpret_cast<uint4*>(a.peers[r] + L::LL_OFFSET +
                                    ((long long)set * L::MAX_BLOCKS + block) * L::LL_REGION_BYTES +
                                    area * area_bytes);
  }

  // Push flags of the rank whose workspace is `ws`: [block][0][src] data arrived from src,
  // [block][1][dst] dst consumed what this rank pushed (a credit).
  static __device__ __forceinline__ unsigned* push_flag(unsigned* ws, int block, int kind,
                                                        int rank) {
    return reinterpret_cast<unsigned*>(reinterpret_cast<char*>(ws) + L::PUSH_FLAG_OFFSET) +
           (block * 2 + kind) * L::MAX_RANKS + rank;
  }

  // Registered-input words of the rank whose workspace is `ws`: [block][src].
  static __device__ __forceinline__ unsigned long long* reg_words(unsigned* ws) {
    return reinterpret_cast<unsigned long long*>(reinterpret_cast<char*>(ws) + L::REG_OFFSET);
  }

  // The row-sum slots of the rank whose workspace is `ws`: [leader block][j] (local).
  static __device__ __forceinline__ unsigned long long* rowsum_slots(unsigned* ws, int leader) {
    return reinterpret_cast<unsigned long long*>(reinterpret_cast<char*>(ws) +
                                                 L::ROWSUM_OFFSET) + leader * L::ROW_SPLIT_MAX;
  }

  // The epoch at which this rank last pushed into set `set` of rank dst (a local word).
  static __device__ __forceinline__ unsigned* sent_word(unsigned* ws, int block, int dst,
                                                        int set) {
    return reinterpret_cast<unsigned*>(reinterpret_cast<char*>(ws) + L::SENT_OFFSET) +
           (block * L::MAX_RANKS + dst) * L::NSETS + set;
  }
};

// One LL line: data words d0, d1, each beside the epoch (st.volatile: not kept in L1).
__device__ __forceinline__ void ll_store(uint4* p, unsigned d0, unsigned d1, unsigned epoch) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(d0),
               "r"(epoch), "r"(d1), "r"(epoch)
               : "memory");
}

__device__ __forceinline__ uint4 ll_load(const uint4* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// Poll line p until both halves carry `epoch` (a stale line holds an earlier epoch of
// the LL kernel, or zero); its data words into d0, d1. On timeout the wait is recorded
// as spin_until does (stage `stage`, blaming `peer`) and false returned.
template <typename Blame>
__device__ __forceinline__ bool ll_wait(const uint4* p, unsigned epoch, unsigned& d0,
                                        unsigned& d1, uint64_t timeout_ns, ErrorRecord* err,
                                        int rank, int peer, int stage, int block, Blame blame) {
  uint4 v = ll_load(p);
  if (v.y != epoch || v.w != epoch) {
    auto seen = [&] {
      v = ll_load(p);
      return v.y == epoch && v.w == epoch ? epoch : epoch - 1;
    };
    if (!spin_until(seen, epoch, timeout_ns, err, rank, peer, stage, block, blame)) return false;
  }
  d0 = v.x;
  d1 = v.z;
  return true;
}

// Poll N lines at once: every load is in flight before the first is checked, so lines
// that have arrived cost one trip to memory together instead of one each (a thread's
// lines are otherwise read one after the other: each check waits for its load); a line
// not there yet is then polled alone by ll_wait. live[i] false: line i is not read. The
// data words of line i into d[2i], d[2i + 1] (zero where not read: not live, or after
// a line timed out).
template <int N, typename Blame>
__device__ __forceinline__ bool ll_wait_n(const uint4* const (&p)[N], const bool (&live)[N],
                                          unsigned epoch, unsigned (&d)[2 * N],
                                          uint64_t timeout_ns, ErrorRecord* err, int rank,
                                          int peer, int stage, int block, Blame blame) {
  uint4 v[N];
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (live[i]) v[i] = ll_load(p[i]);
  bool ok = true;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    d[2 * i] = d[2 * i + 1] = 0;
    if (!live[i] || !ok) continue;
    if (v[i].y == epoch && v[i].w == epoch) {
      d[2 * i] = v[i].x;
      d[2 * i + 1] = v[i].z;
    } else {
      ok = ll_wait(p[i], epoch, d[2 * i], d[2 * i + 1], timeout_ns, err, rank, peer, stage,
                   block, blame);
    }
  }
  return ok;
}

}  // namespace ipc
}  // namespace mixcc
