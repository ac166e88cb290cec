"""daemon.leases and daemon.failure_records: leases across processes, staleness on our own
clock, failures; core.result_folder's done markers; daemon.status's snapshot."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tomolive.core.fingerprint import input_fingerprint
from tomolive.core.result_folder import is_done
from tomolive.daemon.failure_records import FailureRecords
from tomolive.daemon.leases import LeaseLost, LeaseManager, lease_key
from tomolive.daemon.status import status_snapshot

KEYS = [lease_key(f"session{i % 3}/TS_{i:03d}") for i in range(120)]


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _claim_all(out: str, host: str, keys: list[str], barrier, queue) -> None:
    manager = LeaseManager(Path(out), lease_s=60.0, host=host)
    barrier.wait()
    won = [key for key in keys if manager.try_claim(key, key) is not None]
    # A second pass claims nothing more: held leases are not stale.
    won += [key for key in keys if manager.try_claim(key, key) is not None]
    queue.put((host, won))


def _break_all(out: str, host: str, keys: list[str], barrier, queue) -> None:
    manager = LeaseManager(Path(out), lease_s=0.3, host=host)
    barrier.wait()
    won: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for key in keys:
            holder = manager.holder(key)
            if holder is not None and holder["host"] == "crashed":
                if manager.try_claim(key, key) is not None:
                    won.append(key)
        if all((manager.holder(k) or {}).get("host") != "crashed" for k in keys):
            break
        time.sleep(0.05)
    queue.put((host, won, manager.reclaims))


def _run_two(target, out: Path, keys_a: list[str], keys_b: list[str]) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(str(out), host, keys, barrier, queue))
        for host, keys in (("hostA", keys_a), ("hostB", keys_b))
    ]
    for proc in procs:
        proc.start()
    results = {}
    for _ in procs:
        item = queue.get(timeout=60)
        results[item[0]] = item[1:]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return results


def test_lease_key_is_safe_and_distinct():
    key = lease_key("session1/TS_01")
    assert key.startswith("session1__TS_01-") and "/" not in key
    assert lease_key("session1/TS_01") == key
    assert lease_key("session1__TS_01") != key  # sanitising never merges two paths
    assert not lease_key("../.hidden/x y").startswith(".")
    assert "/" not in lease_key("../.hidden/x y") and " " not in lease_key("../.hidden/x y")


def test_two_processes_race_and_each_key_is_claimed_exactly_once(tmp_path):
    results = _run_two(_claim_all, tmp_path, KEYS, list(reversed(KEYS)))
    won_a, won_b = results["hostA"][0], results["hostB"][0]
    assert set(won_a).isdisjoint(won_b)
    assert sorted(won_a + won_b) == sorted(KEYS)
    hosts = {json.loads((tmp_path / ".tomolive/leases" / f"{k}.lease").read_text())["host"]
             for k in KEYS}
    assert hosts <= {"hostA", "hostB"}
    # No temp files are left behind.
    assert sorted(p.suffix for p in (tmp_path / ".tomolive/leases").iterdir()) == [".lease"] * 120


def test_two_processes_breaking_the_same_stale_leases_win_each_once(tmp_path):
    keys = KEYS[:40]
    crashed = LeaseManager(tmp_path, lease_s=0.3, host="crashed", pid=1, boot="other-boot")
    for key in keys:
        assert crashed.try_claim(key, key) is not None
    results = _run_two(_break_all, tmp_path, keys, list(reversed(keys)))
    (won_a, reclaims_a), (won_b, reclaims_b) = results["hostA"], results["hostB"]
    assert set(won_a).isdisjoint(won_b)
    assert sorted(won_a + won_b) == sorted(keys)
    assert reclaims_a + reclaims_b == len(keys)
    leftovers = [p.name for p in (tmp_path / ".tomolive/leases").iterdir()
                 if not p.name.endswith(".lease") and not p.name.endswith(".break.lock")]
    assert leftovers == []


def test_stale_only_after_heartbeat_stands_still_for_lease_seconds(tmp_path):
    clock = FakeClock()
    holder = LeaseManager(tmp_path, lease_s=0.5, host="A")
    other = LeaseManager(tmp_path, lease_s=0.5, host="B", clock=clock)
    lease = holder.try_claim("k", "s/TS_1")
    assert lease is not None
    assert other.try_claim("k") is None  # first observation
    clock.now_s = 0.4
    assert other.try_claim("k") is None
    holder.renew(lease)  # the counter moves: observation starts again
    clock.now_s = 0.6
    assert other.try_claim("k") is None
    clock.now_s = 1.05
    assert other.try_claim("k") is None  # only 0.45 s since the renewal was seen
    clock.now_s = 1.1
    taken = other.try_claim("k", "s/TS_1")
    assert taken is not None and other.reclaims == 1
    assert other.holder("k")["host"] == "B"
    # The old holder finds out: renew, check and release all refuse.
    with pytest.raises(LeaseLost, match=r"k\.lease: lease now held by B pid"):
        holder.renew(lease)
    with pytest.raises(LeaseLost, match="lease now held by B"):
        holder.check(lease)
    assert holder.release(lease) is False
    assert other.holder("k")["token"] == taken.token


def test_sweep_breaks_only_stale_leases_and_keeps_ours(tmp_path):
    clock = FakeClock()
    holder = LeaseManager(tmp_path, lease_s=0.5, host="A")
    sweeper = LeaseManager(tmp_path, lease_s=0.5, host="B", clock=clock)
    live = holder.try_claim("live", "s/TS_1")
    holder.try_claim("dead", "s/TS_2")  # its holder stops renewing
    mine = sweeper.try_claim("mine", "s/TS_3")
    assert sweeper.sweep_stale(keep={"mine"}) == []  # first observations
    clock.now_s = 0.4
    holder.renew(live)
    clock.now_s = 0.6
    swept = sweeper.sweep_stale(keep={"mine"})
    assert [(lease.key, lease.record["target"]) for lease in swept] == [("dead", "s/TS_2")]
    assert sweeper.holder("dead")["host"] == "B" and sweeper.holder("live")["host"] == "A"
    assert sweeper.holder("mine")["token"] == mine.token  # never its own work
    assert sweeper.release(swept[0]) and sweeper.holder("dead") is None


def test_a_renewal_paused_across_a_break_does_not_resurrect_the_lease(tmp_path, monkeypatch):
    """A holder stalls between the check and the write of a renewal (SIGSTOP, a long GC,
    a hung NFS call); meanwhile another daemon breaks the lease, does the work and releases.
    The stalled renewal must not bring the lease file back under the old token."""
    clock = FakeClock()
    stalled = LeaseManager(tmp_path, lease_s=0.5, host="A")
    other = LeaseManager(tmp_path, lease_s=0.5, host="B", clock=clock)
    lease = stalled.try_claim("k", "s/TS_1")
    assert other.try_claim("k") is None
    clock.now_s = 1.0
    taken = other.try_claim("k", "s/TS_1")
    assert taken is not None
    assert other.release(taken)
    # The renewal's check passed before the break; only its write happens now.
    monkeypatch.setattr(stalled, "check", lambda lease: None)
    stalled.renew(lease)
    monkeypatch.undo()
    assert not stalled.lease_path("k").exists()
    with pytest.raises(LeaseLost, match="vanished"):
        stalled.check(lease)


def test_a_live_renewing_holder_is_never_broken_in_real_time(tmp_path):
    holder = LeaseManager(tmp_path, lease_s=1.5, host="A")
    other = LeaseManager(tmp_path, lease_s=1.5, host="B")
    reclaimed = []
    other.on_reclaim = lambda key, old: reclaimed.append((key, old["host"]))
    lease = holder.try_claim("k")
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(0.05):
            holder.renew(lease)

    thread = threading.Thread(target=keep_alive)
    thread.start()
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            assert other.try_claim("k") is None
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert lease.heartbeat > 10
    taken = None
    end = time.monotonic() + 20
    while taken is None and time.monotonic() < end:
        taken = other.try_claim("k")
        time.sleep(0.05)
    assert taken is not None
    assert reclaimed == [("k", "A")]


def test_same_host_lease_of_a_dead_process_is_broken_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)
    me = LeaseManager(tmp_path, lease_s=3600, host="here")
    dead = LeaseManager(tmp_path, lease_s=3600, host="here", pid=dead_pid, boot=me.boot)
    assert dead.try_claim("k") is not None
    elsewhere = LeaseManager(tmp_path, lease_s=3600, host="there")
    assert elsewhere.try_claim("k") is None  # another host cannot see the pid: wait for the lease
    lease = me.try_claim("k")
    assert lease is not None and me.reclaims == 1
    # A live pid on this host is respected.
    assert LeaseManager(tmp_path, lease_s=3600, host="here", pid=os.getpid() + 0).try_claim(
        "k") is None


def test_release_removes_only_our_lease(tmp_path):
    manager = LeaseManager(tmp_path, lease_s=10, host="A")
    lease = manager.try_claim("k", "s/TS")
    assert status_snapshot(tmp_path)["running"][0]["host"] == "A"
    assert manager.release(lease) is True
    assert not lease.path.exists()
    with pytest.raises(LeaseLost, match="lease vanished"):
        manager.renew(lease)
    assert manager.try_claim("k") is not None


def test_status_shows_how_long_ago_a_holder_last_renewed(tmp_path):
    from tomolive.daemon.status import format_status

    manager = LeaseManager(tmp_path, lease_s=10, host="A")
    lease = manager.try_claim("k", "s/TS")
    manager.renew(lease)
    assert status_snapshot(tmp_path)["running"][0]["last_beat_age_s"] < 60
    # A holder whose worker stalled stops renewing: its age keeps growing, and status says so.
    beat = manager.beat_path(lease.key, lease.token)
    past_s = time.time() - 500
    os.utime(beat, (past_s, past_s))
    snapshot = status_snapshot(tmp_path)
    assert 499 <= snapshot["running"][0]["last_beat_age_s"] < 600
    snapshot.update(waiting=0)
    snapshot["counts"]["waiting"] = 0
    assert "heartbeat 1, last 50" in format_status(snapshot)


def _fail_many(out: str, host: str, keys: list[str], barrier, queue) -> None:
    records = FailureRecords(Path(out), max_attempts=5, host=host)
    barrier.wait()
    returned = [records.record_failure(keys[0], "fp-1", f"boom from {host}", "s/TS_9")
                for _ in range(10)]
    queue.put((host, returned))


def test_failure_counts_are_shared_and_reach_quarantine_once(tmp_path):
    results = _run_two(_fail_many, tmp_path, ["k"], ["k"])
    returned = results["hostA"][0] + results["hostB"][0]
    assert sorted(returned) == list(range(1, 21))  # no lost update: every attempt counted once
    assert returned.count(5) == 1  # exactly one attempt crossed the quarantine threshold
    record = FailureRecords(tmp_path).get("k")
    assert record["attempts"] == 20 and record["quarantined"] is True
    assert sorted(record["hosts"]) == ["hostA", "hostB"]
    assert record["last_error"].startswith("boom from host")


def test_quarantine_and_fingerprint_change_and_retry(tmp_path):
    a = FailureRecords(tmp_path, max_attempts=3, host="A")
    b = FailureRecords(tmp_path, max_attempts=3, host="B")
    assert a.record_failure("k1", "fp1", "bad\nheader", "s1/TS_01") == 1
    assert b.record_failure("k1", "fp1", "bad header", "s1/TS_01") == 2
    assert not a.is_quarantined("k1", "fp1")
    assert a.record_failure("k1", "fp1", "bad header", "s1/TS_01") == 3
    assert a.is_quarantined("k1", "fp1") and b.is_quarantined("k1", "fp1")
    assert a.get("k1")["last_error"] == "bad header"
    # The input changed: a new file deserves new attempts.
    assert not a.is_quarantined("k1", "fp2")
    assert a.record_failure("k1", "fp2", "again", "s1/TS_01") == 1
    assert not a.is_quarantined("k1", "fp2")
    for _ in range(3):
        a.record_failure("k2", "fpx", "nan", "s2/TS_02")
    snapshot = status_snapshot(tmp_path)
    assert snapshot["counts"]["failed"] == 1 and snapshot["counts"]["quarantined"] == 1
    assert snapshot["quarantined"][0]["target"] == "s2/TS_02"
    assert a.retry("nothing-like-it") == 0
    assert a.retry("TS_02") == 1  # by stem
    assert not a.is_quarantined("k2", "fpx") and a.attempts("k2", "fpx") == 0
    assert a.retry("S1/TS_01") == 0 and a.retry("1/TS_01") == 0  # whole path components only
    assert a.retry("s1/TS_01") == 1  # by relative path
    a.record_failure("k4", "f", "x", str(tmp_path / "outputs" / "s3" / "TS_04"))
    assert a.retry("s3/TS_04") == 1  # an absolute target matches by its tail
    a.record_failure("k3", "f", "x")
    assert a.retry(None) == 1 and a.all() == {}


def _write_summary(folder: Path, sha: str, fingerprint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"model": {"name": "m", "version": 2, "sha256": sha},
               "input": {"fingerprint": fingerprint}}
    (folder / f"{folder.name}_summary.json").write_text(json.dumps(summary))


def test_done_marker_names_model_and_fingerprint(tmp_path):
    folder = tmp_path / "s1" / "TS_01"
    assert not is_done(folder, "sha-a", "fp")
    _write_summary(folder, "sha-a", "fp")
    assert is_done(folder, "sha-a", "fp")
    assert is_done(folder, None, "fp")  # any model (resegment_on_model_change: false)
    assert not is_done(folder, "sha-b", "fp")
    assert not is_done(folder, "sha-a", "other-fp")
    (folder / "TS_01_summary.json").write_text('{"model": ')  # torn
    assert not is_done(folder, None, "fp")
    _write_summary(tmp_path / "TS_02", "sha-a", "fp")
    (tmp_path / ".TS_03.tmp-1234").mkdir()
    _write_summary(tmp_path / ".TS_03.tmp-1234" / "TS_03", "sha-a", "fp")  # unpublished: ignored
    snapshot = status_snapshot(tmp_path)
    assert snapshot["counts"]["done"] == 2  # published folders with a summary (not parsed)
    assert sorted(n["folder"] for n in snapshot["newest"]) == ["TS_02", "s1/TS_01"]


def test_input_fingerprint_changes_with_content_or_mtime(tmp_path):
    path = tmp_path / "a.mrc"
    path.write_bytes(b"\0" * 2048)
    first = input_fingerprint(path)
    assert first == input_fingerprint(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    second = input_fingerprint(path)
    assert second != first and second.startswith("2048-1000000000-")
    with open(path, "r+b") as handle:
        handle.write(b"MRC")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert input_fingerprint(path) != second  # same size and mtime, different header bytes
