"""The session gallery: one row per finished tomogram, read from the shared output folder.

Three things are built from the rows:

- the live session page (`daemon.metrics` serves `/`, `/t/REL`, `/files/REL/NAME`, calling
  `SessionPages` here),
- the same gallery as static files in the output folder (`OUT/index.html`, per-tomogram pages
  under `OUT/.gallery/`), for when no daemon runs or the folder is copied elsewhere,
- the dataset index `OUT/index.csv` and `OUT/index.star` (one row per tomogram).

Rows are cached in `OUT/.tomolive/gallery/rows.jsonl`, one JSON object a line, appended by
whichever daemon published the tomogram (under a cross-host critical section, as failure records
are). Parsing 5,000 summaries per request or per publish would take seconds; the row cache is
read incrementally (only the bytes appended since the last read), so a request or an update
costs about the same at 5,000 tomograms as at 5. A tomogram segmented again (a new model)
appends a new line for the same folder: the last line wins, the position of the first stays.
When the cache is missing (results from before it existed), it is rebuilt once by walking the
summaries.

Every file written here is replaced atomically (temp file, then os.replace): readers, including
a browser on another host, see the old version or the new one.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jinja2
from PIL import Image

from ..core.atomic import atomic_path, atomic_write_text
from ..core.result_folder import read_summary, summary_name, summary_number
from ..core.star import star_string, star_text
from .leases import held_leases, lease_key
from .state_files import STATE_DIR, critical_section
from .status import read_failures, summary_paths

log = logging.getLogger(__name__)

PAGE_SIZE = 50  # tomograms per page, live and static
PARTICLE_ROWS_SHOWN = 500  # the per-tomogram page's table; the CSV link has all of them
STATIC_DIR = ".gallery"  # OUT/.gallery/: static per-tomogram and archive pages
ROWS_FILE = "rows.jsonl"
THUMBS_DIR = "thumbs"  # OUT/.gallery/thumbs/KEY.webp: what the lists show, not the preview
THUMB_MAX_PX = 320  # a 1200 px preview is ~1 MB; fifty of them would make a page slow to load
RATE_MIN_SPAN_S = 600.0  # throughput per hour is shown once today's first is this old
TEMPLATES = Path(__file__).parent / "templates"


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
        "cleanup_removed_fraction": {k: summary_number(v) for k, v in removed.items()}
        if isinstance(removed, dict) else {},
        "seconds": summary_number((summary.get("timings_s") or {}).get("total")),
        "warnings": len(summary.get("warnings") or []),
        "preview": f"{stem}_preview.png" if f"{stem}_preview.png" in files else None,
        "sweep": f"{stem}_sweep.webp" if f"{stem}_sweep.webp" in files else None,
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


def _rows_lock(output_dir: Path):
    # One writer at a time across hosts: appends, rebuilds and the index files they refresh.
    state = gallery_state_dir(output_dir)
    state.mkdir(parents=True, exist_ok=True)
    return critical_section(state / ".rows.lock")


def append_row(output_dir: Path, row: dict[str, Any]) -> None:
    """Append one row to the cache (call under `_rows_lock`). One write of one whole line, so
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
    with _rows_lock(output_dir):
        if (gallery_state_dir(output_dir) / ROWS_FILE).exists() and not replace:
            return 0
        return _write_rows_from_summaries(output_dir)


def _write_rows_from_summaries(output_dir: Path) -> int:
    """The rebuild itself (call under `_rows_lock`: a row appended during an unlocked walk
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


# ---- the dataset index (index.csv, index.star) ------------------------------------------------

def _class_names(rows: Iterable[dict[str, Any]], group: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for name in row.get(group) or {}:
            names.setdefault(name, None)
    return list(names)


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, ...], ...]:
    """The class names of each per-class column group, in order of first appearance."""
    return (tuple(_class_names(rows, "particles")), tuple(_class_names(rows, "filaments")),
            tuple(_class_names(rows, "filament_length_nm")))


def _header(columns: tuple[tuple[str, ...], ...]) -> list[str]:
    particles, filaments, lengths = columns
    return (["stem", "folder", "input_path", "voxel_size_a", "model", "model_version",
             "model_sha256"]
            + [f"particles_{c}" for c in particles] + [f"filaments_{c}" for c in filaments]
            + [f"filament_length_nm_{c}" for c in lengths]
            + ["confidence", "seconds", "finished_utc"])


def _cells(row: dict[str, Any], columns: tuple[tuple[str, ...], ...]) -> list[str]:
    particles, filaments, lengths = columns
    return ([row["stem"], row["rel"], str(row.get("input_path") or ""),
             _fmt(row.get("voxel_size_a"), 3), str(row.get("model") or ""),
             str(row.get("model_version") or ""), str(row.get("model_sha256") or "")]
            + [str((row.get("particles") or {}).get(c, "")) for c in particles]
            + [str((row.get("filaments") or {}).get(c, "")) for c in filaments]
            + [_fmt((row.get("filament_length_nm") or {}).get(c), 1) for c in lengths]
            + [_fmt(row.get("confidence"), 4), _fmt(row.get("seconds"), 2),
               str(row.get("finished_utc") or "")])


def _star_label(column: str) -> str:
    """A STAR label for an index column: RELION's for the tomogram name, `tomolive...` for
    the rest (camel case; class names keep their spelling)."""
    if column == "stem":
        return "rlnTomoName"
    return "tomolive" + "".join(part[:1].upper() + part[1:] for part in column.split("_"))


class IndexTables:
    """index.csv and index.star text for a list of rows. Each row is formatted once and kept
    (for as long as the row object and the set of class columns stay the same): with 5,000
    tomograms an update formats one row and joins the others' text, instead of quoting
    80,000 values again."""

    def __init__(self) -> None:
        # rel -> (the row formatted, its columns, its CSV line, its STAR values)
        self._formatted: dict[str, tuple[dict[str, Any], tuple, str, list[str]]] = {}

    def _row(self, row: dict[str, Any], columns: tuple) -> tuple[str, list[str]]:
        cached = self._formatted.get(row["rel"])
        if cached is not None and cached[0] is row and cached[1] == columns:
            return cached[2], cached[3]
        cells = _cells(row, columns)
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(cells)
        # Empty in the CSV; in STAR a value cannot be empty: `-`.
        star = [star_string(v) if v else "-" for v in cells]
        self._formatted[row["rel"]] = (row, columns, line.getvalue(), star)
        return line.getvalue(), star

    def texts(self, rows: list[dict[str, Any]]) -> tuple[str, str]:
        """(index.csv, index.star) text, one line per row in the order given."""
        columns = _columns(rows)
        header = _header(columns)
        formatted = [self._row(row, columns) for row in rows]
        head = io.StringIO()
        csv.writer(head, lineterminator="\n").writerow(header)
        csv_text = head.getvalue() + "".join(line for line, _ in formatted)
        # core.export's STAR writer takes columns: the cached values, transposed.
        star_columns = {_star_label(name): list(values) for name, values in
                        zip(header, zip(*(star for _, star in formatted), strict=True)
                            if formatted else [()] * len(header), strict=True)}
        return csv_text, star_text("tomograms", star_columns)


def index_csv_text(rows: list[dict[str, Any]]) -> str:
    """The dataset index as CSV (no cache: for one-off use and tests)."""
    return IndexTables().texts(rows)[0]


def index_star_text(rows: list[dict[str, Any]]) -> str:
    """The dataset index as a STAR table (block `tomograms`), through core.export's writer."""
    return IndexTables().texts(rows)[1]


# ---- rendering ---------------------------------------------------------------------------------

class LiveLinks:
    """URLs on the daemon's HTTP server."""

    refresh_s = None  # the live page polls a JSON endpoint instead

    @staticmethod
    def tomogram(rel: str) -> str:
        return "/t/" + quote(rel)

    @staticmethod
    def file(rel: str, name: str) -> str:
        return f"/files/{quote(rel)}/{quote(name)}"

    @staticmethod
    def thumb(row: dict[str, Any]) -> str:
        return "/thumb/" + quote(row["rel"])  # the preview itself where no thumbnail exists

    @staticmethod
    def page(n: int) -> str:
        return f"/?page={n}"

    index = "/"


@dataclass
class StaticLinks:
    """Relative URLs between the static pages: `OUT/index.html` (depth 0) and the pages in
    `OUT/.gallery/` (depth 1). Relative, so the folder can be opened anywhere (file://)."""

    depth: int
    output_dir: Path | None = None  # to look for thumbnails; without it, previews are shown
    refresh_s = 30  # a static page reloads itself to pick up new tomograms

    @property
    def _up(self) -> str:
        return "../" * self.depth

    def tomogram(self, rel: str) -> str:
        name = f"{lease_key(rel)}.html"
        return name if self.depth else f"{STATIC_DIR}/{name}"

    def file(self, rel: str, name: str) -> str:
        return f"{self._up}{quote(rel)}/{quote(name)}"

    def thumb(self, row: dict[str, Any]) -> str:
        name = f"{THUMBS_DIR}/{lease_key(row['rel'])}.webp"
        if self.output_dir is not None and (self.output_dir / STATIC_DIR / name).is_file():
            return name if self.depth else f"{STATIC_DIR}/{name}"
        return self.file(row["rel"], row["preview"])

    def page(self, n: int) -> str:
        name = f"page-{n:04d}.html"
        return name if self.depth else f"{STATIC_DIR}/{name}"

    @property
    def index(self) -> str:
        return f"{self._up}index.html"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["ago"] = _ago
    env.filters["seconds"] = lambda s: "" if s is None else (
        f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min")
    env.filters["local"] = lambda s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s))
    return env



def _ago(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


_ENV = _environment()


def throughput_today(rows: list[dict[str, Any]], now_s: float | None = None) -> dict[str, Any]:
    """Tomograms finished since local midnight, their mean time and the rate per hour."""
    now_s = time.time() if now_s is None else now_s
    midnight = dt.datetime.fromtimestamp(now_s).replace(hour=0, minute=0, second=0,
                                                        microsecond=0).timestamp()
    today = [r for r in rows if (r.get("finished_s") or 0) >= midnight]
    seconds = [r["seconds"] for r in today if r.get("seconds") is not None]
    span_s = now_s - min(r["finished_s"] for r in today) if today else 0.0
    # A rate over a few minutes is noise (two tomograms a second apart are not 7,200/h).
    per_hour = len(today) / (span_s / 3600) if span_s >= RATE_MIN_SPAN_S else None
    return {"count": len(today),
            "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
            "per_hour": per_hour}


def _page_rows(rows: list[dict[str, Any]], page: int, page_size: int
               ) -> tuple[list[dict[str, Any]], int, int]:
    """The rows of 1-based `page` (clamped to those there are), newest first; the page and
    the number of pages."""
    pages = max(1, -(-len(rows) // page_size))
    page = min(max(1, page), pages)
    end = len(rows) - (page - 1) * page_size
    return rows[max(0, end - page_size):end][::-1], page, pages


def render_session(rows_page: list[dict[str, Any]], *, links: Any, page: int, pages: int,
                   total: int, today: dict[str, Any], state: dict[str, Any] | None,
                   version: str, output_dir: Path, archive: list[int] | None = None) -> str:
    return _ENV.get_template("session.html").render(
        rows=rows_page, links=links, page=page, pages=pages, total=total, today=today,
        state=state, version=version, output_dir=str(output_dir), archive=archive or [],
        now_s=time.time(), title="tomolive session")


def particle_rows(folder: Path, stem: str, limit: int = PARTICLE_ROWS_SHOWN
                  ) -> tuple[list[dict[str, str]], int]:
    """The first `limit` particles of STEM_particles.csv and how many there are."""
    path = folder / f"{stem}_particles.csv"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            shown, total = [], 0
            for record in reader:
                total += 1
                if len(shown) < limit:
                    shown.append(record)
    except (OSError, csv.Error, UnicodeDecodeError):
        return [], 0
    return shown, total


def render_tomogram(folder: Path, row: dict[str, Any], summary: dict[str, Any], *,
                    links: Any) -> str:
    particles, n_particles = particle_rows(folder, row["stem"])
    files = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    classes = [c for c in summary.get("classes") or [] if isinstance(c, dict)]
    return _ENV.get_template("tomogram.html").render(
        row=row, summary=summary, classes=classes, particles=particles,
        n_particles=n_particles, files=files, links=links, title=row["stem"],
        summary_json=json.dumps(summary, indent=1)[:20000])


# ---- the live pages ----------------------------------------------------------------------------

class SessionPages:
    """What the daemon's HTTP server shows: rendered from the shared output folder on each
    request (rows incrementally, leases and failure records afresh), so that every daemon on the
    folder shows the same. `local_state()` adds this daemon's own view (its queue)."""

    def __init__(self, output_dir: str | os.PathLike[str],
                 local_state: Callable[[], dict[str, Any]] | None = None,
                 page_size: int = PAGE_SIZE) -> None:
        self.output_dir = Path(output_dir)
        self.index = RowIndex(self.output_dir)
        self.local_state = local_state
        self.page_size = page_size

    def _state(self) -> dict[str, Any]:
        failed, quarantined = read_failures(self.output_dir)
        local = {}
        if self.local_state is not None:
            try:
                local = dict(self.local_state())
            except Exception:  # the page must not fail for this daemon's side note
                log.exception("gallery: local state")
        return {"running": held_leases(self.output_dir), "failed": failed,
                "quarantined": quarantined, "local": local}

    def _version(self, state: dict[str, Any]) -> str:
        # Heartbeats change every few seconds: leave them out, or the page would redraw
        # for nothing.
        digest = hashlib.sha256(json.dumps(
            [self.index.version,
             [(r["key"], r.get("host"), r.get("device")) for r in state["running"]],
             [(f["key"], f.get("attempts"), f.get("faults"), f.get("updated"))
              for f in state["failed"] + state["quarantined"]],
             state["local"]], sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def session_json(self, page: int = 1) -> dict[str, Any]:
        self.index.refresh()
        rows = self.index.rows()
        state = self._state()
        rows_page, page, pages = _page_rows(rows, page, self.page_size)
        return {"version": self._version(state), "total": len(rows), "page": page,
                "pages": pages, "today": throughput_today(rows), "tomograms": rows_page,
                **state}

    def session_html(self, page: int = 1) -> str:
        self.index.refresh()
        rows = self.index.rows()
        state = self._state()
        rows_page, page, pages = _page_rows(rows, page, self.page_size)
        # A folder removed by hand since: say so rather than show a broken image.
        rows_page = [dict(row, missing=not (self.output_dir / row["rel"]).is_dir())
                     for row in rows_page]
        return render_session(rows_page, links=LiveLinks, page=page,
                              pages=pages, total=len(rows), today=throughput_today(rows),
                              state=state, version=self._version(state),
                              output_dir=self.output_dir)

    def thumbnail(self, raw_rel: str) -> Path | None:
        """The file `/thumb/REL` serves: the tomogram's thumbnail, else its preview."""
        folder = result_folder(self.output_dir, raw_rel)
        if folder is None:
            return None
        rel = Path(os.path.relpath(folder, self.output_dir)).as_posix()
        thumb = _inside(thumbnail_path(self.output_dir, rel), self.output_dir)
        if thumb is not None and thumb.is_file():
            return thumb
        preview = _inside(folder / f"{folder.name}_preview.png", self.output_dir)
        return preview if preview is not None and preview.is_file() else None

    def tomogram_html(self, raw_rel: str) -> str | None:
        """The page of one tomogram; None (404) unless `raw_rel` names a finished one."""
        folder = result_folder(self.output_dir, raw_rel)
        if folder is None:
            return None
        summary = read_summary(folder)
        if summary is None:
            return None
        rel = Path(os.path.relpath(folder, self.output_dir)).as_posix()
        self.index.refresh()
        row = self.index.get(rel) or row_from_summary(summary, rel)
        return render_tomogram(folder, row, summary, links=LiveLinks)


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


def _inside(path: Path, root: Path) -> Path | None:
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
    if _inside(folder, output_dir) is None or not folder.is_dir():
        return None
    summary = folder / summary_name(parts[-1])
    return folder if _inside(summary, output_dir) is not None else None


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
    path = _inside(folder / parts[0], output_dir)
    return path if path is not None and path.is_file() else None


# ---- after each publish: the index files and the static gallery ------------------------------

def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def thumbnail_path(output_dir: Path, rel: str) -> Path:
    return Path(output_dir) / STATIC_DIR / THUMBS_DIR / f"{lease_key(rel)}.webp"


def write_thumbnail(output_dir: Path, row: dict[str, Any]) -> None:
    """A small WebP of the tomogram's preview for the lists (atomically, as every file here)."""
    if not row.get("preview"):
        return
    with Image.open(Path(output_dir) / row["rel"] / row["preview"]) as image:
        image.thumbnail((THUMB_MAX_PX, THUMB_MAX_PX))
        path = thumbnail_path(output_dir, row["rel"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            image.convert("RGB").save(tmp, format="WEBP", quality=80)


def write_static_tomogram(output_dir: Path, row: dict[str, Any]) -> None:
    folder = output_dir / row["rel"]
    summary = read_summary(folder)
    if summary is None:
        return
    html = render_tomogram(folder, row, summary, links=StaticLinks(depth=1))
    _write_atomic(output_dir / STATIC_DIR / f"{lease_key(row['rel'])}.html", html)


def write_static_pages(output_dir: Path, rows: list[dict[str, Any]],
                       changed_positions: Iterable[int], page_size: int = PAGE_SIZE) -> None:
    """`OUT/index.html` (the newest tomograms) and the archive pages that hold the changed rows.

    Archive page k holds arrival positions [(k-1) * page_size, k * page_size): a new
    tomogram only changes the last one, so an update rewrites two pages, not N / page_size.
    """
    archive = list(range(1, -(-len(rows) // page_size) + 1))
    today = throughput_today(rows)
    for k in sorted({p // page_size + 1 for p in changed_positions}):
        chunk = rows[(k - 1) * page_size:k * page_size][::-1]
        html = render_session(chunk, links=StaticLinks(1, output_dir), page=k, pages=len(archive),
                              total=len(rows), today=today, state=None, version="",
                              output_dir=output_dir, archive=archive)
        _write_atomic(output_dir / STATIC_DIR / f"page-{k:04d}.html", html)
    newest = rows[-page_size:][::-1]
    html = render_session(newest, links=StaticLinks(0, output_dir), page=0, pages=len(archive),
                          total=len(rows), today=today, state=None, version="",
                          output_dir=output_dir, archive=archive)
    _write_atomic(output_dir / "index.html", html)


def write_index_files(output_dir: Path, rows: list[dict[str, Any]],
                      tables: IndexTables | None = None) -> None:
    """`OUT/index.csv` and `OUT/index.star`, one row per tomogram, oldest first. Rewritten
    whole (from rows formatted once, in `tables`) so that class columns stay one set."""
    csv_text, star = (tables or IndexTables()).texts(rows)
    _write_atomic(output_dir / "index.csv", csv_text)
    _write_atomic(output_dir / "index.star", star)


class Gallery:
    """The daemon's writer: after each tomogram it publishes, `add(folder)` appends its row and
    refreshes the index files and static pages. Keeps its `RowIndex` between calls, so each
    update reads only what other daemons appended meanwhile."""

    def __init__(self, output_dir: str | os.PathLike[str], page_size: int = PAGE_SIZE) -> None:
        self.output_dir = Path(output_dir)
        self.index = RowIndex(self.output_dir)
        self.tables = IndexTables()
        self.page_size = page_size

    def add(self, folder: str | os.PathLike[str]) -> float:
        """Record a newly published tomogram folder; returns the seconds it took."""
        start_s = time.perf_counter()
        row = row_for_folder(self.output_dir, Path(folder))
        if row is None:
            raise FileNotFoundError(f"{folder}: no readable summary; not added to the gallery")
        write_thumbnail(self.output_dir, row)
        with _rows_lock(self.output_dir):
            if not self.index.path.exists():  # never written, or deleted to be rebuilt
                _write_rows_from_summaries(self.output_dir)
            self.index.refresh()
            if self.index.get(row["rel"]) != row:  # the rebuild may have read it already
                append_row(self.output_dir, row)
            self.index.refresh()
            rows = self.index.rows()
            write_index_files(self.output_dir, rows, self.tables)
            position = self.index.position(row["rel"])
            write_static_pages(self.output_dir, rows, [] if position is None else [position],
                               self.page_size)
            write_static_tomogram(self.output_dir, row)
        return time.perf_counter() - start_s
