"""Rendering and building (docs/DESIGN.md section 7, step 2): every preset and a sample
of fuzzed programs render and compile with nvcc for sm_90; skipped without nvcc."""

from __future__ import annotations

import re
import subprocess
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixcc
from mixcc.codegen.build import build_module, cache_key, find_nvcc
from mixcc.codegen.render import render_stage, schedule_table
from mixcc.codegen.schedule import DST_OUT

from strategies import one_node_programs

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def stages(program, axes, rpn=None):
    coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=rpn), backend="reference")
    return coll.plan.stages


def test_render_is_deterministic_and_specialised():
    st0 = stages("allreduce_allgather", {"dp": 2, "tp": 4})[0]
    a, b = render_stage(st0, torch.bfloat16), render_stage(st0, torch.bfloat16)
    assert a == b
    assert "using T = __nv_bfloat16;" in a and "constexpr int NRANKS = 8;" in a
    assert "constexpr int VEC_WIDE = 8;" in a and "mixcc::Op::kSum" in a
    f = render_stage(stages("allreduce(tp, op=max)", {"tp": 2})[0], torch.float32)
    assert "using T = float;" in f and "VEC_WIDE = 4;" in f and "kMax" in f


@pytest.mark.parametrize("op,enum", [("sum", "kSum"), ("max", "kMax"), ("min", "kMin")])
def test_every_reduction_renders_its_own_op(op, enum):
    src = render_stage(stages(f"allreduce(tp, op={op})", {"tp": 2})[0], torch.float32)
    assert f"constexpr mixcc::Op OP = mixcc::Op::{enum};" in src
    assert sum(f"mixcc::Op::{e};" in src for e in ("kSum", "kMax", "kMin")) == 1


def test_schedule_table_layout():
    st0 = stages("allreduce(tp)", {"tp": 2})[0]
    flat, offsets, max_terms = schedule_table(st0.schedules["one_shot"])
    # rank 1: 1 neighbour (0), 1 reduce task into out[0] of 2 terms, 0 gathers
    r1 = flat[offsets[1]:]
    assert r1[:3] == [1, 0, 1]
    assert r1[3:8] == [DST_OUT, 0, 0, 1, 2]
    assert r1[8:14] == [0, 0, 1, 1, 0, 1] and r1[14] == 0
    assert max_terms == 2


def test_render_refuses_unsupported_dtype():
    with pytest.raises(ValueError, match="supports"):
        render_stage(stages("allreduce(tp)", {"tp": 2})[0], torch.float64)


def test_cache_key_covers_source_flags_version_and_arch():
    k = cache_key("src", "sm_90", ["-O3"], "V13.0")
    assert k == cache_key("src", "sm_90", ["-O3"], "V13.0")
    assert len({k, cache_key("src2", "sm_90", ["-O3"], "V13.0"),
                cache_key("src", "sm_90a", ["-O3"], "V13.0"),
                cache_key("src", "sm_90", ["-O2"], "V13.0"),
                cache_key("src", "sm_90", ["-O3"], "V12.8")}) == 5


def test_fused_refusals_name_the_reason(monkeypatch):
    mesh = mixcc.Mesh({"dp": 2, "tp": 2}, ranks_per_node=2)
    from mixcc.codegen import spec

    monkeypatch.setattr(spec, "find_nvshmem", lambda: None)
    with pytest.raises(ValueError, match=r"cross nodes and NVSHMEM is not installed: pip "
                                         r"install 'mixcc\[nvshmem-cu13\]'"):
        mixcc.compile("allreduce(dp)", mesh, backend="fused")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no CUDA device"):  # this machine has no GPU
        mixcc.compile("allreduce(dp)", mesh, backend="fused")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    with pytest.raises(ValueError, match="multicast is disabled on this machine"):
        mixcc.compile("allreduce(tp)", mixcc.Mesh({"tp": 2}), multicast=True)


@needs_nvcc
@pytest.mark.parametrize("name", list(mixcc.presets.PRESETS))
def test_presets_compile_for_sm90(tmp_path, monkeypatch, name):
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    for dtype in DTYPES:
        for st0 in stages(name, {"dp": 2, "tp": 4}):
            built = build_module(render_stage(st0, dtype), "stage", "sm_90")
            assert built.path.exists() and not built.cached


@needs_nvcc
def test_cache_hit_and_concurrent_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    src = render_stage(stages("reducescatter_allreduce", {"dp": 2, "tp": 2})[0], torch.float16)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        build_module(src, "stage", "sm_90"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.path for r in results}) == 1
    assert sum(not r.cached for r in results) == 1  # one compiled, the others waited
    again = build_module(src, "stage", "sm_90")
    assert again.cached and again.seconds == 0.0
    assert not list((tmp_path / "modules").glob(".stage-*"))  # no stray temp dirs


@needs_nvcc
def test_runtime_library_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    from mixcc.runtime import build_native

    assert build_native("sm_90").path.exists()


@needs_nvcc
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=one_node_programs(max_statements=3), dtype=st.sampled_from(DTYPES))
def test_fuzzed_programs_compile_for_sm90(tmp_path_factory, case, dtype):
    program, axes = case
    import os

    os.environ["MIXCC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        for st0 in stages(program, axes):
            assert build_module(render_stage(st0, dtype), "stage", "sm_90").path.exists()
    finally:
        del os.environ["MIXCC_CACHE_DIR"]


def _exports(path) -> set[str]:
    import subprocess

    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if " T " in line}


def test_abi_is_one_definition():
    from mixcc.codegen import abi

    text = render_stage(stages("allreduce(tp)", {"tp": 2})[0], torch.bfloat16)
    assert abi.c_struct() in text and f"return {abi.VERSION};" in text
    assert [f for f, _ in abi.LaunchArgs._fields_] == [f for f, _ in abi.FIELDS]
    # the struct lies outside the anonymous namespace, or mixcc_launch loses its linkage
    assert text.index("struct LaunchArgs") < text.index("namespace {")


@needs_nvcc
def test_stage_module_exports_the_launch_abi(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    built = build_module(render_stage(stages("allreduce(tp)", {"dp": 1, "tp": 4})[0],
                                      torch.float32), "stage", "sm_90")
    assert {"mixcc_launch", "mixcc_abi_version", "mixcc_nranks", "mixcc_ce_init",
            "mixcc_ce_launch"} <= _exports(built.path)


@needs_nvcc
@pytest.mark.skipif(__import__("mixcc.codegen.spec", fromlist=["x"]).find_nvshmem() is None,
                    reason="nvidia-nvshmem wheel not installed")
@pytest.mark.parametrize("program", ["allreduce_allgather", "reducescatter_allreduce"])
def test_hier_stage_compiles_and_links_nvshmem(tmp_path, monkeypatch, program):
    from mixcc.codegen.build import build
    from mixcc.codegen.plan import HierStage
    from mixcc.codegen.spec import nvshmem_spec

    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    (st,) = stages(program, {"dp": 2, "tp": 2}, rpn=2)
    assert isinstance(st, HierStage)
    built = build(nvshmem_spec("hier", render_stage(st, torch.bfloat16), "sm_90"))
    assert {"mixcc_launch", "mixcc_abi_version", "mixcc_module_init"} <= _exports(built.path)


@needs_nvcc
@pytest.mark.skipif(__import__("mixcc.codegen.spec", fromlist=["x"]).find_nvshmem() is None,
                    reason="nvidia-nvshmem wheel not installed")
def test_nvshmem_runtime_library_compiles(tmp_path, monkeypatch):
    from mixcc import nvshmem

    monkeypatch.setenv("MIXCC_CACHE_DIR", str(tmp_path))
    exports = _exports(nvshmem.build_library("sm_90").path)
    assert {"mixcc_nv_uniqueid", "mixcc_module_init", "mixcc_nv_malloc"} <= exports


# A data store nvcc split into 2- or 4-byte pieces: a 16- or 32-bit store at an offset
# that is not a multiple of 16 from its base register (whole packs start at one).
_SPLIT_STORE = re.compile(r"\bst(?:\.global)?\.(?:u32|b32|u16|b16)\s+\[%rd\d+\+(\d+)\]")


def _ptx(source: str, tmp_path, include: tuple[str, ...] = ()) -> str:
    from mixcc.paths import templates_dir

    src, ptx = tmp_path / "k.cu", tmp_path / "k.ptx"
    src.write_text(source)
    flags = [f"-I{templates_dir()}", *(f"-I{d}" for d in include)]
    subprocess.run([find_nvcc(), "-arch=sm_90a", "-O3", "-std=c++17", "-ptx", *flags,
                    "-o", str(ptx), str(src)], check=True, capture_output=True)
    return ptx.read_text()


@needs_nvcc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("program,axes", [("allreduce(tp)", {"tp": 2}),
                                          ("allreduce_allgather", {"dp": 2, "tp": 2}),
                                          ("allreduce(tp); add(r); store(r); rmsnorm(w)",
                                           {"tp": 2}),
                                          ("allreduce(tp); add(r); rmsnorm(w); "
                                           "quant(fp8_e4m3, s)", {"tp": 2})])
def test_kernels_store_whole_16_byte_packs(tmp_path, dtype, program, axes):
    """Every copy and reduce writes a 16-byte pack with one st.global.v4: nvcc split a plain
    uint4 assignment into four 4-byte stores in push's copies, which slowed push (commit
    d6da35d)."""
    coll = mixcc.compile(program, mixcc.Mesh(axes), dtype=dtype, backend="reference")
    st0 = coll.plan.stages[-1]
    ptx = _ptx(render_stage(st0, dtype, coll.ir.epilogue), tmp_path)
    assert "st.global.v4.b32" in ptx
    # the LL kernel's narrow path (a misaligned tensor) writes a line's elements one by one
    entries = re.split(r"(?=\.entry )", ptx)
    assert any("ll_kernelILi1E" in e for e in entries)
    ptx = "".join(e for e in entries if "ll_kernelILi1E" not in e)
    split = [m.group(0) for m in _SPLIT_STORE.finditer(ptx) if int(m.group(1)) % 16]
    assert not split, split[:8]


@needs_nvcc
@pytest.mark.skipif(__import__("mixcc.codegen.spec", fromlist=["x"]).find_nvshmem() is None,
                    reason="nvidia-nvshmem wheel not installed")
def test_hier_kernel_stores_whole_16_byte_packs(tmp_path):
    from mixcc.codegen.spec import find_nvshmem

    (st0,) = stages("allreduce_allgather", {"dp": 2, "tp": 2}, rpn=2)
    ptx = _ptx(render_stage(st0, torch.bfloat16), tmp_path, (find_nvshmem().include,))
    split = [m.group(0) for m in _SPLIT_STORE.finditer(ptx) if int(m.group(1)) % 16]
    assert not split, split[:8]
    # with a fused epilogue (step D from fp32 shares): the same, its kernels are there
    # (EPI 1, 2, 4 packs), the plain ones do not spill and the epilogue's stay near what
    # ptxas -v gives (128 / 158 / 540 bytes at 1 / 2 / 4 packs, bf16)
    coll = mixcc.compile("allreduce(tp); allgather(dp); add(r); rmsnorm(w)",
                         mixcc.Mesh({"dp": 2, "tp": 2}, ranks_per_node=2), backend="reference")
    ptx = _ptx(render_stage(coll.plan.stages[-1], torch.bfloat16, coll.ir.epilogue), tmp_path,
               (find_nvshmem().include,))
    split = [m.group(0) for m in _SPLIT_STORE.finditer(ptx) if int(m.group(1)) % 16]
    assert not split, split[:8]
    for epi in ("1", "2", "4"):
        assert f"hier_kernelILi8ELi{epi}E" in ptx, epi
    assert "hier_kernelILi8ELin1E" not in ptx
    spills = _spills(render_stage(coll.plan.stages[-1], torch.bfloat16, coll.ir.epilogue),
                     tmp_path, (find_nvshmem().include,))
    assert spills["hier<8,0>"] == 0 and spills["hier<1,0>"] == 0, spills
    assert spills["hier<8,1>"] <= 200, spills
    assert spills["hier<8,2>"] <= 220 and spills["hier<8,4>"] <= 700, spills


@needs_nvcc
@pytest.mark.skipif(__import__("mixcc.codegen.spec", fromlist=["x"]).find_nvshmem() is None,
                    reason="nvidia-nvshmem wheel not installed")
def test_one_rank_per_node_hier_kernel_compiles_without_spills(tmp_path):
    """DIRECT (one rank per node: input read and output written in place), plain and with a
    fused epilogue: whole 16-byte stores, and the plain kernels do not spill."""
    from mixcc.codegen.spec import find_nvshmem

    inc = (find_nvshmem().include,)
    for program, axes in (("allreduce(dp)", {"dp": 2, "tp": 1}),
                          ("allreduce(tp); allgather(dp); add(r); rmsnorm(w)",
                           {"dp": 2, "tp": 2})):
        coll = mixcc.compile(program, mixcc.Mesh(axes, ranks_per_node=1), backend="reference")
        src = render_stage(coll.plan.stages[-1], torch.bfloat16, coll.ir.epilogue)
        assert "constexpr int LOCAL = 1;" in src
        ptx = _ptx(src, tmp_path, inc)
        split = [m.group(0) for m in _SPLIT_STORE.finditer(ptx) if int(m.group(1)) % 16]
        assert not split, split[:8]
        spills = _spills(src, tmp_path, inc)
        assert spills["hier<8,0>"] == 0 and spills["hier<1,0>"] == 0, spills


def _spills(source: str, tmp_path, include: tuple[str, ...] = ()) -> dict[str, int]:
    """Bytes of spill stores per kernel of a rendered module (ptxas -v), keyed
    "stage<VEC,TWO_SHOT,EPI>", "push<VEC>", "ll<VEC,EPI>" and "hier<VEC,EPI>" (EPI -1:
    "n1")."""
    from mixcc.paths import templates_dir

    src = tmp_path / "k.cu"
    src.write_text(source)
    flags = [f"-I{templates_dir()}", *(f"-I{d}" for d in include)]
    flags += ["-rdc=true"] if include else []  # NVSHMEM device code links separately
    out = subprocess.run([find_nvcc(), "-arch=sm_90a", "-O3", "-std=c++17", "-cubin", *flags,
                          "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(src)],
                         check=True, capture_output=True, text=True).stderr
    spills = {}
    for part in out.split("Compiling entry function")[1:]:
        m = re.match(r" '\S*(stage|push)_kernelILi(\d+)E(?:Lb(\d)ELi(\d)E)?", part)
        h = re.match(r" '\S*hier_kernelILi(\d+)ELi(n?\d+)E", part)
        ll = re.match(r" '\S*ll_kernelILi(\d+)ELi(\d+)E", part)
        if m:
            key = f"stage<{m[2]},{m[3]},{m[4]}>" if m[1] == "stage" else f"push<{m[2]}>"
        elif h:
            key = f"hier<{h[1]},{h[2]}>"
        elif ll:
            key = f"ll<{ll[1]},{ll[2]}>"
        else:
            continue
        spills[key] = int(re.search(r"(\d+) bytes spill stores", part).group(1))
    return spills


@needs_nvcc
def test_kernels_keep_their_registers(tmp_path):
    """Four packs in flight per thread in two-term reduces (PAIR_UNR) only where measured
    (the one-shot and push of two-rank modules), and no spill growth elsewhere: at four in
    every kernel the fused-epilogue kernels spilled 386 and 820 bytes (one and two packs
    per row thread, bf16) against 78 and 132 and ran slower, and the two-shot and some
    one-shots of eight ranks spilled too (evidence: commit 9f2e3ce)."""
    def module(program, axes):
        coll = mixcc.compile(program, mixcc.Mesh(axes), dtype=torch.bfloat16,
                             backend="reference")
        return render_stage(coll.plan.stages[-1], torch.bfloat16, coll.ir.epilogue)

    two = _spills(module("allreduce(tp); add(r); store(r); rmsnorm(w)", {"tp": 2}), tmp_path)
    assert two["stage<8,0,0>"] == 0 and two["stage<8,1,0>"] == 0, two
    assert two["stage<8,0,1>"] <= 160 and two["stage<8,0,2>"] <= 260, two
    # the two-shot's with a fused epilogue (algorithm='two_shot'; never run on a GPU yet):
    # its kernel also holds the one-shot's row pass for the units nobody shares
    assert two["stage<8,1,1>"] <= 240 and two["stage<8,1,2>"] <= 320, two
    assert two["push<8>"] <= 40, two
    # LL, plain (wide and narrow) and with the epilogue's row pass at one and two packs
    assert all(two[f"ll<{v},{e}>"] == 0 for v, e in ((8, 0), (1, 0), (8, 1), (8, 2))), two
    eight = _spills(module("reducescatter(dp)", {"dp": 2, "tp": 4}), tmp_path)
    assert eight["stage<8,0,0>"] == 0 and eight["push<8>"] == 0, eight


def test_ipc_layout_struct_matches_layout():
    """The kernels address the IPC workspace (templates/transport_ipc.cuh) with the
    constants of mixcc/codegen/layout.py, rendered once into every module."""
    from mixcc.codegen import layout
    from mixcc.codegen.render import ipc_layout_struct

    text = ipc_layout_struct()
    for name in ("MAX_RANKS", "MAX_BLOCKS", "NSETS", "PUSH_FLAG_OFFSET", "SENT_OFFSET",
                 "REG_OFFSET", "ROW_SPLIT_MAX", "ROWSUM_OFFSET", "LL_OFFSET"):
        assert re.search(rf"\b{name} = {getattr(layout, name)};", text), name
    for st0 in (stages("allreduce(tp)", {"tp": 2})[0],
                stages("allreduce_allgather", {"dp": 2, "tp": 2}, rpn=2)[0]):
        src = render_stage(st0, torch.bfloat16)
        assert text in src and '#include "transport_ipc.cuh"' in src


def test_sym_layout_struct_matches_layout():
    """The hierarchical kernels address the NVSHMEM symmetric workspace
    (templates/transport_nvshmem.cuh) with the constants of mixcc/codegen/layout.py."""
    from mixcc.codegen import layout
    from mixcc.codegen.render import sym_layout_struct

    text = sym_layout_struct()
    for name in ("MAX_RANKS", "MAX_BLOCKS", "NSETS", "SIG_BYTES", "CREDIT_BYTES",
                 "SYM_DATA_OFFSET", "SYM_BLAME_OFFSET"):
        assert re.search(rf"\b{name} = {getattr(layout, name)};", text), name
    (st0,) = stages("allreduce_allgather", {"dp": 2, "tp": 2}, rpn=2)
    src = render_stage(st0, torch.bfloat16)
    assert text in src and "mixcc::nvs::SymWorkspace<SymLayout, PartT>" in src
    assert "using PartT = __nv_bfloat16;" in src  # a node's part is a final by itself
    (st1,) = stages("allreduce(tp*dp)", {"dp": 2, "tp": 2}, rpn=2)
    assert "using PartT = float;" in render_stage(st1, torch.bfloat16)  # parts are added
    one_node = render_stage(stages("allreduce(tp)", {"tp": 2})[0], torch.bfloat16)
    assert "SymWorkspace" not in one_node
