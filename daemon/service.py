"""The main loop of `tomolive run`: discovery -> queue -> leases -> workers -> metrics.

One thread runs the loop; it alone touches the queue, the leases and the failure records.
Signals only set flags. SIGTERM: stop taking work, let running tomograms finish within
`shutdown_grace_seconds`, abandon the rest cleanly (workers stopped, temporary output folders
removed, leases released), exit 0. SIGHUP: reload the configuration without dropping work.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.fingerprint import input_fingerprint
from ..core.result_folder import recover_interrupted_publish
from . import claim_sequence
from .config import Config, ConfigError, load_config
from .failure_records import FailureRecords
from .faults import (
    ENVIRONMENT,
    FULL_DISK_FREE_BYTES,
    INPUT,
    WorkerDeath,
    disk_is_full,
    explain_death,
    fault_backoff_s,
)
from .gallery import Gallery, SessionPages
from .http_server import HttpServer
from .leases import Lease, LeaseLost, LeaseManager, lease_key
from .messages import (
    Job,
    JobAbandoned,
    JobDone,
    JobFailed,
    MayPublish,
    Progress,
    WorkerReady,
    WorkerReport,
)
from .metrics import Metrics
from .model_registry import ModelRegistry, ServingModel
from .notify import SystemdNotifier
from .result_lines import served_line
from .scheduler import QueueItem, WorkQueue
from .watcher import FileWatcher
from .workers import WorkerPool

log = logging.getLogger("tomolive.service")

LOOP_WAIT_S = 0.2  # the longest the loop sleeps waiting for worker messages
MODEL_POLL_INTERVAL_S = 1.0
STUCK_AFTER_S = 30.0  # /healthz turns 503 when the loop has not turned for this long


@dataclass
class ModelTrack:
    """How a serving model has done since it started serving (by sha256)."""

    successes: int = 0
    # Its input failures so far, one per tomogram: one bad file failing again and again
    # says nothing about the model.
    failed: dict[Path, QueueItem] = field(default_factory=dict)


@dataclass
class InFlight:
    """A tomogram a worker is segmenting under our lease."""

    item: QueueItem
    lease: Lease
    fingerprint: str
    model: ServingModel
    lease_lost: bool = False


def run_service(config_path: Path | None) -> int:
    """Entry point of `tomolive run`: returns the exit status."""
    try:
        config = load_config(config_path, Path.cwd())
    except ConfigError as error:
        print(f"tomolive: error: {error}", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(config.log_level)
    return Service(config, config_path).run()


class Service:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.host = socket.gethostname()
        self.devices = resolve_devices(config)
        self.notifier = SystemdNotifier()
        self.metrics = Metrics(devices=sorted(set(self.devices)))
        self.queue = WorkQueue(config.order)
        self.in_flight: dict[int, InFlight] = {}
        self._next_job_id = 1
        self._stop_requested = False
        self._reload_requested = False
        self._stopping_since_s: float | None = None
        self._last_tick_s = time.monotonic()
        self._last_model_poll_s = 0.0
        self._last_renew_s = time.monotonic()
        self._finished_ok = 0
        self._warned_no_model = False
        self._parked: dict[Path, QueueItem] = {}  # quarantined or unreadable, looked at again
        # Why each parked unreadable item was last warned about: a result another user left
        # unreadable (0700) would otherwise log the same warning at every rescan, forever.
        self._unreadable_warned: dict[Path, str] = {}
        self._last_parked_check_s = time.monotonic()
        # Faults that were not the tomograms' (daemon/faults.py): retry delays per input, and
        # a pause of all new work while the output disk is full.
        self._unchecked: collections.deque[Any] = collections.deque()  # found, not yet checked
        self._faults_in_a_row: dict[Path, int] = {}
        self._device_faults_in_a_row: dict[int, int] = {}  # per worker index
        self._model_tracks: dict[str, ModelTrack] = {}
        self._unkillable_workers = 0
        self._paused_until_s: float | None = None
        self._resume_free_bytes = FULL_DISK_FREE_BYTES
        self._started_s = time.monotonic()
        self._state_dir = Path(tempfile.mkdtemp(prefix="tomolive-"))
        self._setup_shared_state()

    # --- set-up and tear-down -----------------------------------------------------------------

    def _setup_shared_state(self) -> None:
        config = self.config
        config.output_dir.mkdir(parents=True, exist_ok=True)
        self.leases = LeaseManager(config.output_dir, config.lease_seconds,
                                   on_reclaim=lambda key, old: self._on_reclaim(key, old))
        self.failures = FailureRecords(config.output_dir, config.max_attempts)
        self.gallery = Gallery(config.output_dir)
        from ..core.model import default_bundle_path

        self.registry = ModelRegistry(
            config.models_dir, self._state_dir / "models", policy=config.model,
            settle_s=min(config.settle_seconds, 5.0), default_bundle=default_bundle_path(),
            on_rejected=lambda path, reason: self._on_bundle_rejected(),
            voxel_size_bounds_a=config.voxel_size_bounds_a,
            truncated_after_s=config.truncated_after_seconds)
        self.watcher = FileWatcher(config)

    def _on_bundle_rejected(self) -> None:
        # A failed switch attempt as well as a bad file: the dashboard shows reloads by result.
        self.metrics.bundle_rejected()
        self.metrics.model_reloaded("rejected")

    def _on_reclaim(self, key: str, old: dict[str, Any]) -> None:
        log.warning("lease %s of %s (pid %s) was stale: reclaimed", key, old.get("host"),
                    old.get("pid"))
        self.metrics.lease_reclaimed()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        server = None
        self.pool = WorkerPool(self.devices, threads_per_cpu_worker=self._cpu_threads())
        try:
            if self.config.metrics.enabled:
                pages = SessionPages(self.config.output_dir, local_state=self._page_state)
                server = HttpServer(self.metrics, self.config.metrics.host,
                                       self.config.metrics.port, health=self.healthy,
                                       pages=pages)
                log.info("metrics on %s/metrics", server.url)
            self._switch_model_if_needed(force=True)
            self._sweep_stale_leases()  # a crash of ours before this start leaves no trace
            self.pool.start()
            self.watcher.start()
            log.info("tomolive serving: watching %s, outputs in %s, devices %s",
                     ", ".join(str(w.path) for w in self.config.watch), self.config.output_dir,
                     ",".join(f"{d} w{i}" for i, d in enumerate(self.devices)))
            self.notifier.ready(self._status_text())
            while not self._done_stopping():
                try:
                    self._tick()
                except OSError as error:  # a shared folder gone wrong must not stop the service
                    log.error("main loop: %s; going on", error)
                    time.sleep(1.0)
        finally:
            self._shutdown(server)
        return 0

    def _shutdown(self, server: HttpServer | None) -> None:
        for worker in self.pool.busy_workers():
            job = self.pool.abandon(worker)
            if job is not None:
                self._abandon_job(job.job_id, "shutdown: grace period over")
        self.pool.stop()
        self.watcher.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(self._state_dir, ignore_errors=True)
        log.info("tomolive stopped")

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._reload_requested = True

    def healthy(self) -> bool:
        """For /healthz: the loop turned recently, we are not stopping, and no worker that
        was killed for stalling is still stuck (in the kernel, on a dead mount)."""
        return (self._stopping_since_s is None
                and time.monotonic() - self._last_tick_s < STUCK_AFTER_S
                and self._unkillable_workers == 0)

    # --- the loop -----------------------------------------------------------------------------

    def _done_stopping(self) -> bool:
        if not self._stop_requested:
            return False
        now = time.monotonic()
        if self._stopping_since_s is None:
            self._stopping_since_s = now
            self.notifier.stopping()
            log.info("stopping: %d tomogram(s) running, grace %gs", len(self.in_flight),
                     self.config.shutdown_grace_seconds)
        grace_over = now - self._stopping_since_s >= self.config.shutdown_grace_seconds
        return not self.in_flight or grace_over

    def _tick(self) -> None:
        self._last_tick_s = time.monotonic()
        if self._reload_requested:
            self._reload_config()
        if self._stopping_since_s is None:
            self._switch_model_if_needed()
            self._discover()
            self._dispatch()
        for message in self.pool.messages(LOOP_WAIT_S):
            self._handle(message)
        for worker, job, exitcode in self.pool.reap_dead():
            self.metrics.worker_restarted(worker.device)
            if job is not None:
                self._worker_died(job, exitcode)
        self._reap_stalled()
        self._renew_leases()
        self._publish_state()

    def _publish_state(self) -> None:
        self.metrics.set_queue(len(self.queue), len(self.in_flight),
                               self.queue.oldest_enqueued_s())
        self.metrics.set_paused_workers(self.pool.paused_counts())
        self.metrics.discovery_unchecked.set(len(self._unchecked))
        self.metrics.discovery_pending.set(self.watcher.pending)
        self.notifier.status(self._status_text())
        self.notifier.watchdog()

    def _status_text(self) -> str:
        hours = max((time.monotonic() - self._started_s) / 3600.0, 1e-9)
        model = self.registry.current.label() if self.registry.current else "none"
        return (f"queue {len(self.queue)}, running {len(self.in_flight)}, done "
                f"{self._finished_ok} ({self._finished_ok / hours:.1f}/h), model {model}")

    # --- models -------------------------------------------------------------------------------

    def _switch_model_if_needed(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_model_poll_s < MODEL_POLL_INTERVAL_S:
            return
        self._last_model_poll_s = now
        previous = self.registry.current
        new = self.registry.poll()
        if new is None:
            if self.registry.current is None and not self._warned_no_model:
                self._warned_no_model = True
                log.error("no valid model yet: %s has none and the shipped default model is "
                          "missing; waiting for one", self.config.models_dir)
            return
        self.metrics.set_model(new.name, str(new.version), new.sha256, new.classes)
        self.metrics.model_reloaded("ok")
        log.info("serving model %s from %s", new.label(), new.source)
        # Copies of bundles that were replaced or removed: a daemon that runs for months
        # through many retrained models would otherwise keep every one.
        self.registry.prune_cache({f.model.sha256 for f in self.in_flight.values()})
        if previous is not None and self.config.resegment_on_model_change:
            self._queue_resegmentation()

    def _queue_resegmentation(self) -> None:
        """Finished tomograms go back in the queue, behind new arrivals."""
        for candidate in self.watcher.rescan_all():
            self._enqueue(candidate, resegment=True)

    # --- discovery and dispatch ---------------------------------------------------------------

    def _discover(self) -> None:
        # A file that settled but is not a valid tomogram (garbage, truncated, NaN) is queued
        # like any other: the worker's validation fails it with a clear message, and the
        # failure records count the attempts up to quarantine, across all daemons.
        rescans_before = self.watcher.rescans
        self._unchecked.extend(self.watcher.poll())
        self.metrics.rescans_done(self.watcher.rescans - rescans_before)
        # Checking a candidate reads its header, summary and failure record: tens of
        # thousands at start-up (a backlog on NFS) would hold one loop turn past the systemd
        # watchdog and the lease heartbeats. So at most discovery_batch_seconds per turn; the
        # rest waits in order for the next turns.
        deadline = time.monotonic() + self.config.discovery_batch_seconds
        while self._unchecked:
            self._enqueue(self._unchecked.popleft())
            if time.monotonic() >= deadline:
                break
        now = time.monotonic()
        if now - self._last_parked_check_s >= self.config.rescan_interval_seconds:
            self._last_parked_check_s = now
            self._recheck_parked()
            self._sweep_stale_leases()

    def _enqueue(self, candidate: Any, resegment: bool = False) -> None:
        item = QueueItem(path=candidate.path, out_parent=candidate.out_parent,
                         stem=candidate.stem, key=lease_key(candidate.rel_output),
                         rel_output=candidate.rel_output, mtime_ns=candidate.mtime_ns,
                         voxel_size_a=candidate.voxel_size_a, resegment=resegment)
        self._queue_or_park(item)

    def _queue_or_park(self, item: QueueItem) -> None:
        """Queue `item` if it needs work; park it if it may need work later (quarantined until
        `tomolive retry`, or unreadable for now); drop it if it is done or gone."""
        try:
            status, _ = self._status_of(item)
        except OSError as error:
            if self._unreadable_warned.get(item.path) != str(error):
                self._unreadable_warned[item.path] = str(error)
                log.warning("%s: cannot check it now (%s); will look again at every rescan "
                            "(logged once)", item.path, error)
            status = "unreadable"
        else:
            self._unreadable_warned.pop(item.path, None)
        if status in (claim_sequence.QUARANTINED, "unreadable"):
            self._parked[item.path] = item
            return
        self._parked.pop(item.path, None)
        if status is None and self.queue.add(item):
            self.metrics.tomograms_discovered()

    def _sweep_stale_leases(self) -> None:
        """Leftovers of crashed holders whose tomogram nobody will claim again (its input is
        gone): break the stale lease, remove the temporary output folder, release."""
        ours = {flight.lease.key for flight in self.in_flight.values()}
        root = self.config.output_dir.resolve()
        for lease in self.leases.sweep_stale(ours):
            target = Path(str(lease.record.get("target") or ""))
            parent = (root / target.parent).resolve()
            # A lease file is shared state anyone could write: never clean outside the folder.
            if target.name and not target.is_absolute() and parent.is_relative_to(root):
                recover_interrupted_publish(parent, target.name)
            self._release(lease)
            log.info("cleaned up after a crashed holder of %s", target or lease.key)

    def _recheck_parked(self) -> None:
        for item in list(self._parked.values()):
            self._queue_or_park(item)

    def _status_of(self, item: QueueItem) -> tuple[str | None, str | None]:
        """claim_sequence.needed for `item`. Raises OSError when the shared folder cannot be
        read."""
        return claim_sequence.needed(_work(item), self.failures, self._wanted_model_sha256())

    def _wanted_model_sha256(self) -> str | None:
        # Re-segmentation items exist only with resegment_on_model_change; with it, a result
        # of another model is not done.
        current = self.registry.current
        return current.sha256 if current and self.config.resegment_on_model_change else None

    def _dispatch(self) -> None:
        idle = self.pool.idle_workers()
        if not idle or self.registry.current is None or self._dispatch_paused():
            return
        for item in list(self.queue.ready()):
            if not idle:
                return
            try:
                if self._claim_and_start(item, idle[0]):
                    idle.pop(0)
            except OSError as error:  # the shared folder misbehaves: try this one later
                log.warning("%s: not started (%s); will retry", item.path, error)
                self.queue.defer(item.path, self.config.rescan_interval_seconds)

    def _claim_and_start(self, item: QueueItem, worker: Any) -> bool:
        def unchanged() -> bool:
            # Written to since the watcher judged it complete (a retry, or a quarantined file
            # whose transfer resumed): only the watcher may say it is complete again, and it
            # reports the new version once it is.
            return item.path.stat().st_mtime_ns == item.mtime_ns

        claim = claim_sequence.claim(_work(item), self.leases, self.failures,
                                     self._wanted_model_sha256(), unchanged, worker.device)
        if claim.status == claim_sequence.HELD:
            return False  # another daemon works on it; its lease is watched on later passes
        if claim.status is not None:
            self.queue.remove(item.path)
            if claim.status == claim_sequence.QUARANTINED:
                self._parked[item.path] = item
            elif claim.status == claim_sequence.CHANGED:
                log.info("%s changed since it was found complete; waiting until it is again",
                         item.path)
            return False
        assert claim.lease is not None and claim.fingerprint is not None
        try:
            self._start(worker, item, claim.lease, claim.fingerprint)
        except BaseException:
            self._release(claim.lease)
            raise
        return True

    def _start(self, worker: Any, item: QueueItem, lease: Lease, fingerprint: str) -> None:
        recover_interrupted_publish(item.out_parent, item.stem)  # ours: we hold the lease
        model = self.registry.current
        job = Job(job_id=self._next_job_id, path=str(item.path),
                  out_parent=str(item.out_parent), stem=item.stem,
                  model_path=str(model.cached_path),
                  model_sha256=model.sha256, voxel_size_a=item.voxel_size_a,
                  inference=self._inference_options(),
                  voxel_size_bounds_a=tuple(self.config.voxel_size_bounds_a),
                  max_model_voxels=self.config.max_model_voxels,
                  tilt_series_pattern=self.config.tilt_series_name_pattern,
                  save_probabilities=self.config.save_probabilities,
                  specimen_mask=self.config.specimen_mask)
        self._next_job_id += 1
        self.in_flight[job.job_id] = InFlight(item, lease, fingerprint, model)
        self.queue.remove(item.path)
        self.pool.submit(worker, job)
        log.debug("started %s on %s", item.path, worker.device)

    def _inference_options(self) -> dict[str, Any]:
        inference = self.config.inference
        options: dict[str, Any] = {"batch_size": inference.batch_size,
                                   "precision": inference.precision,
                                   "tta_flips": inference.tta_flips}
        if inference.tile_size_px:
            options["tile_size_px"] = inference.tile_size_px
        return options

    # --- worker messages ----------------------------------------------------------------------

    def _handle(self, message: WorkerReport) -> None:
        if isinstance(message, Progress):
            self.pool.beat(message.job_id, message.stage)
        elif isinstance(message, MayPublish):
            self.pool.reply_publish(message.job_id, self._may_publish(message.job_id))
        elif isinstance(message, JobDone):
            self._job_done(message.job_id, message.summary, message.device_memory_bytes)
        elif isinstance(message, JobFailed):
            self._job_failed(message.job_id, message.error, message.category,
                             device_fault=message.device_fault)
        elif isinstance(message, JobAbandoned):
            self._abandon_job(message.job_id, message.reason)
        elif isinstance(message, WorkerReady):
            log.debug("worker w%d ready (pid %d)", message.index, message.pid)
        else:  # a kind added to messages.py but not here: say so rather than drop it
            log.error("unhandled worker message %r", message)

    def _may_publish(self, job_id: int) -> bool:
        flight = self.in_flight.get(job_id)
        if flight is None or flight.lease_lost:
            return False
        try:
            self.leases.renew(flight.lease)
        except LeaseLost:
            self._lease_lost(flight)
            return False
        except OSError as error:  # cannot prove the lease is ours: do not publish
            self.metrics.lease_renewal_failed()
            log.warning("%s: lease not confirmed (%s); result not published",
                        flight.item.path, error)
            return False
        return True

    def _job_done(self, job_id: int, summary: dict[str, Any], memory_bytes: int | None) -> None:
        flight = self.in_flight.pop(job_id, None)
        finished = self.pool.finish(job_id)
        if flight is None or finished is None:
            return
        worker, job, busy_s = finished
        self._release(flight.lease)
        try:
            self.failures.clear(flight.item.key)
        except OSError as error:
            log.warning("%s: old failure record not cleared: %s", flight.item.path, error)
        self.metrics.device_busy_seconds(worker.device, busy_s)
        self.metrics.set_device_memory(worker.device, memory_bytes)
        self.metrics.observe_tomogram(summary, resegmented=flight.item.resegment)
        self._finished_ok += 1
        self._faults_in_a_row.pop(flight.item.path, None)
        self._device_faults_in_a_row.pop(worker.index, None)
        self._model_tracks.setdefault(flight.model.sha256, ModelTrack()).successes += 1
        device = f"{worker.device} w{worker.index}"
        log.info("%s", served_line(summary, flight.item.path.name, device, flight.item.resegment))
        self._add_to_gallery(flight.item.out_parent / flight.item.stem)

    def _add_to_gallery(self, folder: Path) -> None:
        """The session gallery and dataset index (daemon/gallery.py) after a publish. Under a
        second at 5,000 tomograms; a failure is logged and never fails the tomogram."""
        try:
            seconds = self.gallery.add(folder)
        except Exception as error:  # noqa: BLE001 (a side product: the result is published)
            log.warning("%s: gallery and index not updated: %s", folder, error)
            return
        log.debug("gallery updated in %.3fs", seconds)

    def _page_state(self) -> dict[str, Any]:
        """This daemon's own part of the session page (called from the HTTP thread: reads
        sizes only)."""
        return {"host": self.host, "waiting": len(self.queue)}

    def _job_failed(self, job_id: int, error: str, category: str = INPUT,
                    disk_full: bool = False, device_fault: bool = False) -> None:
        flight = self.in_flight.pop(job_id, None)
        finished = self.pool.finish(job_id)
        if finished is not None:
            self.metrics.device_busy_seconds(finished[0].device, finished[2])
            if device_fault:  # the device's fault, whoever owns the tomogram now
                self._pause_worker(finished[0], error)
        if flight is None:
            return
        # After a stall the worker's error (e.g. its temporary folder removed by the daemon
        # that reclaimed the lease) can arrive before our next heartbeat notices the loss:
        # someone else owns the tomogram now, so this failure is not counted, and their
        # temporary folder is not ours to remove.
        if not self._still_ours(flight):
            log.warning("%s (after losing the lease; not counted)", error)
            return
        recover_interrupted_publish(flight.item.out_parent, flight.item.stem)
        if category != INPUT:
            self._not_the_tomograms_fault(flight, error, category, disk_full)
            return
        try:
            attempts = self.failures.record_failure(flight.item.key, flight.fingerprint,
                                                    error, flight.item.rel_output)
        except OSError as record_error:  # the shared folder's lock timed out: count it later
            log.error("%s (could not record the failure: %s)", error, record_error)
            attempts = 0
        self._release(flight.lease)
        quarantined = attempts >= self.config.max_attempts
        self.metrics.tomogram_failed(quarantined=quarantined)
        log.error("%s (attempt %d/%d%s)", error, attempts, self.config.max_attempts,
                  ", quarantined" if quarantined else ", will retry")
        item = flight.item
        if quarantined:
            self._parked[item.path] = item  # until `tomolive retry` or a changed input
        else:
            item.not_before_monotonic_s = time.monotonic() + self.config.rescan_interval_seconds
            self.queue.add(item)
        self._judge_model(flight.model, item)

    def _judge_model(self, model: ServingModel, failed: QueueItem) -> None:
        """A new model that fails every one of its first `model_failure_limit` tomograms is
        the likelier culprit than the tomograms (a well-formed but absurd bundle): take it out
        of service, and retry what it failed without the attempts it cost."""
        track = self._model_tracks.setdefault(model.sha256, ModelTrack())
        if track.successes:
            return  # it has worked: failures from now on are the tomograms'
        track.failed[failed.path] = failed
        if len(track.failed) < self.config.model_failure_limit:
            return
        current = self.registry.current
        if current is None or current.sha256 != model.sha256 or \
                not self.registry.has_alternative(model):
            return  # nothing to fall back to: keep serving and keep counting
        self.registry.take_out_of_service(
            model, f"its first {len(track.failed)} tomograms all failed (last: "
                   f"{failed.path.name}); the previous model serves again")
        for item in track.failed.values():
            try:
                self.failures.clear(item.key)
            except OSError as error:
                log.warning("%s: failure record not cleared (%s)", item.path, error)
            self._parked.pop(item.path, None)
            item.not_before_monotonic_s = 0.0
            self.queue.add(item)
        track.failed.clear()
        self._switch_model_if_needed(force=True)

    def _not_the_tomograms_fault(self, flight: InFlight, error: str, category: str,
                                 disk_full: bool) -> None:
        """Record and report a fault of the machine or of tomolive; retry the tomogram later,
        with a delay that doubles while the fault repeats, without counting an attempt."""
        item = flight.item
        faults = self._faults_in_a_row.get(item.path, 0) + 1
        self._faults_in_a_row[item.path] = faults
        try:
            self.failures.record_fault(item.key, flight.fingerprint, error, category,
                                       item.rel_output)
        except OSError as record_error:  # the disk that is full may be the one recorded on
            log.warning("%s: fault not recorded (%s)", item.path, record_error)
        self._release(flight.lease)
        self.metrics.fault(category)
        delay_s = fault_backoff_s(faults, self.config.rescan_interval_seconds)
        log.error("%s (%s fault, not counted against the tomogram; retry in %.0fs)", error,
                  category, delay_s)
        if not disk_full and category == ENVIRONMENT:  # an ENOSPC raised, not a SIGBUS
            with contextlib.suppress(OSError):
                disk_full = disk_is_full(item.out_parent)[0]
        if disk_full:
            self._pause_dispatch(delay_s, item.path)
        item.not_before_monotonic_s = time.monotonic() + delay_s
        self.queue.add(item)

    def _pause_worker(self, worker: Any, error: str) -> None:
        """A device error: that device takes no work for a delay that doubles while its
        errors repeat (reset by its next success); the tomogram goes to the queue like any
        fault that was not its own, so another device may take it meanwhile."""
        faults = self._device_faults_in_a_row.get(worker.index, 0) + 1
        self._device_faults_in_a_row[worker.index] = faults
        pause_s = fault_backoff_s(faults, self.config.rescan_interval_seconds)
        self.pool.pause(worker, pause_s)
        self.metrics.device_paused(worker.device)
        log.error("device %s w%d paused for %.0fs after a device error (%d in a row; worker "
                  "restarted): %s", worker.device, worker.index, pause_s, faults, error)

    def _pause_dispatch(self, delay_s: float, failed_input: Path) -> None:
        if self._paused_until_s is None:
            log.error("output disk full under %s: no new tomograms start until space is "
                      "free (checked every %.0fs)", self.config.output_dir,
                      self.config.rescan_interval_seconds)
        with contextlib.suppress(OSError):
            self._resume_free_bytes = max(FULL_DISK_FREE_BYTES, failed_input.stat().st_size)
        self._paused_until_s = time.monotonic() + min(delay_s,
                                                      self.config.rescan_interval_seconds)
        self.metrics.dispatch_paused.set(1)

    def _dispatch_paused(self) -> bool:
        """While paused for a full output disk: look again once the delay is over; resume
        when the space for (at least) the input that failed is free."""
        if self._paused_until_s is None or time.monotonic() < self._paused_until_s:
            return self._paused_until_s is not None
        full, free = disk_is_full(self.config.output_dir, self._resume_free_bytes)
        if full:
            self._paused_until_s = time.monotonic() + self.config.rescan_interval_seconds
            return True
        log.info("output disk has %.0f MB free again: starting tomograms", free / 1e6)
        self._paused_until_s = None
        self.metrics.dispatch_paused.set(0)
        return False

    def _worker_died(self, job: Job, exitcode: int | None) -> None:
        flight = self.in_flight.get(job.job_id)
        changed = False
        if flight is not None:
            try:
                changed = input_fingerprint(flight.item.path) != flight.fingerprint
            except OSError:
                changed = True
        death: WorkerDeath = explain_death(exitcode, job.path, job.out_parent, changed)
        self._job_failed(job.job_id, death.message, death.category, death.disk_full)

    def _reap_stalled(self) -> None:
        """Kill and replace workers that stopped proving progress (see worker_stall_seconds)."""
        stall_s = self.config.worker_stall_seconds
        for worker in self.pool.stalled(stall_s):
            silent_s = time.monotonic() - worker.last_beat_monotonic
            stage = worker.stage
            job = self.pool.kill_stalled(worker)
            self.metrics.worker_stalled(worker.device)
            self.metrics.worker_restarted(worker.device)
            if job is not None:
                self._job_failed(job.job_id, f"{job.path}: worker {worker.device} "
                                             f"w{worker.index} made no progress for "
                                             f"{silent_s:.0f}s after stage {stage}; killed "
                                             "and replaced", "internal")
        # Counted here, in the loop's thread; /healthz (the server's thread) reads the count.
        self._unkillable_workers = self.pool.unkillable()
        self.metrics.unkillable_workers.set(self._unkillable_workers)

    def _abandon_job(self, job_id: int, reason: str) -> None:
        """A job stopped without a result (lease lost, or shutdown): clean up, count nothing."""
        flight = self.in_flight.pop(job_id, None)
        self.pool.finish(job_id)
        if flight is None:
            return
        if self._still_ours(flight):
            recover_interrupted_publish(flight.item.out_parent, flight.item.stem)
            self._release(flight.lease)
        log.warning("%s: abandoned (%s)", flight.item.path, reason)

    def _still_ours(self, flight: InFlight) -> bool:
        """Does the lease file still carry our token? (An unreadable share counts as yes:
        nobody can have taken it without being able to write there.)"""
        if flight.lease_lost:
            return False
        try:
            self.leases.check(flight.lease)
        except LeaseLost:
            self._lease_lost(flight)
            return False
        except OSError:
            return True
        return True

    def _release(self, lease: Lease) -> None:
        try:
            self.leases.release(lease)
        except OSError as error:  # it expires after lease_seconds without heartbeats anyway
            log.warning("lease %s not released (%s); it will expire", lease.key, error)

    # --- leases -------------------------------------------------------------------------------

    def _renew_leases(self) -> None:
        now = time.monotonic()
        if now - self._last_renew_s < self.config.heartbeat_interval_seconds:
            return
        self._last_renew_s = now
        stall_s = self.config.worker_stall_seconds
        for job_id, flight in self.in_flight.items():
            if flight.lease_lost:
                continue
            worker = self.pool.worker_of(job_id)
            if worker is None or time.monotonic() - worker.last_beat_monotonic > stall_s:
                continue  # leases are renewed only while their worker proves progress
            try:
                self.leases.renew(flight.lease)
            except LeaseLost:
                self._lease_lost(flight)
            except OSError as error:  # a network share hiccup: try again next beat
                self.metrics.lease_renewal_failed()
                log.warning("lease renewal for %s failed: %s", flight.item.path, error)

    def _lease_lost(self, flight: InFlight) -> None:
        flight.lease_lost = True
        self.metrics.lease_renewal_failed()
        log.warning("%s: lease lost to another daemon; the result will not be published",
                    flight.item.path)

    # --- configuration ------------------------------------------------------------------------

    def _reload_config(self) -> None:
        self._reload_requested = False
        try:
            new = load_config(self.config_path, Path.cwd())
        except ConfigError as error:
            log.error("configuration not reloaded: %s", error)
            return
        fixed = ("devices", "workers_per_gpu", "cpu_workers", "metrics", "output_dir")
        for name in fixed:
            if getattr(new, name) != getattr(self.config, name):
                log.warning("configuration: %s changed; it takes effect after a restart", name)
                setattr(new, name, getattr(self.config, name))
        self.config = new
        self.queue.order = new.order
        self.failures.max_attempts = new.max_attempts
        self.leases.lease_s = new.lease_seconds
        self.registry.models_dir = new.models_dir
        self.registry.policy = new.model
        self.registry.voxel_size_bounds_a = tuple(new.voxel_size_bounds_a)  # bundles seen later
        self.registry.truncated_after_s = new.truncated_after_seconds
        self.watcher.stop()
        self.watcher = FileWatcher(new)
        self.watcher.start()
        log.info("configuration reloaded from %s", self.config_path or "defaults")

    def _cpu_threads(self) -> int | None:
        import os

        cpu_workers = sum(1 for d in self.devices if d == "cpu")
        return max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None


def resolve_devices(config: Config) -> list[str]:
    """One entry per worker process: `auto` = every visible GPU (else the CPU), `cpu`, or a
    list of GPU ids; each GPU gets `workers_per_gpu` workers, the CPU `cpu_workers`."""
    setting = config.devices
    if setting == "cpu":
        gpus: list[str] = []
    elif isinstance(setting, list):
        gpus = [f"cuda:{int(i)}" for i in setting]
    else:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [f"cuda:{i}" for i in range(count)]
    if not gpus:
        return ["cpu"] * config.cpu_workers
    return [gpu for gpu in gpus for _ in range(config.workers_per_gpu)]


def _work(item: QueueItem) -> claim_sequence.Work:
    return claim_sequence.Work(item.path, item.out_parent / item.stem, item.key, item.rel_output)
