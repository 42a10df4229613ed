"""auto's size thresholds as data, keyed by GPU architecture, topology and world size
(docs/DESIGN.md, "Tuning").

Each table in mixcc/tuning/defaults/<key>.json holds every threshold with the provenance
of the run that measured it. `resolve` looks a key up in this order: a table written by
`mixcc tune --emit-defaults` (the tuning table's directory, defaults/<key>.json), the
shipped table, then BUILTIN, a conservative rule, logging once per key and process that
no table exists. `agree` makes every rank of a group use rank 0's values.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch.distributed as dist

SCHEMA = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "defaults"
TOPOLOGIES = ("nvlink", "nvswitch", "pcie", "mps", "shared", "nodes", "single", "unknown")
PROVENANCE = ("device", "driver", "torch", "nccl", "mixcc", "command", "evidence")
log = logging.getLogger("mixcc")


@dataclass(frozen=True)
class Thresholds:
    """Bytes of input per rank at which auto changes its choice (None: never). Names
    follow the JSON tables' keys (upper case there)."""

    ll_max_bytes: int | None  # LL up to this size, two-rank stages (plan.ll_auto)
    ll_epi_max_bytes: int | None  # the same with a fused epilogue
    push_min_bytes: int | None  # push from this size, two-rank stages (plan.push_auto)
    pool_push_min_bytes: int | None  # ... in a group with a registered pool
    one_shot_max_bytes_wide: int | None  # two-shot above it where a rank reads several peers
    hier_nccl_min_bytes: int | None  # NCCL from it: one rank per node, plans that reduce
    hier_staged_nccl_min_bytes: int | None  # NCCL from it: other cross-node plans
    reg_min_bytes: int | None  # the one-shot reads a registered input in place from it
    ce_min_bytes: int | None  # copy engines for registered copies from it
    row_split_min_bytes: int | None  # LL epilogue rows over two blocks from this row size

    @classmethod
    def names(cls) -> list[str]:
        """The tables' keys, in field order."""
        return [f.name.upper() for f in fields(cls)]

    def to_json(self) -> dict[str, int | None]:
        return {k.upper(): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: object, where: str) -> Thresholds:
        """From a table's "thresholds" object: every key present, each a byte count >= 0
        or null; ValueError naming `where` and the key otherwise."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: \"thresholds\" must be an object, got {raw!r}")
        names = cls.names()
        missing = [n for n in names if n not in raw]
        unknown = [k for k in raw if k not in names]
        if missing or unknown:
            raise ValueError(f"{where}: thresholds missing {missing}, unknown {unknown}; "
                             f"expected exactly {names}")
        for k, v in raw.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{where}: {k} must be a byte count >= 0 or null, got {v!r}")
        return cls(**{k.lower(): v for k, v in raw.items()})


# The conservative rule for keys without a table: the one-shot (two-shot past 1 MiB where a
# rank reads several peers), no LL, push, copy engines or in-place reads, cross-node plans
# on NCCL from 4 MiB. The rule, not a measurement: `mixcc tune --emit-defaults` replaces it.
BUILTIN = Thresholds(
    ll_max_bytes=None, ll_epi_max_bytes=None, push_min_bytes=None, pool_push_min_bytes=None,
    one_shot_max_bytes_wide=1 << 20, hier_nccl_min_bytes=4 << 20,
    hier_staged_nccl_min_bytes=4 << 20, reg_min_bytes=None, ce_min_bytes=None,
    row_split_min_bytes=16 << 10)


@dataclass(frozen=True)
class Key:
    """What a table is keyed by: "sm_90", a TOPOLOGIES name, ranks in the group."""

    arch: str
    topology: str
    world: int

    def __str__(self) -> str:
        return f"{self.arch}-{self.topology}-w{self.world}"


@dataclass(frozen=True)
class Resolved:
    """The thresholds a runner uses and where they came from ("shipped default KEY",
    "tuned defaults PATH", "built-in rule (no table for KEY)")."""

    key: Key | None
    values: Thresholds
    source: str


@dataclass(frozen=True)
class RankFacts:
    """What one rank knows of its GPU: host, device UUID, arch ("sm_90"), active NVLinks
    (-1: unknown) and whether one of them reaches an NVSwitch."""

    host: str
    device: str
    arch: str
    nvlinks: int = -1
    switch: bool = False


def classify(facts: list[RankFacts]) -> Key:
    """The key of a group from every rank's facts (a pure function: ranks that see the same
    list derive the same key). Ranks on several hosts: "nodes"; every rank on one GPU: "mps";
    some GPU shared otherwise: "shared"; else by links: "nvlink" (every GPU has an active
    NVLink; more than two GPUs through an NVSwitch: "nvswitch"), "pcie" (none has one) or
    "unknown". Mixed architectures give arch "mixed"."""
    world = len(facts)
    archs = sorted({f.arch for f in facts})
    arch = archs[0] if len(archs) == 1 else "mixed"
    devices = {(f.host, f.device) for f in facts}
    if world == 1:
        topo = "single"
    elif len({f.host for f in facts}) > 1:
        topo = "nodes"
    elif len(devices) == 1:
        topo = "mps"
    elif len(devices) < world:
        topo = "shared"
    elif any(f.nvlinks < 0 for f in facts):
        topo = "unknown"
    elif all(f.nvlinks > 0 for f in facts):
        topo = "nvswitch" if len(devices) > 2 and all(f.switch for f in facts) else "nvlink"
    elif all(f.nvlinks == 0 for f in facts):
        topo = "pcie"
    else:
        topo = "unknown"
    return Key(arch, topo, world)


# -- tables -------------------------------------------------------------------------------

def check_table(raw: object, where: str) -> tuple[Key, Thresholds, dict]:
    """A table's key, thresholds and provenance; ValueError naming `where` and what is
    wrong for anything else (schema version, key fields, a provenance field missing)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a table must be a JSON object, got {type(raw).__name__}")
    if raw.get("schema") != SCHEMA:
        raise ValueError(f"{where}: schema {raw.get('schema')!r}, expected {SCHEMA}")
    unknown = sorted(set(raw) - {"schema", "key", "thresholds", "provenance", "notes"})
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    k = raw.get("key")
    if not (isinstance(k, dict) and set(k) == {"arch", "topology", "world"}
            and isinstance(k["arch"], str) and k["topology"] in TOPOLOGIES
            and isinstance(k["world"], int) and k["world"] >= 1):
        raise ValueError(f"{where}: \"key\" must be {{arch: str, topology: one of "
                         f"{list(TOPOLOGIES)}, world: int >= 1}}, got {k!r}")
    prov = raw.get("provenance")
    if not isinstance(prov, dict) or any(p not in prov for p in PROVENANCE):
        raise ValueError(f"{where}: \"provenance\" must name {list(PROVENANCE)}, got "
                         f"{sorted(prov) if isinstance(prov, dict) else prov!r}")
    return (Key(k["arch"], k["topology"], k["world"]),
            Thresholds.from_json(raw.get("thresholds"), where), prov)


def read_table(path: Path) -> tuple[Key, Thresholds, dict]:
    """check_table of the file at `path`; ValueError for unreadable JSON or a file whose
    name is not its key."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    key, values, prov = check_table(raw, str(path))
    if path.stem != str(key):
        raise ValueError(f"{path}: holds key {key}, its name must be {key}.json")
    return key, values, prov


def table_body(key: Key, values: Thresholds, provenance: dict, notes: dict | None = None
               ) -> dict:
    """The JSON object of a table (check_table's inverse)."""
    body = {"schema": SCHEMA, "key": asdict(key), "thresholds": values.to_json(),
            "provenance": {p: provenance.get(p) for p in PROVENANCE}}
    if notes:
        body["notes"] = notes
    check_table(body, str(key))
    return body


def write_table(path: Path, body: dict) -> Path:
    """Write a table atomically (its name must be its key)."""
    key, _, _ = check_table(body, str(path))
    if path.stem != str(key):
        raise ValueError(f"{path}: a table of key {key} must be named {key}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def user_dir() -> Path | None:
    """Where `mixcc tune --emit-defaults` writes by default, beside the tuning table
    (None when MIXCC_TUNE_TABLE=off)."""
    from .. import tune

    table = tune.table_path()
    return None if table is None else table.parent / "defaults"


_LOGGED: set[str] = set()


def resolve(key: Key | None, user: Path | None = None, shipped: Path = SHIPPED_DIR
            ) -> Resolved:
    """The thresholds of `key`: the user's table (`user`, default user_dir()), else the
    shipped one, else BUILTIN with one log line per key and process. A damaged table is
    skipped with a warning in the log, never trusted."""
    if key is None:
        return Resolved(None, BUILTIN, "built-in rule (no GPU: key unknown)")
    user = user if user is not None else user_dir()
    for where, label in ((user, "tuned defaults"), (shipped, "shipped default")):
        path = where / f"{key}.json" if where is not None else None
        if path is None or not path.exists():
            continue
        try:
            _, values, _ = read_table(path)
        except ValueError as e:
            log.warning("mixcc: ignoring the threshold table %s", e)
            continue
        return Resolved(key, values, f"{label} {key}" if label == "shipped default"
                        else f"{label} {path}")
    if str(key) not in _LOGGED:
        _LOGGED.add(str(key))
        log.warning("mixcc: no threshold table for %s (arch-topology-world): auto uses its "
                    "conservative built-in rule; `mixcc tune --emit-defaults` makes one", key)
    return Resolved(key, BUILTIN, f"built-in rule (no table for {key})")


def shipped_keys() -> list[Key]:
    """The keys of the shipped tables."""
    return sorted((read_table(p)[0] for p in SHIPPED_DIR.glob("*.json")), key=str)


# -- facts of this machine ----------------------------------------------------------------

_NVML_SUCCESS, _NVLINK_MAX_LINKS, _NVLINK_DEVICE_TYPE_SWITCH = 0, 18, 2


def nvlink_facts(uuid: str) -> tuple[int, bool]:
    """(active NVLinks, one reaches an NVSwitch) of the GPU with `uuid` through NVML (the
    driver's libnvidia-ml); (-1, False) when NVML cannot tell."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != _NVML_SUCCESS:
            return -1, False
    except (OSError, AttributeError):
        return -1, False
    try:
        dev = ctypes.c_void_p()
        name = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        if nvml.nvmlDeviceGetHandleByUUID(name.encode(), ctypes.byref(dev)) != _NVML_SUCCESS:
            return -1, False
        active, switch = 0, False
        remote = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
        for link in range(_NVLINK_MAX_LINKS):
            on = ctypes.c_int()
            if nvml.nvmlDeviceGetNvLinkState(dev, link, ctypes.byref(on)) != _NVML_SUCCESS:
                continue  # no such link on this GPU
            if on.value:
                active += 1
                kind = ctypes.c_int()
                if remote is not None and remote(dev, link, ctypes.byref(kind)) == \
                        _NVML_SUCCESS and kind.value == _NVLINK_DEVICE_TYPE_SWITCH:
                    switch = True
        return active, switch
    finally:
        nvml.nvmlShutdown()


def arch_name(major: int, minor: int) -> str:
    """"sm_90" for compute capability 9.0 (the tables' arch, without build suffixes)."""
    return f"sm_{major}{minor}"


@functools.cache
def local_facts(device: int) -> RankFacts:
    """This rank's facts for CUDA device `device` (asked once per process)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", device))
    links, switch = nvlink_facts(uuid)
    return RankFacts(socket.gethostname(), uuid, arch_name(props.major, props.minor), links,
                     switch)


def agree(group: dist.ProcessGroup | None, mine: RankFacts, user: Path | None = None
          ) -> Resolved:
    """The thresholds every rank of `group` uses: the key from every rank's facts
    (gathered), resolved on rank 0 and broadcast, so ranks that see other tables or facts
    still launch alike."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return resolve(classify([mine]), user)
    world = dist.get_world_size(group)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    box = [resolve(classify(everyone), user) if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, group_src=0, group=group)
    return box[0]


# -- reading sizes ------------------------------------------------------------------------

def human_bytes(n: int | None) -> str:
    """1536 -> "1.5 KiB", 75894784 -> "72.4 MiB"; None -> "never"."""
    from ..codegen.plan import human_bytes as plain

    return "never" if n is None else plain(n)


def arch_of(text: str) -> str:
    """The tables' arch of a build target: "sm_90a" -> "sm_90"."""
    return text.rstrip("abcdefghijklmnopqrstuvwxyz") if text.startswith("sm_") else text


def guess_key(world: int) -> Key | None:
    """The key of `world` ranks on this machine's GPUs, for `mixcc explain` (None without a
    GPU): ranks on GPUs 0..world-1 where there are as many, else sharing them."""
    import torch

    if not torch.cuda.is_available():
        return None
    gpus = torch.cuda.device_count()
    facts = [local_facts(r % gpus) for r in range(min(world, gpus))]
    facts += [facts[r % gpus] for r in range(len(facts), world)]
    return classify(facts)


def shipped(key: Key) -> Thresholds:
    """The shipped table of `key` alone (KeyError when none ships)."""
    path = SHIPPED_DIR / f"{key}.json"
    if not path.exists():
        raise KeyError(f"no shipped threshold table for {key}")
    return read_table(path)[1]
