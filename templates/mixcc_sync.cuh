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

struct ErrorRecord {           // host-mapped; written once by the first failing thread
  volatile int status;         // 0 ok, 1 timeout, 2 fingerprint mismatch (debug mode);
                               // stored last, with release: the fields below are complete
  volatile int rank, peer, stage, block;
  volatile unsigned epoch;
  volatile unsigned mine_fp, peer_fp;  // status 2: this rank's and the peer's fingerprints
  volatile int via;            // 1 + the peer waited for when `peer` is the rank it blamed
  unsigned* blame_ipc;         // set by the host: this rank's blame words (IPC workspace,
  unsigned long long* blame_sym;  // NVSHMEM symmetric workspace or null), written on timeout
  volatile int claim;          // the first failing thread takes it (CAS 0 -> 1), then
                               // writes the fields, then status
};

__device__ __forceinline__ void st_release_sys_int(volatile int* p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

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

// 64-bit forms for the debug fingerprint words: epoch and fingerprint travel in one
// single-copy-atomic access, so a reader never pairs one call's epoch with another's
// fingerprint.
__device__ __forceinline__ void st_release_sys64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_acquire_sys64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// GPU scope, relaxed, for words that blocks of one rank exchange through its own memory
// (a fused epilogue's row split over blocks): each word carries its value and its tag in
// one single-copy-atomic access and publishes nothing else, so no ordering is needed.
// (A release store would also wait for the thread's earlier stores, the LL lines it sent
// to the peer over NVLink among them: docs/DESIGN.md, "Rows split over blocks".)
__device__ __forceinline__ void st_relaxed_gpu64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_relaxed_gpu64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Blame words (docs/DESIGN.md, "Reliability"): 1 + the rank this rank's timed-out wait
// blames, with BLAME_FINAL once its error record is written. A rank that times out first
// publishes a tentative word, then listens for BLAME_GRACE_NS to the word of the peer it
// waited for, adopting (and re-publishing) the rank that peer blames: timeouts that
// expire together along a chain (rank 3 waits for rank 1, which waits for the dead rank
// 0) then all name rank 0. Before its own timeout a wait adopts only final words.
// 250 ms: far above the usual spread of the ranks' timeout moments (ranks blocked on one
// dead peer start waiting within microseconds of each other) and well inside the +1 s
// users are promised. A rank that started waiting more than 250 ms before the rank it
// waits for can still name that rank instead of the root.
constexpr unsigned BLAME_FINAL = 0x80000000u;
constexpr uint64_t BLAME_GRACE_NS = 250000000ull;

__device__ __forceinline__ void publish_tentative(ErrorRecord* err, int root) {
  const unsigned v = (unsigned)root + 1;
  if (unsigned* b = err->blame_ipc) {
    unsigned old = *(volatile unsigned*)b;
    while (!(old & BLAME_FINAL) && old != v) {
      const unsigned prev = atomicCAS(b, old, v);
      if (prev == old) break;
      old = prev;
    }
  }
  if (unsigned long long* bs = err->blame_sym) {
    unsigned long long old = *(volatile unsigned long long*)bs;
    while (!(old & BLAME_FINAL) && old != v) {
      const unsigned long long prev = atomicCAS(bs, old, (unsigned long long)v);
      if (prev == old) break;
      old = prev;
    }
  }
  __threadfence_system();
}

// Record a timed-out wait in `err` (the first writer wins) and publish whom it blames,
// final, in this rank's blame words. Stages: 0 input barrier, 1 result barrier, 2
// inter-node data (NVSHMEM signal), 3 inter-node credit. `via`: 1 + the peer waited for
// when `peer` was learned from that peer's blame word, else 0.
__device__ __forceinline__ void record_timeout(ErrorRecord* err, int rank, int peer, int stage,
                                               int block, unsigned epoch, int via = 0) {
  if (atomicCAS((int*)&err->claim, 0, 1) == 0) {
    err->rank = rank;
    err->peer = peer;
    err->stage = stage;
    err->block = block;
    err->epoch = epoch;
    err->via = via;
    const unsigned v = ((unsigned)peer + 1) | BLAME_FINAL;
    if (unsigned* b = err->blame_ipc) atomicExch(b, v);
    if (unsigned long long* bs = err->blame_sym) atomicExch(bs, (unsigned long long)v);
    __threadfence_system();
    st_release_sys_int(&err->status, 1);  // the host reads a complete record
  }
}

// Record that `peer` reached the same barrier from a different call (debug mode).
__device__ __forceinline__ void record_mismatch(ErrorRecord* err, int rank, int peer,
                                                int block, unsigned epoch, unsigned mine,
                                                unsigned theirs) {
  if (atomicCAS((int*)&err->claim, 0, 1) == 0) {
    err->rank = rank;
    err->peer = peer;
    err->stage = 0;
    err->block = block;
    err->epoch = epoch;
    err->mine_fp = mine;
    err->peer_fp = theirs;
    __threadfence_system();
    st_release_sys_int(&err->status, 2);
  }
}

// Another wait of this runtime already timed out: every later wait gives up at once, so
// kernels queued behind a failed one return instead of each waiting its own timeout.
__device__ __forceinline__ bool runtime_failed(const ErrorRecord* err) {
  return err->claim != 0;
}

// Spin until load() >= value in wrapping uint32 arithmetic. On timeout, record (rank,
// peer, stage, block, value) and return false; when the runtime already failed, return
// false without recording (checked every 1024th spin, about a millisecond: a kernel
// queued behind a failed one returns within about that, while a wait that is satisfied
// sooner never reads the host-mapped record: a read of host memory can cost tens of
// microseconds in a VM, commit 87d555c).
// blame() reads the peer's blame word (1 + the rank it timed out on, 0 if none): a peer
// that gave up on a third rank will never arrive, so the wait ends at once and names
// that rank, with `via` the peer.
template <typename Load, typename Blame>
__device__ __forceinline__ bool spin_until(Load load, unsigned value, uint64_t timeout_ns,
                                           ErrorRecord* err, int rank, int peer, int stage,
                                           int block, Blame blame) {
  if ((int)(load() - value) >= 0) return true;
  const uint64_t start = globaltimer_ns();
  unsigned n = 0;
  while ((int)(load() - value) < 0) {
    if ((++n & 1023) == 0) {
      if (runtime_failed(err)) return false;
      const unsigned w = blame();
      const int root = (int)(w & ~BLAME_FINAL) - 1;
      if ((w & BLAME_FINAL) && root != rank) {
        record_timeout(err, rank, root, stage, block, value, peer + 1);
        return false;
      }
    }
    if (globaltimer_ns() - start > timeout_ns) {
      int root = peer, via = 0;
      publish_tentative(err, root);
      const uint64_t t1 = globaltimer_ns();
      while (globaltimer_ns() - t1 < BLAME_GRACE_NS) {
        if (runtime_failed(err)) return false;
        const unsigned w = blame();
        const int r = (int)(w & ~BLAME_FINAL) - 1;
        if (w != 0 && r != rank && r != root) {
          root = r;
          via = peer + 1;
          publish_tentative(err, root);
        }
      }
      record_timeout(err, rank, root, stage, block, value, via);
      return false;
    }
  }
  return true;
}

// Spin until *flag >= epoch (a peer's IPC store, acquire at system scope); `blame` is
// the peer's blame word.
__device__ __forceinline__ bool wait_flag(const unsigned* flag, unsigned epoch,
                                          uint64_t timeout_ns, ErrorRecord* err, int rank,
                                          int peer, int stage, int block,
                                          const unsigned* blame) {
  return spin_until([flag] { return ld_acquire_sys(flag); }, epoch, timeout_ns, err, rank,
                    peer, stage, block, [blame] { return *(volatile const unsigned*)blame; });
}

// Rank r's blame word: right after its fingerprint words (mixcc/codegen/layout.py).
template <int MAX_RANKS, int MAX_BLOCKS>
__device__ __forceinline__ const unsigned* blame_word(unsigned* flags_of_r) {
  return flags_of_r + MAX_BLOCKS * 2 * MAX_RANKS + MAX_BLOCKS * MAX_RANKS * 2;
}

// spin_until's blame reader for peer p: p's blame word, read (volatile) only when the
// spin asks, after its flags pointer (the IPC mapping of every rank's flags).
template <int MAX_RANKS, int MAX_BLOCKS>
__device__ __forceinline__ auto blame_of(unsigned* const* flags, int p) {
  return [flags, p] {
    return *(volatile const unsigned*)blame_word<MAX_RANKS, MAX_BLOCKS>(flags[p]);
  };
}

// Rank r's debug fingerprint words: uint64 [MAX_BLOCKS][MAX_RANKS] right after its
// flags (mixcc/codegen/layout.py).
template <int MAX_RANKS, int MAX_BLOCKS>
__device__ __forceinline__ unsigned long long* fp_words(unsigned* flags_of_r) {
  return reinterpret_cast<unsigned long long*>(flags_of_r + MAX_BLOCKS * 2 * MAX_RANKS);
}

// Cross-rank barrier of block `block` at (stage, epoch) with `nbrs` (no self).
// flags(r) is rank r's flag array: [block][stage][source rank]. Returns false on
// timeout (the caller must leave the kernel: the workspace is no longer consistent).
// Debug mode (fp != 0): at the input barrier (stage 0) each rank also publishes
// (epoch, fp) to its peers before its flag (release: a peer that sees the flag sees
// the fingerprint or a later one) and, once the barrier passed, compares each peer's
// word with its own fp. The comparison is made only when the word carries this epoch:
// a peer already at a later epoch passed this barrier and overwrote it, which proves
// nothing either way. A mismatch is recorded as status 2 and fails the barrier.
template <int MAX_RANKS, int MAX_BLOCKS>
__device__ __forceinline__ bool block_barrier(unsigned* const* flags, int rank,
                                              const int* nbrs, int n_nbrs, int block,
                                              int stage, unsigned epoch, uint64_t timeout_ns,
                                              ErrorRecord* err, unsigned fp,
                                              const int* skip = nullptr) {
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();  // all staging writes of this block precede the release below
  const int slot = (block * 2 + stage) * MAX_RANKS;
  const bool check = fp != 0 && stage == 0;
  // *skip (shared, read after the __syncthreads above): the block alone, no neighbour
  if ((int)threadIdx.x < n_nbrs && !(skip && *(const volatile int*)skip)) {
    const int p = nbrs[threadIdx.x];
    if (check)
      st_release_sys64(fp_words<MAX_RANKS, MAX_BLOCKS>(flags[p]) + block * MAX_RANKS + rank,
                       ((unsigned long long)epoch << 32) | fp);
    st_release_sys(flags[p] + slot + rank, epoch);
    if (!wait_flag(flags[rank] + slot + p, epoch, timeout_ns, err, rank, p, stage, block,
                   blame_word<MAX_RANKS, MAX_BLOCKS>(flags[p]))) {
      failed = 1;
    } else if (check) {
      const unsigned long long w = ld_acquire_sys64(
          fp_words<MAX_RANKS, MAX_BLOCKS>(flags[rank]) + block * MAX_RANKS + p);
      if ((unsigned)(w >> 32) == epoch && (unsigned)w != fp) {
        record_mismatch(err, rank, p, block, epoch, fp, (unsigned)w);
        failed = 1;
      }
    }
  }
  __syncthreads();  // extends each acquire to the whole block
  return failed == 0;
}

}  // namespace mixcc
