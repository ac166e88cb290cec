"""The daemon's Prometheus metrics.

One `Metrics` object per daemon owns its own `CollectorRegistry` (no global state, so tests can
build several). Worker processes send their per-tomogram summaries to the main process, which
calls the methods here; daemon/http_server.py serves the registry.

Conventions (https://prometheus.io/docs/practices/naming/): names start with `tomolive_`, carry
base units (`_seconds`, `_bytes`, `_ratio`), counters end in `_total`, durations are histograms,
and label values come from small fixed sets (stage, outcome, reload result, device, model class
name). A file name never becomes a label value: that would create one series per tomogram.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import InfoMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..core.result_folder import summary_number
from ..core.specimen_mask import measured_thickness_nm
from ..core.stages import STAGES

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "failed", "quarantined")  # failed = one attempt failed; quarantined = gave up
RELOAD_RESULTS = ("ok", "rejected", "failed")
FAULT_CATEGORIES = ("environment", "internal")  # daemon/faults.py; "input" failures are attempts
# Seconds, from a fast stage of a small tomogram to a whole large tomogram on CPU (an hour).
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                      600.0, 1200.0, 1800.0, 3600.0)
# Mean max class probability inside the specimen, 0..1; finest where models usually sit.
# The model-fit signal, 0..1: the shipped model read 0.06-0.08 on its own kind of data and
# 0.22-0.28 where it failed (issue 21 note); finest between.
UNCERTAIN_BUCKETS = (0.02, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99,
                      1.0)
# The SNR estimate (core.quality.adjacent_slice_snr) read 1.7-3.2 on the validation set's
# realistic tomograms and about 6 on the cartoon demo data: log-spaced around that.
SNR_BUCKETS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0)
# Specimen thickness in metres (Prometheus base units; Grafana shows nm), finest around the
# 100-250 nm of FIB lamellae and core.specimen_mask.THICK_SPECIMEN_NM.
THICKNESS_BUCKETS_M = (50e-9, 75e-9, 100e-9, 125e-9, 150e-9, 175e-9, 200e-9, 250e-9, 300e-9,
                       350e-9, 400e-9, 500e-9, 750e-9, 1000e-9)
# Fractions 0..1 per class (cleanup removed, mean confidence of a class's voxels).
FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

# Label values must come from small sets; these patterns also keep paths out.
_CLASS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_DEVICE_RE = re.compile(r"^(cpu|cuda:\d{1,2})$")
MAX_CLASSES = 64  # a model has a handful of classes; more means a bug, not a bigger model


class _InfoCollector(Collector):
    """An info metric (`NAME_info{...} 1`) whose label set is replaced atomically.

    A Gauge with `remove()` + `set()` would let a scrape in between see no model or two models;
    here a scrape sees the old labels or the new ones, and nothing while no value is set.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._value: dict[str, str] | None = None
        self._lock = threading.Lock()

    def set(self, value: Mapping[str, str] | None) -> None:
        with self._lock:
            self._value = None if value is None else {k: str(v) for k, v in value.items()}

    def get(self) -> dict[str, str] | None:
        with self._lock:
            return None if self._value is None else dict(self._value)

    def collect(self) -> Iterator[InfoMetricFamily]:
        family = InfoMetricFamily(self._name, self._documentation)
        value = self.get()
        if value is not None:
            family.add_metric([], value)
        yield family

    def describe(self) -> Iterator[InfoMetricFamily]:
        # Lets the registry check for name clashes without calling collect().
        yield InfoMetricFamily(self._name, self._documentation)


def _package_version() -> str:
    try:
        return metadata.version("tomolive")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every tomolive metric, in a registry of its own. Thread-safe; call from the main process.

    `devices` and `classes` given up front make their series exist at 0 from the start, so that
    `rate()` and `increase()` see the first event; others are added when first used.
    """

    def __init__(self, devices: Iterable[str] = (), classes: Iterable[str] = (),
                 process_metrics: bool = True, version: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()
        self._classes_seen: set[str] = set()
        self._fraction_classes: set[str] = set()  # classes with a last-tomogram fraction series

        self.discovered = Counter(
            "tomolive_tomograms_discovered_total",
            "Tomograms found complete in the watched folders and queued.", registry=r)
        self.finished = Counter(
            "tomolive_tomograms_finished_total",
            "Tomogram attempts that ended, by outcome: ok, failed (will be retried) or "
            "quarantined (retry limit reached).", ["outcome"], registry=r)
        self.resegmented = Counter(
            "tomolive_tomograms_resegmented_total",
            "Finished tomograms segmented again because the model changed.", registry=r)
        self.rescans = Counter(
            "tomolive_discovery_rescans_total",
            "Rescans of the watched folders (every rescan_interval_seconds, more often when "
            "polling; most list only the folders whose mtime changed): a flat line means "
            "discovery has stopped.", registry=r)
        self.discovery_pending = Gauge(
            "tomolive_discovery_pending",
            "Files seen but not yet judged complete (being written, settling, or a start-up "
            "backlog whose headers are read discovery_batch_seconds per loop turn).", registry=r)
        self.discovery_unchecked = Gauge(
            "tomolive_discovery_unchecked",
            "Files found complete but not yet checked against their results (a start-up "
            "backlog is checked discovery_batch_seconds per loop turn).", registry=r)
        self.queue_length = Gauge(
            "tomolive_queue_length", "Tomograms waiting in the queue.", registry=r)
        self.in_progress = Gauge(
            "tomolive_tomograms_in_progress", "Tomograms being segmented now.", registry=r)
        self.oldest_waiting_age = Gauge(
            "tomolive_queue_oldest_waiting_age_seconds",
            "Age of the oldest tomogram waiting in the queue (0 when the queue is empty).",
            registry=r)
        self._oldest_enqueued_monotonic_s: float | None = None
        self.oldest_waiting_age.set_function(self._oldest_age_s)
        self.last_success = Gauge(
            "tomolive_last_success_timestamp_seconds",
            "Unix time the last tomogram finished ok (the start-up time until the first).",
            registry=r)
        self.last_success.set(time.time())
        self.stage_seconds = Histogram(
            "tomolive_stage_duration_seconds", "Wall-clock seconds per pipeline stage.",
            ["stage"], buckets=DURATION_BUCKETS_S, registry=r)
        self.tomogram_seconds = Histogram(
            "tomolive_tomogram_duration_seconds",
            "Wall-clock seconds per tomogram, end to end (read to summary written).",
            buckets=DURATION_BUCKETS_S, registry=r)
        self.voxels = Counter(
            "tomolive_voxels_processed_total",
            "Voxels of input tomograms segmented (input grid).", registry=r)
        self.particles = Counter(
            "tomolive_particles_found_total", "Particles found, per class.", ["class"],
            registry=r)
        self.filaments = Counter(
            "tomolive_filaments_traced_total", "Filaments traced, per class.", ["class"],
            registry=r)
        self.class_fraction = Gauge(
            "tomolive_last_tomogram_class_volume_ratio",
            "Fraction of the last finished tomogram's volume assigned to each class.",
            ["class"], registry=r)
        self.confidence = Histogram(
            "tomolive_tomogram_confidence_ratio",
            "Per tomogram: mean maximum class probability inside the specimen (0..1). "
            "A drop means the model no longer fits the data.",
            buckets=CONFIDENCE_BUCKETS, registry=r)
        self.last_confidence = Gauge(
            "tomolive_last_tomogram_confidence_ratio",
            "Confidence of the last finished tomogram (see tomolive_tomogram_confidence_ratio).",
            registry=r)
        self.last_confidence.set(math.nan)
        self.uncertain = Histogram(
            "tomolive_tomogram_uncertain_ratio",
            "Per tomogram, the model-fit signal: of the specimen voxels where the model sees "
            "a foreground class (probability > 0.2), the share where no class reaches 0.6. "
            "High when the model does not fit the data.",
            buckets=UNCERTAIN_BUCKETS, registry=r)
        self.last_uncertain = Gauge(
            "tomolive_last_tomogram_uncertain_ratio",
            "The model-fit signal of the last finished tomogram "
            "(see tomolive_tomogram_uncertain_ratio).", registry=r)
        self.last_uncertain.set(math.nan)
        self.snr = Histogram(
            "tomolive_tomogram_snr_ratio",
            "Per tomogram: the input's SNR estimate (signal over noise variance from "
            "neighbouring z-slices, core.quality). For ranking tomograms of one facility; "
            "not an absolute SNR.", buckets=SNR_BUCKETS, registry=r)
        self.thickness = Histogram(
            "tomolive_tomogram_specimen_thickness_meters",
            "Per tomogram: the specimen slab's mean thickness (core.specimen_mask), observed "
            "only when both of its surfaces were found (a slab filling the volume has no "
            "measured thickness).", buckets=THICKNESS_BUCKETS_M, registry=r)
        self.class_confidence = Histogram(
            "tomolive_tomogram_class_confidence_ratio",
            "Per tomogram and class: the mean probability the network gave the label over "
            "the class's voxels (0..1); no observation when the class has none.",
            ["class"], buckets=FRACTION_BUCKETS, registry=r)
        self.cleanup_removed = Histogram(
            "tomolive_tomogram_cleanup_removed_ratio",
            "Per tomogram and class: the fraction of the network's voxels that cleanup's size "
            "rules removed (0..1). High: cleanup, not the network, erased the class.",
            ["class"], buckets=FRACTION_BUCKETS, registry=r)
        self.model_info = _InfoCollector(
            "tomolive_model", "The model bundle serving now (value 1 on its labels).")
        r.register(self.model_info)
        self.model_reloads = Counter(
            "tomolive_model_reloads_total",
            "Attempts to switch to a new model bundle, by result: ok, rejected (validation "
            "failed, the old model keeps serving) or failed (error while switching).",
            ["result"], registry=r)
        self.bundles_rejected = Counter(
            "tomolive_model_bundles_rejected_total",
            "Model bundle files that failed validation and were ignored.", registry=r)
        self.device_busy = Counter(
            "tomolive_device_busy_seconds_total",
            "Seconds each device spent segmenting; rate() of it is the busy fraction.",
            ["device"], registry=r)
        self.device_memory = Gauge(
            "tomolive_device_memory_used_bytes",
            "Accelerator memory in use by the worker, where the device reports it.",
            ["device"], registry=r)
        self.worker_restarts = Counter(
            "tomolive_worker_restarts_total",
            "Worker processes restarted after they died or hung, per device.", ["device"],
            registry=r)
        self.worker_stalls = Counter(
            "tomolive_worker_stalls_total",
            "Workers killed and replaced because they reported no progress for "
            "worker_stall_seconds mid-tomogram (stopped, hung on a mount, deadlocked).",
            ["device"], registry=r)
        self.unkillable_workers = Gauge(
            "tomolive_unkillable_workers",
            "Stalled workers sent SIGKILL that have not died yet (stuck in the kernel, e.g. "
            "on a dead NFS mount); /healthz is 503 while this is above 0.", registry=r)
        self.device_pauses = Counter(
            "tomolive_device_pauses_total",
            "Device errors (CUDA faults, device memory exhausted) after which the device was "
            "paused and its worker restarted; the tomogram is retried, never quarantined for "
            "it.", ["device"], registry=r)
        self.paused_workers = Gauge(
            "tomolive_paused_workers",
            "Workers taking no work for now after a device error, per device.", ["device"],
            registry=r)
        self.faults = Counter(
            "tomolive_faults_total",
            "Failed tomogram attempts that were not the tomogram's fault, by category: "
            "environment (disk full, permissions, memory, device error) or internal (bug, "
            "stall). "
            "Never counted towards quarantine; retried with a growing delay.", ["category"],
            registry=r)
        self.dispatch_paused = Gauge(
            "tomolive_dispatch_paused",
            "1 while no new tomograms are started because the output disk is full.",
            registry=r)
        self.lease_reclaims = Counter(
            "tomolive_lease_reclaims_total",
            "Stale leases of other workers or hosts broken and their tomogram taken over.",
            registry=r)
        self.lease_renewal_failures = Counter(
            "tomolive_lease_renewal_failures_total",
            "Lease heartbeats that failed or found the lease taken; the tomogram was dropped.",
            registry=r)
        self.build_info = _InfoCollector(
            "tomolive_build", "tomolive and Python versions (value 1 on its labels).")
        r.register(self.build_info)
        self.build_info.set({
            "version": version or _package_version(),
            "python": ".".join(str(v) for v in sys.version_info[:3]),
        })
        if process_metrics:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, ...

        for category in FAULT_CATEGORIES:
            self.faults.labels(category)
        for outcome in OUTCOMES:
            self.finished.labels(outcome)
        for result in RELOAD_RESULTS:
            self.model_reloads.labels(result)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for device in devices:
            self._init_device(device)
        for name in classes:
            self._class_label(name)

    # --- the queue and discovery -------------------------------------------------------------

    def rescans_done(self, n: int = 1) -> None:
        """Count `n` rescans of the watched folders (full or incremental)."""
        self.rescans.inc(n)

    def tomograms_discovered(self, n: int = 1) -> None:
        """Count `n` tomograms found complete and queued."""
        self.discovered.inc(n)

    def set_queue(self, waiting: int, in_progress: int,
                  oldest_enqueued_monotonic_s: float | None) -> None:
        """Queue state. `oldest_enqueued_monotonic_s` is `time.monotonic()` when the oldest
        waiting tomogram was queued (None when none waits); its age is computed at scrape time,
        so it keeps growing while the main loop is stuck."""
        self.queue_length.set(waiting)
        self.in_progress.set(in_progress)
        with self._lock:
            self._oldest_enqueued_monotonic_s = (
                oldest_enqueued_monotonic_s if waiting > 0 else None)

    def _oldest_age_s(self) -> float:
        with self._lock:
            since = self._oldest_enqueued_monotonic_s
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    # --- tomograms -------------------------------------------------------------------------

    def observe_tomogram(self, summary: Mapping[str, Any], resegmented: bool = False) -> None:
        """Record one tomogram finished ok from its summary (the STEM_summary.json content).

        Uses `timings_s` ({stage: s, "total": s}), `input.shape_zyx`, `counts.particles` and
        `counts.filaments` ({class: n}), `class_fractions` ({class: fraction}) and
        `confidence`. Missing or malformed parts are skipped with a warning: metrics never
        stop the daemon.
        """
        self.finished.labels("ok").inc()
        if resegmented:
            self.resegmented.inc()
        self.last_success.set(time.time())
        self._observe_timings(summary.get("timings_s") or {})
        shape = (summary.get("input") or {}).get("shape_zyx")
        try:
            self.voxels.inc(math.prod(int(n) for n in shape))
        except (TypeError, ValueError):
            log.warning("metrics: summary has no usable input.shape_zyx: %r", shape)
        counts = summary.get("counts") or {}
        for name, n in (counts.get("particles") or {}).items():
            if self._class_label(name):
                self.particles.labels(name).inc(_non_negative(n))
        for name, n in (counts.get("filaments") or {}).items():
            if self._class_label(name):
                self.filaments.labels(name).inc(_non_negative(n))
        self._set_class_fractions(summary.get("class_fractions") or {})
        self._observe_confidence(summary.get("confidence"))
        self._observe_uncertain(summary.get("uncertain_fraction"))
        self._observe_quality(summary)

    def tomogram_failed(self, quarantined: bool = False) -> None:
        """Count a failed attempt, or the tomogram being quarantined after the last one."""
        self.finished.labels("quarantined" if quarantined else "failed").inc()

    def _observe_timings(self, timings_s: Mapping[str, Any]) -> None:
        for stage, seconds in timings_s.items():
            value = summary_number(seconds)
            if value is None:
                continue
            if stage == "total":
                self.tomogram_seconds.observe(value)
            elif stage in STAGES:
                self.stage_seconds.labels(stage).observe(value)
            else:
                log.warning("metrics: unknown stage %r in summary timings ignored", stage)
        if "total" not in timings_s:
            # Fall back to the sum of the stages, which is what "total" measures minus overhead.
            stage_sum = sum(v for s, v in timings_s.items()
                            if s in STAGES and summary_number(v) is not None)
            if stage_sum > 0:
                self.tomogram_seconds.observe(stage_sum)

    def _set_class_fractions(self, fractions: Mapping[str, Any]) -> None:
        # Last tomogram only: a class the current model lacks must not keep a stale value.
        current = {name: summary_number(value) for name, value in fractions.items()
                   if self._class_label(name)}
        current = {name: value for name, value in current.items() if value is not None}
        with self._lock:
            for name in self._fraction_classes - set(current):
                self.class_fraction.remove(name)
            for name, value in current.items():
                self.class_fraction.labels(name).set(value)
            self._fraction_classes = set(current)

    def _observe_confidence(self, confidence: Any) -> None:
        value = summary_number(confidence)
        if value is None:  # NaN when the specimen mask was empty: not a measurement
            return
        self.confidence.observe(value)
        self.last_confidence.set(value)

    def _observe_uncertain(self, fraction: Any) -> None:
        value = summary_number(fraction)
        if value is None:  # the model saw nothing in the specimen: no measurement
            return
        self.uncertain.observe(value)
        self.last_uncertain.set(value)

    def _observe_quality(self, summary: Mapping[str, Any]) -> None:
        snr = summary_number(summary.get("snr_estimate"))
        if snr is not None:
            self.snr.observe(snr)
        thickness_nm = measured_thickness_nm(summary.get("specimen"))
        if thickness_nm is not None:
            self.thickness.observe(thickness_nm * 1e-9)
        for key, histogram in (("class_confidence", self.class_confidence),
                               ("cleanup_removed_fraction", self.cleanup_removed)):
            values = summary.get(key)
            if not isinstance(values, Mapping):
                continue
            for name, value in values.items():
                number = summary_number(value)
                if number is not None and self._class_label(name):
                    histogram.labels(name).observe(number)

    # --- models ----------------------------------------------------------------------------

    def set_model(self, name: str, version: str, sha256: str,
                  classes: Iterable[str] = ()) -> None:
        """The bundle now serving; replaces the previous model's label set."""
        self.model_info.set({"name": name, "version": str(version), "sha256": sha256})
        for class_name in classes:
            self._class_label(class_name)

    def model_reloaded(self, result: str) -> None:
        """One attempt to switch models: "ok", "rejected" or "failed"."""
        if result not in RELOAD_RESULTS:
            raise ValueError(f"model reload result {result!r} is not one of {RELOAD_RESULTS}")
        self.model_reloads.labels(result).inc()

    def bundle_rejected(self) -> None:
        """A bundle file failed validation (count each file version once)."""
        self.bundles_rejected.inc()

    # --- devices, workers, leases -----------------------------------------------------------

    def device_busy_seconds(self, device: str, seconds: float) -> None:
        """Add seconds a device spent on a tomogram (failed attempts included)."""
        value = summary_number(seconds)
        if self._init_device(device) and value is not None and value > 0:
            self.device_busy.labels(device).inc(value)

    def set_device_memory(self, device: str, used_bytes: int | None) -> None:
        """Memory in use on a device; None removes the series (not measurable there)."""
        if not self._init_device(device):
            return
        if used_bytes is None:
            self.device_memory.remove(device)
        else:
            self.device_memory.labels(device).set(used_bytes)

    def worker_restarted(self, device: str) -> None:
        if self._init_device(device):
            self.worker_restarts.labels(device).inc()

    def worker_stalled(self, device: str) -> None:
        if self._init_device(device):
            self.worker_stalls.labels(device).inc()

    def device_paused(self, device: str) -> None:
        if self._init_device(device):
            self.device_pauses.labels(device).inc()

    def set_paused_workers(self, counts: dict[str, int]) -> None:
        for device, count in counts.items():
            if self._init_device(device):
                self.paused_workers.labels(device).set(count)

    def fault(self, category: str) -> None:
        """A failed attempt that was not the tomogram's fault (not counted as an attempt)."""
        if category in FAULT_CATEGORIES:
            self.faults.labels(category).inc()

    def lease_reclaimed(self) -> None:
        self.lease_reclaims.inc()

    def lease_renewal_failed(self) -> None:
        self.lease_renewal_failures.inc()

    # --- helpers ---------------------------------------------------------------------------

    def _init_device(self, device: str) -> bool:
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            log.warning("metrics: device %r is not 'cpu' or 'cuda:N'; not recorded", device)
            return False
        self.device_busy.labels(device)
        self.worker_restarts.labels(device)
        self.worker_stalls.labels(device)
        self.device_pauses.labels(device)
        return True

    def _class_label(self, name: Any) -> bool:
        """True when `name` may be a class label value (and starts its per-class series)."""
        with self._lock:
            if name in self._classes_seen:
                return True
            if not isinstance(name, str) or not _CLASS_RE.match(name):
                log.warning("metrics: class name %r is not a valid label value; ignored", name)
                return False
            if len(self._classes_seen) >= MAX_CLASSES:
                log.warning("metrics: more than %d class names; %r ignored", MAX_CLASSES, name)
                return False
            self._classes_seen.add(name)
        self.particles.labels(name)
        self.filaments.labels(name)
        return True


def _non_negative(value: Any) -> float:
    result = summary_number(value)
    return result if result is not None and result > 0 else 0.0
