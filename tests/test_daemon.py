"""The real daemon as a subprocess (issue 5): discovery, completeness, hot reload, bad inputs,
SIGTERM, restart, systemd notify, polling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from tomolive.core.fingerprint import input_fingerprint
from tomolive.core.model import load_bundle
from tomolive.core.result_folder import output_paths

from .daemon_harness import (
    Daemon,
    partial_outputs,
    tomogram_bytes,
    write_slowly,
    write_tiny_model,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def daemon(tmp_path, make_daemon):
    """Daemons sharing tmp_path's folders, served model-a unless a test drops others."""

    def make(**overrides) -> Daemon:
        d = make_daemon(root=tmp_path, **overrides)
        if not any(d.models.iterdir()):
            write_tiny_model(d.models / "a.safetensors", name="model-a")
        return d

    return make


def _contract_files_present(d: Daemon, stem: str) -> None:
    bundle = load_bundle(next(d.models.glob("a.safetensors")))
    expected = output_paths(d.outputs, stem, bundle.classes)
    for path in expected.values():
        assert path.exists(), path
    assert {p.name for p in (d.outputs / stem).iterdir()} == {p.name for p in expected.values()}


def test_backlog_slow_write_and_rename_each_processed_once(daemon, tmp_path):
    d = daemon()
    (d.incoming / "backlog.mrc").write_bytes(tomogram_bytes(1))
    d.start()
    d.wait_for_summary("backlog")
    # Written slowly under its final name, with pauses longer than the settle time: the
    # header check must keep the daemon from reading it before it is complete.
    slow = d.incoming / "slow.mrc"
    write_slowly(slow, tomogram_bytes(2), chunks=5, pause_s=0.8)
    staged = tmp_path / "staged.mrc"
    staged.write_bytes(tomogram_bytes(3))
    os.rename(staged, d.incoming / "renamed.mrc")
    for stem in ("slow", "renamed"):
        d.wait_for_summary(stem)
    d.wait_for_rescans(2)  # nothing may be processed twice
    log = d.log
    for stem in ("backlog", "slow", "renamed"):
        assert log.count(f"{stem}.mrc: ok") == 1, log
        _contract_files_present(d, stem)
    assert d.summary("slow")["input"]["fingerprint"] == input_fingerprint(slow)
    assert "error" not in log.lower(), log
    assert d.stop() == 0


def test_hot_reload_waits_for_complete_model_and_rejects_corrupt(daemon, tmp_path):
    d = daemon()
    d.start()
    d.wait_for_log(r"serving model model-a v1")
    new_model = write_tiny_model(tmp_path / "b.staging", name="model-b", version=2, seed=1)
    # Copied in slowly under its final name: must not be loaded before it is complete.
    write_slowly(d.models / "b.safetensors", new_model.read_bytes(), chunks=4, pause_s=0.15)
    d.wait_for_log(r"serving model model-b v2")
    assert "rejected" not in d.log
    (d.incoming / "t1.mrc").write_bytes(tomogram_bytes(4))
    assert d.wait_for_summary("t1")["model"]["name"] == "model-b"
    # A corrupt bundle, newer than the others: rejected, and model-b keeps serving.
    (d.models / "c.safetensors").write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{not json")
    d.wait_for_log(r"model .*c\.safetensors rejected")
    (d.incoming / "t2.mrc").write_bytes(tomogram_bytes(5))
    assert d.wait_for_summary("t2")["model"]["name"] == "model-b"
    assert d.stop() == 0


def test_bad_inputs_are_quarantined_and_work_goes_on(daemon):
    d = daemon()
    blob = tomogram_bytes(6)
    (d.incoming / "truncated.mrc").write_bytes(blob[: len(blob) // 2])
    (d.incoming / "text.mrc").write_text("this is not a tomogram\n" * 100)
    (d.incoming / "nan.mrc").write_bytes(tomogram_bytes(7, nan=True))
    d.start()
    failures = d.outputs / ".tomolive" / "failures"

    def quarantined() -> dict[str, dict]:
        records = {}
        for path in failures.glob("*.json") if failures.is_dir() else []:
            record = json.loads(path.read_text())
            if record.get("quarantined"):
                records[record["target"]] = record
        return records if len(records) == 3 else None

    records = d.wait_for(quarantined, 90, "three quarantined inputs")
    assert "header implies" in records["truncated"]["last_error"]
    assert "not an MRC file" in records["text"]["last_error"]
    assert "NaN" in records["nan"]["last_error"] or "non-finite" in records["nan"]["last_error"]
    for record in records.values():
        assert record["attempts"] == 2
    (d.incoming / "good.mrc").write_bytes(tomogram_bytes(8))
    d.wait_for_summary("good")
    assert d.process.poll() is None
    assert d.stop() == 0


def test_a_quarantined_file_whose_transfer_resumes_is_read_only_once_complete(daemon):
    # Each paused piece is seen by two rescans (about 2 s) and stays far from the 8 s after
    # which an unchanged short file counts as truncated.
    d = daemon(truncated_after_seconds=8.0)
    blob = tomogram_bytes(16)
    resumed = d.incoming / "resumed.mrc"
    resumed.write_bytes(blob[: len(blob) // 3])  # the transfer stalls
    d.start()
    d.wait_for_log(r"resumed\.mrc: .*truncated.*attempt 2/2, quarantined")
    failures_before = d.log.count("resumed.mrc: file is")
    # The transfer resumes in pieces, each seen by several rescans, so that a retry that
    # skipped the completeness check would read it mid-write (and fail it again).
    d.append_seen(resumed, blob[len(blob) // 3:], pieces=4, rescans=2)
    summary = d.wait_for_summary("resumed")
    assert summary["input"]["fingerprint"] == input_fingerprint(resumed)
    assert d.log.count("resumed.mrc: file is") == failures_before, d.log  # never read torn
    # The worker publishes the summary; the service clears the failure record once it hears
    # of the success, an instant later: wait for that state, do not assume it came first.
    failures = d.outputs / ".tomolive" / "failures"
    d.wait_for(lambda: not list(failures.glob("*.json")), 30, "the failure record cleared")
    assert d.stop() == 0


def test_sigterm_mid_tomogram_leaves_no_partial_output_and_restart_finishes(daemon):
    d = daemon(shutdown_grace_seconds=0.5)
    (d.incoming / "big.mrc").write_bytes(tomogram_bytes(9))
    # Parked once inference is done: mid-tomogram on any machine, however fast. It is never
    # released, so only the grace period can end it (else the wait below times out).
    d.hold("big", "inference")
    d.start()
    d.wait_held("big")
    assert list((d.outputs / ".tomolive" / "leases").glob("*.lease"))
    d.signal(signal.SIGTERM)
    assert d.process.wait(timeout=60) == 0
    assert not (d.outputs / "big").exists()
    assert partial_outputs(d.outputs) == []
    assert list((d.outputs / ".tomolive" / "leases").glob("*.lease")) == []
    assert "abandoned" in d.log
    d2 = daemon()
    d2.start()
    d2.wait_for_summary("big", timeout_s=180)
    assert d2.stop() == 0


def test_systemd_notify_ready_watchdog_stopping(daemon, tmp_path):
    socket_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(socket_path))
    sock.settimeout(1.0)
    d = daemon()
    d.start(env={"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": "1000000"})
    received: list[str] = []

    def receive_until(field: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                received.extend(sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                continue
            if field in received:
                return
        raise AssertionError(f"{field} not received; got {received}\n{d.log[-2000:]}")

    try:
        receive_until("READY=1", 60)
        receive_until("WATCHDOG=1", 10)
        assert any(f.startswith("STATUS=queue") for f in received)
        d.signal(signal.SIGTERM)
        receive_until("STOPPING=1", 30)
        assert d.process.wait(timeout=30) == 0
    finally:
        sock.close()


def test_polling_discovery(daemon):
    d = daemon(discovery="polling")
    d.start()
    d.wait_for_log(r"watching .*incoming \(polling\)")
    write_slowly(d.incoming / "polled.mrc", tomogram_bytes(10), chunks=3, pause_s=0.2)
    d.wait_for_summary("polled")
    assert d.stop() == 0


def test_already_finished_tomograms_are_not_redone_after_restart(daemon):
    d = daemon()
    (d.incoming / "once.mrc").write_bytes(tomogram_bytes(11))
    d.start()
    d.wait_for_summary("once")
    assert d.stop() == 0
    d.start()
    d.wait_for(lambda: d.log.count("tomolive serving") == 2, 60, "the second start")
    d.wait_for_rescans(2)
    assert d.log.count("once.mrc: ok") == 1
    assert d.stop() == 0
    shutil.rmtree(d.outputs / "once")


def test_sighup_reloads_configuration_without_dropping_work(daemon, tmp_path):
    d = daemon()
    (d.incoming / "before.mrc").write_bytes(tomogram_bytes(12))
    d.hold("before", "rescale")  # SIGHUP must find it mid-way, on any machine
    d.start()
    d.wait_held("before")
    second = tmp_path / "second"
    second.mkdir()
    config = yaml.safe_load(d.config_path.read_text())
    config["watch"].append({"path": str(second), "patterns": ["*.mrc"]})
    d.config_path.write_text(yaml.safe_dump(config))
    d.signal(signal.SIGHUP)  # while `before` is being segmented
    d.wait_for_log(r"configuration reloaded")
    d.release("before")
    (second / "after.mrc").write_bytes(tomogram_bytes(13))
    d.wait_for_summary("before")
    d.wait_for_summary("after")
    assert d.log.count("before.mrc: ok") == 1
    assert "abandoned" not in d.log
    assert d.stop() == 0


def test_status_and_retry_commands(daemon):
    d = daemon()
    (d.incoming / "fine.mrc").write_bytes(tomogram_bytes(14))
    (d.incoming / "broken.mrc").write_text("not a tomogram\n" * 100)
    d.start()
    d.wait_for_summary("fine")
    records = d.outputs / ".tomolive" / "failures"
    d.wait_for(lambda: any(json.loads(p.read_text()).get("quarantined")
                           for p in records.glob("*.json")) if records.is_dir() else None,
               60, "quarantine")
    assert d.stop() == 0
    status = _tomolive("status", "--config", d.config_path)
    assert status.returncode == 0, status.stderr
    first = status.stdout.splitlines()[0]
    assert "1 done" in first and "1 quarantined" in first and "0 running" in first, first
    assert "broken" in status.stdout and "not an MRC file" in status.stdout
    as_json = json.loads(_tomolive("status", "--config", d.config_path, "--json").stdout)
    assert as_json["counts"]["done"] == 1 and as_json["counts"]["waiting"] == 0
    retry = _tomolive("retry", "broken", "--config", d.config_path)
    assert retry.returncode == 0 and "cleared 1" in retry.stdout, retry.stdout + retry.stderr
    after = json.loads(_tomolive("status", "--config", d.config_path, "--json").stdout)
    assert after["counts"]["quarantined"] == 0 and after["counts"]["waiting"] == 1


def _tomolive(*args):
    return subprocess.run([sys.executable, "-m", "tomolive", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_resegment_on_model_change_after_new_arrivals(daemon, tmp_path):
    d = daemon(resegment_on_model_change=True)
    (d.incoming / "early.mrc").write_bytes(tomogram_bytes(15))
    d.start()
    assert d.wait_for_summary("early")["model"]["name"] == "model-a"
    new_model = write_tiny_model(tmp_path / "b.staging", name="model-b", version=2, seed=1)
    shutil.copyfile(new_model, d.models / ".b.partial")
    os.rename(d.models / ".b.partial", d.models / "b.safetensors")  # published atomically
    d.wait_for_log(r"serving model model-b v2")
    d.wait_for_log(r"early\.mrc: ok .*model=model-b v2 \(re-segmented\)", 90)
    assert d.summary("early")["model"]["name"] == "model-b"
    assert d.log.count("early.mrc: ok") == 2
    assert d.stop() == 0


def test_retry_while_running_offers_a_quarantined_tomogram_again(daemon):
    d = daemon()
    (d.incoming / "junk.mrc").write_text("not a tomogram\n" * 100)
    os.mkfifo(d.incoming / "pipe.mrc")  # a FIFO would block any reader: never picked up
    d.start()
    d.wait_for_log(r"junk\.mrc: not an MRC file.*attempt 2/2, quarantined")
    retry = _tomolive("retry", "junk", "--config", d.config_path)
    assert retry.returncode == 0, retry.stderr
    d.wait_for(lambda: d.log.count("attempt 1/2") == 2, 60, "a new first attempt")
    assert "pipe.mrc" not in d.log
    assert d.process.poll() is None
    assert d.stop() == 0


def test_several_workers_pull_from_one_queue(daemon):
    """Two worker processes on one device (as `workers_per_gpu` gives each GPU, so that one
    worker's CPU stages overlap the other's inference): every tomogram done once, by both."""
    d = daemon(cpu_workers=2)
    for i in range(6):
        (d.incoming / f"w{i}.mrc").write_bytes(tomogram_bytes(20 + i, shape_zyx=(32, 96, 96)))
    d.start()
    for i in range(6):
        d.wait_for_summary(f"w{i}")
    d.wait_for(lambda: d.log.count(": ok in") == 6, 30, "six log lines")
    for i in range(6):
        assert d.log.count(f"w{i}.mrc: ok") == 1
    assert " on cpu w0 (" in d.log and " on cpu w1 (" in d.log, d.log
    assert d.stop() == 0


def test_a_new_model_that_fails_every_tomogram_is_taken_out_of_service(daemon):
    # Model b is well-formed and passes validation, but at 1.6 Å every 10 Å tomogram needs
    # a model grid above this daemon's max_model_voxels: each one fails, "its own fault".
    d = daemon(max_model_voxels=2_000_000, model_failure_limit=2, max_attempts=3)
    (d.incoming / "t0.mrc").write_bytes(tomogram_bytes(30))
    d.start()
    assert d.wait_for_summary("t0")["model"]["name"] == "model-a"
    write_tiny_model(d.models / "b.safetensors", name="model-b", voxel_size_a=1.6)
    d.wait_for_log(r"serving model model-b v1")
    for name in ("t1", "t2"):
        (d.incoming / f"{name}.mrc").write_bytes(tomogram_bytes(31 + len(name)))
    d.wait_for_log(r"model model-b v1 \(\w+\) taken out of service: its first 2 tomograms "
                   r"all failed")
    for name in ("t1", "t2"):
        assert d.wait_for_summary(name)["model"]["name"] == "model-a"
    assert d.log.count("serving model model-a v1") == 2, d.log  # at start, and restored
    assert "quarantined" not in d.log
    d.wait_for_failure_records_cleared()
    assert d.stop() == 0


def test_a_backlog_checked_one_file_per_loop_turn_loses_nothing(daemon):
    # discovery_batch_seconds 0: every loop turn checks one found file and leaves the rest
    # for the next turns (what a backlog of tens of thousands does with the default).
    d = daemon(discovery_batch_seconds=0.0)
    stems = [f"b{i}" for i in range(6)]
    for i, stem in enumerate(stems):
        (d.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(60 + i))
    d.start()
    for stem in stems:
        d.wait_for_summary(stem)
    assert d.log.count(": ok in ") == len(stems)
    assert d.stop() == 0


def test_one_bad_file_failing_again_and_again_does_not_condemn_a_new_model(daemon):
    d = daemon(model_failure_limit=2, max_attempts=4)  # the limit counts tomograms, not tries
    blob = tomogram_bytes(70)
    (d.incoming / "cut.mrc").write_bytes(blob[: len(blob) // 2])
    d.start()
    d.wait_for_log(r"cut\.mrc: .*truncated.*attempt 4/4, quarantined")
    (d.incoming / "fine.mrc").write_bytes(tomogram_bytes(71))
    assert d.wait_for_summary("fine")["model"]["name"] == "model-a"
    assert "taken out of service" not in d.log
    assert d.stop() == 0


def test_inputs_sharing_a_stem_get_their_own_output_folders(daemon, tmp_path):
    d = daemon(watch=[{"path": str(tmp_path / "incoming"), "patterns": ["*.mrc", "*.rec"]}])
    (d.incoming / "TS_01.mrc").write_bytes(tomogram_bytes(12))
    d.start()
    assert d.wait_for_summary("TS_01")["input"]["path"].endswith("TS_01.mrc")  # alone: bare
    # A sibling arriving later gets its extension; the finished TS_01 keeps its folder.
    (d.incoming / "TS_01.rec").write_bytes(tomogram_bytes(13))
    assert d.wait_for_summary("TS_01_rec")["input"]["path"].endswith("TS_01.rec")
    # Arriving together, neither takes the bare name.
    (d.incoming / "TS_02.mrc").write_bytes(tomogram_bytes(14))
    (d.incoming / "TS_02.rec").write_bytes(tomogram_bytes(15))
    assert d.wait_for_summary("TS_02_mrc")["input"]["path"].endswith("TS_02.mrc")
    assert d.wait_for_summary("TS_02_rec")["input"]["path"].endswith("TS_02.rec")
    assert d.stop() == 0
    d.start()  # after a restart every input still finds its own result: nothing redone
    d.wait_for(lambda: d.log.count("tomolive serving") == 2, 60, "the second start")
    d.wait_for_rescans(2)
    for name in ("TS_01.mrc", "TS_01.rec", "TS_02.mrc", "TS_02.rec"):
        assert d.log.count(f"{name}: ok") == 1, name
    assert d.stop() == 0
    # Result folders only (beside them the dataset index and the gallery: daemon/gallery.py).
    assert sorted(p.name for p in d.outputs.iterdir() if not p.name.startswith(".")
                  and p.is_dir()) == ["TS_01", "TS_01_rec", "TS_02_mrc", "TS_02_rec"]
    assert {p.name for p in d.outputs.iterdir() if p.is_file()} == {
        "index.csv", "index.star", "index.html"}


def test_save_probabilities_writes_every_class_map_that_repick_then_uses(daemon):
    d = daemon(save_probabilities=True)
    (d.incoming / "soft.mrc").write_bytes(tomogram_bytes(12))
    d.start()
    d.wait_for_summary("soft")
    assert d.stop() == 0
    bundle = load_bundle(next(d.models.glob("a.safetensors")))
    names = tuple(spec.name for spec in bundle.classes)
    expected = output_paths(d.outputs, "soft", bundle.classes, names)
    assert {p.name for p in (d.outputs / "soft").iterdir()} == {p.name for p in expected.values()}
    run = subprocess.run([sys.executable, "-m", "tomolive", "repick", str(d.outputs / "soft")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(expected["summary"].read_text())
    assert summary["settings"]["save_probabilities"] is True and "repick" in summary
