"""Metrics of the running daemon (issue 6): `/metrics` scraped over HTTP while `tomolive run`
processes tomograms, `promtool check metrics` on that scrape, `/healthz` through shutdown, and a
real Prometheus on loopback scraping the daemon and answering through its HTTP API."""

from __future__ import annotations

import hashlib
import http.client
import math
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tomolive.core.specimen_mask import measured_thickness_nm
from tomolive.core.stages import STAGES

from .daemon_harness import tomogram_bytes, write_tiny_model
from .prometheus_harness import running_prometheus, scalar

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

WAIT_S = 120.0  # the first tomogram includes starting a worker and importing torch
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[str, Samples]:
    """The raw `/metrics` text and its samples keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels} in the scrape"
    return samples[key]


def with_name(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def healthz(url: str) -> int | None:
    """HTTP status of /healthz, or None when nothing answers (the daemon has exited)."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected):
        return None


def test_scrape_counters_histograms_promtool_and_healthz(make_daemon) -> None:
    d = make_daemon(shutdown_grace_seconds=4.0)
    model = write_tiny_model(d.models / "a.safetensors", name="model-a", version=3)
    model_sha = hashlib.sha256(model.read_bytes()).hexdigest()
    # Newer than model-a, so the registry looks at it first: rejected, model-a serves.
    (d.models / "b.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    stems = ["t1", "t2", "t3"]
    for seed, stem in enumerate(stems):
        (d.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(seed))
    (d.incoming / "bad.mrc").write_text("this is not a tomogram\n" * 100)
    d.start()
    url = d.metrics_url()

    # Scrape while it works, until the three are done and the bad file is quarantined.
    _, first = scrape(url)
    max_queue, max_oldest_age_s = 0.0, 0.0
    deadline = time.monotonic() + WAIT_S
    while True:
        text, samples = scrape(url)
        max_queue = max(max_queue, value(samples, "tomolive_queue_length"))
        max_oldest_age_s = max(max_oldest_age_s,
                               value(samples, "tomolive_queue_oldest_waiting_age_seconds"))
        if (value(samples, "tomolive_tomograms_finished_total", outcome="ok") == 3
                and value(samples, "tomolive_tomograms_finished_total",
                          outcome="quarantined") == 1
                and value(samples, "tomolive_tomograms_in_progress") == 0):
            break
        assert d.process.poll() is None, d.log[-3000:]
        assert time.monotonic() < deadline, f"not done in {WAIT_S} s:\n{d.log[-3000:]}"
        time.sleep(0.1)
    summaries = [d.summary(stem) for stem in stems]
    assert all(summaries), d.log[-3000:]
    # Every stage a summary times is a stage the metrics know (the specimen stage once was not).
    assert "unknown stage" not in d.log

    def close(name: str, expected: float, **labels: str) -> None:
        assert value(samples, name, **labels) == pytest.approx(expected, rel=1e-9), (name, labels)

    # Four files queued at once for one CPU worker: some waited, and the queue drained.
    assert max_queue >= 1 and max_oldest_age_s > 0
    assert value(samples, "tomolive_queue_length") == 0
    assert value(samples, "tomolive_queue_oldest_waiting_age_seconds") == 0
    assert value(samples, "tomolive_tomograms_discovered_total") == 4
    # max_attempts 2: one failed attempt, then quarantined.
    assert value(samples, "tomolive_tomograms_finished_total", outcome="failed") == 1
    assert value(samples, "tomolive_tomograms_resegmented_total") == 0

    for stage in STAGES:
        assert value(samples, "tomolive_stage_duration_seconds_count", stage=stage) == 3
        close("tomolive_stage_duration_seconds_sum",
              sum(s["timings_s"][stage] for s in summaries), stage=stage)
        assert value(samples, "tomolive_stage_duration_seconds_bucket", stage=stage,
                     le="+Inf") == 3
    assert value(samples, "tomolive_tomogram_duration_seconds_count") == 3
    close("tomolive_tomogram_duration_seconds_sum", sum(s["timings_s"]["total"] for s in summaries))
    voxels = sum(int(math.prod(s["input"]["shape_zyx"])) for s in summaries)
    assert voxels == 3 * 16 * 64 * 64
    assert value(samples, "tomolive_voxels_processed_total") == voxels

    for kind, metric in (("particles", "tomolive_particles_found_total"),
                         ("filaments", "tomolive_filaments_traced_total")):
        classes = summaries[0]["counts"][kind]
        assert classes, kind
        for name in classes:
            assert value(samples, metric, **{"class": name}) == sum(
                s["counts"][kind][name] for s in summaries)
    fractions = {dict(labels)["class"]: v for labels, v in
                 with_name(samples, "tomolive_last_tomogram_class_volume_ratio").items()}
    assert fractions in [s["class_fractions"] for s in summaries]

    confidences = [s["confidence"] for s in summaries]
    assert value(samples, "tomolive_tomogram_confidence_ratio_count") == 3
    close("tomolive_tomogram_confidence_ratio_sum", sum(confidences))
    assert value(samples, "tomolive_last_tomogram_confidence_ratio") in confidences

    # Quality per tomogram (issue 21, item 3): the SNR estimate and, per class, the mean
    # confidence over its voxels and the share cleanup removed.
    snrs = [s["snr_estimate"] for s in summaries]
    assert all(v is not None and v >= 0 for v in snrs)  # noise with a few blobs: near 0
    assert value(samples, "tomolive_tomogram_snr_ratio_count") == 3
    close("tomolive_tomogram_snr_ratio_sum", sum(snrs))
    # The specimen's thickness: every summary has the record; only slabs whose two surfaces
    # were found are observed (these 16-slice tomograms are thinner than the finder's minimum
    # depth, so none is: the series exists with nothing in it).
    assert all(isinstance(s.get("specimen"), dict) for s in summaries)
    thicknesses_m = [t * 1e-9 for s in summaries
                     if (t := measured_thickness_nm(s["specimen"])) is not None]
    assert value(samples, "tomolive_tomogram_specimen_thickness_meters_count") \
        == len(thicknesses_m)
    close("tomolive_tomogram_specimen_thickness_meters_sum", sum(thicknesses_m))
    for key, metric in (("class_confidence", "tomolive_tomogram_class_confidence_ratio"),
                        ("cleanup_removed_fraction", "tomolive_tomogram_cleanup_removed_ratio")):
        for name in summaries[0][key]:
            found = [s[key][name] for s in summaries if s[key].get(name) is not None]
            if not found:  # a class no tomogram had: never observed, no series yet
                assert (f"{metric}_count", (("class", name),)) not in samples
                continue
            assert value(samples, f"{metric}_count", **{"class": name}) == len(found), metric
            close(f"{metric}_sum", sum(found), **{"class": name})

    assert with_name(samples, "tomolive_model_info") == {
        (("name", "model-a"), ("sha256", model_sha), ("version", "3")): 1.0}
    assert value(samples, "tomolive_model_reloads_total", result="ok") == 1
    assert value(samples, "tomolive_model_reloads_total", result="rejected") == 1
    assert value(samples, "tomolive_model_bundles_rejected_total") == 1

    busy_s = value(samples, "tomolive_device_busy_seconds_total", device="cpu")
    assert busy_s >= sum(s["timings_s"]["total"] for s in summaries) > 0
    assert value(samples, "tomolive_worker_restarts_total", device="cpu") == 0

    last_success_s = value(samples, "tomolive_last_success_timestamp_seconds")
    newest_written_s = max(datetime.fromisoformat(s["written_utc"]).timestamp()
                           for s in summaries)
    assert newest_written_s <= last_success_s <= time.time()
    if value(first, "tomolive_tomograms_finished_total", outcome="ok") == 0:
        assert value(first, "tomolive_last_success_timestamp_seconds") < last_success_s

    promtool_check_metrics(text)
    assert healthz(url) == 200

    # One more tomogram, parked mid-way (never released), then SIGTERM: /healthz must say
    # 503 during the grace period, which then abandons it.
    d.hold("last", "inference")
    (d.incoming / "last.mrc").write_bytes(tomogram_bytes(9))
    d.wait_held("last", WAIT_S)
    d.wait_for(lambda: value(scrape(url)[1], "tomolive_tomograms_in_progress") == 1, 30,
               "in progress on /metrics")
    d.signal(signal.SIGTERM)
    statuses: list[int | None] = []
    deadline = time.monotonic() + 60
    while d.process.poll() is None and time.monotonic() < deadline:
        statuses.append(healthz(url))
        time.sleep(0.05)
    assert d.process.wait(timeout=30) == 0
    assert 503 in statuses, (statuses, d.log[-3000:])
    # After the first 503 it never turns healthy again; once exited, nothing answers.
    assert 200 not in statuses[statuses.index(503):]
    assert healthz(url) is None


def promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; "
                    "scripts/install-prometheus.sh installs it, CI does)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_real_prometheus_scrapes_the_running_daemon(make_daemon, tmp_path: Path) -> None:
    d = make_daemon()
    model = write_tiny_model(d.models / "a.safetensors", name="model-a")
    model_sha = hashlib.sha256(model.read_bytes()).hexdigest()
    stems = ["p1", "p2"]
    for seed, stem in enumerate(stems, start=20):
        (d.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(seed))
    d.start()
    target = d.metrics_url().removeprefix("http://")
    with running_prometheus(tmp_path / "prometheus", target) as prometheus:
        ok = 'tomolive_tomograms_finished_total{job="tomolive", outcome="ok"}'
        prometheus.wait_for("up == 1",
                            lambda: scalar(prometheus.query('up{job="tomolive"}')) == 1)
        prometheus.wait_for("2 finished", lambda: scalar(prometheus.query(ok)) == 2, WAIT_S)
        summaries = [d.summary(stem) for stem in stems]
        assert all(summaries), d.log[-3000:]

        inference = 'tomolive_stage_duration_seconds_count{job="tomolive", stage="inference"}'
        assert scalar(prometheus.query(inference)) == 2
        counts = prometheus.query('tomolive_stage_duration_seconds_count{job="tomolive"}')
        assert {r["metric"]["stage"]: float(r["value"][1]) for r in counts} == {
            stage: 2.0 for stage in STAGES}
        assert scalar(prometheus.query(
            'tomolive_stage_duration_seconds_sum{job="tomolive", stage="inference"}')) \
            == pytest.approx(sum(s["timings_s"]["inference"] for s in summaries), rel=1e-9)
        assert scalar(prometheus.query("tomolive_tomogram_duration_seconds_count")) == 2
        assert scalar(prometheus.query("tomolive_tomograms_discovered_total")) == 2
        assert scalar(prometheus.query("tomolive_voxels_processed_total")) == 2 * 16 * 64 * 64
        assert scalar(prometheus.query(
            'tomolive_tomograms_finished_total{outcome="quarantined"}')) == 0
        assert [r["metric"]["sha256"] for r in prometheus.query("tomolive_model_info")] == [
            model_sha]
    assert d.stop() == 0
