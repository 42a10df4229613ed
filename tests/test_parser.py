import pytest

from mixcc import ParseError
from mixcc.ir.parser import parse


def test_parses_statements_with_positions():
    p = parse("allreduce(tp);\n  reducescatter(dp*tp, op=max);  # tail\n")
    assert [s.coll for s in p.stmts] == ["allreduce", "reducescatter"]
    assert [a.name for a in p.stmts[1].axes] == ["dp", "tp"]
    assert p.stmts[1].redop == "max" and p.stmts[0].redop == "sum"
    assert (p.stmts[1].pos.line, p.stmts[1].pos.column) == (2, 3)
    assert (p.stmts[1].axes[1].pos.line, p.stmts[1].axes[1].pos.column) == (2, 20)


def test_world_and_keyword_like_axes():
    p = parse("allgather(world); allreduce(worldly*summary, op=min)")
    assert p.stmts[0].axes is None
    assert [a.name for a in p.stmts[1].axes] == ["worldly", "summary"]
    assert str(p) == "allgather(world); allreduce(worldly*summary, op=min)"


@pytest.mark.parametrize("text,line,col,expected", [
    ("allreduce(tp", 1, 13, "')'"),
    ("allreduce(tp)\nallgather(dp)", 2, 1, "';'"),
    ("allreduce(tp, op=avg)", 1, 18, "sum|max|min"),
    ("broadcast(tp)", 1, 1, "allreduce|allgather|reducescatter"),
    ("allreduce(tp*)", 1, 14, "axis name"),
    ("allreduce(t$p)", 1, 12, "')'"),
    ("# only a comment\n", 1, 1, "allreduce|allgather|reducescatter"),
])
def test_errors_name_line_column_expected_and_caret(text, line, col, expected):
    with pytest.raises(ParseError) as ei:
        parse(text)
    e = ei.value
    assert (e.line, e.column) == (line, col), str(e)
    assert expected in e.expected
    msg = str(e)
    assert f"line {line}, column {col}" in msg
    caret_line = msg.splitlines()[-1]
    assert caret_line.index("^") == col + 1  # two spaces of indent
