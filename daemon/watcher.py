"""Discovery: which tomograms in the watched folders are complete and ready to segment.

File events (watchdog) are only hints that put paths in a "dirty" set: inotify sees nothing
written by another host over NFS/SMB and its queue overflows silently, so a full rescan of every
watched folder runs every `rescan_interval_s` whatever the mode. A file is ready when its size
equals what its MRC header implies AND its (size, mtime_ns) have stood still for `settle_s` on
our monotonic clock (reconstruction software writes slice by slice under the final name). A file
whose header cannot be read, or whose size never matches, is returned once settled as a *bad*
candidate (`Candidate.error`), so that the daemon records the failure.

Cost: a full rescan is one `scandir` per folder and one `stat` per file, and runs every
`full_rescan_interval_s`. The rescans between are incremental: a folder whose modification
time is what it was when last listed has the same entries (creating, deleting or renaming a
file changes it), so it is not listed again and its files are not stat'ed; only its subfolders
are. An idle daemon over years of sessions then costs a stat per folder, not per tomogram
(issue 18). What an incremental rescan cannot see, a finished file rewritten in place, the
events see at once and the next full rescan sees on a network share; files not yet reported
(being written, settling) are re-stat'ed at every loop turn anyway. Headers are read only for
settled files whose size changed since the last read.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ..core.errors import one_line
from ..core.volume import HEADER_BYTES, VolumeError, read_header
from .config import Config, WatchFolder, patterns_regex
from .naming import output_stem

log = logging.getLogger(__name__)

Mode = Literal["events", "polling"]

# Filesystems where inotify cannot see other hosts' (or the VM host's) writes.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "virtiofs", "vboxsf", "davfs", "fuse.sshfs", "sshfs", "fuse.glusterfs",
    "fuse.ceph", "fuse.cephfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.davfs2",
    "fuse.vmhgfs-fuse", "fuse.juicefs", "fuse.beegfs",
})
# Names that are never tomograms: hidden files, editor/copy temporaries, our own temp folders.
TEMP_SUFFIXES = (".tmp", "~", ".part", ".partial", ".crdownload", ".swp")
EVENT_TYPES = frozenset({"created", "modified", "moved", "closed", "deleted"})
# What the observers ask the kernel for (watchdog's event_filter sets the inotify mask): not
# opens, reads and closes without writing, which our own header and fingerprint reads would
# raise by the thousand, each one woken up for and thrown away.
HINT_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileMovedEvent,
               DirMovedEvent, FileClosedEvent, FileDeletedEvent]


@dataclass(frozen=True)
class Candidate:
    """A settled tomogram file (or a bad one, when `error` is set)."""

    path: Path  # absolute, under `root`
    root: Path  # the watched folder it was found in
    rel_parent: Path  # its folder relative to `root` ("." at the top)
    voxel_size_a: float | None  # the watched folder's override, if any
    size_bytes: int
    mtime_ns: int
    error: str | None = None  # one line starting with the path: why it cannot be used
    out_parent: Path | None = None  # output_dir / rel_parent (None when no output_dir is known)
    output_stem: str | None = None  # its output folder's name (daemon/naming.py)

    @property
    def stem(self) -> str:
        return self.output_stem or self.path.stem

    @property
    def rel_output(self) -> str:
        """The output folder relative to output_dir: `session1/TS_01`."""
        return (self.rel_parent / self.stem).as_posix()

    @property
    def ok(self) -> bool:
        return self.error is None


def sort_candidates(candidates: Iterable[Candidate],
                    order: str = "newest_first") -> list[Candidate]:
    """newest_first (by mtime, the just-collected tomogram first) or oldest_first."""
    newest = order == "newest_first"
    return sorted(candidates, key=lambda c: ((-c.mtime_ns if newest else c.mtime_ns), str(c.path)))


def is_ignored_name(name: str) -> bool:
    """Hidden files, temporary names (`*.tmp`, `*~`, `.*.swp`, `*.tmp-*`, partial copies)."""
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES) or ".tmp-" in name


# -- mount types --------------------------------------------------------------------------------
def _unescape_mount(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_type(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount holding `path` (longest matching mount point)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    # realpath resolves the existing part: a folder not created yet lives on its parent's mount.
    target = os.path.realpath(os.path.abspath(path))
    best, best_type = "", None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = _unescape_mount(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type


def discovery_mode(path: str | os.PathLike[str], discovery: str,
                   mountinfo: str | None = None) -> Mode:
    """`events` or `polling` for one watched folder; auto polls on network filesystems."""
    if discovery in ("events", "polling"):
        return discovery  # type: ignore[return-value]
    fstype = mount_type(path, mountinfo)
    return "polling" if fstype in NETWORK_FILESYSTEMS else "events"


# -- scanning -----------------------------------------------------------------------------------
# A folder modified this recently may be modified again within the same tick of the file
# system's clock (coarse: milliseconds, or seconds on some network shares) without its mtime
# changing: such a listing is not trusted, and the folder is listed again next time.
DIR_MTIME_TRUST_S = 2.0


class FileStat(NamedTuple):
    """What discovery needs of a file's stat (small: a listing of 100,000 files is kept)."""

    st_size: int
    st_mtime_ns: int


Found = dict[str, tuple[int, FileStat]]


@dataclass
class _Listing:
    """One folder as last listed: reused while the folder's mtime stays `mtime_ns`."""

    mtime_ns: int | None  # None: listed too soon after a change to be trusted
    files: Found
    subfolders: list[str]


class Scanner:
    """Full rescans of the watched folders; the same rules decide whether an event path counts."""

    def __init__(self, watch: Sequence[WatchFolder], ignore_dirs: Sequence[Path] = ()) -> None:
        # Most specific root first: a file under nested watched folders belongs to the inner one.
        self.folders = sorted(watch, key=lambda w: len(os.path.abspath(w.path)), reverse=True)
        self.roots = [os.path.abspath(w.path) for w in self.folders]
        self.ignore_dirs = [os.path.abspath(p) for p in ignore_dirs]
        # Folders that could not be listed, and why: warned about once per new reason, so
        # that a missing mount or a permission change is seen without flooding the journal.
        self._problems: dict[str, str] = {}
        self._pattern_res = [patterns_regex(tuple(folder.patterns)) for folder in self.folders]
        self._listings: dict[str, _Listing] = {}  # for incremental rescans
        self.folders_listed = 0  # listings done (a measure of a rescan's cost)

    def _ignored_ids(self) -> set[tuple[int, int]]:
        ids = set()
        for folder in self.ignore_dirs:
            try:
                st = os.stat(folder)
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
        return ids

    def _matches(self, index: int, name: str) -> bool:
        if is_ignored_name(name):
            return False
        return self._pattern_res[index].match(name) is not None

    def scan(self) -> Found:
        """Every matching file: path -> (folder index, stat), from a full listing."""
        self._walk_roots(incremental=False)
        found: Found = {}
        for listing in self._listings.values():
            found.update(listing.files)
        return found

    def changes(self, incremental: bool) -> tuple[Found, set[str]]:
        """(the files of every folder listed anew, with their stats; the paths that were in
        the previous listings and are gone). Incremental: folders whose mtime stood still
        are not listed, so the cost is a stat per folder plus the changed folders' files."""
        before = self._listings
        relisted = self._walk_roots(incremental)
        updated: Found = {}
        gone: set[str] = set()
        for directory in relisted:
            updated.update(self._listings[directory].files)
            if directory in before:
                gone.update(before[directory].files.keys() - self._listings[directory].files.keys())
        for directory in before.keys() - self._listings.keys():  # vanished, or unlistable now
            gone.update(before[directory].files)
        return updated, gone

    def _walk_roots(self, incremental: bool) -> list[str]:
        """Walk every watched folder, replacing `_listings`; returns the folders listed anew."""
        ignored = self._ignored_ids()
        listings: dict[str, _Listing] = {}
        relisted: list[str] = []
        for index, root in enumerate(self.roots):
            if os.path.isdir(root):
                self._walk(index, root, ignored, listings, relisted, incremental)
            else:
                self._problem(root, "does not exist or is not a folder (yet?)")
        self._listings = listings  # folders gone since are forgotten
        return relisted

    def _problem(self, directory: str, why: str | None) -> None:
        """Warn once per new reason that `directory` cannot be watched; note its recovery."""
        before = self._problems.get(directory)
        if why is None:
            if before is not None:
                del self._problems[directory]
                log.info("watched folder %s can be listed again", directory)
        elif before != why:
            self._problems[directory] = why
            log.warning("watched folder %s %s; looking again at every rescan", directory, why)

    def scan_dir(self, directory: str) -> Found:
        """The matching files under one folder (after an event on a folder moved in)."""
        found: Found = {}
        index = self.root_index(os.path.join(directory, "x"))
        if index is not None and self._dir_allowed(index, directory):
            listings: dict[str, _Listing] = {}
            self._walk(index, directory, self._ignored_ids(), listings, [], False)
            for listing in listings.values():
                found.update(listing.files)
        return found

    def _walk(self, index: int, directory: str, ignored: set[tuple[int, int]],
              listings: dict[str, _Listing], relisted: list[str], incremental: bool) -> None:
        try:
            # Stat before listing: a change during the listing then shows as a new mtime.
            mtime_ns = os.stat(directory).st_mtime_ns
        except OSError as error:
            self._problem(directory, f"cannot be listed ({error.strerror or error})")
            return
        listing = self._listings.get(directory) if incremental else None
        if listing is None or listing.mtime_ns != mtime_ns:
            listing = self._list(index, directory, ignored, mtime_ns)
            if listing is None:
                return
            relisted.append(directory)
        listings[directory] = listing
        for subfolder in listing.subfolders:
            self._walk(index, subfolder, ignored, listings, relisted, incremental)

    def _list(self, index: int, directory: str, ignored: set[tuple[int, int]],
              mtime_ns: int) -> _Listing | None:
        try:
            entries = list(os.scandir(directory))
        except OSError as error:  # vanished, or no permission: the next rescan tries again
            self._problem(directory, f"cannot be listed ({error.strerror or error})")
            return None
        self._problem(directory, None)
        self.folders_listed += 1
        files: Found = {}
        subfolders = []
        for entry in entries:
            try:
                # Never follow symlinked folders (loops); symlinked files are fine.
                if entry.is_dir(follow_symlinks=False):
                    if not self.folders[index].recursive or entry.name.startswith("."):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in ignored:
                        continue
                    if self._claimed_by_inner(index, entry.path):
                        continue
                    subfolders.append(entry.path)
                elif self._matches(index, entry.name):
                    st = entry.stat()
                    if stat.S_ISREG(st.st_mode):  # a FIFO or device would block a reader
                        files[entry.path] = (index, FileStat(st.st_size, st.st_mtime_ns))
            except OSError:
                continue  # removed between listing and stat
        trusted = time.time() - mtime_ns / 1e9 > DIR_MTIME_TRUST_S
        return _Listing(mtime_ns if trusted else None, files, subfolders)

    def _claimed_by_inner(self, index: int, directory: str) -> bool:
        # A nested watched folder is walked under its own settings, not its parent's.
        return any(r == directory for r in self.roots[:index])

    def root_index(self, path: str) -> int | None:
        """The watched folder a path falls under (most specific), if any."""
        for index, root in enumerate(self.roots):
            if path.startswith(root.rstrip("/") + "/"):
                rel_parent = os.path.dirname(os.path.relpath(path, root))
                if rel_parent and not self.folders[index].recursive:
                    continue
                return index
        return None

    def _dir_allowed(self, index: int, directory: str) -> bool:
        root = self.roots[index]
        rel = os.path.relpath(directory, root)
        if rel == ".":
            return True
        if not self.folders[index].recursive or any(p.startswith(".") for p in rel.split(os.sep)):
            return False
        real = os.path.realpath(directory)
        for ignored in self.ignore_dirs:
            for form in (ignored, os.path.realpath(ignored)):
                if real == form or real.startswith(form.rstrip("/") + "/"):
                    return False
        return True

    def accepts(self, path: str) -> int | None:
        """The folder index if `path` is a file name we would pick up on a rescan, else None."""
        index = self.root_index(path)
        if index is None or not self._matches(index, os.path.basename(path)):
            return None
        return index if self._dir_allowed(index, os.path.dirname(path)) else None


# -- completeness -------------------------------------------------------------------------------
@dataclass
class _Track:
    index: int
    size: int
    mtime_ns: int
    since_s: float  # when (size, mtime_ns) last changed, on our monotonic clock
    header_size: int = -1  # the size at which the header was last read
    expected: int | None = None
    header_error: str | None = None
    reported: Candidate | None = None  # set once returned by poll(), until the file changes


class _Hints(FileSystemEventHandler):
    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in EVENT_TYPES:
            return
        if event.is_directory and event.event_type not in ("created", "moved"):
            return  # a folder's own modified/deleted events say nothing new (and would cost a scan)
        # A rename into the folder is an event on its destination; its source is gone.
        for path in (event.src_path, event.dest_path if event.event_type == "moved" else ""):
            if path:
                self.sink(os.fsdecode(path))


class FileWatcher:
    """Watches folders; `poll()` returns the candidates that became ready since the last call.

    `FileWatcher(config)` takes everything from a Config (output and models folders ignored);
    or pass the watched folders and settings one by one. Call `start()` once (starts the
    watchdog observers), `poll()` from the main loop (cheap between rescans), `stop()` at the
    end. Thread-safe for hints; poll from one thread.
    """

    def __init__(
        self,
        watch: Sequence[WatchFolder] | Config,
        *,
        output_dir: Path | None = None,
        ignore_dirs: Sequence[Path] = (),
        discovery: str = "auto",
        settle_s: float = 10.0,
        rescan_interval_s: float = 30.0,
        full_rescan_interval_s: float = 300.0,
        truncated_after_s: float = 120.0,
        polling_interval_s: float | None = None,
        evaluate_budget_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(watch, Config):  # FileWatcher(config): every setting from the config
            config = watch
            watch, output_dir = config.watch, config.output_dir
            ignore_dirs = [*ignore_dirs, config.output_dir, config.models_dir]
            discovery, settle_s = config.discovery, config.settle_seconds
            rescan_interval_s = config.rescan_interval_seconds
            full_rescan_interval_s = config.full_rescan_interval_seconds
            truncated_after_s = config.truncated_after_seconds
            evaluate_budget_s = config.discovery_batch_seconds
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.scanner = Scanner(watch, ignore_dirs)
        self.discovery = discovery
        self.settle_s = settle_s
        self.rescan_interval_s = rescan_interval_s
        self.full_rescan_interval_s = max(full_rescan_interval_s, rescan_interval_s)
        self.evaluate_budget_s = evaluate_budget_s  # None: judge every settled file at once
        self.truncated_after_s = max(truncated_after_s, settle_s)
        # Where no events come (a network share), incremental rescans stand in for them: often
        # enough to see arrivals quickly; they cost a stat per folder.
        self.polling_interval_s = polling_interval_s or max(
            1.0, min(settle_s / 2, rescan_interval_s)
        )
        self.clock = clock
        self.modes: dict[str, Mode] = {}
        self.rescans = 0
        self.full_rescans = 0
        self.header_reads = 0
        self._tracks: dict[str, _Track] = {}
        # The tracks not yet reported (new, changed or still being written), in the order they
        # became so: every loop turn looks at these only. Looking at every track instead made
        # an idle daemon's CPU grow with the number of finished tomograms (issue 18).
        self._unreported: dict[str, None] = {}
        # Files reported bad (truncated, say): an incremental rescan re-stats them, since a
        # resumed transfer appends without changing the folder's mtime.
        self._reported_bad: set[str] = set()
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._next_rescan_s = float("-inf")
        self._next_full_rescan_s = float("-inf")
        self._observers: dict[Mode, Observer] = {}
        self._scheduled: set[str] = set()

    # -- observers ------------------------------------------------------------------------------
    def start(self) -> None:
        self._schedule_roots()

    def _observer(self, mode: Mode) -> Observer:
        if mode not in self._observers:
            observer = Observer()
            observer.daemon = True
            observer.start()
            self._observers[mode] = observer
        return self._observers[mode]

    def _schedule_roots(self) -> None:
        """Schedule every existing, not yet scheduled folder (missing ones are retried later)."""
        for index, root in enumerate(self.scanner.roots):
            if root in self._scheduled or not os.path.isdir(root):
                continue
            mode = discovery_mode(root, self.discovery)
            # Polling needs no observer: incremental rescans every polling_interval_s see
            # what watchdog's PollingObserver would, at a stat per folder instead of per file.
            try:
                if mode == "events":
                    self._observer(mode).schedule(
                        _Hints(self.hint), root, recursive=self.scanner.folders[index].recursive,
                        event_filter=HINT_EVENTS)
            except OSError as error:  # e.g. inotify watch limit: rescans still find everything
                log.warning("cannot watch %s for events (%s); relying on rescans", root, error)
                mode = "polling"
            self.modes[root] = mode
            self._scheduled.add(root)
            log.info("watching %s (%s)", root, mode)

    def stop(self) -> None:
        for observer in self._observers.values():
            observer.stop()
        for observer in self._observers.values():
            observer.join(timeout=10)
        self._observers.clear()
        self._scheduled.clear()

    def __enter__(self) -> FileWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hint(self, path: str | os.PathLike[str]) -> None:
        """Something happened at `path` (thread-safe; from watchdog or anyone)."""
        with self._lock:
            self._dirty.add(os.path.abspath(path))

    # -- polling --------------------------------------------------------------------------------
    def poll(self, now_s: float | None = None) -> list[Candidate]:
        """Candidates that became ready (or bad) since the last call; each is returned once per
        (size, mtime) of its file. Runs the periodic full rescan when it is due."""
        now_s = self.clock() if now_s is None else now_s
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        if now_s >= self._next_rescan_s:
            self._rescan(now_s)
        else:
            self._apply_hints(dirty, now_s)
            self._restat_pending(now_s)
        ready = []
        # Judging a settled file reads its header: a backlog of 100,000 files settling at once
        # would hold one loop turn for minutes on a network share (no heartbeats, no watchdog
        # pings), so at most evaluate_budget_s per call; the rest are judged on later calls.
        deadline_s = (None if self.evaluate_budget_s is None
                      else time.monotonic() + self.evaluate_budget_s)
        for path in list(self._unreported):
            track = self._tracks[path]
            candidate = self._evaluate(path, track, now_s)
            if candidate is not None:
                track.reported = candidate
                del self._unreported[path]
                if not candidate.ok:
                    self._reported_bad.add(path)
                ready.append(candidate)
            if deadline_s is not None and time.monotonic() >= deadline_s:
                break
        return ready

    def all_ready(self) -> list[Candidate]:
        """Every file currently known to be ready or bad (to reconsider after a rescan, e.g.
        when another daemon's lease went stale or the model changed)."""
        return [t.reported for t in self._tracks.values() if t.reported is not None]

    def rescan_all(self, now_s: float | None = None) -> list[Candidate]:
        """Run a full rescan now and return every ready (or bad) candidate, e.g. to queue
        finished tomograms again after a model change. Does not consume poll()'s news."""
        self._rescan(self.clock() if now_s is None else now_s)
        return self.all_ready()

    @property
    def pending(self) -> int:
        """Files seen but not yet ready (being written, or settling)."""
        return len(self._unreported)

    def _rescan(self, now_s: float) -> None:
        self._schedule_roots()  # folders created since start
        full = now_s >= self._next_full_rescan_s
        updated, gone = self.scanner.changes(incremental=not full)
        for path in gone:
            self._forget(path)
        if full:  # a track from an event whose folder no listing holds any more
            for path in self._tracks.keys() - updated.keys():
                self._forget(path)
            self.full_rescans += 1
            self._next_full_rescan_s = now_s + self.full_rescan_interval_s
        for path, (index, st) in updated.items():
            self._update(path, index, st, now_s)
        self._restat(list(self._reported_bad), now_s)
        self.rescans += 1
        polling = any(mode == "polling" for mode in self.modes.values())
        self._next_rescan_s = now_s + (self.polling_interval_s if polling
                                       else self.rescan_interval_s)

    def _apply_hints(self, dirty: set[str], now_s: float) -> None:
        for path in dirty:
            try:
                st = os.stat(path)
            except OSError:
                self._forget(path)  # deleted or moved away
                continue
            if os.path.isdir(path):
                for sub, (index, sub_st) in self.scanner.scan_dir(path).items():
                    self._update(sub, index, sub_st, now_s)
                continue
            index = self.scanner.accepts(path)
            if index is not None and stat.S_ISREG(st.st_mode):
                self._update(path, index, st, now_s)

    def _restat_pending(self, now_s: float) -> None:
        # Settling needs time, not events (NFS sends none): re-stat files not yet ready.
        self._restat(list(self._unreported), now_s)

    def _restat(self, paths: list[str], now_s: float) -> None:
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                self._forget(path)
                continue
            self._update(path, self._tracks[path].index, st, now_s)

    def _update(self, path: str, index: int, st: os.stat_result, now_s: float) -> None:
        track = self._tracks.get(path)
        if track is None:
            self._tracks[path] = _Track(index, st.st_size, st.st_mtime_ns, now_s)
            self._unreported[path] = None
        elif (track.size, track.mtime_ns) != (st.st_size, st.st_mtime_ns):
            track.size, track.mtime_ns, track.since_s = st.st_size, st.st_mtime_ns, now_s
            track.index = index
            track.reported = None  # changed: a new version of the file, to be reported again
            self._unreported[path] = None
            self._reported_bad.discard(path)

    def _forget(self, path: str) -> None:
        self._tracks.pop(path, None)
        self._unreported.pop(path, None)
        self._reported_bad.discard(path)

    def _read_header(self, path: str, track: _Track) -> None:
        track.header_size = track.size
        self.header_reads += 1
        try:
            track.expected, track.header_error = read_header(path).expected_size_bytes, None
        except VolumeError as error:
            track.expected, track.header_error = None, one_line(error)

    def _evaluate(self, path: str, track: _Track, now_s: float) -> Candidate | None:
        """A Candidate once settled and complete (or settled and hopeless), else None."""
        age_s = now_s - track.since_s
        if age_s < self.settle_s:
            return None
        gave_up = age_s >= self.truncated_after_s
        if track.size < HEADER_BYTES:
            if not gave_up:
                return None  # the writer may not have written the header yet
            return self._candidate(path, track, f"{path}: not an MRC file ({track.size} bytes, "
                                                f"shorter than the {HEADER_BYTES}-byte header)")
        if track.header_size != track.size:
            self._read_header(path, track)
        if track.header_error is not None:
            return self._candidate(path, track, track.header_error)
        expected = track.expected
        if track.size == expected:
            return self._candidate(path, track, None)
        if track.size > expected:
            return self._candidate(path, track, f"{path}: file is {track.size} bytes but its "
                                   f"header implies {expected} bytes (wrong header or extra data)")
        if not gave_up:
            return None  # still being written, slowly
        return self._candidate(path, track, f"{path}: file is {track.size} bytes but its header "
                               f"implies {expected} bytes (truncated; unchanged for {age_s:.0f} s)")

    def _candidate(self, path: str, track: _Track, error: str | None) -> Candidate:
        folder = self.scanner.folders[track.index]
        root = self.scanner.roots[track.index]
        rel_parent = Path(os.path.relpath(os.path.dirname(path), root))
        out_parent = None
        if self.output_dir is not None:
            out_parent = Path(os.path.normpath(self.output_dir / rel_parent))
        stem = output_stem(Path(path), out_parent, folder.patterns)
        return Candidate(Path(path), Path(root), rel_parent, folder.voxel_size_a,
                         track.size, track.mtime_ns, error, out_parent, stem)
