"""Exceptions raised by mixcc, each carrying enough context to act on."""

from __future__ import annotations


def caret_excerpt(text: str, line: int, column: int, width: int = 1) -> str:
    """Return the offending source line with a caret line under (line, column), 1-based."""
    lines = text.splitlines() or [""]
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    return f"  {src}\n  {' ' * (column - 1)}{'^' * max(1, width)}"


class MixccError(Exception):
    """Base class of every mixcc error."""


class ParseError(MixccError):
    """The program text does not follow the grammar.

    Attributes: line, column (1-based), expected (sorted token names), text.
    """

    def __init__(self, message: str, text: str, line: int, column: int, expected: list[str]):
        self.text, self.line, self.column, self.expected = text, line, column, expected
        exp = f"; expected one of: {', '.join(expected)}" if expected else ""
        super().__init__(
            f"line {line}, column {column}: {message}{exp}\n{caret_excerpt(text, line, column)}"
        )


class CompileError(MixccError):
    """The program is well formed but does not fit the mesh, dtype or shape."""

    def __init__(self, message: str, text: str = "", line: int = 0, column: int = 0,
                 width: int = 1):
        self.text, self.line, self.column = text, line, column
        where = ""
        if text and line:
            where = f"\n{caret_excerpt(text, line, column, width)}"
            message = f"line {line}, column {column}: {message}"
        super().__init__(message + where)


class CollectiveTimeout(MixccError):
    """A device-side wait ran past its timeout: a peer never arrived. `peer` is the rank
    blamed; when this rank learned it from the peer it waited for (which had itself timed
    out on `peer`), that one is `via`."""

    def __init__(self, rank: int, peer: int, stage: str, block: int, epoch: int,
                 timeout_s: float, via: int | None = None):
        self.rank, self.peer, self.stage, self.block, self.epoch = rank, peer, stage, block, epoch
        self.via = via
        how = (f"waited for rank {via}, which had itself given up on rank {peer} (directly or "
               "through another rank),"
               if via is not None else f"waited more than {timeout_s:g} s for rank {peer}")
        super().__init__(
            f"rank {rank} {how} at stage '{stage}' (block {block}, epoch {epoch}); rank "
            f"{peer} probably died, skipped or did not reach this collective. The runtime "
            "is now unusable: close it and create a new one."
        )


class CollectiveMismatch(MixccError):
    """Debug mode: a peer reached the same barrier from a different call (another
    collective, shape, dtype or call count). `mine` and `theirs` describe both calls."""

    def __init__(self, rank: int, peer: int, mine: str, theirs: str):
        self.rank, self.peer, self.mine, self.theirs = rank, peer, mine, theirs
        super().__init__(
            f"mismatched collective calls: rank {rank} called {mine}, but rank {peer} called "
            f"{theirs}. Every rank must call the same collectives with the same shapes and "
            "dtypes in the same order. The runtime is now unusable: close it and create a "
            "new one."
        )
