"""The autotuner's table: measured launch choices per stage and size (docs/DESIGN.md,
"Tuning").

`mixcc tune` (mixcc/tuning/) measures, per (stage source hash, dtype, world, arch,
size bucket), the algorithm x blocks x chunk width and writes the fastest here, a JSON
table in the kernel cache directory (or MIXCC_TUNE_TABLE). A fused collective reads it
when it binds: rank 0 reads the file and broadcasts the entries of its stages, so every
rank launches the same grid (the barriers pair block b with block b). Without an entry
auto's thresholds decide (mixcc/tuning/thresholds.py, fused.auto_algorithm).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from .codegen.build import cache_dir

VERSION = 1
ENV = "MIXCC_TUNE_TABLE"  # a path, or "off" to ignore every table


@dataclass(frozen=True)
class Choice:
    """One tuned launch: algorithm ("one_shot", "two_shot", "push", "ll", "hier" for a
    cross-node stage, or "nccl": the reference backend for the whole call), blocks, and the
    columns per block and chunk (0: the widest that fits the workspace region)."""

    algorithm: str
    blocks: int
    chunk_cols: int = 0
    time_us: float = 0.0  # what it measured, for the reader of the table


def table_path() -> Path | None:
    """Where the table lives, or None when tuning is switched off."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    return Path(env) if env else cache_dir() / "tune" / "table.json"


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def bucket(nbytes: int) -> int:
    """The size bucket of `nbytes` of stage input per rank: ceil(log2)."""
    return max(0, (max(1, nbytes) - 1).bit_length())


def stage_prefix(src_hash: str, dtype: str, world: int, arch: str) -> str:
    return f"{src_hash}|{dtype}|{world}|{arch}|"


def key(src_hash: str, dtype: str, world: int, arch: str, nbytes: int) -> str:
    """The table key of one stage at one size."""
    return stage_prefix(src_hash, dtype, world, arch) + str(bucket(nbytes))


def load(path: Path | None = None) -> dict[str, Choice]:
    """The table's entries ({} when there is none); a damaged table is ignored with a
    warning rather than trusted."""
    path = path if path is not None else table_path()
    if path is None or not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version') if isinstance(raw, dict) else raw!r}"
                             f", expected {VERSION}")
        out = {str(k): Choice(**v) for k, v in raw["entries"].items()}
        for c in out.values():
            if not (isinstance(c.algorithm, str) and isinstance(c.blocks, int) and c.blocks > 0
                    and isinstance(c.chunk_cols, int)):
                raise ValueError(f"bad entry {c}")
        return out
    except Exception as e:  # any damage: ignored, never a crash on one rank only
        warnings.warn(f"mixcc: ignoring the tuning table {path}: {e}", RuntimeWarning,
                      stacklevel=2)
        return {}


def save(entries: dict[str, Choice], path: Path | None = None) -> Path:
    """Merge `entries` into the table and write it atomically; returns its path."""
    path = path if path is not None else table_path()
    if path is None:
        raise ValueError(f"tuning is switched off ({ENV}=off)")
    merged = {**load(path), **entries}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = {"version": VERSION,
            "entries": {k: asdict(v) for k, v in sorted(merged.items())}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".table-")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)
    return path


def shared(group: dist.ProcessGroup | None, prefixes: list[str]) -> dict[tuple[int, int], Choice]:
    """Rank 0's entries for the stages whose key prefixes are `prefixes`, as
    {(stage index, size bucket): choice}, the same dict on every rank of `group`: keyed by
    stage index, so a rank whose own prefix differs (another arch or build) still launches
    rank 0's grid."""
    mine = None
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if rank == 0:
        mine = {}
        for k, v in load().items():
            for i, p in enumerate(prefixes):
                if k.startswith(p) and k[len(p):].isdigit():
                    mine[(i, int(k[len(p):]))] = v
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine or {}
    box = [mine]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0] or {}
