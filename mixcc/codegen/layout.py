"""The workspace layouts shared by the runtime (allocation) and the kernels (addressing).

IPC workspace, one per rank, fixed size:
  [0, FLAG_BYTES)   flags: uint32 [MAX_BLOCKS][2 barrier stages][MAX_RANKS], written by
                    peers (flag [b][s][src] holds the last epoch src reached)
  [FLAG_BYTES, …)   debug fingerprints: uint64 [MAX_BLOCKS][MAX_RANKS], (epoch << 32 | fp)
                    of src's last input barrier; written only in debug mode (mixcc/debug.py)
  [BLAME_OFFSET]    uint32: 1 + the rank this rank's first timed-out wait blamed (0: none),
                    read by peers that time out waiting for this rank (root-cause naming)
  [PUSH_FLAG_OFFSET] push transport flags: uint32 [MAX_BLOCKS][2][MAX_RANKS]: [b][0][src]
                    = the last epoch src pushed data into this rank's push area (src
                    writes it), [b][1][dst] = the last epoch dst consumed what this rank
                    pushed to it (a credit, dst writes it)
  [SENT_OFFSET]     uint32 [MAX_BLOCKS][MAX_RANKS][NSETS], local: the epoch at which this
                    rank last pushed into set s of rank dst (the credit it must see before
                    writing that set again)
  [REG_OFFSET]      uint64 [MAX_BLOCKS][MAX_RANKS]: (epoch << 32) | word, written by src
                    before its first barrier of a one-shot call: word 0 = src staged its
                    input, else src's input lies in its registered pool at byte offset
                    (word - 1) * 16 and peers read it there (docs/DESIGN.md, "Registered
                    buffers")
  [ROWSUM_OFFSET]   uint64 [MAX_BLOCKS][ROW_SPLIT_MAX], local: the sums of squares of a
                    fused epilogue's row split over blocks of the LL kernel (docs/DESIGN.md,
                    "Epilogues"), slot [L][j] = (tag << 32) | float bits from the row's
                    j-th block, L its first block, tag the leader's epoch of that call
  [LL_OFFSET]       the LL area: LL_SETS sets x MAX_BLOCKS regions of LL_REGION_BYTES, each
                    cut into world-1 sender areas as a push region is (area (src - dst -
                    1) mod world belongs to sender src). Peers write 16-byte lines there,
                    8 bytes of data and the epoch twice (docs/DESIGN.md, "LL"); only the
                    LL kernel touches it, so a line holds an epoch of that kernel or zero
  [DATA_OFFSET, …)  the pull area: NSETS sets x MAX_BLOCKS regions of region_bytes(workspace)
                    bytes, then the push area, laid out alike. Chunk (epoch e) of block b
                    uses region b of set e % NSETS. Block b of every kernel only ever
                    touches region b of a set, and the epoch counter is shared by every
                    kernel, so collectives with different block counts and kinds share one
                    workspace. Four sets let a pipelined kernel keep up to three chunks in
                    flight (docs/DESIGN.md, "Pipelining"); NSETS is a power of two so that
                    e % NSETS stays in step when the uint32 epoch wraps. In the pull area a
                    rank writes its own regions and peers read them; in the push area peers
                    write and the owner reads: each push region is cut into world-1 equal
                    sender areas, area (src - dst - 1) mod world belonging to sender src in
                    every program (docs/DESIGN.md, "Push"), so each area has one writer and
                    one reader whatever mix of collectives runs.

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

# Per-rank NVSHMEM workspace (cross-node programs only): about 512 KiB regions at 128 blocks,
# the fastest of 32 MiB / 256 MiB / 1 GiB on two GPUs as two nodes (commit 73b4a4d).
DEFAULT_SYMMETRIC_BYTES = 256 << 20
# Blocks per kernel and workspace regions per set: each block's phases are latency-bound,
# so bandwidth needs many more blocks than the link alone (commit 87d555c).
MAX_BLOCKS = 128
MAX_RANKS = 64  # ranks a runtime can serve
MAX_NODES = 64
THREADS = 512  # threads per block: 512 x 16 B in flight per block per pass
NSETS = 4
FLAG_BYTES = MAX_BLOCKS * 2 * MAX_RANKS * 4
FP_BYTES = MAX_BLOCKS * MAX_RANKS * 8
BLAME_OFFSET = FLAG_BYTES + FP_BYTES
PUSH_FLAG_OFFSET = (BLAME_OFFSET + 4 + 15) // 16 * 16
PUSH_FLAG_BYTES = MAX_BLOCKS * 2 * MAX_RANKS * 4
SENT_OFFSET = PUSH_FLAG_OFFSET + PUSH_FLAG_BYTES
SENT_BYTES_IPC = MAX_BLOCKS * MAX_RANKS * NSETS * 4
REG_OFFSET = SENT_OFFSET + SENT_BYTES_IPC
REG_BYTES = MAX_BLOCKS * MAX_RANKS * 8
# Blocks that may share one row of the LL kernel's fused epilogue: two beat both one and
# four (commit 82b859d).
ROW_SPLIT_MAX = 2
ROWSUM_OFFSET = REG_OFFSET + REG_BYTES
ROWSUM_BYTES = MAX_BLOCKS * ROW_SPLIT_MAX * 8
LL_OFFSET = (ROWSUM_OFFSET + ROWSUM_BYTES + 4095) // 4096 * 4096
# LL region per block and set: 32 KiB of lines hold a row of 8192 bf16 (a fused epilogue);
# a plain chunk uses LL_CHUNK_BYTES of it, the size measured fastest (commit 1ff688d). Two sets
# suffice (templates/stage_kernel.cu.j2, ll_kernel).
LL_SETS = 2
LL_REGION_BYTES = 32 << 10
LL_CHUNK_BYTES = 8 << 10
LL_BYTES = LL_SETS * MAX_BLOCKS * LL_REGION_BYTES
DATA_OFFSET = (LL_OFFSET + LL_BYTES + 4095) // 4096 * 4096
# Default per-rank IPC workspace: flags, the LL area, then 64 KiB regions per block in the
# pull and push areas (8 MiB per chunk at 128 blocks; a region holds a row of 16384 fp32,
# docs/DESIGN.md "Epilogues").
DEFAULT_WORKSPACE_BYTES = DATA_OFFSET + 2 * NSETS * MAX_BLOCKS * (64 << 10)
# The registered pool's offsets travel as 16-byte units in 32 bits.
MAX_POOL_BYTES = (1 << 32) * 16 - 16
SIG_BYTES = MAX_BLOCKS * NSETS * MAX_RANKS * 8
CREDIT_BYTES = MAX_BLOCKS * MAX_RANKS * 8
SENT_BYTES = MAX_BLOCKS * MAX_RANKS * NSETS * 4
SYM_BLAME_OFFSET = SIG_BYTES + CREDIT_BYTES + SENT_BYTES
SYM_DATA_OFFSET = (SYM_BLAME_OFFSET + 8 + 4095) // 4096 * 4096


# The smallest workspaces `compile` accepts: every region holds at least 256 bytes.
MIN_WORKSPACE_BYTES = DATA_OFFSET + 2 * NSETS * MAX_BLOCKS * 256


def region_bytes(workspace_bytes: int) -> int:
    """Bytes of one block's region in one set of the IPC pull (or push) area."""
    return (workspace_bytes - DATA_OFFSET) // (2 * NSETS * MAX_BLOCKS) // 16 * 16


def sender_area_bytes(region: int, world: int) -> int:
    """Bytes of one sender's area in a region of `region` bytes cut among world - 1 senders
    in 16-byte units: a push region, an LL region (or the LL_CHUNK_BYTES of it a plain LL
    chunk uses)."""
    return region // max(1, world - 1) // 16 * 16


def min_symmetric_bytes() -> int:
    """The smallest NVSHMEM workspace `compile` accepts (regions of at least 256 bytes)."""
    return SYM_DATA_OFFSET + NSETS * MAX_BLOCKS * 256


def sym_region_bytes(symmetric_bytes: int) -> int:
    """Bytes of one block's region in one set of the NVSHMEM data area."""
    return (symmetric_bytes - SYM_DATA_OFFSET) // (NSETS * MAX_BLOCKS) // 16 * 16
