"""Log text that cannot be forged by a file name: every value interpolated into a log record
goes through core.errors.printable (control characters become visible escapes; see there why),
and errors are logged as core.errors.one_line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from ..core.errors import printable


class EscapeArguments(logging.Filter):
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
        if not any(isinstance(f, EscapeArguments) for f in handler.filters):
            handler.addFilter(EscapeArguments())
