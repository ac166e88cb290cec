"""The session gallery, built from the rows of daemon/gallery_rows.py:

- the live session page (`daemon.metrics` serves `/`, `/t/REL`, `/files/REL/NAME`, calling
  `SessionPages` here),
- the same gallery as static files in the output folder (`OUT/index.html`, per-tomogram pages
  under `OUT/.gallery/`), for when no daemon runs or the folder is copied elsewhere,
- the dataset index `OUT/index.csv` and `OUT/index.star` (daemon/dataset_index.py).

Every file written here is replaced atomically (temp file, then os.replace): readers, including
a browser on another host, see the old version or the new one.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from PIL import Image

from ..core.atomic import atomic_path, atomic_write_text
from ..core.result_folder import output_paths, read_summary, sweep_planes
from ..core.specimen_mask import THICK_SPECIMEN_NM
from .dataset_index import IndexTables
from .gallery_rows import (
    RowIndex,
    append_row,
    row_for_folder,
    row_from_summary,
    rows_lock,
    write_rows_from_summaries,
)
from .leases import held_leases, lease_key
from .served_files import resolve_inside, result_folder
from .status import read_failures

log = logging.getLogger(__name__)

PAGE_SIZE = 50  # tomograms per page, live and static
PARTICLE_ROWS_SHOWN = 500  # the per-tomogram page's table; the CSV link has all of them
STATIC_DIR = ".gallery"  # OUT/.gallery/: static per-tomogram and archive pages
THUMBS_DIR = "thumbs"  # OUT/.gallery/thumbs/KEY.webp: what the lists show, not the preview
THUMB_MAX_PX = 320  # a 1200 px preview is ~1 MB; fifty of them would make a page slow to load
RATE_MIN_SPAN_S = 600.0  # throughput per hour is shown once today's first is this old
TEMPLATES = Path(__file__).parent / "templates"


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
    env.globals["thick_specimen_nm"] = THICK_SPECIMEN_NM
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
        layers=_sweep_layers(row["stem"], summary, files),
        summary_json=json.dumps(summary, indent=1)[:20000])


def _sweep_layers(stem: str, summary: dict[str, Any], files: list[str]) -> dict[str, Any] | None:
    """The sweep's layer files and frame count for the page's per-class toggles (core.export
    writes them), or None for a result written before them."""
    names = {key: path.name for key, path in output_paths(Path("."), stem, []).items()}
    shape = summary.get("shape_zyx") or []
    if not (names["sweep_planes"] in files and names["sweep_labels"] in files and shape):
        return None
    try:
        frames = len(sweep_planes(int(shape[0])))
    except (TypeError, ValueError):
        return None
    return {"planes": names["sweep_planes"], "labels": names["sweep_labels"], "frames": frames}


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
        thumb = resolve_inside(thumbnail_path(self.output_dir, rel), self.output_dir)
        if thumb is not None and thumb.is_file():
            return thumb
        preview = resolve_inside(output_paths(folder.parent, folder.name, [])["preview"],
                                 self.output_dir)
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
        with rows_lock(self.output_dir):
            if not self.index.path.exists():  # never written, or deleted to be rebuilt
                write_rows_from_summaries(self.output_dir)
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
