"""bench.read_log rebuilds the rows of a printed bench table (a run cut short before it
wrote its files): every field round-trips through format_row."""

import math
import random

from mixcc import bench


def test_read_log_round_trips_format_row(tmp_path):
    rng = random.Random()
    rows = []
    for program in ("allreduce(world)", "allreduce(tp); allgather(dp)"):
        for backend in ("fused", "symm_two_shot_nocopy"):
            t = round(rng.uniform(1, 900), 2)
            rows.append(bench.Row(
                program, backend, rng.choice(["oop", "ip"]), "graph", "bfloat16", 4,
                "dp=2,tp=2", 4, 64, 1024, 131072, 131072.0, t, round(t * 0.9, 2),
                round(t * 1.2, 2), round(rng.uniform(0, 99), 3), round(rng.uniform(0, 99), 3),
                rng.choice([0, 3]), iters=20, repeats=10, device="NVIDIA H100 80GB HBM3",
                setup="one GPU, MPS"))
    text = ("# mixcc bench: mesh dp=2,tp=2 (ranks_per_node 4), world 4, process group gloo; "
            "NVIDIA H100 80GB HBM3, one GPU, MPS\n"
            "# dtype bfloat16, hidden 1024, backends x; time: median of 10 repeats of 20 calls "
            "(min, max: fastest and slowest repeat), each the max over ranks\n"
            + bench.header() + "\n" + "\n".join(bench.format_row(r) for r in rows)
            + "\n" + bench.format_row(rows[0])[:40] + "\n")  # a line cut off mid-row
    path = tmp_path / "bench.log"
    path.write_text(text)
    got = bench.read_log(str(path))
    assert len(got) == len(rows)
    for a, b in zip(got, rows, strict=True):
        assert math.isnan(a.ratio) and a.best == ""
        a.ratio, a.best = b.ratio, b.best
        assert a == b
