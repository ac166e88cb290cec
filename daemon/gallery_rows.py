"""The gallery's rows: one per finished tomogram, read from the shared output folder.

Rows are cached in `OUT/.tomolive/gallery/rows.jsonl`, one JSON object a line, appended by
whichever daemon published the tomogram (under a cross-host critical section, as failure records
are). Parsing 5,000 summaries per request or per publish would take seconds; the row cache is
read incrementally (only the bytes appended since the last read), so a request or an update
costs about the same at 5,000 tomograms as at 5. A tomogram segmented again (a new model)
appends a new line for the same folder: the last line wins, the position of the first stays.
When the cache is missing (results from before it existed), it is rebuilt once by walking the
summaries.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_write_text
from ..core.result_folder import output_paths, read_summary, summary_name, summary_number
from ..core.specimen_mask import measured_thickness_nm
from .state_files import STATE_DIR, critical_section
from .status import summary_paths

log = logging.getLogger(__name__)

ROWS_FILE = "rows.jsonl"


# ---- rows --------------------------------------------------------------------------------------

def _finished_s(summary: dict[str, Any], fallback_s: float) -> float:
    try:
        return dt.datetime.fromisoformat(str(summary["written_utc"])).timestamp()
    except (KeyError, ValueError, TypeError):
        return fallback_s


def row_from_summary(summary: dict[str, Any], rel: str, mtime_s: float = 0.0) -> dict[str, Any]:
    """The gallery's row for one tomogram: what the pages and the index show, from its summary.

    `rel` is the tomogram's folder relative to the output folder (`session1/TS_01`)."""
    model = summary.get("model") or {}
    counts = summary.get("counts") or {}
    files = [str(f) for f in summary.get("files") or []]
    stem = str(summary.get("stem") or rel.rsplit("/", 1)[-1])
    removed = summary.get("cleanup_removed_fraction") or {}
    # core.export's names for the files every result has (no class files asked for).
    names = {key: path.name for key, path in output_paths(Path("."), stem, []).items()}
    return {
        "rel": rel,
        "stem": stem,
        "finished_utc": summary.get("written_utc"),
        "finished_s": _finished_s(summary, mtime_s),
        "input_path": (summary.get("input") or {}).get("path"),
        "voxel_size_a": summary_number(summary.get("voxel_size_a")),
        "shape_zyx": summary.get("shape_zyx"),
        "model": model.get("name"),
        "model_version": model.get("version"),
        "model_sha256": str(model.get("sha256") or "")[:12],
        "particles": dict(counts.get("particles") or {}),
        "filaments": dict(counts.get("filaments") or {}),
        "filament_length_nm": dict(summary.get("filament_length_nm") or {}),
        "colors": {str(c.get("name")): str(c.get("color", "#ffffff"))
                   for c in summary.get("classes") or [] if isinstance(c, dict)},
        "fractions": {str(k): summary_number(v) for k, v in
                      (summary.get("class_fractions") or {}).items()},
        "confidence": summary_number(summary.get("confidence")),
        "uncertain_fraction": summary_number(summary.get("uncertain_fraction")),
        "snr_estimate": summary_number(summary.get("snr_estimate")),
        "specimen_thickness_nm": measured_thickness_nm(summary.get("specimen")),
        "cleanup_removed_fraction": {k: summary_number(v) for k, v in removed.items()}
        if isinstance(removed, dict) else {},
        "seconds": summary_number((summary.get("timings_s") or {}).get("total")),
        "warnings": len(summary.get("warnings") or []),
        "preview": names["preview"] if names["preview"] in files else None,
        "sweep": names["sweep"] if names["sweep"] in files else None,
    }


def row_for_folder(output_dir: Path, folder: Path) -> dict[str, Any] | None:
    """The row of a published tomogram folder, None when it has no readable summary."""
    summary = read_summary(folder)
    if summary is None:
        return None
    rel = Path(os.path.relpath(folder, output_dir)).as_posix()
    mtime_s = (folder / summary_name(folder.name)).stat().st_mtime
    return row_from_summary(summary, rel, mtime_s)


def gallery_state_dir(output_dir: Path) -> Path:
    return Path(output_dir) / STATE_DIR / "gallery"


class RowIndex:
    """The rows of the output folder's row cache, kept up to date by reading only what was
    appended since the last `refresh()`. Thread-safe (the HTTP server serves from threads)."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.path = gallery_state_dir(self.output_dir) / ROWS_FILE
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file read
        self._offset = 0
        self._rows: dict[str, dict[str, Any]] = {}  # rel -> row; dict order = arrival order
        self._order: list[str] | None = None  # rels in arrival order (cache of self._rows)

    def refresh(self) -> bool:
        """Read new lines; True when the rows changed. A missing cache (never written, or
        deleted to have it rebuilt) is rebuilt from the summaries."""
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            if not self.output_dir.is_dir():
                return False
            rebuild_rows(self.output_dir)
            try:
                handle = open(self.path, "rb")
            except FileNotFoundError:
                return False
        with handle, self._lock:
            stat = os.fstat(handle.fileno())  # the file opened, even if replaced meanwhile
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._identity or stat.st_size < self._offset:
                # Another file (rebuilt): read it again from the start.
                self._identity, self._offset, self._rows = identity, 0, {}
                self._order = None
            if stat.st_size == self._offset:
                return False
            handle.seek(self._offset)
            data = handle.read(stat.st_size - self._offset)
            end = data.rfind(b"\n") + 1  # a line still being appended waits for next time
            for line in data[:end].splitlines():
                self._add_line(line)
            self._offset += end
            self._order = None
            return end > 0

    def _add_line(self, line: bytes) -> None:
        try:
            row = json.loads(line)
            rel = row["rel"]
        except (ValueError, KeyError, TypeError):
            log.warning("gallery: unreadable line in %s skipped", self.path)
            return
        self._rows[rel] = row  # a new line for a known folder keeps its first position

    def rows(self) -> list[dict[str, Any]]:
        """Every row in arrival order (oldest first)."""
        with self._lock:
            if self._order is None:
                self._order = list(self._rows)
            return [self._rows[rel] for rel in self._order]

    def position(self, rel: str) -> int | None:
        """0-based arrival position of `rel`."""
        with self._lock:
            if self._order is None:
                self._order = list(self._rows)
            try:
                return self._order.index(rel)
            except ValueError:
                return None

    def get(self, rel: str) -> dict[str, Any] | None:
        with self._lock:
            return self._rows.get(rel)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    @property
    def version(self) -> str:
        """Changes whenever a row is added or replaced."""
        with self._lock:
            return f"{self._identity}:{self._offset}"


def rows_lock(output_dir: Path):
    # One writer at a time across hosts: appends, rebuilds and the index files they refresh.
    state = gallery_state_dir(output_dir)
    state.mkdir(parents=True, exist_ok=True)
    return critical_section(state / ".rows.lock")


def append_row(output_dir: Path, row: dict[str, Any]) -> None:
    """Append one row to the cache (call under `rows_lock`). One write of one whole line, so
    a reader never sees half a row followed by another's."""
    path = gallery_state_dir(output_dir) / ROWS_FILE
    line = (json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def rebuild_rows(output_dir: str | os.PathLike[str], replace: bool = False) -> int:
    """Write the row cache from every summary in the output folder (oldest first), unless it
    exists by the time the lock is ours (`replace` rewrites it anyway); returns the number of
    rows written. Slow for thousands of tomograms: for a missing cache."""
    output_dir = Path(output_dir)
    with rows_lock(output_dir):
        if (gallery_state_dir(output_dir) / ROWS_FILE).exists() and not replace:
            return 0
        return write_rows_from_summaries(output_dir)


def write_rows_from_summaries(output_dir: Path) -> int:
    """The rebuild itself (call under `rows_lock`: a row appended during an unlocked walk
    would be lost when the rebuilt file replaced the one it was appended to)."""
    rows = []
    for summary_path in summary_paths(output_dir):
        row = row_for_folder(output_dir, summary_path.parent)
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: r["finished_s"])
    atomic_write_text(gallery_state_dir(output_dir) / ROWS_FILE,
                      "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n"
                              for r in rows))
    log.info("gallery: row cache rebuilt from %d summaries", len(rows))
    return len(rows)


