"""What the session page may serve: finished tomogram folders and the plain files directly in
them, resolved inside the output folder. Nothing else: no `..`, no encoded separators, no
hidden names (which keeps `.tomolive/` private), no symlink that leads out."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import unquote

from ..core.result_folder import summary_name

log = logging.getLogger(__name__)

# ---- what may be served ------------------------------------------------------------------------

_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)


def _safe_parts(raw: str) -> list[str] | None:
    """The path segments of a raw request path, or None when it could reach anything but a
    plain name inside the output folder: encoded separators, backslashes, NULs, empty, `.`,
    `..` or hidden segments (which also keeps `.tomolive/` leases and records private)."""
    if _ENCODED_SEPARATOR.search(raw):
        return None
    parts = unquote(raw, errors="strict").split("/") if raw else []
    if not parts or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\x00" in p
                        for p in parts):
        return None
    return parts


def resolve_inside(path: Path, root: Path) -> Path | None:
    """`path` with every symlink resolved, if that is inside `root` (resolved)."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    return resolved if resolved.is_relative_to(root.resolve()) else None


def result_folder(output_dir: Path, raw_rel: str) -> Path | None:
    """The finished tomogram folder that the URL part `raw_rel` names (`session1/TS_01`),
    or None: only folders with their summary, and only inside the output folder."""
    try:
        parts = _safe_parts(raw_rel)
    except UnicodeDecodeError:
        return None
    if parts is None:
        return None
    folder = Path(output_dir, *parts)
    if resolve_inside(folder, output_dir) is None or not folder.is_dir():
        return None
    summary = folder / summary_name(parts[-1])
    return folder if resolve_inside(summary, output_dir) is not None else None


def result_file(output_dir: Path, raw: str) -> Path | None:
    """The file that `/files/RAW` may serve (`RAW` = `REL/NAME`), resolved; None for anything
    else. Only plain files directly in a finished tomogram's folder, resolved inside the
    output folder (a symlink out of it is refused)."""
    rel, _, name = raw.rpartition("/")
    folder = result_folder(output_dir, rel)
    if folder is None:
        return None
    try:
        parts = _safe_parts(name)
    except UnicodeDecodeError:
        return None
    if parts is None or len(parts) != 1:
        return None
    path = resolve_inside(folder / parts[0], output_dir)
    return path if path is not None and path.is_file() else None


