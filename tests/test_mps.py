"""mixcc.mps with a fake nvidia-cuda-mps-control on PATH, and `mixcc bench` starting MPS
around its spawns when ranks share one GPU (the GPU faked: no CUDA is touched)."""

import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from mixcc import bench, cli, launch, mps
from mixcc.cli import main

FAKE = """#!/bin/sh
# fake nvidia-cuda-mps-control: -d creates the control pipe, `quit` on stdin removes it
echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_LOG"
if [ "$1" = "-d" ]; then
  if [ -n "$FAKE_MPS_FAIL" ]; then echo "$FAKE_MPS_FAIL" >&2; exit 1; fi
  [ -n "$FAKE_MPS_NO_PIPE" ] || mkfifo "$CUDA_MPS_PIPE_DIRECTORY/control"
  echo "control daemon started" > "$CUDA_MPS_LOG_DIRECTORY/control.log"
  exit 0
fi
read -r cmd
echo "cmd=$cmd" >> "$FAKE_MPS_LOG"
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A PATH with the fake binary, a private temp dir, and the env dict to pass."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / mps.CONTROL
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_MPS_LOG": str(log),
           "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "not-running")}
    return env, log, tmp


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_running_is_the_control_pipe(tmp_path):
    assert not mps.running(str(tmp_path))
    os.mkfifo(tmp_path / "control")
    assert mps.running(str(tmp_path))
    assert mps.pipe_dir({}) == "/tmp/nvidia-mps"
    assert mps.pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": "/x"}) == "/x"


def test_a_socket_runs_while_it_listens_and_a_stale_one_does_not(tmp_path):
    """Current daemons listen on a UNIX socket whose file stays after they quit."""
    import socket

    path = str(tmp_path / "control")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        assert mps.running(str(tmp_path))
    finally:
        listener.close()
    assert os.path.exists(path)  # the file outlives the listener
    assert not mps.running(str(tmp_path))


def test_ensure_starts_a_private_daemon_and_stops_it(fake):
    env, log, tmp = fake
    before = dict(env)
    with mps.ensure(env) as state:
        assert state.started
        assert state.pipe_dir.startswith(str(tmp)) and state.log_dir.startswith(str(tmp))
        assert mps.running(state.pipe_dir)
        # exported to what starts inside the block (the ranks)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == state.pipe_dir
        assert env["CUDA_MPS_LOG_DIRECTORY"] == state.log_dir
    assert env == before
    assert not mps.running(state.pipe_dir)
    assert list(tmp.iterdir()) == []  # both private directories removed
    calls = _calls(log)
    assert calls == [f"args=-d pipe={state.pipe_dir} log={state.log_dir}",
                     f"args= pipe={state.pipe_dir} log={state.log_dir}", "cmd=quit"]


def test_ensure_stops_the_daemon_when_the_block_fails(fake, capsys):
    env, log, tmp = fake
    with pytest.raises(RuntimeError, match="rank died"), mps.ensure(env) as state:
        raise RuntimeError("rank died")
    assert not mps.running(state.pipe_dir) and "cmd=quit" in _calls(log)
    assert "CUDA_MPS_LOG_DIRECTORY" not in env
    err = capsys.readouterr().err
    assert f"note: the MPS logs ({state.log_dir}) end with:" in err
    assert "control.log: control daemon started" in err


def test_ensure_uses_a_running_daemon_as_it_is(fake, tmp_path):
    env, log, _ = fake
    running = tmp_path / "pipe"
    running.mkdir()
    os.mkfifo(running / "control")
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(running)
    with mps.ensure(env) as state:
        assert not state.started and state.pipe_dir == str(running)
    assert mps.running(str(running))  # not ours to stop
    assert _calls(log) == []


def test_ensure_without_the_binary_says_what_to_run(fake):
    env, _, tmp = fake
    env["PATH"] = "/nonexistent"
    with pytest.raises(mps.MpsError) as e, mps.ensure(env):
        pass
    msg = str(e.value)
    assert "nvidia-cuda-mps-control is not on PATH" in msg
    assert "export CUDA_MPS_PIPE_DIRECTORY=" in msg and "nvidia-cuda-mps-control -d" in msg
    assert "echo quit | nvidia-cuda-mps-control" in msg
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("var,why", [("FAKE_MPS_FAIL", "exit code 1: no GPU for MPS"),
                                     ("FAKE_MPS_NO_PIPE", "no control pipe in ")])
def test_ensure_when_the_daemon_does_not_start(fake, var, why):
    env, _, tmp = fake
    env[var] = "no GPU for MPS"
    with pytest.raises(mps.MpsError) as e, mps.ensure(env, timeout_s=0.5):
        pass
    assert why in str(e.value) and "Start MPS by hand:" in str(e.value)
    assert list(tmp.iterdir()) == [] and "CUDA_MPS_LOG_DIRECTORY" not in env


# ---- mixcc bench on one (faked) GPU ---------------------------------------------------

@pytest.fixture
def one_gpu(monkeypatch, fake):
    """One GPU as the launcher sees it (NVML count), fused runnable; the parent must not
    initialise CUDA, so the CUDA entry points the parent could reach raise."""
    env, log, tmp = fake
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_WORLD_SIZE",
                "CUDA_MPS_LOG_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_MPS_LOG", env["FAKE_MPS_LOG"])
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", env["CUDA_MPS_PIPE_DIRECTORY"])
    monkeypatch.setattr(bench, "gpu_count", lambda: 1)
    monkeypatch.setattr(bench, "fused_refusal", lambda dtype: None)

    def no_cuda_init(*a, **kw):
        raise AssertionError("the launching process initialised CUDA")

    for name in ("is_available", "init", "current_device", "get_device_name",
                 "set_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda_init)
    return log, tmp


def _fake_spawn(record: list):
    def spawn(fn, world, cfg, backend=None):
        pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "")
        record.append((world, backend, cfg["mps"], pipe, mps.running(pipe),
                       [be for _, be in cfg["pairs"]]))
        rows = [bench.Row(p, be, "oop", "graph", "bfloat16", world, "m", world, 8, 1024,
                          16384, 16384.0, t, t, t, 1.0, 1.0, 0, device="Fake GPU",
                          setup="one GPU, MPS")
                for p, be in cfg["pairs"] for t in ([5.0] if be == "fused" else [8.0])]
        bench.dump_rows(rows, cfg["rows_path"])
    return spawn


def test_bench_on_one_gpu_runs_every_world_under_mps_it_starts(one_gpu, monkeypatch, tmp_path,
                                                               capsys):
    log, tmp = one_gpu
    record: list = []
    monkeypatch.setattr(launch, "spawn", _fake_spawn(record))
    prefix = str(tmp_path / "b")
    assert main(["bench", "--world-size", "2,4,8", "--program", "allreduce_allgather",
                 "--backend", "fused,separate,nccl1", "--min-bytes", "16K", "--max-bytes",
                 "64M", "--hidden", "1024", "--out", prefix]) == 0
    assert [r[:3] for r in record] == [(2, "gloo", True), (4, "gloo", True), (8, "gloo", True)]
    pipes = {r[3] for r in record}
    assert len(pipes) == 1 and all(r[4] for r in record)  # one daemon, running for all
    assert record[0][5] == ["fused", "separate", "nccl1"]
    assert not mps.running(pipes.pop()) and os.environ["CUDA_MPS_PIPE_DIRECTORY"].endswith(
        "not-running")
    assert "CUDA_MPS_LOG_DIRECTORY" not in os.environ
    assert [c.split()[0] for c in _calls(log)] == ["args=-d", "args=", "cmd=quit"]
    assert list(tmp.iterdir()) == []
    err = capsys.readouterr().err
    assert "note: MPS started for this run (control pipe in " in err
    rows = bench.read_rows(prefix + ".json")
    assert [r.world for r in rows] == [2] * 3 + [4] * 3 + [8] * 3
    fused = [r for r in rows if r.backend == "fused"]
    assert [round(r.ratio, 3) for r in fused] == [0.625] * 3 and {r.best for r in fused} == {
        "separate"}  # nccl1's fake 8 us ties with separate: the first seen stays best


def test_bench_on_one_gpu_without_the_mps_binary_says_what_to_run(one_gpu, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(launch, "spawn", _fake_spawn([]))
    assert main(["bench", "--world-size", "2", "--program", "allreduce",
                 "--backend", "fused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcc: error: ranks share a GPU and MPS is not running")
    assert "nvidia-cuda-mps-control -d" in err
    assert err.rstrip().endswith("or pass --no-mps (GPU rows then report host issue times, "
                                 "not device times)")


def test_no_mps_and_cpu_only_backends_start_nothing(one_gpu, monkeypatch):
    log, _ = one_gpu
    record: list = []
    monkeypatch.setattr(launch, "spawn", _fake_spawn(record))
    assert main(["bench", "--world-size", "2", "--program", "allreduce", "--backend",
                 "fused", "--no-mps"]) == 0
    assert main(["bench", "--world-size", "2", "--program", "allreduce_allgather",
                 "--backend", "reference,nccl1"]) == 0  # gloo on CPU tensors: no MPS needed
    assert [r[2] for r in record] == [False, False]
    assert _calls(log) == []


def test_symm_baselines_are_offered_when_every_rank_shares_the_gpu(one_gpu, monkeypatch):
    runs, skipped = cli.bench_config(cli.build_parser().parse_args(
        ["bench", "--world-size", "2,4", "--program", "allreduce(world)", "--program",
         "allreduce_allgather", "--backend", "symm_one_shot,symm_two_shot_nocopy,separate"]))
    for world, cfg in runs:
        assert cfg["pg"] == "gloo" and cfg["mps"], world
        assert cfg["pairs"] == [("allreduce(world)", "symm_one_shot"),
                                ("allreduce(world)", "symm_two_shot_nocopy"),
                                ("allreduce(tp); allgather(dp)", "separate")]
    assert skipped == [
        "symm_one_shot cannot run 'allreduce(tp); allgather(dp)': symmetric-memory baseline: "
        "one sum allreduce over the whole world only",
        "symm_two_shot_nocopy cannot run 'allreduce(tp); allgather(dp)': symmetric-memory "
        "baseline: one sum allreduce over the whole world only",
        "separate cannot run 'allreduce(world)': separate calls need a program of several "
        "statements"]


def test_under_torchrun_a_shared_gpu_needs_mps_running_first(one_gpu, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(launch, "run_torchrun", lambda *a, **k: pytest.fail("ran"))
    assert main(["bench", "--program", "allreduce", "--backend", "fused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixcc: error: ranks share a GPU and MPS is not running")
    assert "start MPS before torchrun" in err


if sys.platform != "linux":  # mkfifo and the fake shell script
    pytestmark = pytest.mark.skip("needs Linux")
