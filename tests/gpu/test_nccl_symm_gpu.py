"""The `nccl_symm` baseline on two GPUs (one process each, NCCL): NCCL's allreduce,
allgather and reducescatter on buffers registered as NCCL windows give the float64
result of the same collective, eagerly and replayed from a CUDA graph after the input
changed in place, with the copy into the window and without it; the windows are
deregistered after. Skips where this torch or NCCL lacks symmetric kernels."""

from __future__ import annotations

import pytest
import torch

CASES = [("allreduce(tp)", "dp=1,tp=2"), ("allgather(dp)", "dp=2,tp=1"),
         ("reducescatter(dp)", "dp=2,tp=1")]


def windows_match_the_exact_result(rank: int, world: int) -> None:
    import torch.distributed as dist

    import mixcc
    from mixcc import baselines
    from mixcc.bench import count_wrong

    dev = torch.device("cuda", torch.cuda.current_device())
    for program, mesh_text in CASES:
        mesh = mixcc.Mesh.parse(mesh_text, world)
        exact = mixcc.compile(program, mesh, dtype=torch.float64, backend="reference")
        for dtype in (torch.bfloat16, torch.float32):
            for name in baselines.NCCL_SYMM:
                gen = torch.Generator().manual_seed(7 + rank)
                x = torch.randn(64, 1024, generator=gen).to(dtype).to(dev)
                fn = baselines.make(name, program, mesh, x.shape, dtype)
                out = torch.empty(exact.output_shape(x.shape), dtype=dtype, device=dev)
                fn.load(x)
                got = fn(x, out)
                assert got.shape == out.shape, (program, name, got.shape)
                wrong = count_wrong(got, exact(x.double()))
                assert wrong == 0, f"rank {rank}: {program} {name} {dtype}: {wrong} wrong"
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                    fn(x, out)
                torch.cuda.current_stream().wait_stream(stream)
                x.copy_(torch.randn(x.shape, generator=gen).to(dtype))
                fn.load(x)  # the nocopy variant reads the window, the other copies x in
                graph.replay()
                torch.cuda.synchronize()
                wrong = count_wrong(got, exact(x.double()))
                assert wrong == 0, f"rank {rank}: {program} {name} {dtype} replayed: {wrong}"
                del graph
                fn.close()
                dist.barrier()


def test_nccl_symmetric_kernels_on_registered_windows(spawn_ranks):
    from mixcc import baselines

    why = baselines.nccl_symm_support()
    if why:
        pytest.skip(f"nccl_symm: {why}")
    spawn_ranks(windows_match_the_exact_result, 2)


def test_bench_times_nccl_symm_beside_nccl_with_no_wrong_element(tmp_path):
    """`mixcc bench` on two GPUs: the nccl_symm rows of allreduce, allgather and
    reducescatter at three sizes, each checked against the exact result and timed with
    CUDA graphs (its windows made and released per size)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gpu_helpers import ranks

    from mixcc import baselines
    from mixcc.launch import NO_MULTICAST_ENV

    why = baselines.nccl_symm_support()
    if why:
        pytest.skip(f"nccl_symm: {why}")
    if ranks.gpu_count() < 2:
        pytest.skip("needs two GPUs")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, **NO_MULTICAST_ENV, "CUDA_VISIBLE_DEVICES": "0,1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(root), env.get("PYTHONPATH"))))
    for program, mesh in CASES:
        out = tmp_path / program.split("(")[0]
        proc = subprocess.run(
            [sys.executable, "-m", "mixcc", "bench", "--mesh", mesh, "--program", program,
             "--backend", "reference,nccl_symm,nccl_symm_nocopy", "--dtype", "bfloat16",
             "--hidden", "1024", "--min-bytes", "64K", "--max-bytes", "256K", "--iters", "5",
             "--repeats", "2", "--out", str(out)],
            capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        rows = json.loads(out.with_suffix(".json").read_text())
        got = {(r["backend"], r["bytes"]) for r in rows if r["backend"].startswith("nccl_symm")}
        assert len(got) == 6, (program, sorted(got))  # two variants x three sizes
        assert all(r["errors"] == 0 and r["timing"] == "graph" and r["time_us"] > 0
                   for r in rows if r["backend"].startswith("nccl_symm")), rows
