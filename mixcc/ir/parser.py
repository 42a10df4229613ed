"""parse: program text -> AST (docs/DESIGN.md section 3, step 1)."""

from __future__ import annotations

import functools
from importlib import resources

import lark

from ..errors import ParseError
from .ast import Axis, EPArg, Epi, EPStmt, Pos, Program, Stmt

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
    "DISPATCH": "dispatch",
    "COMBINE": "combine",
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


# The keyword arguments of the expert-parallel statements (mixcc/expert.py): name ->
# "int" (a positive integer) or the tuple of names it may take; and which are required.
EP_ARGS: dict[str, dict[str, str | tuple[str, ...]]] = {
    "dispatch": {"experts": "int", "topk": "int", "max_tokens": "int", "capacity": "int",
                 "wire": ("fp8_e4m3",), "scale_block": "int"},
    "combine": {},
}
EP_REQUIRED = {"dispatch": ("experts", "topk"), "combine": ()}


def _group_axes(group: lark.Tree) -> tuple[Axis, ...] | None:
    if group.data == "axes":
        return tuple(Axis(str(t), _pos(t)) for t in group.children)
    return None


def _ep_stmt(tree: lark.Tree, text: str) -> EPStmt:
    """A dispatch or combine statement, its keyword arguments checked against EP_ARGS."""
    kind = str(tree.data)
    allowed = EP_ARGS[kind]
    args: list[EPArg] = []
    for a in tree.children[1:]:
        name_tok, value_tok = a.children
        name, raw, p = str(name_tok), str(value_tok), _pos(name_tok)
        if name not in allowed:
            what = (f"{kind} takes no keyword arguments" if not allowed else
                    f"{kind} takes {', '.join(allowed)}")
            raise ParseError(f"unknown keyword {name!r}: {what}", text, p.line, p.column, [])
        if any(b.name == name for b in args):
            raise ParseError(f"keyword {name!r} given twice", text, p.line, p.column, [])
        want = allowed[name]
        vp = _pos(value_tok)
        if want == "int":
            if not raw.isdigit() or int(raw) < 1:
                raise ParseError(f"{name} must be a positive integer, got {raw}", text,
                                 vp.line, vp.column, [])
            value: int | str = int(raw)
        else:
            if raw not in want:
                raise ParseError(f"{name} must be one of {', '.join(want)}, got {raw}", text,
                                 vp.line, vp.column, [])
            value = raw
        args.append(EPArg(name, value, p))
    st = EPStmt(kind, _group_axes(tree.children[0]), tuple(args), _pos(tree))
    for need in EP_REQUIRED[kind]:
        if st.arg(need) is None:
            raise ParseError(f"{kind} needs {need}=N", text, st.pos.line, st.pos.column, [])
    if st.arg("scale_block") is not None and st.arg("wire") is None:
        p = st.arg("scale_block").pos
        raise ParseError("scale_block applies to an fp8 wire only: add wire=fp8_e4m3", text,
                         p.line, p.column, [])
    return st


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
    trees = [c for c in tree.children if isinstance(c, lark.Tree)]
    ep = [t for t in trees if t.data in ("dispatch", "combine")]
    if ep:
        if len(trees) > 1:
            # point at the first statement that breaks "one statement": the second one
            p = _pos(trees[1])
            raise ParseError(f"{ep[0].data} must be the only statement of its program: "
                             "dispatch and combine do not compose with other statements "
                             "(combine needs the handle dispatch returns, and a collective "
                             "or epilogue has no rows to act on between them); compile "
                             "each statement as a program of its own",
                             text, p.line, p.column, [])
        return Program((), text, (), _ep_stmt(ep[0], text))
    for t in trees:
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
