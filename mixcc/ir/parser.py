"""parse: program text -> AST (docs/DESIGN.md section 3, step 1)."""

from __future__ import annotations

import functools
from importlib import resources

import lark

from ..errors import ParseError
from .ast import Axis, Pos, Program, Stmt

# Human names for the grammar's terminals, used in "expected one of" lists.
_TOKEN_TEXT = {
    "COLL": "allreduce|allgather|reducescatter",
    "REDOP": "sum|max|min",
    "NAME": "axis name",
    "WORLD": "'world'",
    "OP": "'op'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COMMA": "','",
    "STAR": "'*'",
    "EQUAL": "'='",
    "SEMICOLON": "';'",
    "$END": "end of program",
}


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("mixcc.ir").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, start="program", parser="lalr", propagate_positions=True)


def _pos(item: lark.Token | lark.Tree) -> Pos:
    if isinstance(item, lark.Token):
        return Pos(item.line, item.column, max(1, len(item)))
    m = item.meta
    width = m.end_column - m.column if m.end_line == m.line else 1
    return Pos(m.line, m.column, max(1, width))


def _stmt(tree: lark.Tree) -> Stmt:
    coll_tok, group = tree.children[0], tree.children[1]
    redop = str(tree.children[2]) if len(tree.children) > 2 else "sum"
    if group.data == "axes":
        axes: tuple[Axis, ...] | None = tuple(Axis(str(t), _pos(t)) for t in group.children)
    else:
        axes = None
    return Stmt(str(coll_tok), axes, redop, _pos(tree))


def parse(text: str) -> Program:
    """Parse program text into a Program; raise ParseError with a caret on bad input."""
    if not text.strip() or all(
        not ln.strip() or ln.strip().startswith("#") for ln in text.splitlines()
    ):
        raise ParseError("empty program", text, 1, 1, [_TOKEN_TEXT["COLL"]])
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedToken as e:
        got = "end of program" if e.token.type == "$END" else repr(str(e.token))
        expected = sorted({_TOKEN_TEXT.get(t, t) for t in e.expected})
        line, col = e.line, e.column
        if e.token.type == "$END":  # lark reports -1 at EOF: point just after the text
            lines = text.rstrip("\n").splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        raise ParseError(f"unexpected {got}", text, line, col, expected) from None
    except lark.UnexpectedCharacters as e:
        expected = sorted({_TOKEN_TEXT.get(t, t) for t in (e.allowed or ())})
        raise ParseError(
            f"unexpected character {text[e.pos_in_stream]!r}", text, e.line, e.column, expected
        ) from None
    return Program(tuple(_stmt(s) for s in tree.children if isinstance(s, lark.Tree)), text)
