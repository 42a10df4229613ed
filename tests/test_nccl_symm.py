"""NCCL's symmetric kernels as a `mixcc bench` baseline (`nccl_symm`): whether this torch
and NCCL can reach them (checked with the platform monkeypatched), which programs they
can run, and how the bench reports them where they are absent: an n/a line and column
with the reason, never an error. The kernels themselves run in tests/gpu."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import mixcc
from mixcc import baselines, bench, cli, launch

ROOT = Path(__file__).resolve().parents[1]
REGISTER_DOC = ("register_mem_pool(self: torch._C._distributed_c10d.ProcessGroupNCCL, pool: "
                "torch._C._MemPool, symm: bool = False) -> None\n")


def _platform(monkeypatch, *, nccl=True, version=(2, 27, 3), doc=REGISTER_DOC,
              register=True, allocator=True):
    """Monkeypatch torch's NCCL as nccl_symm_support sees it."""
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(baselines, "nccl_version", lambda: version)
    attrs = {}
    if register:
        def register_mem_pool(self, pool, symm=False):
            pass
        register_mem_pool.__doc__ = doc
        attrs["register_mem_pool"] = register_mem_pool
    if allocator:
        attrs["mem_allocator"] = property(lambda self: None)
    monkeypatch.setattr(dist, "ProcessGroupNCCL", type("ProcessGroupNCCL", (), attrs),
                        raising=False)


def test_support_needs_nccl_2_27_and_torchs_window_registration(monkeypatch):
    ver = f"torch {torch.__version__}"
    _platform(monkeypatch)
    assert baselines.nccl_symm_support() is None
    _platform(monkeypatch, doc="register_mem_pool(self: ProcessGroupNCCL, arg0: "
                               "torch._C._MemPool, arg1: bool) -> None")
    assert baselines.nccl_symm_support() is None  # a binding that names no argument
    _platform(monkeypatch, nccl=False)
    assert baselines.nccl_symm_support() == f"{ver} is built without NCCL"
    _platform(monkeypatch, version=None)
    assert baselines.nccl_symm_support() == f"{ver} does not report its NCCL version"
    _platform(monkeypatch, version=(2, 26, 6))
    assert baselines.nccl_symm_support() == ("NCCL 2.26.6 has no symmetric kernels (they "
                                             "came with NCCL 2.27.0)")
    _platform(monkeypatch, register=False)
    assert baselines.nccl_symm_support() == (f"{ver} has no ProcessGroupNCCL.register_mem_pool"
                                             " / mem_allocator")
    _platform(monkeypatch, allocator=False)
    assert "has no ProcessGroupNCCL.register_mem_pool" in baselines.nccl_symm_support()
    _platform(monkeypatch, doc="register_mem_pool(self: ProcessGroupNCCL, pool: "
                               "torch._C._MemPool) -> None\n\nsymmetric pools elsewhere")
    assert baselines.nccl_symm_support() == (
        f"{ver}: ProcessGroupNCCL.register_mem_pool takes no symmetric flag, so it cannot "
        "register NCCL windows")


def test_this_machines_answer_is_a_reason_or_none():
    """Unpatched: a CPU build says it has no NCCL; a CUDA build answers from its NCCL."""
    why = baselines.nccl_symm_support()
    if not dist.is_nccl_available():
        assert why == f"torch {torch.__version__} is built without NCCL"
    else:
        v = baselines.nccl_version()
        assert v is not None and (why is None) <= (v >= baselines.NCCL_SYMM_MIN)


def test_machine_refusal_adds_the_placement_for_nccl_symm_only(monkeypatch):
    _platform(monkeypatch)
    for name in baselines.NCCL_SYMM:
        assert baselines.machine_refusal(name, nccl=True) is None
        assert baselines.machine_refusal(name, nccl=False) == (
            "NCCL symmetric kernels need one GPU per rank (here ranks share GPUs)")
    _platform(monkeypatch, version=(2, 21, 5))
    assert baselines.machine_refusal("nccl_symm", nccl=False).startswith("NCCL 2.21.5 has no")
    for name in ("nccl1", "separate", "symm_one_shot", "peer_copy"):
        assert baselines.machine_refusal(name, nccl=False) is None  # torch has symm_mem here


@pytest.mark.parametrize("program,mesh,dtype,why", [
    ("allreduce", "dp=1,tp=2", torch.bfloat16, None),
    ("allreduce(world)", "dp=2,tp=2", torch.float32, None),
    ("allgather", "dp=2,tp=1", torch.float64, None),  # allgather: any dtype
    ("reducescatter", "dp=4,tp=1", torch.float16, None),
    ("allreduce_allgather", "dp=2,tp=1", torch.bfloat16, None),  # allreduce over tp=1: none
    ("reducescatter_allreduce", "dp=1,tp=2", torch.bfloat16, None),
    ("allreduce", "dp=2,tp=2", torch.bfloat16, "one collective over the whole world only"),
    ("allreduce_allgather", "dp=2,tp=2", torch.bfloat16, "one collective over the whole"),
    ("allreduce", "dp=1,tp=2", torch.float64, "sum of bfloat16, float16 or float32 only"),
    ("allreduce(tp, op=max)", "dp=1,tp=2", torch.float32, "sum of bfloat16, float16 or"),
])
def test_which_programs_nccl_symm_runs(program, mesh, dtype, why):
    text = mixcc.presets.resolve(program)
    got = baselines.unavailable_reason("nccl_symm", text, mixcc.Mesh.parse(mesh, 1), dtype,
                                       nccl=True)
    assert (got is None) if why is None else (why in got), got
    if why is None:  # a program it runs still needs one GPU per rank
        assert "one GPU per rank" in baselines.unavailable_reason(
            "nccl_symm", text, mixcc.Mesh.parse(mesh, 1), dtype, nccl=False)


def test_nccl_symm_without_a_gpu_is_unavailable_in_the_rank(monkeypatch):
    """Inside a rank (gloo, no CUDA) the call refuses with the reason, and the bench's
    probe records it as n/a, not as a program it cannot run."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    mesh = mixcc.Mesh.parse("dp=1,tp=2", 2)
    with pytest.raises(baselines.Unavailable, match="one GPU per rank"):
        baselines.make("nccl_symm", "allreduce(tp)", mesh, torch.Size((1, 8)), torch.float32)

    def unavailable(*a, **kw):
        raise baselines.Unavailable("registering NCCL windows failed: no P2P")

    monkeypatch.setattr(baselines, "make", unavailable)
    fake = SimpleNamespace(ir=SimpleNamespace(row_factor=1, granularity=1))
    monkeypatch.setattr(bench, "mixcc_compile", lambda *a, **kw: fake)
    cfg = {"pairs": [("allreduce(tp)", "reference"), ("allreduce(tp)", "nccl_symm"),
                     ("allreduce(tp)", "nccl1")]}
    skipped: list[str] = []
    absent: dict[str, str] = {}
    out = bench._entries(cfg, mesh, torch.float32, {}, skipped, absent)
    assert [be for be, _, _ in out["allreduce(tp)"]] == ["reference"]
    assert absent == {"nccl_symm": "registering NCCL windows failed: no P2P"}
    assert skipped == ["nccl1 cannot run 'allreduce(tp)': registering NCCL windows failed: "
                       "no P2P"]  # a program-bound baseline stays a skip


@pytest.fixture
def no_spawn(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a process was spawned")

    monkeypatch.setattr(launch, "spawn", refuse)
    monkeypatch.setattr(launch, "run_torchrun", refuse)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def _config(*argv: str):
    return cli.bench_config(cli.build_parser().parse_args(["bench", *argv]))


def test_bench_config_reports_an_absent_nccl_symm_and_runs_the_rest(monkeypatch, no_spawn):
    monkeypatch.setattr(bench, "gpu_count", lambda: 2)  # one GPU per rank: NCCL
    _platform(monkeypatch, version=(2, 21, 5))
    [(world, cfg)], skipped = _config("--mesh", "dp=1,tp=2", "--program", "allreduce",
                                      "--backend", "reference,nccl_symm,nccl_symm_nocopy")
    assert world == 2 and cfg["pg"] == "nccl" and skipped == []
    assert cfg["pairs"] == [("allreduce(tp)", "reference")]
    why = "NCCL 2.21.5 has no symmetric kernels (they came with NCCL 2.27.0)"
    assert cfg["absent"] == {"nccl_symm": why, "nccl_symm_nocopy": why}
    with pytest.raises(cli.UsageError) as e:  # nothing else to run: that is an error
        _config("--mesh", "dp=1,tp=2", "--program", "allreduce", "--backend", "nccl_symm")
    assert str(e.value) == f"nothing to run: n/a: nccl_symm: {why}"
    _platform(monkeypatch)  # present: it runs where the program fits
    [(_, cfg)], skipped = _config("--mesh", "dp=1,tp=2", "--program", "allreduce",
                                  "--program", "allreduce(tp, op=max)", "--backend",
                                  "reference,nccl_symm")
    assert cfg["absent"] == {}
    assert cfg["pairs"] == [("allreduce(tp)", "reference"), ("allreduce(tp)", "nccl_symm"),
                            ("allreduce(tp, op=max)", "reference")]
    assert skipped == ["nccl_symm cannot run 'allreduce(tp, op=max)': NCCL's symmetric "
                       "allreduce and reducescatter: sum of bfloat16, float16 or float32 only"]


def test_ranks_sharing_a_gpu_get_nccl_symm_as_na(monkeypatch, no_spawn):
    monkeypatch.setattr(bench, "gpu_count", lambda: 1)
    monkeypatch.setattr(bench, "fused_refusal", lambda dtype: None)
    _platform(monkeypatch)
    [(_, cfg)], _ = _config("--mesh", "dp=1,tp=2", "--program", "allreduce", "--backend",
                            "symm_one_shot,nccl_symm")
    assert cfg["pg"] == "gloo" and cfg["pairs"] == [("allreduce(tp)", "symm_one_shot")]
    assert cfg["absent"] == {"nccl_symm": "NCCL symmetric kernels need one GPU per rank "
                                          "(here ranks share GPUs)"}


def _row(backend: str, nbytes: int, t: float) -> bench.Row:
    return bench.Row("allreduce(tp)", backend, "oop", "graph", "bfloat16", 2, "dp=1,tp=2", 2,
                     1, nbytes // 2, nbytes, nbytes, t, t, t, 1.0, 1.0, 0)


def test_pivot_shows_an_absent_baseline_as_na_with_its_reason():
    rows = [_row("reference", 1024, 10.0), _row("fused", 1024, 5.0),
            _row("reference", 2048, 20.0)]
    lines = bench.pivot(rows, absent={"nccl_symm": "NCCL 2.21.5 has no symmetric kernels",
                                      "fused": "ran, so not absent"}).splitlines()
    assert lines[1] == "# n/a: nccl_symm: NCCL 2.21.5 has no symmetric kernels"
    assert lines[2].split()[3:] == ["reference", "fused", "nccl_symm", "/ref", "fused",
                                    "/ref", "nccl_symm"]
    assert lines[3].split()[2:] == ["1024", "10.00", "5.00", "n/a", "0.50", "n/a"]
    assert lines[4].split()[2:] == ["2048", "20.00", "-", "n/a", "-", "n/a"]
    assert len(lines) == 5
    plain = bench.pivot(rows)
    assert "nccl_symm" not in plain and "n/a" not in plain
    assert plain.splitlines()[2].split()[2:] == ["1024", "10.00", "5.00", "0.50"]


@pytest.mark.skipif(dist.is_nccl_available(), reason="needs a torch without NCCL")
def test_bench_on_cpu_reports_nccl_symm_as_na_and_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mixcc", "bench", "--mesh", "dp=1,tp=2", "--program",
         "allreduce", "--backend", "reference,nccl_symm", "--max-rows", "1", "--iters", "1",
         "--repeats", "1", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    na = f"# n/a: nccl_symm: torch {torch.__version__} is built without NCCL"
    table, pivot = proc.stdout.split("# oop time (us) per backend", 1)
    assert na in table.splitlines()  # under the run's preamble, and again in the summary
    assert na in pivot.splitlines()
    assert pivot.splitlines()[-1].split()[-2:] == ["n/a", "n/a"]
    rows = bench.read_rows(str(tmp_path / "r.json"))
    assert {r.backend for r in rows} == {"reference"} and len(rows) == 2
