"""Error text as one line: the form every error about a file takes (a clear one-line error naming
the file and the problem), in logs, failure records, summaries and reject notes.

File names come from whoever writes into the watched folders. A newline in one would start a
fake log line ("TS_02.mrc: ok in 3.1s" that never happened), an ANSI escape would repaint the
operator's terminal, so control characters become visible escapes (`\\n`, `\\x1b`).
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every non-printable character (newline, tab, ESC, DEL, ...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(error: BaseException | str) -> str:
    """An exception (or a message) as one line: whitespace collapsed, control characters
    escaped; an exception without a message reads as its type's name."""
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    return printable(" ".join(text.split()))
