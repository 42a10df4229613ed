"""build: CUDA source -> shared library, through nvcc and ninja, cached on disk
(docs/DESIGN.md section 3, step 6).

The cache key hashes the source, the headers it includes, the flags, nvcc's version
and the target arch. The cache dir is MIXCC_CACHE_DIR, else $XDG_CACHE_HOME/mixcc,
else ~/.cache/mixcc. Several ranks may build the same module at once: a file lock
lets one compile while the others wait, and the result appears by an atomic rename
of a finished private directory, so a reader never sees a half-written library.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..paths import templates_dir
from .spec import BuildSpec


class BuildError(RuntimeError):
    """nvcc or ninja failed; the message holds the compiler output and the build dir."""


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


def build(spec: BuildSpec) -> Built:
    """Build the module `spec` describes (or find it in the cache)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    flags = spec.key_flags()
    key = cache_key(spec.source, spec.arch, flags, nvcc_version(nvcc), spec.versions)
    name = spec.name
    root = cache_dir() / "modules"
    final = root / f"{name}-{key}"
    lib = final / "module.so"
    if lib.exists():
        return Built(lib, key, 0.0, True)
    flags = [*flags, f"-I{templates_dir()}", *spec.path_flags()]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per key; the others wait here
        if lib.exists():
            return Built(lib, key, 0.0, True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            (tmp / "source.cu").write_text(spec.source)
            (tmp / "build.ninja").write_text(_ninja_file(nvcc, flags))
            t0 = time.perf_counter()
            proc = subprocess.run([find_ninja(), "-C", str(tmp)], capture_output=True,
                                  text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                raise BuildError(f"building {name} failed in {tmp}:\n{proc.stdout}{proc.stderr}")
            os.rename(tmp, final)  # atomic: readers see all of it or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Built(lib, key, seconds, False)
