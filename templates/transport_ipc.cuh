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
// registered: a rank publishes the offset of its input in its registered pool as a
//             64-bit word (epoch << 32 | word) to its neighbours, who then load the input
//             in place (mixcc/fused.py REG_MIN_BYTES says when).
#pragma once

namespace mixcc {
namespace ipc {

// L: the module's layout constants, rendered from mixcc/codegen/layout.py
// (render.ipc_layout_struct): MAX_RANKS, MAX_BLOCKS, NSETS, PUSH_FLAG_OFFSET,
// SENT_OFFSET, REG_OFFSET. T: the element type. A: the launch arguments (peers,
// data_off, region_bytes).
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

  // The epoch at which this rank last pushed into set `set` of rank dst (a local word).
  static __device__ __forceinline__ unsigned* sent_word(unsigned* ws, int block, int dst,
                                                        int set) {
    return reinterpret_cast<unsigned*>(reinterpret_cast<char*>(ws) + L::SENT_OFFSET) +
           (block * L::MAX_RANKS + dst) * L::NSETS + set;
  }
};

}  // namespace ipc
}  // namespace mixcc
