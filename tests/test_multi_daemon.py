"""Several real daemons on one watched folder and one output folder (issue 7): work shared
exactly once, SIGKILL of a lease holder (its worker dies with it), and a SIGSTOPped holder
whose lease is reclaimed and which, once continued, does not publish over the winner's result.

All daemons run on this one host, so a SIGKILLed holder's lease is broken at once (same host,
same boot id, pid gone: docs/leases.md step 4); the SIGSTOP test is the one that exercises the
heartbeat-stands-still-for-lease_seconds path.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from .daemon_harness import (
    Daemon,
    descendant_pids,
    partial_outputs,
    summary_counts,
    tomogram_bytes,
    unfinished_files,
    write_tiny_model,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

LEASE_S = 3.0


# --- helpers: /proc, leases, logs, metrics ----------------------------------------------------

def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a recycled pid apart); None if gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in "ZX" else int(fields[19])


def _survivors(identities: dict[int, int | None]) -> list[int]:
    return [pid for pid, start in identities.items()
            if start is not None and _start_time(pid) == start]


def _leases(outputs: Path) -> dict[str, dict]:
    folder = outputs / ".tomolive" / "leases"
    found = {}
    for path in folder.glob("*.lease") if folder.is_dir() else []:
        try:
            found[path.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # released or replaced while we read
    return found


def _lease_of(outputs: Path, pid: int, target: str | None = None) -> dict | None:
    for record in _leases(outputs).values():
        if record.get("pid") == pid and (target is None or record.get("target") == target):
            return record
    return None


def _ok_lines(daemon: Daemon, stem: str) -> int:
    return len(re.findall(rf"^.*\b{re.escape(stem)}\.mrc: ok in ", daemon.log, re.MULTILINE))


def _drop(incoming: Path, staging: Path, name: str, blob: bytes) -> None:
    """Appear in the watched folder at once (rename), as a finished transfer does."""
    staging.mkdir(exist_ok=True)
    (staging / name).write_bytes(blob)
    os.rename(staging / name, incoming / name)


@pytest.fixture
def shared(tmp_path, make_daemon):
    """One watched folder, one output folder, one models folder; daemons each with their own
    config file and log (in their own root) and their own inference batch size."""
    incoming, outputs, models = (tmp_path / n for n in ("incoming", "outputs", "models"))
    for folder in (incoming, outputs, models):
        folder.mkdir()
    write_tiny_model(models / "a.safetensors", name="model-a")

    def make(name: str, batch_size: int) -> Daemon:
        d = make_daemon(name=name, watch=[{"path": str(incoming), "patterns": ["*.mrc"]}],
                        output_dir=str(outputs), models_dir=str(models), lease_seconds=LEASE_S,
                        inference={"batch_size": batch_size})
        d.incoming, d.outputs, d.models = incoming, outputs, models
        return d

    return make


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _start_both(shared) -> tuple[Daemon, Daemon]:
    a, b = shared("a", batch_size=2).start(), shared("b", batch_size=8).start()
    for d in (a, b):
        d.wait_for_log(r"tomolive serving", 90)
    return a, b


# --- tests ------------------------------------------------------------------------------------

def test_two_daemons_share_twenty_tomograms_each_done_once(shared, tmp_path):
    a, b = _start_both(shared)
    stems = [f"t{i:02d}" for i in range(20)]
    blobs = {stem: tomogram_bytes(100 + i) for i, stem in enumerate(stems)}
    started = time.monotonic()
    for stem in stems:
        _drop(a.incoming, tmp_path / "staging", f"{stem}.mrc", blobs[stem])
    a.wait_for(lambda: all(a.summary(s) for s in stems), 150, "all 20 summaries")
    wall_s = time.monotonic() - started
    for d in (a, b):
        d.wait_for_rescans(2)  # nothing may be redone
    split = {d.name: sum(_ok_lines(d, s) for s in stems) for d in (a, b)}
    print(f"\n20 tomograms in {wall_s:.1f}s; split {split}")
    for stem in stems:
        assert _ok_lines(a, stem) + _ok_lines(b, stem) == 1, (stem, a.log, b.log)
    assert summary_counts(a.outputs) == dict.fromkeys(stems, 1)
    assert split["a"] > 0 and split["b"] > 0, split
    assert partial_outputs(a.outputs) == []
    assert _leases(a.outputs) == {}
    assert a.metric("tomolive_lease_reclaims_total") == 0
    assert b.metric("tomolive_lease_reclaims_total") == 0
    # Both daemons' session pages show the same 20, from the shared folder (each did only
    # some of them), and the dataset index has each once.
    for d in (a, b):
        with urllib.request.urlopen(f"{d.metrics_url()}/api/session.json", timeout=10) as r:
            page = json.loads(r.read())
        assert page["total"] == 20, (d.name, page["total"])
    with open(a.outputs / "index.csv", newline="") as handle:
        assert sorted(row["stem"] for row in csv.DictReader(handle)) == stems
    assert a.stop() == 0 and b.stop() == 0


def test_sigkill_of_a_lease_holder_other_daemon_finishes_its_tomogram(shared, tmp_path):
    a, b = _start_both(shared)
    # Two at once: each daemon has one worker, so each takes one of them. Whichever a takes
    # is parked mid-tomogram (only a has holds), so a is killed while it works on it.
    for i in (1, 2):
        a.hold(f"big{i}", "inference")
        _drop(a.incoming, tmp_path / "staging", f"big{i}.mrc", tomogram_bytes(200 + i))
    held = a.wait_for(lambda: _lease_of(a.outputs, a.process.pid), 60, "a lease held by a")
    stem = held["target"]
    a.wait_held(stem)
    workers = descendant_pids(a.process.pid)
    assert workers, "daemon a has no worker process"
    identities = {pid: _start_time(pid) for pid in workers}
    dead_pid = a.process.pid
    a.kill()  # SIGKILL, while it holds the lease and its worker is mid-tomogram
    # PR_SET_PDEATHSIG: the kernel takes the worker (and every other child) down too.
    deadline = time.monotonic() + 15
    while _survivors(identities) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _survivors(identities) == [], f"children of the killed daemon {dead_pid} survive"
    b.wait_for_summary(stem, timeout_s=180)
    other = "big2" if stem == "big1" else "big1"
    b.wait_for_summary(other, timeout_s=180)
    b.wait_for(lambda: _leases(b.outputs) == {}, 30, "leases released")
    assert _ok_lines(b, stem) == 1 and _ok_lines(a, stem) == 0, (a.log, b.log)
    assert _ok_lines(a, other) + _ok_lines(b, other) == 1
    assert re.search(rf"lease {stem}-\w+ of .* \(pid {dead_pid}\) was stale: reclaimed", b.log), \
        b.log
    assert b.metric("tomolive_lease_reclaims_total") == 1
    assert summary_counts(b.outputs) == {"big1": 1, "big2": 1}
    assert partial_outputs(b.outputs) == []
    assert b.stop() == 0


def test_sigstopped_holder_loses_lease_and_does_not_publish_after_sigcont(shared, tmp_path):
    a = shared("a", batch_size=2).start()
    a.wait_for_log(r"tomolive serving", 90)
    a.hold("big", "inference")  # mid-tomogram when frozen, on any machine
    _drop(a.incoming, tmp_path / "staging", "big.mrc", tomogram_bytes(300))
    a.wait_held("big")
    # Freeze the whole daemon: the main process (no more heartbeats) and its worker.
    frozen = [a.process.pid, *descendant_pids(a.process.pid)]
    for pid in frozen:
        _signal(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    assert _lease_of(a.outputs, a.process.pid, "big") is not None
    b = shared("b", batch_size=8).start()
    b.wait_for_log(r"was stale: reclaimed", 90)
    # b waited for the heartbeat to stand still for the lease duration on its own clock.
    assert time.monotonic() - stopped_at >= LEASE_S
    b.wait_for(lambda: _lease_of(b.outputs, b.process.pid, "big"), 30, "b's lease on big")
    assert a.summary("big") is None  # nobody published while a was frozen mid-tomogram
    winner = b.wait_for_summary("big", timeout_s=180)
    folder = b.outputs / "big"
    summary_path = folder / "big_summary.json"
    before = (folder.stat().st_ino, summary_path.stat().st_ino, summary_path.stat().st_mtime_ns,
              summary_path.read_bytes())
    a.release("big")  # when it continues, a's worker finishes big and asks to publish
    for pid in frozen:
        _signal(pid, signal.SIGCONT)
    a.wait_for_log(r"big\.mrc: lease lost to another daemon; the result will not be published",
                   60)
    a.wait_for_log(r"big\.mrc: (abandoned|.*after losing the lease; not counted)", 180)
    a.wait_for_rescans(2)
    after = (folder.stat().st_ino, summary_path.stat().st_ino, summary_path.stat().st_mtime_ns,
             summary_path.read_bytes())
    assert after == before, "the continued daemon published over the winner's result"
    assert json.loads(after[3]) == winner
    assert _ok_lines(a, "big") == 0 and _ok_lines(b, "big") == 1, (a.log, b.log)
    assert summary_counts(b.outputs) == {"big": 1}
    assert partial_outputs(b.outputs) == []
    assert _leases(b.outputs) == {}
    # Losing the lease is not a failure of the tomogram: no failure record for it.
    b.wait_for_failure_records_cleared()
    assert b.metric("tomolive_lease_reclaims_total") == 1
    assert a.metric("tomolive_lease_reclaims_total") == 0
    assert a.stop() == 0 and b.stop() == 0


def test_holder_stopped_while_writing_its_temporary_folder_records_no_failure(shared, tmp_path):
    """Frozen with `.big.tmp-*` written: the reclaiming daemon removes that folder; when the
    frozen one continues, being refused at publishing must not count as a failure of the
    tomogram (someone else finished it)."""
    a = shared("a", batch_size=2).start()
    a.wait_for_log(r"tomolive serving", 90)
    a.hold("big", "publish")  # its temporary folder is complete, the rename not yet done
    _drop(a.incoming, tmp_path / "staging", "big.mrc", tomogram_bytes(400))
    a.wait_held("big")
    assert list(a.outputs.glob(".big.tmp-*")), "no temporary folder while parked at publish"
    frozen = [a.process.pid, *descendant_pids(a.process.pid)]
    for pid in frozen:
        _signal(pid, signal.SIGSTOP)
    b = shared("b", batch_size=8).start()
    b.wait_for_summary("big", timeout_s=180)
    a.release("big")
    for pid in frozen:
        _signal(pid, signal.SIGCONT)
    a.wait_for_log(r"after losing the lease; not counted|big\.mrc: abandoned|attempt \d", 60)
    a.wait_for_rescans(2)
    assert "attempt 1/" not in a.log, a.log
    b.wait_for_failure_records_cleared()
    assert _ok_lines(a, "big") == 0 and _ok_lines(b, "big") == 1, (a.log, b.log)
    assert summary_counts(b.outputs) == {"big": 1}
    assert partial_outputs(b.outputs) == []
    assert a.stop() == 0 and b.stop() == 0
    assert unfinished_files(b.outputs) == []
