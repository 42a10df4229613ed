"""build: CUDA source -> shared library, through nvcc and ninja, cached on disk
(docs/DESIGN.md section 3, step 6).

The cache key hashes the source, the headers it includes, the flags, nvcc's version
and the target arch. The cache dir is MIXCC_CACHE_DIR, else $XDG_CACHE_HOME/mixcc,
else ~/.cache/mixcc. Several ranks may build the same module at once: a file lock
lets one compile while the others wait, and the result appears by an atomic rename
of a finished private directory, so a reader never sees a half-written library.

mixcc loads and runs what the cache holds, so the cache is private: mixcc creates
its directories with mode 0700, and refuses (CacheSecurityError) to use a cache dir,
modules/ dir, entry or library that another user owns or that group or others may
write. Each entry records its library's sha256 (module.sha256, in `sha256sum -c`
form); a library that does not match, or an entry without the record, is removed
under the key's lock and built again, never loaded. Builds run in dot-prefixed
private directories that are never taken for entries; those a killed build left
behind are removed by the next build of the same key.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MixccError
from ..paths import templates_dir
from .spec import BuildSpec


class BuildError(MixccError, RuntimeError):
    """nvcc or ninja failed; the message holds the compiler output and the build dir."""


class CacheSecurityError(BuildError):
    """A path of the kernel cache is owned by another user or writable by group or others."""


def cache_dir() -> Path:
    env = os.environ.get("MIXCC_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mixcc"


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME/CUDA_PATH, PATH, or /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


@functools.lru_cache(maxsize=4)
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def find_ninja() -> str:
    try:
        import ninja

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("ninja")
    if not found:
        raise BuildError("ninja not found: pip install ninja")
    return found


def device_arch() -> str:
    """The current GPU's target: sm_90a on Hopper (its arch-specific features), else sm_XY."""
    import torch

    if not torch.cuda.is_available():
        raise BuildError("no CUDA device: name the target arch (e.g. --arch sm_90a)")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}" + ("a" if (major, minor) in ((9, 0), (10, 0)) else "")


@dataclass(frozen=True)
class Built:
    path: Path  # the shared library
    key: str
    seconds: float  # compile time (0.0 on a cache hit)
    cached: bool


def _headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(templates_dir().glob("*.cuh")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_key(source: str, arch: str, flags: list[str], nvcc_ver: str, versions: str = ""
              ) -> str:
    h = hashlib.sha256()
    for part in (source, _headers_digest(), " ".join(flags), nvcc_ver, arch, versions):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _ninja_file(nvcc: str, flags: list[str]) -> str:
    return (
        "ninja_required_version = 1.3\n"
        f"nvcc = {nvcc}\n"
        f"flags = {' '.join(flags)}\n"
        "rule nvcc\n"
        "  command = $nvcc $flags $in -o $out\n"
        "  description = NVCC $out\n"
        "build module.so: nvcc source.cu\n"
        "default module.so\n"
    )


def build_module(source: str, name: str, arch: str) -> Built:
    """Compile a self-contained `source` into a shared library (or find it in the cache)."""
    return build(BuildSpec(name, source, arch))


def _my_uid() -> int:
    """The user the cache must belong to (one place, so tests can pretend otherwise)."""
    return os.getuid()


def _check_private(path: Path) -> None:
    """Raise CacheSecurityError unless `path` is ours and not writable by group or others."""
    st = os.stat(path)
    what = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    why = ("mixcc loads and runs code from its kernel cache, so whoever can change it "
           "can run code as you")
    if st.st_uid != _my_uid():
        raise CacheSecurityError(
            f"kernel cache {what} {path} is owned by uid {st.st_uid}, not by you "
            f"(uid {_my_uid()}): {why}. Set MIXCC_CACHE_DIR to a private directory of "
            "your own (mode 700), or remove this one.")
    loose = st.st_mode & 0o022
    if loose:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if loose & bit)
        fix = f"chmod 700 {path}" if what == "directory" else f"chmod go-w {path}"
        raise CacheSecurityError(
            f"kernel cache {what} {path} is writable by {who} (mode "
            f"{stat.S_IMODE(st.st_mode):o}): {why}. Run `{fix}`, or set MIXCC_CACHE_DIR to "
            "a private directory.")


def _private_dir(path: Path) -> None:
    """Create `path` with mode 0700 if it is missing, then check that it is private."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass  # the user's or an earlier run's: check it, never change it
    else:
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask
    _check_private(path)


LIBRARY = "module.so"
DIGEST = "module.sha256"  # "<hex>  module.so", as sha256sum writes it
_verified: set[tuple[str, int, int, int]] = set()  # (path, inode, size, mtime_ns) hashed OK


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached(entry: Path) -> Path | None:
    """The library of a finished, intact cache entry; None if there is no usable entry.

    Raises CacheSecurityError if the entry or its library is not private. A library is
    hashed once per process (per inode, size and mtime) against the recorded digest.
    """
    if not os.path.lexists(entry) or entry.is_symlink():
        return None  # mixcc makes no links here: a link is removed and built again
    _check_private(entry)
    lib = entry / LIBRARY
    if not lib.is_file():
        return None
    _check_private(lib)
    st = lib.stat()
    memo = (str(lib), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo in _verified:
        return lib
    try:
        recorded = (entry / DIGEST).read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return None  # no digest: an entry from before digests, or damaged
    if _sha256(lib) != recorded:
        return None
    _verified.add(memo)
    return lib


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Move `path` aside to a dot-prefixed name (never taken for an entry), then delete it."""
    aside = path.with_name(f".{path.name}-bad-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, aside)
    _delete(aside)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(tmp: Path) -> None:
    """Make a finished build dir private, record its library's digest, flush it to disk."""
    lib = tmp / LIBRARY
    os.chmod(lib, 0o700)  # nvcc's output mode follows the umask
    fd = os.open(tmp / DIGEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_sha256(lib)}  {LIBRARY}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(lib)
    _fsync(tmp)


def build(spec: BuildSpec) -> Built:
    """Build the module `spec` describes (or find it in the cache).

    Raises BuildError if the compile fails and CacheSecurityError if the cache is not
    private to this user.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    flags = spec.key_flags()
    key = cache_key(spec.source, spec.arch, flags, nvcc_version(nvcc), spec.versions)
    name = spec.name
    top = cache_dir()
    root = top / "modules"
    _private_dir(top)
    _private_dir(root)
    final = root / f"{name}-{key}"
    lib = _cached(final)
    if lib is not None:
        return Built(lib, key, 0.0, True)
    flags = [*flags, f"-I{templates_dir()}", *spec.path_flags()]
    fd = os.open(root / f"{name}-{key}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per key; the others wait here
        lib = _cached(final)
        if lib is not None:
            return Built(lib, key, 0.0, True)
        if os.path.lexists(final):
            _remove(final)  # truncated, corrupt or without a digest: build it again
        for stale in root.glob(f".{name}-{key}-*"):
            _delete(stale)  # left by a killed build of this key (its lock is ours now)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}-", dir=root))
        try:
            (tmp / "source.cu").write_text(spec.source)
            (tmp / "build.ninja").write_text(_ninja_file(nvcc, flags))
            t0 = time.perf_counter()
            proc = subprocess.run([find_ninja(), "-C", str(tmp)], capture_output=True,
                                  text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                raise BuildError(f"building {name} failed in {tmp}:\n{proc.stdout}{proc.stderr}")
            _seal(tmp)
            os.rename(tmp, final)  # atomic: readers see all of it or nothing
            _fsync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Built(final / LIBRARY, key, seconds, False)
