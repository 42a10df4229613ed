"""The workspace layout shared by the runtime (allocation) and the kernels (addressing).

Each rank owns one workspace of fixed size:
  [0, DATA_OFFSET)  flags: uint32 [MAX_BLOCKS][2 barrier stages][MAX_RANKS], written by
                    peers (flag [b][s][src] holds the last epoch src reached)
  [DATA_OFFSET, …)  2 halves x MAX_BLOCKS regions of region_bytes(workspace) bytes;
                    block b of every kernel only ever touches region b of a half, so
                    collectives with different block counts can share one workspace.
"""

from __future__ import annotations

# Default per-rank workspace. 8 MiB gives 128 KiB regions: a one-shot message of a few
# MB per rank then fits in one chunk (latency-bound sizes never loop).
DEFAULT_WORKSPACE_BYTES = 8 << 20
MAX_BLOCKS = 32  # blocks per kernel; also the number of workspace regions per half
MAX_RANKS = 64  # ranks of one node a runtime can serve
THREADS = 512  # threads per block: 512 x 16 B in flight per block per pass
FLAG_BYTES = MAX_BLOCKS * 2 * MAX_RANKS * 4
DATA_OFFSET = (FLAG_BYTES + 4095) // 4096 * 4096


def region_bytes(workspace_bytes: int) -> int:
    """Bytes of one block's region in one half of the double-buffered data area."""
    return (workspace_bytes - DATA_OFFSET) // (2 * MAX_BLOCKS) // 16 * 16
