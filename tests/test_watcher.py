"""daemon.watcher: real watchdog observers, chunked writes, renames, rescans, ignore rules."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from tomolive.core.volume import write_mrc
from tomolive.daemon.config import WatchFolder
from tomolive.daemon.watcher import (
    Candidate,
    FileWatcher,
    Scanner,
    discovery_mode,
    is_ignored_name,
    mount_type,
    sort_candidates,
)

SETTLE_S = 0.4


@pytest.fixture(scope="module")
def mrc_bytes(tmp_path_factory) -> bytes:
    """A small valid MRC file's bytes (16 x 32 x 32 float32 = 64 KiB of data + header)."""
    path = tmp_path_factory.mktemp("src") / "src.mrc"
    data = np.random.default_rng(0).normal(size=(16, 32, 32)).astype(np.float32)
    write_mrc(path, data, voxel_size_a=10.0)
    return path.read_bytes()


def _watcher(root: Path, **kwargs) -> FileWatcher:
    kwargs.setdefault("settle_s", SETTLE_S)
    kwargs.setdefault("rescan_interval_s", 3600.0)  # events (or the first rescan) must do the job
    kwargs.setdefault("discovery", "events")
    ignore = kwargs.pop("ignore_dirs", ())
    voxel = kwargs.pop("voxel_size_a", None)
    return FileWatcher([WatchFolder(path=root, voxel_size_a=voxel)], ignore_dirs=ignore, **kwargs)


def _poll_until(watcher: FileWatcher, count: int, timeout_s: float = 15.0) -> list[Candidate]:
    found: list[Candidate] = []
    end = time.monotonic() + timeout_s
    while len(found) < count and time.monotonic() < end:
        found += watcher.poll()
        time.sleep(0.05)
    return found


def _poll_for(watcher: FileWatcher, seconds: float) -> list[Candidate]:
    found: list[Candidate] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found += watcher.poll()
        time.sleep(0.05)
    return found


def test_chunked_write_is_ready_only_when_complete_and_settled(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    root.mkdir()
    with _watcher(root, voxel_size_a=13.2) as watcher:
        assert watcher.poll() == [] and watcher.rescans == 1
        target = root / "TS_01.mrc"
        with open(target, "wb") as handle:
            handle.write(mrc_bytes[:1024])  # header first, as AreTomo does
            handle.flush()
            chunks = np.array_split(np.arange(1024, len(mrc_bytes)), 8)
            for i, chunk in enumerate(chunks):
                assert _poll_for(watcher, 0.1) == []
                if i == 4:
                    # A pause longer than the settle time: settled but incomplete, still not ready.
                    assert _poll_for(watcher, 3 * SETTLE_S) == []
                    assert watcher.pending == 1
                handle.write(mrc_bytes[chunk[0]:chunk[-1] + 1])
                handle.flush()
        found = _poll_until(watcher, 1)
        assert len(found) == 1
        (candidate,) = found
        assert candidate.ok and candidate.size_bytes == len(mrc_bytes)
        assert candidate.path == target and candidate.rel_output == "TS_01"
        assert candidate.voxel_size_a == 13.2
        assert _poll_for(watcher, 2 * SETTLE_S) == []  # reported once
        assert watcher.rescans == 1  # the events did it
        assert [c.path for c in watcher.all_ready()] == [target]


def test_file_renamed_into_the_folder_and_a_folder_moved_in_are_found(tmp_path, mrc_bytes):
    root, outside = tmp_path / "in", tmp_path / "staging"
    (root / "session1").mkdir(parents=True)
    (outside / "session2").mkdir(parents=True)
    (outside / "TS_02.mrc").write_bytes(mrc_bytes)
    (outside / "session2" / "TS_03.mrc").write_bytes(mrc_bytes)
    with _watcher(root) as watcher:
        assert watcher.poll() == []
        # No wait needed: watchdog adds the inotify watches in schedule() itself (the
        # emitter's on_thread_start runs in the caller), so the renames below are seen.
        os.rename(outside / "TS_02.mrc", root / "session1" / "TS_02.mrc")
        os.rename(outside / "session2", root / "session2")
        found = _poll_until(watcher, 2)
    assert sorted(c.rel_output for c in found) == ["session1/TS_02", "session2/TS_03"]
    assert all(c.ok and c.root == root for c in found)
    assert watcher.rescans == 1


def test_backlog_present_at_start_is_found_and_junk_is_ignored(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    out = root / "outputs"  # an output folder inside the watched one
    for rel in ["a.mrc", "sub/b.rec", "sub/deeper/C.MRC", ".hidden.mrc", "d.mrc.tmp", "e.mrc~",
                ".f.mrc.swp", "g.tmp-123.mrc", "notes.txt", ".tomolive/h.mrc", ".TS.tmp-9/i.mrc",
                "outputs/TS_01/TS_01_labels.mrc"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mrc_bytes)
    os.symlink(root / "sub", root / "loop")  # a symlinked folder is not followed
    with _watcher(root, ignore_dirs=[out]) as watcher:
        found = _poll_until(watcher, 3)
        found += _poll_for(watcher, 2 * SETTLE_S)
    assert sorted(c.rel_output for c in found) == ["a", "sub/b", "sub/deeper/C"]


def test_polling_mode_finds_new_files_by_incremental_rescans(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    root.mkdir()
    with _watcher(root, discovery="polling", polling_interval_s=0.2) as watcher:
        assert watcher.modes == {str(root): "polling"}
        assert watcher.poll() == []
        (root / "TS_04.mrc").write_bytes(mrc_bytes)
        found = _poll_until(watcher, 1)
    assert [c.rel_output for c in found] == ["TS_04"] and found[0].ok
    # Only the first rescan was full: the file was found by incremental ones.
    assert watcher.rescans > 1 and watcher.full_rescans == 1


def _age(folder: Path, seconds: float = 3600.0) -> None:
    """Backdate a folder's mtime: a listing of a folder changed just now is not trusted."""
    past = time.time() - seconds
    os.utime(folder, (past, past))


def test_incremental_scans_list_only_folders_whose_mtime_changed(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    for session in ("s1", "s2"):
        (root / session).mkdir(parents=True)
        (root / session / "TS_01.mrc").write_bytes(mrc_bytes)
        _age(root / session)
    _age(root)
    scanner = Scanner([WatchFolder(path=root)])
    updated, gone = scanner.changes(incremental=True)  # nothing listed before: all of it
    assert len(updated) == 2 and not gone and scanner.folders_listed == 3
    assert scanner.changes(incremental=True) == ({}, set())
    assert scanner.folders_listed == 3  # a stat per folder, no listing, no stat per file
    (root / "s2" / "TS_02.mrc").write_bytes(mrc_bytes)
    (root / "s1" / "TS_01.mrc").unlink()
    updated, gone = scanner.changes(incremental=True)
    assert sorted(Path(p).name for p in updated) == ["TS_01.mrc", "TS_02.mrc"]  # s2's files
    assert gone == {str(root / "s1" / "TS_01.mrc")} and scanner.folders_listed == 5
    # Changed less than DIR_MTIME_TRUST_S ago: listed again, in case a second change fell
    # within the same tick of the file system's clock.
    scanner.changes(incremental=True)
    assert scanner.folders_listed == 7
    _age(root / "s1", 1800)
    _age(root / "s2", 1800)
    scanner.changes(incremental=True)
    assert scanner.folders_listed == 9
    assert scanner.changes(incremental=True) == ({}, set()) and scanner.folders_listed == 9
    shutil.rmtree(root / "s2")  # a vanished folder's files are gone
    _age(root, 60)
    updated, gone = scanner.changes(incremental=True)
    assert not updated and {Path(p).name for p in gone} == {"TS_01.mrc", "TS_02.mrc"}
    # A full scan lists every folder whatever its mtime.
    scanner.changes(incremental=False)
    assert scanner.folders_listed == 12


def test_periodic_rescan_finds_files_without_any_observer(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    root.mkdir()
    watcher = _watcher(root, rescan_interval_s=0.3)  # never started: no events at all
    assert watcher.poll() == []
    (root / "TS_05.mrc").write_bytes(mrc_bytes)
    found = _poll_until(watcher, 1)
    assert [c.rel_output for c in found] == ["TS_05"]
    assert watcher.rescans >= 2


def test_bad_files_are_reported_once_settled_with_a_clear_reason(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    root.mkdir()
    (root / "text.mrc").write_text("this is not a tomogram\n" * 200)
    (root / "tiny.mrc").write_bytes(b"x" * 10)
    (root / "truncated.mrc").write_bytes(mrc_bytes[: len(mrc_bytes) // 2])
    (root / "long.mrc").write_bytes(mrc_bytes + b"\0" * 100)
    with _watcher(root, truncated_after_s=1.0) as watcher:
        found = _poll_until(watcher, 4)
        assert _poll_for(watcher, 0.5) == []  # each reported once
    errors = {c.path.name: c.error for c in found}
    assert sorted(errors) == ["long.mrc", "text.mrc", "tiny.mrc", "truncated.mrc"]
    assert all(not c.ok for c in found)
    assert errors["text.mrc"].startswith(f"{root / 'text.mrc'}: not an MRC file")
    assert errors["tiny.mrc"] == (f"{root / 'tiny.mrc'}: not an MRC file (10 bytes, shorter "
                                  "than the 1024-byte header)")
    half, full = len(mrc_bytes) // 2, len(mrc_bytes)
    assert errors["truncated.mrc"].startswith(
        f"{root / 'truncated.mrc'}: file is {half} bytes but its header implies {full} bytes "
        "(truncated; unchanged for")
    assert errors["long.mrc"] == (f"{root / 'long.mrc'}: file is {full + 100} bytes but its "
                                  f"header implies {full} bytes (wrong header or extra data)")


def test_settling_on_the_monotonic_clock_and_a_changed_file_is_reported_again(tmp_path, mrc_bytes):
    root = tmp_path / "in"
    root.mkdir()
    path = root / "TS_06.mrc"
    path.write_bytes(mrc_bytes)
    watcher = _watcher(root, settle_s=10.0)
    assert watcher.poll(now_s=100.0) == []
    assert watcher.poll(now_s=109.9) == []
    (first,) = watcher.poll(now_s=110.0)
    assert first.ok and watcher.header_reads == 1
    assert watcher.poll(now_s=200.0) == []
    os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))  # rewritten in place
    watcher.hint(path)
    assert watcher.poll(now_s=201.0) == []  # a new version must settle again
    (second,) = watcher.poll(now_s=211.5)
    assert second.mtime_ns == first.mtime_ns + 10**9
    assert watcher.header_reads == 1  # same size: the header is not read again
    path.unlink()
    watcher.hint(path)
    watcher.poll(now_s=212.0)
    assert watcher.all_ready() == []


def test_ignored_names():
    for name in [".x.mrc", "x.tmp", "x.mrc~", ".x.mrc.swp", "x.tmp-42.mrc", "x.mrc.part"]:
        assert is_ignored_name(name), name
    for name in ["x.mrc", "TS_01_rec.mrc", "tmp.mrc"]:
        assert not is_ignored_name(name), name


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /data rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
41 40 8:2 / /data/local rw,relatime shared:21 - xfs /dev/sdb1 rw
42 22 0:36 / /mnt/my\\040share rw,relatime - cifs //nas/share rw
"""


def test_mount_type_picks_the_longest_mount_point():
    assert mount_type("/data/tomograms", MOUNTINFO) == "nfs4"
    assert mount_type("/data/local/x", MOUNTINFO) == "xfs"
    assert mount_type("/datax", MOUNTINFO) == "ext4"
    assert mount_type("/mnt/my share/in", MOUNTINFO) == "cifs"
    assert discovery_mode("/data/tomograms", "auto", MOUNTINFO) == "polling"
    assert discovery_mode("/mnt/my share", "auto", MOUNTINFO) == "polling"
    assert discovery_mode("/data/local", "auto", MOUNTINFO) == "events"
    assert discovery_mode("/data/tomograms", "events", MOUNTINFO) == "events"
    assert mount_type("/") is not None  # the real /proc/self/mountinfo parses


def _candidate(name: str, mtime_ns: int) -> Candidate:
    return Candidate(Path("/r") / name, Path("/r"), Path("."), None, 1, mtime_ns)


def test_sort_candidates():
    items = [_candidate("a.mrc", 2), _candidate("b.mrc", 3), _candidate("c.mrc", 1)]
    assert [c.stem for c in sort_candidates(items)] == ["b", "a", "c"]
    assert [c.stem for c in sort_candidates(items, "oldest_first")] == ["c", "a", "b"]


def test_watcher_from_config_gives_output_parents_and_ignores_outputs(tmp_path, mrc_bytes):
    from tomolive.daemon.config import load_config

    config_path = tmp_path / "config.yaml"
    config_path.write_text("watch:\n  - path: data\noutput_dir: data/outputs\n"
                           "models_dir: data/models\nsettle_seconds: 0.2\n")
    config = load_config(config_path)
    for rel in ["s1/TS_07.mrc", "outputs/s1/TS_07/TS_07_labels.mrc", "models/x.mrc"]:
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / rel).write_bytes(mrc_bytes)
    watcher = FileWatcher(config)
    assert watcher.settle_s == 0.2 and watcher.rescan_interval_s == 30.0
    (found,) = _poll_until(watcher, 1)
    assert found.out_parent == tmp_path / "data" / "outputs" / "s1"
    assert found.rel_output == "s1/TS_07"
    assert [c.path for c in watcher.rescan_all()] == [found.path]
    assert watcher.rescans == 2 and watcher.poll() == []


def test_a_missing_watched_folder_is_warned_about_once_and_its_return_noted(tmp_path, caplog):
    missing, present = tmp_path / "not-mounted", tmp_path / "present"
    present.mkdir()
    scanner = Scanner([WatchFolder(path=missing), WatchFolder(path=present)])
    caplog.set_level("INFO", logger="tomolive.daemon.watcher")
    for _ in range(3):
        scanner.scan()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [("WARNING", f"watched folder {missing} does not exist or is not a "
                                    "folder (yet?); looking again at every rescan")]
    missing.mkdir()
    scanner.scan()
    scanner.scan()
    assert [(r.levelname, r.getMessage()) for r in caplog.records][1:] == [
        ("INFO", f"watched folder {missing} can be listed again")]


def test_a_settling_backlog_is_judged_a_budget_at_a_time(tmp_path, mrc_bytes):
    # Judging a file reads its header: a huge backlog settling at once must not hold one loop
    # turn (no heartbeats, no watchdog pings). A zero budget still judges one file per call.
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.mrc", "b.mrc", "c.mrc"):
        (root / name).write_bytes(mrc_bytes)
    watcher = _watcher(root, evaluate_budget_s=0.0, settle_s=1.0)
    assert watcher.poll(now_s=0.0) == [] and watcher.pending == 3  # found, not settled yet
    found = [watcher.poll(now_s=10.0) for _ in range(4)]
    assert [len(batch) for batch in found] == [1, 1, 1, 0]
    assert sorted(c.path.name for batch in found for c in batch) == ["a.mrc", "b.mrc", "c.mrc"]
    assert watcher.pending == 0
