"""`mixcc tune --emit-defaults`: auto's thresholds from a tuning sweep, as a table in the
shipped tables' schema (mixcc/tuning/thresholds.py)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field, replace

from .thresholds import Key, Thresholds, human_bytes, table_body


@dataclass(frozen=True)
class Sample:
    """One program at one size in the sweep: its one stage's bytes per rank, what kind of
    stage ("intra", or "hier_" + fused.hier_kind: direct, staged, copy), whether a
    rank reads several peers there, and the fastest time (s) of each algorithm timed."""

    program: str
    nbytes: int
    kind: str
    wide: bool = False
    best: dict[str, float] = field(default_factory=dict)


def _winner(s: Sample, among: tuple[str, ...] | None = None) -> str:
    times = {a: t for a, t in s.best.items() if among is None or a in among}
    return min(times, key=lambda a: (times[a], a))


def _from_top(samples: list[Sample], wins) -> int | None | bool:
    """The smallest size from which `wins(sample)` holds at every size up to the largest, in
    every program sampled there; None when it fails at the largest; False without samples."""
    sizes = sorted({s.nbytes for s in samples})
    if not sizes:
        return False
    found = None
    for n in reversed(sizes):
        if all(wins(s) for s in samples if s.nbytes == n):
            found = n
        else:
            break
    return found


def _from_bottom(samples: list[Sample], wins) -> int | None | bool:
    """The largest size up to which `wins` holds from the smallest size; None when it fails
    at the smallest; False without samples."""
    sizes = sorted({s.nbytes for s in samples})
    if not sizes:
        return False
    found = None
    for n in sizes:
        if all(wins(s) for s in samples if s.nbytes == n):
            found = n
        else:
            break
    return found


def derive(samples: list[Sample], base: Thresholds, base_source: str
           ) -> tuple[Thresholds, dict[str, str]]:
    """The thresholds the samples measure (LL, push, two-shot for wide stages, the NCCL
    hand-off of cross-node plans), the rest kept from `base`; with a note per threshold
    saying which."""
    notes: dict[str, str] = {}
    got: dict[str, int | None] = {}
    intra = [s for s in samples if s.kind == "intra"]

    def measured(name: str, value: int | None | bool, how: str) -> None:
        if value is False:
            return
        got[name] = value
        notes[name.upper()] = f"{how}: {human_bytes(value)}"

    measured("ll_max_bytes",
             _from_bottom([s for s in intra if "ll" in s.best], lambda s: _winner(s) == "ll"),
             "largest size up to which ll was the fastest at every size")
    measured("push_min_bytes",
             _from_top([s for s in intra if "push" in s.best], lambda s: _winner(s) == "push"),
             "smallest size from which push was the fastest at every size")
    wide = [s for s in intra if s.wide and {"one_shot", "two_shot"} <= set(s.best)]
    two_from = _from_top(wide, lambda s: _winner(s, ("one_shot", "two_shot")) == "two_shot")
    if two_from is not False:
        below = [n for n in sorted({s.nbytes for s in wide}) if two_from is not None
                 and n < two_from]
        got["one_shot_max_bytes_wide"] = None if two_from is None else (below[-1] if below
                                                                        else 0)
        notes["ONE_SHOT_MAX_BYTES_WIDE"] = (
            "largest size below the one from which the two-shot beat the one-shot: "
            f"{human_bytes(got['one_shot_max_bytes_wide'])}")
    for kind, name in (("hier_direct", "hier_nccl_min_bytes"),
                       ("hier_staged", "hier_staged_nccl_min_bytes")):
        measured(name, _from_top([s for s in samples if s.kind == kind and "nccl" in s.best],
                                 lambda s: _winner(s) == "nccl"),
                 "smallest size from which NCCL was the fastest at every size")
    values = replace(base, **got)
    for name in Thresholds.names():
        notes.setdefault(name, f"not measured by this sweep: kept from {base_source}")
    return values, notes


def driver_version() -> str:
    """The NVIDIA driver's version through NVML, or "unknown"."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return "unknown"
        buf = ctypes.create_string_buffer(96)
        try:
            ok = nvml.nvmlSystemGetDriverVersion(buf, 96) == 0
        finally:
            nvml.nvmlShutdown()
        return buf.value.decode() if ok else "unknown"
    except (OSError, AttributeError):
        return "unknown"


def provenance(key: Key, command: str, evidence: list[str]) -> dict:
    """The provenance fields of a table measured on this machine now."""
    import torch

    from .. import __version__

    names = sorted({torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count())})
    try:
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # a torch without NCCL
        nccl = "none"
    return {"device": f"{', '.join(names)}; {key.topology}, {key.world} ranks",
            "driver": driver_version(), "torch": torch.__version__, "nccl": nccl,
            "mixcc": __version__, "command": command, "evidence": evidence}


def emit_body(samples: list[Sample], key: Key, base: Thresholds, base_source: str,
              command: str, evidence: list[str]) -> dict:
    """The table `mixcc tune --emit-defaults` writes."""
    values, notes = derive(samples, base, base_source)
    return table_body(key, values, provenance(key, command, evidence), notes)
