"""An independent oracle: the semantics table of docs/DESIGN.md section 2, in float64.

It parses programs with a regular expression and lays out ranks with itertools,
sharing no code with mixcc, and rebuilds every rank's input from seeds.
"""

from __future__ import annotations

import itertools
import re

import torch

_STMT = re.compile(r"^\s*(allreduce|allgather|reducescatter)\s*\(\s*([\w\s*]+?)\s*"
                   r"(?:,\s*op\s*=\s*(sum|max|min)\s*)?\)\s*$")


def statements(program: str) -> list[tuple[str, list[str] | None, str]]:
    body = "\n".join(line.split("#", 1)[0] for line in program.splitlines())
    out = []
    for part in body.split(";"):
        if not part.strip():
            continue
        m = _STMT.match(part)
        assert m, f"oracle cannot read {part!r}"
        group = m.group(2).replace(" ", "")
        axes = None if group == "world" else group.split("*")
        out.append((m.group(1), axes, m.group(3) or "sum"))
    return out


def layout(axes: list[tuple[str, int]]) -> list[dict[str, int]]:
    """Coordinates of each rank, row-major with the last axis fastest."""
    names = [a for a, _ in axes]
    return [dict(zip(names, c, strict=True))
            for c in itertools.product(*[range(s) for _, s in axes])]


def group_of(coords: list[dict[str, int]], rank: int, axes: list[str] | None,
             mesh_axes: list[tuple[str, int]]) -> list[int]:
    if axes is None:
        axes = [a for a, _ in mesh_axes]
    sizes = dict(mesh_axes)
    me = coords[rank]
    members = []
    for combo in itertools.product(*[range(sizes[a]) for a in axes]):
        want = dict(me)
        want.update(zip(axes, combo, strict=True))
        members.append(coords.index(want))
    return members


def make_input(seed: int, rank: int, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype in (torch.int32,):
        return torch.randint(-100, 100, (rows, hidden), generator=g, dtype=dtype)
    return torch.randn((rows, hidden), generator=g, dtype=torch.float32).to(dtype)


def expected(program: str, mesh_axes: list[tuple[str, int]], inputs: list[torch.Tensor]
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Per-rank outputs in float64, the magnitude bound of each element (the same program
    on |x| with sum, or max |x|), and the largest number of terms behind one element."""
    coords = layout(mesh_axes)
    vals = [x.double() for x in inputs]
    mags = [x.double().abs() for x in inputs]
    terms = 1
    for coll, axes, op in statements(program):
        new_v, new_m = [], []
        for r in range(len(vals)):
            g = group_of(coords, r, axes, mesh_axes)
            if coll == "allgather":
                new_v.append(torch.cat([vals[m] for m in g]))
                new_m.append(torch.cat([mags[m] for m in g]))
                continue
            stack = torch.stack([vals[m] for m in g])
            red = {"sum": stack.sum(0), "max": stack.amax(0), "min": stack.amin(0)}[op]
            mstack = torch.stack([mags[m] for m in g])
            mag = mstack.sum(0) if op == "sum" else mstack.amax(0)
            if coll == "reducescatter":
                n, i = len(g), g.index(r)
                red, mag = red.chunk(n)[i], mag.chunk(n)[i]
            new_v.append(red)
            new_m.append(mag)
        if coll != "allgather" and op == "sum":
            terms *= len(group_of(coords, 0, axes, mesh_axes))
        vals, mags = new_v, new_m
    return vals, mags, terms


EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-8,
       torch.float16: 2.0**-11, torch.int32: 0.0}


def mismatch(out: torch.Tensor, exp: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype,
             n_statements: int, terms: int) -> str | None:
    """None if `out` matches, else a short description. Each rounding of a sum of at most
    `terms` terms costs at most terms*eps of the magnitude; one more for the input."""
    if out.shape != exp.shape:
        return f"shape {tuple(out.shape)} != expected {tuple(exp.shape)}"
    got = out.double()
    if torch.isnan(got).any():
        return "NaN in output"
    tol = EPS[dtype] * mag * (n_statements + 1) * (terms + 1) + 1e-30
    bad = (got - exp).abs() > tol
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return (f"{int(bad.sum())} of {bad.numel()} elements differ; first at flat index {i}: "
                f"got {got.flatten()[i].item()}, expected {exp.flatten()[i].item()}")
    return None


# NaN and infinities (tests/test_nan.py, tests/gpu/test_nan_gpu.py): torch's semantics, i.e.
# amax/amin give NaN where any term is NaN and sums follow IEEE (inf + -inf = NaN).
SPECIALS = (float("nan"), float("inf"), float("-inf"))


def planted_input(seed: int, rank: int, world: int, rows: int, hidden: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """make_input() with NaN, +inf and -inf planted: about 1 element in 12 of each rank at
    random, and at random positions shared by every rank (the other ranks finite there):
    NaN on one rank only (each rank in turn), +inf on one rank and -inf on the next, and
    +inf, -inf on every rank."""
    base = make_input(seed, rank, rows, hidden, torch.float32).view(-1)
    g = torch.Generator().manual_seed(seed * 1000 + rank + 500_000)
    hit = torch.rand(base.numel(), generator=g) < 1 / 12
    kind = torch.randint(0, 3, (base.numel(),), generator=g)
    x = torch.where(hit, torch.tensor(SPECIALS)[kind], base)
    nan, inf = SPECIALS[0], SPECIALS[1]
    patterns = [{r: nan} for r in range(world)]
    patterns += [{a: inf, (a + 1) % world: -inf} for a in range(world)]
    patterns += [dict.fromkeys(range(world), inf), dict.fromkeys(range(world), -inf)]
    assert base.numel() >= len(patterns), "too few elements for the planted patterns"
    pos = torch.randperm(base.numel(), generator=torch.Generator().manual_seed(seed))
    for p, pat in zip(pos.tolist(), patterns, strict=False):
        x[p] = pat.get(rank, base[p].item())
    return x.view(rows, hidden).to(dtype)


def expected_nonfinite(program: str, mesh_axes: list[tuple[str, int]],
                       inputs: list[torch.Tensor]):
    """expected() for inputs with NaN and infinities: the values of the inputs as they are;
    the magnitude bounds of the inputs with non-finite elements zeroed (behind a finite
    output, every term is finite or was dropped by a max/min)."""
    vals, _, terms = expected(program, mesh_axes, inputs)
    _, mags, _ = expected(program, mesh_axes, [x.nan_to_num(0.0, 0.0, 0.0) for x in inputs])
    return vals, mags, terms


def mismatch_nonfinite(out: torch.Tensor, exp: torch.Tensor, mag: torch.Tensor,
                       dtype: torch.dtype, n_statements: int, terms: int) -> str | None:
    """mismatch() with equal_nan: NaN exactly where `exp` is NaN, each infinity of `exp`
    equal (with its sign) and nowhere else; the finite elements within mismatch()'s bound."""
    if out.shape != exp.shape:
        return f"shape {tuple(out.shape)} != expected {tuple(exp.shape)}"
    got = out.double()
    for what, g, e in (("NaN", got.isnan(), exp.isnan()),
                       ("infinity", got.isinf(), exp.isinf()),
                       ("sign of infinity", got.isinf() & (got > 0), exp.isinf() & (exp > 0))):
        if not torch.equal(g, e):
            i = int((g != e).flatten().nonzero()[0])
            return (f"{what} differs at {int((g != e).sum())} of {g.numel()} elements; first "
                    f"at flat index {i}: got {got.flatten()[i].item()}, "
                    f"expected {exp.flatten()[i].item()}")
    fin = exp.isfinite()
    return mismatch(torch.where(fin, got, 0.0), torch.where(fin, exp, 0.0), mag, dtype,
                    n_statements, terms)


# Epilogues (docs/DESIGN.md, "Epilogues"), in float64, written apart from mixcc/ops.py:
# a chain is a list of (op, name, eps) with op in add / store / rmsnorm / quant.
def split_epilogue(program: str) -> tuple[str, list[tuple[str, str, float | None]]]:
    """(the collectives' text, the epilogue chain) of a program."""
    body = "\n".join(line.split("#", 1)[0] for line in program.splitlines())
    colls, chain = [], []
    for part in (p.strip() for p in body.split(";")):
        m = re.match(r"^(add|store|rmsnorm|quant)\s*\((.*)\)$", part)
        if not m:
            if part:
                colls.append(part)
            continue
        args = [a.strip() for a in m.group(2).split(",")]
        if m.group(1) == "quant":
            chain.append(("quant", args[1], None))
        elif m.group(1) == "rmsnorm" and len(args) > 1:
            chain.append(("rmsnorm", args[0], float(args[1].split("=")[1])))
        else:
            chain.append((m.group(1), args[0], None))
    return "; ".join(colls), chain


def epilogue_expected(y: torch.Tensor, chain: list, tensors: dict[str, torch.Tensor],
                      err: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]],
                                 torch.Tensor]:
    """(output, {stored name: (new value, its error bound)}, an error bound per element of
    the output) in float64
    for collective output `y` (float64) known to within `err` per element; every fp32 or
    dtype rounding on the way costs `eps` relative. A store rounds to its tensor's dtype,
    and later reads see that value."""
    v = y.double()
    t = {k: x.double() for k, x in tensors.items()}
    dt = {k: x.dtype for k, x in tensors.items()}
    stored = {}
    for op, name, e in chain:
        if op == "add":
            v = v + t[name]
            err = err + eps * (v.abs() + t[name].abs())
        elif op == "store":
            t[name] = v.to(dt[name]).double()
            err = err + eps * v.abs()  # what later reads of the stored value may differ by
            stored[name] = (t[name], err)
        elif op == "rmsnorm":
            rms = torch.sqrt((v * v).mean(dim=-1, keepdim=True) + (1e-6 if e is None else e))
            row_err = err.amax(dim=-1, keepdim=True)
            v = v / rms * t[name]
            # a perturbation d of a row moves v / rms by at most ~(1 + sqrt(n)) d / rms
            n = v.shape[-1]
            err = ((1 + n ** 0.5) * row_err / rms + eps) * t[name].abs() + eps * v.abs()
        else:  # quant: saturate to the fp8 e4m3 range
            scale = t[name].reshape(())
            v = torch.clamp(v / scale, -448.0, 448.0)
            err = err / scale + eps * v.abs()
    return v, stored, err
