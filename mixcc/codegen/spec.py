"""Build specifications: what a module is made of, as data (sources, include and link
directories, libraries, relocatable device code), apart from how build.py runs nvcc.

Paths stay out of the cache key (only the headers' contents, the flags without paths,
the toolkit, the arch and the versions of linked libraries go in), so a kernel cache
made in one checkout or on one machine serves another with the same toolkit.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared",
              "-lineinfo")


@dataclass(frozen=True)
class BuildSpec:
    name: str  # "stage", "hier", "runtime", ... (the cache entry's prefix)
    source: str  # CUDA source text
    arch: str  # e.g. "sm_90a"
    include_dirs: tuple[str, ...] = ()  # besides templates/
    link_dirs: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()  # as for -l: "nvshmem_device", ":libnvshmem_host.so.3"
    rdc: bool = False  # relocatable device code; nvcc then device-links the module
    rpath: bool = True  # record link_dirs as the module's run path
    versions: str = ""  # versions of what is linked (part of the cache key)

    def key_flags(self) -> list[str]:
        """The flags that change the output, without paths."""
        num = self.arch.removeprefix("sm_")
        flags = [*BASE_FLAGS, f"-gencode=arch=compute_{num},code=sm_{num}"]
        if self.rdc:
            flags.append("-rdc=true")
        flags += [f"-l{lib}" for lib in self.libraries]
        return flags

    def path_flags(self) -> list[str]:
        flags = [f"-I{d}" for d in self.include_dirs] + [f"-L{d}" for d in self.link_dirs]
        if self.rpath:
            flags += [f"-Xlinker=-rpath,{d}" for d in self.link_dirs]
        return flags


@dataclass(frozen=True)
class NvshmemInstall:
    root: Path
    version: str
    package: str

    @property
    def include(self) -> str:
        return str(self.root / "include")

    @property
    def lib(self) -> str:
        return str(self.root / "lib")


@functools.lru_cache(maxsize=1)
def find_nvshmem() -> NvshmemInstall | None:
    """The nvidia-nvshmem-cu13 / -cu12 wheel's headers and libraries, or None."""
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        root = Path(loc)
        if (root / "include" / "nvshmem.h").exists() and (root / "lib").is_dir():
            for pkg in ("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12"):
                try:
                    return NvshmemInstall(root, importlib.metadata.version(pkg), pkg)
                except importlib.metadata.PackageNotFoundError:
                    continue
            return NvshmemInstall(root, "unknown", "nvidia-nvshmem")
    return None


NVSHMEM_MISSING = ("NVSHMEM is not installed: pip install 'mixcc[nvshmem-cu13]' (or "
                   "'mixcc[nvshmem-cu12]', matching torch's CUDA major version)")


def nvshmem_spec(name: str, source: str, arch: str) -> BuildSpec:
    """A module whose device code calls NVSHMEM: relocatable device code, device-linked
    with the static device library and linked with the host library."""
    nv = find_nvshmem()
    if nv is None:
        raise RuntimeError(NVSHMEM_MISSING)
    return BuildSpec(name, source, arch, include_dirs=(nv.include,), link_dirs=(nv.lib,),
                     libraries=("nvshmem_device", ":libnvshmem_host.so.3"), rdc=True,
                     # the library path too: the module records it as its run path
                     versions=f"{nv.package} {nv.version} {nv.lib}")
