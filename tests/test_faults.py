"""Faults that are not the tomogram's (issue 15, items 1 and 2): a worker that stops making
progress is killed and replaced, a full output disk pauses new work and says so; neither is
counted against the tomogram, and both are retried until they succeed.

The daemon tests run the real daemon; the stalled worker is a real SIGSTOP (parked first with
a stage hold, so it is provably mid-tomogram whatever the machine's speed), the full disk a
real tmpfs (root only: mounting needs it)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import urllib.request

import pytest
import torch
from tomolive.core.volume import VolumeError
from tomolive.daemon.failure_records import FailureRecords
from tomolive.daemon.faults import (
    ENVIRONMENT,
    INPUT,
    INTERNAL,
    classify_error,
    explain_death,
    fault_backoff_s,
    is_device_error,
)
from tomolive.daemon.status import format_status, status_snapshot

from .daemon_harness import (
    Daemon,
    mount_tmpfs,
    partial_outputs,
    pid_alive,
    tomogram_bytes,
    unfinished_files,
    wait_until,
    write_tiny_model,
)


def test_errors_are_classified_by_whose_fault_they_are(tmp_path):
    assert classify_error(OSError(errno.ENOSPC, "No space left on device")) == ENVIRONMENT
    assert classify_error(PermissionError(errno.EACCES, "Permission denied")) == ENVIRONMENT
    assert classify_error(MemoryError()) == ENVIRONMENT
    assert classify_error(VolumeError(f"{tmp_path}/a.mrc: truncated")) == INPUT
    assert classify_error(ValueError("absurd header")) == INPUT
    assert classify_error(FileNotFoundError(errno.ENOENT, "gone")) == INPUT
    assert classify_error(RuntimeError("shapes cannot be multiplied")) == INTERNAL
    # Device errors are the machine's: they pause the device, never quarantine the tomogram.
    for device_error in (RuntimeError("CUDA error: an illegal memory access was encountered"),
                         torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                         RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")):
        assert is_device_error(device_error) and classify_error(device_error) == ENVIRONMENT
    assert not is_device_error(RuntimeError("shapes cannot be multiplied"))
    assert not is_device_error(MemoryError())  # host memory: not a device to pause


def test_a_worker_death_names_its_cause(tmp_path):
    sigbus = -signal.SIGBUS
    plain = explain_death(sigbus, "/in/a.mrc", str(tmp_path), input_changed=False)
    assert plain.category == INPUT and "SIGBUS" in plain.message and not plain.disk_full
    moved = explain_death(sigbus, "/in/a.mrc", str(tmp_path), input_changed=True)
    assert moved.category == ENVIRONMENT and "overwritten" in moved.message
    segfault = explain_death(-signal.SIGSEGV, "/in/a.mrc", str(tmp_path), False)
    assert segfault.category == INPUT and "(exit code -11)" in segfault.message
    assert explain_death(-signal.SIGKILL, "/in/a.mrc", str(tmp_path), False).category \
        == ENVIRONMENT


def test_fault_delays_double_up_to_a_bound():
    assert [fault_backoff_s(n, 30.0) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]
    assert fault_backoff_s(20, 30.0) == 300.0


def test_faults_are_recorded_but_never_quarantine(tmp_path):
    records = FailureRecords(tmp_path, max_attempts=2)
    for n in range(1, 6):
        assert records.record_fault("k", "fp", "/in/a.mrc: disk full", ENVIRONMENT, "a") == n
    assert records.attempts("k", "fp") == 0 and not records.is_quarantined("k", "fp")
    report = status_snapshot(tmp_path)
    assert report["counts"]["quarantined"] == 0
    assert report["failed"][0]["category"] == ENVIRONMENT
    assert "(0 attempts, 5 environment faults not counted): /in/a.mrc: disk full" \
        in format_status(report)
    assert records.record_failure("k", "fp", "/in/a.mrc: truncated") == 1  # input: counted
    assert records.get("k")["last_category"] == INPUT


def _scrape(d: Daemon) -> str:
    with urllib.request.urlopen(f"{d.metrics_url()}/metrics", timeout=10) as response:
        return response.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    selector = re.escape(f"{name}{{{label_text}}}" if labels else name)
    match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _healthz(d: Daemon) -> int:
    try:
        with urllib.request.urlopen(f"{d.metrics_url()}/healthz", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_worker_is_killed_replaced_and_its_tomogram_done_without_an_attempt(tmp_path):
    d = Daemon(tmp_path, worker_stall_seconds=4.0)
    write_tiny_model(d.models / "tiny.safetensors")
    d.hold("stuck", "read")
    try:
        d.start()
        (d.incoming / "stuck.mrc").write_bytes(tomogram_bytes(5))
        pid = int(d.wait_held("stuck").split()[1])
        os.kill(pid, signal.SIGSTOP)  # the worker can no longer prove progress
        d.release("stuck")  # it would go on if it could: only the stop holds it now
        d.wait_for_log(r"stuck\.mrc: worker cpu w0 made no progress for \d+s after stage "
                       r"read; killed and replaced \(internal fault, not counted")
        assert d.wait_for(lambda: not pid_alive(pid), 30, f"stopped worker {pid} to be gone")
        summary = d.wait_for_summary("stuck")
        assert summary["input"]["path"].endswith("stuck.mrc")
        assert "attempt 1/" not in d.log and "quarantined" not in d.log, d.log
        d.wait_for_failure_records_cleared()
        assert partial_outputs(d.outputs) == []
        metrics = _scrape(d)
        assert _sample(metrics, "tomolive_worker_stalls_total", device="cpu") >= 1
        assert _sample(metrics, "tomolive_faults_total", category="internal") >= 1
        assert _sample(metrics, "tomolive_unkillable_workers") == 0
        assert _healthz(d) == 200
        assert d.stop() == 0
        assert unfinished_files(d.outputs) == []  # no write in flight now: none half-done
    finally:
        with_pid = locals().get("pid")
        if with_pid and pid_alive(with_pid):
            os.kill(with_pid, signal.SIGKILL)
        d.kill()


def test_a_device_error_pauses_the_device_restarts_its_worker_and_retries_uncounted(tmp_path):
    # max_attempts 1: had the device's error been counted against "sick", it would be
    # quarantined at once instead of done.
    d = Daemon(tmp_path, max_attempts=1)
    write_tiny_model(d.models / "tiny.safetensors")
    (d.hold_dir / "sick.drill").write_text("device")  # fails the first attempt, once read
    d.hold("sick", "read")
    try:
        d.start()
        (d.incoming / "sick.mrc").write_bytes(tomogram_bytes(6))
        pid = int(d.wait_held("sick").split()[1])
        d.release("sick")
        d.wait_for_log(r"device cpu w0 paused for \d+s after a device error \(1 in a row; "
                       r"worker restarted\): .*sick\.mrc: CUDA error: an illegal memory access")
        d.wait_for_log(r"sick\.mrc: .*\(environment fault, not counted against the tomogram")
        assert d.wait_for(lambda: not pid_alive(pid), 30, f"the faulted worker {pid} to exit")
        assert d.wait_for_summary("sick")["input"]["path"].endswith("sick.mrc")
        (d.incoming / "well.mrc").write_bytes(tomogram_bytes(7))
        d.wait_for_summary("well")
        assert "quarantined" not in d.log, d.log
        metrics = _scrape(d)
        assert _sample(metrics, "tomolive_device_pauses_total", device="cpu") == 1
        assert _sample(metrics, "tomolive_paused_workers", device="cpu") == 0
        assert _sample(metrics, "tomolive_faults_total", category="environment") == 1
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_output_disk_pauses_work_names_the_cause_and_resumes_when_freed(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the output disk needs root")
    d = Daemon(tmp_path, max_attempts=2)
    write_tiny_model(d.models / "tiny.safetensors")
    mount_tmpfs(d.outputs, "4m")  # room for about two results of 32x128x128 (1.6 MB each)
    stems = [f"full{i}" for i in range(6)]
    try:
        for i, stem in enumerate(stems):
            (d.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(40 + i, (32, 128, 128)))
        d.start()
        d.wait_for_log(r"No space left on device")
        d.wait_for_log(r"output disk full under .*: no new tomograms start")
        d.wait_for(lambda: _sample(_scrape(d), "tomolive_dispatch_paused") == 1, 30, "paused")
        assert "quarantined" not in d.log and "attempt 1/" not in d.log, d.log
        mount_tmpfs(d.outputs, "64m", remount=True)
        d.wait_for_log(r"output disk has \d+ MB free again: starting tomograms")
        wait_until(lambda: all(d.summary(s) for s in stems), 120, "every summary",
                   lambda: d.log[-3000:])
        assert "quarantined" not in d.log, d.log
        d.wait_for_failure_records_cleared()
        assert partial_outputs(d.outputs) == []
        metrics = _scrape(d)
        assert _sample(metrics, "tomolive_faults_total", category="environment") >= 1
        assert _sample(metrics, "tomolive_dispatch_paused") == 0
        assert d.stop() == 0
        assert unfinished_files(d.outputs) == []
    finally:
        d.kill()
        subprocess.run(["umount", "-l", str(d.outputs)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_crash_whose_input_then_vanished_leaves_nothing_behind_after_restart(tmp_path):
    d = Daemon(tmp_path)
    write_tiny_model(d.models / "tiny.safetensors")
    d.hold("gone", "publish")  # the result is written under its temporary name
    leases = d.outputs / ".tomolive" / "leases"
    try:
        d.start()
        (d.incoming / "gone.mrc").write_bytes(tomogram_bytes(7))
        worker_pid = int(d.wait_held("gone").split()[1])
        assert partial_outputs(d.outputs) and list(leases.glob("*.lease"))
        d.kill()  # SIGKILL mid-write; the worker dies with it (PR_SET_PDEATHSIG)
        wait_until(lambda: not pid_alive(worker_pid), 30, "the worker to die with the daemon")
        (d.incoming / "gone.mrc").unlink()
        d.release("gone")
        d.start()
        d.wait_for_log(r"cleaned up after a crashed holder of gone")
        assert not list(leases.glob("*.lease")) and not list(leases.glob(".*.beat"))
        assert partial_outputs(d.outputs) == []
        report = status_snapshot(d.outputs)
        assert report["counts"]["running"] == 0 and report["running"] == [], report
        assert d.stop() == 0
    finally:
        d.kill()
