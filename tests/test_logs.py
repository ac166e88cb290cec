"""daemon.logs: a file name cannot forge log lines or repaint the terminal (issue 15 item 9)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from tomolive.core.errors import one_line, printable
from tomolive.daemon.logs import EscapeArguments


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(EscapeArguments())  # what configure_logging adds to the root handler
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def test_printable_escapes_controls_and_keeps_the_rest():
    assert printable("TS_01 ü µm.mrc") == "TS_01 ü µm.mrc"
    assert printable("a\nb\tc\x1b[2Jd\x7f") == "a\\nb\\tc\\x1b[2Jd\\x7f"


def test_a_hostile_name_stays_on_its_line():
    stream = io.StringIO()
    log = _logger(stream)
    forged = Path("/in/x.mrc: failed\nTS_02.mrc: ok in 3.1s\x1b[2J.mrc")
    log.error("%s: not an MRC file", forged)
    log.info("%(path)s done", {"path": "a\nb"})
    log.warning("plain text with\na newline")
    lines = stream.getvalue().splitlines()
    assert lines == ["/in/x.mrc: failed\\nTS_02.mrc: ok in 3.1s\\x1b[2J.mrc: not an MRC file",
                     "a\\nb done", "plain text with\\na newline"]


def test_a_traceback_keeps_its_lines_but_its_arguments_are_escaped():
    stream = io.StringIO()
    log = _logger(stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.error("%s: unexpected error", "bad\nname.mrc", exc_info=True)
    text = stream.getvalue()
    assert text.startswith("bad\\nname.mrc: unexpected error\nTraceback (most recent call")
    assert "RuntimeError: boom" in text


def test_one_line_errors():
    assert one_line(OSError("two\nlines\x1b[0m")) == "two lines\\x1b[0m"
    assert one_line(MemoryError()) == "MemoryError"
