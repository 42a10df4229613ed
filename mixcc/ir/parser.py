"""parse: program text -> AST (docs/DESIGN.md section 3, step 1)."""

from __future__ import annotations

import functools
from importlib import resources

import lark

from ..errors import ParseError
from .ast import Axis, Epi, Pos, Program, Stmt

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
    "ADD": "add",
    "STORE": "store",
    "RMSNORM": "rmsnorm",
    "QUANT": "quant",
    "EPS": "'eps'",
    "QFMT": "fp8_e4m3",
    "NUMBER": "number",
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


def _epi(tree: lark.Tree) -> Epi:
    kids = tree.children
    if tree.data == "quant":
        return Epi("quant", str(kids[1]), _pos(tree), fmt=str(kids[0]))
    eps = float(kids[1]) if len(kids) > 1 else None
    return Epi(str(tree.data), str(kids[0]), _pos(tree), eps=eps)


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
    stmts: list[Stmt] = []
    epilogue: list[Epi] = []
    for t in (c for c in tree.children if isinstance(c, lark.Tree)):
        if t.data == "coll":
            if epilogue:
                p = _pos(t)
                raise ParseError(f"collective after the epilogue statement {epilogue[0]}: "
                                 "epilogue statements come after the last collective",
                                 text, p.line, p.column, [])
            stmts.append(_stmt(t))
            continue
        epi = _epi(t)
        if not stmts:
            raise ParseError(f"{epi} before any collective: epilogue statements follow the "
                             "last collective", text, epi.pos.line, epi.pos.column, [])
        if epilogue and epilogue[-1].op == "quant":
            p = epilogue[-1].pos
            raise ParseError(f"{epilogue[-1]} must be the last statement", text, p.line,
                             p.column, [])
        epilogue.append(epi)
    return Program(tuple(stmts), text, tuple(epilogue))
