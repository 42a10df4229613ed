"""A pool of gloo ranks kept alive across test examples (spawning per example is slow).

Each worker joins one world of `size` ranks once; a task for a smaller world runs on
the first ranks, over a subgroup of them. Tasks are module-level functions called as
fn(rank, world, group, *args) and return a string (empty = pass).
"""

from __future__ import annotations

import os
import queue
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _worker(rank: int, size: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    # Every worker creates every prefix group, in the same order (new_group's contract).
    groups = {w: dist.new_group(list(range(w))) for w in range(1, size)}
    groups[size] = None
    while True:
        task = tasks.get()
        if task is None:
            break
        tid, world, fn, args = task
        if rank >= world:
            continue
        try:
            msg = fn(rank, world, groups[world], *args)
        except Exception:
            msg = traceback.format_exc(limit=8)
        results.put((tid, rank, msg))
    from mixcc.reference import clear_groups

    clear_groups()
    dist.destroy_process_group()


class RankPool:
    def __init__(self, size: int = 8):
        from mixcc.launch import NO_MULTICAST_ENV, free_port

        os.environ.update(NO_MULTICAST_ENV)
        ctx = mp.get_context("spawn")
        self.size = size
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(size)]
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, size, port, self.queues[r],
                                                        self.results), daemon=True)
                      for r in range(size)]
        for p in self.procs:
            p.start()
        self._next = 0

    def run(self, world: int, fn, *args, timeout: float = 180.0) -> dict[int, str]:
        """Run fn on ranks 0..world-1; returns {rank: message} (empty message = pass)."""
        assert 1 <= world <= self.size
        self._next += 1
        tid = self._next
        for q in self.queues:
            q.put((tid, world, fn, args))
        out: dict[int, str] = {}
        while len(out) < world:
            try:
                got_tid, rank, msg = self.results.get(timeout=timeout)
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if not p.is_alive()]
                raise RuntimeError(f"rank pool timed out; dead workers: {dead}") from None
            if got_tid == tid:
                out[rank] = msg
        return out

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
