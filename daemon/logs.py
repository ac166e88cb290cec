"""Log and message text that cannot be forged by a file name.

File names come from whoever writes into the watched folders. A newline in one would start a
fake log line ("TS_02.mrc: ok in 3.1s" that never happened), an ANSI escape would repaint the
operator's terminal. Every value interpolated into a log record, and every one-line error, goes
through `printable`: control characters become visible escapes (`\\n`, `\\x1b`), the rest stays.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def printable(text: str) -> str:
    """`text` with every non-printable character (newline, tab, ESC, DEL, ...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line(error: BaseException) -> str:
    """An exception as one line: its whitespace collapsed, control characters escaped."""
    return printable(" ".join((str(error) or type(error).__name__).split()))


class _EscapeArguments(logging.Filter):
    """Escapes the interpolated values of every record (the format strings are ours; a
    traceback is attached through exc_info, which stays multi-line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):  # log.info("%(name)s", {"name": ...})
            record.args = {k: _escape(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_escape(a) for a in record.args)
        elif isinstance(record.msg, str):  # a message without arguments, e.g. log.info(text)
            record.msg = printable(record.msg)
        return True


def _escape(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return printable(os.fspath(value) if isinstance(value, os.PathLike) else value)
    return value


def configure_logging(level: int = logging.INFO) -> None:
    """One line per record on stdout (the journal's), every interpolated value escaped."""
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _EscapeArguments) for f in handler.filters):
            handler.addFilter(_EscapeArguments())
