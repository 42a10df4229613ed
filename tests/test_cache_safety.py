"""The kernel cache is code mixcc loads and runs (issue 10, item 7): it is private,
refuses paths another user owns or may write, rebuilds a library that does not match
its recorded sha256, and a build killed half-way leaves nothing taken for finished.

A fake nvcc (a shell script under CUDA_HOME/bin) stands in for the toolkit, so these
tests run on CPU machines without CUDA; it appends a line to a file each time it
compiles, so a test can tell a rebuild from a cache hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mixcc.codegen import build as B
from mixcc.codegen.spec import BuildSpec

GOOD = b"\x7fELF fake mixcc module " + bytes(range(256)) * 8


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fake toolkit and an empty cache dir; yields a namespace of useful paths."""
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (tmp_path / "good.bin").write_bytes(GOOD)
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "Cuda compilation tools, fake V0.0.0"; exit 0; fi
        echo run >> "{tmp_path}/count"
        out=""
        while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
        if [ -f "{tmp_path}/slow" ]; then
            head -c 100 "{tmp_path}/good.bin" > "$out"   # half a library, then stall
            touch "{tmp_path}/started"
            sleep 60
        fi
        if [ -f "{tmp_path}/fail" ]; then echo "fake nvcc: error" >&2; exit 1; fi
        cat "{tmp_path}/good.bin" > "$out"
        """))
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(cuda))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path / "cache"))
    B.nvcc_version.cache_clear()
    B._verified.clear()
    yield type("Cache", (), {"tmp": tmp_path, "dir": tmp_path / "cache",
                             "modules": tmp_path / "cache" / "modules"})
    B.nvcc_version.cache_clear()
    B._verified.clear()


SPEC = BuildSpec("stage", "// a module\n", "sm_90")


def runs(c) -> int:
    count = c.tmp / "count"
    return len(count.read_text().splitlines()) if count.exists() else 0


def entries(c) -> list[str]:
    """What `build` could take for a finished entry (not dot-prefixed, not a lock)."""
    return sorted(p.name for p in c.modules.iterdir()
                  if not p.name.startswith(".") and not p.name.endswith(".lock"))


def test_new_cache_is_private_and_hits(cache, monkeypatch):
    old = os.umask(0o002)  # a loose umask: mixcc must tighten what it creates anyway
    try:
        first = B.build(SPEC)
    finally:
        os.umask(old)
    assert not first.cached and runs(cache) == 1 and first.path.read_bytes() == GOOD
    for d in (cache.dir, cache.modules, first.path.parent):
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert first.path.stat().st_mode & 0o077 == 0
    digest = (first.path.parent / B.DIGEST).read_text().split()
    assert digest == [B._sha256(first.path), "module.so"]
    hashed = []
    monkeypatch.setattr(B, "_sha256", lambda p: hashed.append(p) or B.hashlib.sha256(
        p.read_bytes()).hexdigest())
    B._verified.clear()
    for _ in range(3):
        again = B.build(SPEC)
        assert again.cached and again.path == first.path and again.seconds == 0.0
    assert runs(cache) == 1
    assert len(hashed) == 1  # one hash per library per process


def test_existing_private_dir_is_used_as_it_is(cache):
    cache.dir.mkdir(mode=0o755)
    os.chmod(cache.dir, 0o755)
    assert B.build(SPEC).path.read_bytes() == GOOD
    assert cache.dir.stat().st_mode & 0o777 == 0o755  # the user's choice; mixcc keeps it


@pytest.mark.parametrize("where", ["dir", "modules"])
@pytest.mark.parametrize("mode, who", [(0o770, "group"), (0o757, "others"),
                                       (0o777, "group and others")], ids=["g", "o", "go"])
def test_refuses_a_directory_others_can_write(cache, where, mode, who):
    B.build(SPEC)
    path = getattr(cache, where)
    os.chmod(path, mode)
    try:
        with pytest.raises(B.CacheSecurityError) as err:
            B.build(SPEC)
    finally:
        os.chmod(path, 0o700)
    msg = str(err.value)
    assert f"{path} is writable by {who} (mode {mode:o})" in msg
    assert "loads and runs code" in msg and f"chmod 700 {path}" in msg
    assert "MIXCC_CACHE_DIR" in msg
    assert isinstance(err.value, B.BuildError)


def test_refuses_a_library_others_can_write(cache):
    lib = B.build(SPEC).path
    for mode, who in ((0o702, "others"), (0o720, "group")):
        os.chmod(lib, mode)
        with pytest.raises(B.CacheSecurityError, match=f"file {lib} is writable by {who}.*"
                           f"chmod go-w {lib}"):
            B.build(SPEC)
    os.chmod(lib, 0o700)
    assert B.build(SPEC).cached and runs(cache) == 1


def test_refuses_a_cache_another_user_owns(cache, monkeypatch):
    B.build(SPEC)
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)
    with pytest.raises(B.CacheSecurityError,
                       match=rf"{cache.dir} is owned by uid {me}, not by you \(uid {me + 1}\)"
                             r".*loads and runs code.*MIXCC_CACHE_DIR"):
        B.build(SPEC)
    assert runs(cache) == 1


def test_refuses_an_entry_another_user_owns(cache, monkeypatch):
    """Only the entry's library seems foreign (as if another user had swapped it in)."""
    lib = B.build(SPEC).path
    real = os.stat

    def stat(path, *a, **kw):
        st = real(path, *a, **kw)
        if os.fspath(path) == str(lib):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink,
                                   st.st_uid + 1, *st[5:]))
        return st

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(B.CacheSecurityError, match=f"file {lib} is owned by uid"):
        B.build(SPEC)


def _damage_and_rebuild(cache, damage) -> None:
    lib = B.build(SPEC).path
    damage(lib)
    B._verified.clear()  # as a new process would
    again = B.build(SPEC)
    assert not again.cached and runs(cache) == 2
    assert again.path == lib and again.path.read_bytes() == GOOD
    assert B.build(SPEC).cached and runs(cache) == 2
    assert entries(cache) == [lib.parent.name]
    assert not list(cache.modules.glob(".stage-*"))  # the damaged entry is gone


def test_truncated_library_is_rebuilt(cache):
    def truncate(lib):
        with open(lib, "r+b") as f:
            f.truncate(len(GOOD) // 2)

    _damage_and_rebuild(cache, truncate)


def test_truncated_library_is_rebuilt_in_the_same_process(cache):
    lib = B.build(SPEC).path
    assert B.build(SPEC).cached  # verified and memoised
    os.truncate(lib, 10)  # the size changes, so the memo does not vouch for it
    again = B.build(SPEC)
    assert not again.cached and runs(cache) == 2 and again.path.read_bytes() == GOOD


def test_corrupt_library_of_the_same_length_is_rebuilt(cache):
    def corrupt(lib):
        st = lib.stat()
        data = bytearray(lib.read_bytes())
        data[40:48] = b"\xcc" * 8
        lib.write_bytes(bytes(data))
        os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide it from size and mtime
        assert lib.stat().st_size == st.st_size

    _damage_and_rebuild(cache, corrupt)


@pytest.mark.parametrize("how", ["missing", "empty", "wrong"])
def test_entry_without_a_good_digest_is_rebuilt(cache, how):
    def spoil(lib):
        digest = lib.parent / B.DIGEST
        if how == "missing":
            digest.unlink()
        else:
            digest.write_text("" if how == "empty" else "0" * 64 + "  module.so\n")

    _damage_and_rebuild(cache, spoil)


def test_failed_compile_leaves_no_entry(cache):
    (cache.tmp / "fail").touch()
    with pytest.raises(B.BuildError, match="fake nvcc: error"):
        B.build(SPEC)
    assert entries(cache) == [] and not list(cache.modules.glob(".stage-*"))
    (cache.tmp / "fail").unlink()
    built = B.build(SPEC)
    assert not built.cached and built.path.read_bytes() == GOOD


def test_build_killed_midway_leaves_nothing_taken_for_finished(cache):
    (cache.tmp / "slow").touch()
    code = ("from mixcc.codegen.build import build; from mixcc.codegen.spec import BuildSpec; "
            f"build(BuildSpec({SPEC.name!r}, {SPEC.source!r}, {SPEC.arch!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (cache.tmp / "started").exists():
            assert proc.poll() is None, "the build ended before nvcc started"
            assert time.monotonic() < deadline, "the fake nvcc never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its ninja and nvcc
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert entries(cache) == []
    leftovers = list(cache.modules.glob(".stage-*"))
    assert leftovers and (leftovers[0] / "module.so").stat().st_size == 100  # half-written
    (cache.tmp / "slow").unlink()
    built = B.build(SPEC)
    assert not built.cached and runs(cache) == 2 and built.path.read_bytes() == GOOD
    assert not list(cache.modules.glob(".stage-*"))  # the dead build's dir is cleared
    assert B.build(SPEC).cached
