"""The workspace layouts shared by the runtime (allocation) and the kernels (addressing).

IPC workspace, one per rank, fixed size:
  [0, FLAG_BYTES)   flags: uint32 [MAX_BLOCKS][2 barrier stages][MAX_RANKS], written by
                    peers (flag [b][s][src] holds the last epoch src reached)
  [FLAG_BYTES, …)   debug fingerprints: uint64 [MAX_BLOCKS][MAX_RANKS], (epoch << 32 | fp)
                    of src's last input barrier; written only in debug mode (mixcc/debug.py)
  [BLAME_OFFSET]    uint32: 1 + the rank this rank's first timed-out wait blamed (0: none),
                    read by peers that time out waiting for this rank (root-cause naming)
  [DATA_OFFSET, …)  NSETS sets x MAX_BLOCKS regions of region_bytes(workspace) bytes.
                    Chunk (epoch e) of block b uses region b of set e % NSETS. Block b of
                    every kernel only ever touches region b of a set, and the epoch counter
                    is shared by every kernel, so collectives with different block counts
                    and kinds share one workspace. Four sets let a pipelined kernel keep up
                    to three chunks in flight (docs/DESIGN.md, "Pipelining"); NSETS is a
                    power of two so that e % NSETS stays in step when the uint32 epoch wraps.

NVSHMEM symmetric workspace, one per rank (the same offsets on every PE):
  [0, SIG_BYTES)         uint64 signals [MAX_BLOCKS][NSETS][MAX_RANKS] (data of a chunk
                         from PE src arrived; value = the chunk's sequence number), then
                         uint64 credits [MAX_BLOCKS][MAX_RANKS] (the last sequence number PE
                         dst consumed from this PE), then uint32 [MAX_BLOCKS][MAX_RANKS]
                         [NSETS] (local: the sequence number this PE last put into each
                         buffer set of PE dst), then the uint64 blame word (as the IPC
                         one, for peers on other nodes). Indexed by PE, never by node: each word has
                         one writer whatever the mesh, so collectives over meshes with
                         different ranks_per_node share one workspace.
  [SYM_DATA_OFFSET, …)   NSETS sets x MAX_BLOCKS regions of sym_region_bytes(bytes): send
                         parts [nodes][max_parts] then received parts [nodes][max_parts],
                         each a column share of share_cap elements.
"""

from __future__ import annotations

# Default per-rank IPC workspace. 16 MiB gives 128 KiB regions: a one-shot message of a
# few MB per rank then fits in one chunk (latency-bound sizes never loop).
DEFAULT_WORKSPACE_BYTES = 16 << 20
# Default per-rank NVSHMEM symmetric workspace (same region size as the IPC one).
DEFAULT_SYMMETRIC_BYTES = 16 << 20
MAX_BLOCKS = 32  # blocks per kernel; also the number of workspace regions per set
MAX_RANKS = 64  # ranks a runtime can serve
MAX_NODES = 64
THREADS = 512  # threads per block: 512 x 16 B in flight per block per pass
NSETS = 4
FLAG_BYTES = MAX_BLOCKS * 2 * MAX_RANKS * 4
FP_BYTES = MAX_BLOCKS * MAX_RANKS * 8
BLAME_OFFSET = FLAG_BYTES + FP_BYTES
DATA_OFFSET = (BLAME_OFFSET + 4 + 4095) // 4096 * 4096
SIG_BYTES = MAX_BLOCKS * NSETS * MAX_RANKS * 8
CREDIT_BYTES = MAX_BLOCKS * MAX_RANKS * 8
SENT_BYTES = MAX_BLOCKS * MAX_RANKS * NSETS * 4
SYM_BLAME_OFFSET = SIG_BYTES + CREDIT_BYTES + SENT_BYTES
SYM_DATA_OFFSET = (SYM_BLAME_OFFSET + 8 + 4095) // 4096 * 4096


def region_bytes(workspace_bytes: int) -> int:
    """Bytes of one block's region in one set of the IPC data area."""
    return (workspace_bytes - DATA_OFFSET) // (NSETS * MAX_BLOCKS) // 16 * 16


def sym_region_bytes(symmetric_bytes: int) -> int:
    """Bytes of one block's region in one set of the NVSHMEM data area."""
    return (symmetric_bytes - SYM_DATA_OFFSET) // (NSETS * MAX_BLOCKS) // 16 * 16
