"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def one_node_programs(draw, max_statements: int = 4):
    """(program, [(axis, size), ...]): up to 3 axes of sizes 1/2/4 with at most 8 ranks,
    1..max_statements statements over random axis subsets with random reductions."""
    names = ["a", "b", "c"][: draw(st.integers(1, 3))]
    sizes, left = [], 8
    for _ in names:
        s = draw(st.sampled_from([d for d in (1, 2, 4) if left % d == 0]))
        sizes.append(s)
        left //= s
    stmts = []
    for _ in range(draw(st.integers(1, max_statements))):
        coll = draw(st.sampled_from(["allreduce", "allgather", "reducescatter"]))
        k = draw(st.integers(1, len(names)))
        axes = draw(st.permutations(names))[:k]
        op = draw(st.sampled_from(["", ", op=max", ", op=min"]))
        stmts.append(f"{coll}({'*'.join(axes)}{op})")
    return "; ".join(stmts), list(zip(names, sizes, strict=True))
