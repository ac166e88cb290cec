"""daemon.metrics: the counters, histograms and gauges move as they should, seen over real HTTP."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tomolive.core.specimen_mask import SpecimenSlab, Surface
from tomolive.core.stages import STAGES
from tomolive.daemon.http_server import HttpServer, LoopHealth
from tomolive.daemon.metrics import Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fake_summary(scale: float = 1.0, confidence: float = 0.9) -> dict:
    """A STEM_summary.json-like dict with the keys the daemon's workers send."""
    timings = {stage: 0.05 * (i + 1) * scale for i, stage in enumerate(STAGES)}
    timings["inference"] = 40.0 * scale
    timings["total"] = sum(timings.values()) + 0.3
    return {
        "input": {"path": "/data/session1/TS_01.mrc", "shape_zyx": [32, 64, 64]},
        "model": {"name": "default", "version": "2", "sha256": "ab" * 32},
        "timings_s": timings,
        "class_fractions": {"membrane": 0.12, "microtubule": 0.03, "ribosome": 0.01},
        "counts": {"particles": {"ribosome": 7}, "filaments": {"microtubule": 2}},
        "confidence": confidence,
    }


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def health_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, HttpServer, threading.Event]]:
    alive = threading.Event()
    alive.set()
    metrics = Metrics(devices=["cpu", "cuda:0"])
    server = HttpServer(metrics, host="127.0.0.1", port=0, health=alive.is_set)
    try:
        yield metrics, server, alive
    finally:
        server.stop()


def test_counters_and_histograms_move_by_the_fed_amounts(served) -> None:
    metrics, server, _ = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    before = parse(scrape_text(server.url))
    assert value(before, "tomolive_tomograms_finished_total", outcome="ok") == 0
    assert value(before, "tomolive_stage_duration_seconds_count", stage="inference") == 0

    metrics.tomograms_discovered(3)
    metrics.set_model("default", "2", "ab" * 32, classes=["membrane", "microtubule", "ribosome"])
    metrics.observe_tomogram(fake_summary(1.0, confidence=0.9))
    metrics.observe_tomogram(fake_summary(2.0, confidence=0.7), resegmented=True)
    metrics.tomogram_failed()
    metrics.tomogram_failed(quarantined=True)
    metrics.device_busy_seconds("cuda:0", 12.5)
    metrics.device_busy_seconds("cuda:0", 2.5)
    metrics.set_device_memory("cuda:0", 3 * 2**30)
    metrics.worker_restarted("cpu")
    metrics.model_reloaded("ok")
    metrics.model_reloaded("rejected")
    metrics.bundle_rejected()
    metrics.lease_reclaimed()
    metrics.lease_renewal_failed()
    metrics.lease_renewal_failed()
    metrics.set_queue(waiting=4, in_progress=1, oldest_enqueued_monotonic_s=time.monotonic() - 60)

    after = parse(scrape_text(server.url))
    assert value(after, "tomolive_tomograms_discovered_total") == 3
    assert value(after, "tomolive_tomograms_finished_total", outcome="ok") == 2
    assert value(after, "tomolive_tomograms_finished_total", outcome="failed") == 1
    assert value(after, "tomolive_tomograms_finished_total", outcome="quarantined") == 1
    assert value(after, "tomolive_tomograms_resegmented_total") == 1
    assert value(after, "tomolive_voxels_processed_total") == 2 * 32 * 64 * 64
    assert value(after, "tomolive_particles_found_total", **{"class": "ribosome"}) == 14
    assert value(after, "tomolive_filaments_traced_total", **{"class": "microtubule"}) == 4
    assert value(after, "tomolive_last_tomogram_class_volume_ratio", **{"class": "membrane"}) \
        == pytest.approx(0.12)

    # Stage histogram: two observations, 40 s and 80 s of inference.
    assert value(after, "tomolive_stage_duration_seconds_count", stage="inference") == 2
    assert value(after, "tomolive_stage_duration_seconds_sum", stage="inference") \
        == pytest.approx(120.0)
    assert value(after, "tomolive_stage_duration_seconds_bucket", stage="inference", le="30.0") \
        == 0
    assert value(after, "tomolive_stage_duration_seconds_bucket", stage="inference", le="60.0") \
        == 1
    assert value(after, "tomolive_stage_duration_seconds_bucket", stage="inference", le="120.0") \
        == 2
    assert value(after, "tomolive_stage_duration_seconds_count", stage="read") == 2
    assert value(after, "tomolive_stage_duration_seconds_count", stage="write") == 2
    totals = [fake_summary(s)["timings_s"]["total"] for s in (1.0, 2.0)]
    assert value(after, "tomolive_tomogram_duration_seconds_sum") == pytest.approx(sum(totals))
    assert value(after, "tomolive_tomogram_duration_seconds_bucket", le="3600.0") == 2
    assert value(after, "tomolive_tomogram_duration_seconds_bucket", le="+Inf") == 2

    assert value(after, "tomolive_tomogram_confidence_ratio_count") == 2
    assert value(after, "tomolive_tomogram_confidence_ratio_sum") == pytest.approx(1.6)
    assert value(after, "tomolive_tomogram_confidence_ratio_bucket", le="0.8") == 1
    assert value(after, "tomolive_last_tomogram_confidence_ratio") == pytest.approx(0.7)

    assert value(after, "tomolive_device_busy_seconds_total", device="cuda:0") == 15.0
    assert value(after, "tomolive_device_busy_seconds_total", device="cpu") == 0
    assert value(after, "tomolive_device_memory_used_bytes", device="cuda:0") == 3 * 2**30
    assert value(after, "tomolive_worker_restarts_total", device="cpu") == 1
    assert value(after, "tomolive_model_reloads_total", result="ok") == 1
    assert value(after, "tomolive_model_reloads_total", result="rejected") == 1
    assert value(after, "tomolive_model_reloads_total", result="failed") == 0
    assert value(after, "tomolive_model_bundles_rejected_total") == 1
    assert value(after, "tomolive_lease_reclaims_total") == 1
    assert value(after, "tomolive_lease_renewal_failures_total") == 2
    assert value(after, "tomolive_queue_length") == 4
    assert value(after, "tomolive_tomograms_in_progress") == 1
    assert 60 <= value(after, "tomolive_queue_oldest_waiting_age_seconds") < 600
    assert abs(value(after, "tomolive_last_success_timestamp_seconds") - time.time()) < 600
    assert value(after, "tomolive_model_info", name="default", version="2",
                 sha256="ab" * 32) == 1


def test_model_info_keeps_only_the_serving_model(served) -> None:
    metrics, server, _ = served
    assert not [k for k in parse(scrape_text(server.url)) if k[0] == "tomolive_model_info"]
    metrics.set_model("default", "1", "a" * 64)
    metrics.set_model("retrained", "2", "b" * 64)
    infos = {k: v for k, v in parse(scrape_text(server.url)).items()
             if k[0] == "tomolive_model_info"}
    assert infos == {("tomolive_model_info", frozenset(
        {"name": "retrained", "version": "2", "sha256": "b" * 64}.items())): 1.0}


def test_class_fractions_describe_only_the_last_tomogram(served) -> None:
    metrics, server, _ = served
    metrics.observe_tomogram(fake_summary())
    second = fake_summary()
    second["class_fractions"] = {"membrane": 0.2, "actin": 0.05}
    metrics.observe_tomogram(second)
    fractions = {dict(k[1])["class"]: v for k, v in parse(scrape_text(server.url)).items()
                 if k[0] == "tomolive_last_tomogram_class_volume_ratio"}
    assert fractions == pytest.approx({"membrane": 0.2, "actin": 0.05})


def test_specimen_thickness_is_observed_only_where_both_surfaces_were_found(served) -> None:
    metrics, server, _ = served
    extent = (300.0, 500.0, 500.0)
    flat = SpecimenSlab(Surface(60.0, 0.0, 0.0, True), Surface(180.0, 0.0, 0.0, True),
                        extent, 3.0)
    thick = SpecimenSlab(Surface(10.0, 0.0, 0.0, True), Surface(290.0, 0.0, 0.0, True),
                         extent, 2.0)
    one_side = SpecimenSlab(Surface(60.0, 0.0, 0.0, True), Surface(301.0, 0.0, 0.0, False),
                            extent, 2.0)
    records = [flat.summary(), thick.summary(), one_side.summary(),
               SpecimenSlab.whole(extent).summary(), None,
               {"thickness_is_lower_bound": False, "thickness_nm": {"mean": "thin"}}]
    for record in records:
        summary = fake_summary()
        if record is not None:
            summary["specimen"] = record
        metrics.observe_tomogram(summary)
    after = parse(scrape_text(server.url))
    name = "tomolive_tomogram_specimen_thickness_meters"
    assert value(after, f"{name}_count") == 2  # the lower bounds and the garbage are not
    assert value(after, f"{name}_sum") == pytest.approx(400e-9)  # 120 nm + 280 nm
    assert value(after, f"{name}_bucket", le="1.25e-07") == 1
    assert value(after, f"{name}_bucket", le="3e-07") == 2
    assert value(after, "tomolive_tomograms_finished_total", outcome="ok") == len(records)


def test_queue_age_is_zero_when_empty_and_grows_while_waiting(served) -> None:
    metrics, server, _ = served
    metrics.set_queue(waiting=0, in_progress=0, oldest_enqueued_monotonic_s=None)
    assert value(parse(scrape_text(server.url)), "tomolive_queue_oldest_waiting_age_seconds") == 0
    enqueued_s = time.monotonic() - 5
    metrics.set_queue(waiting=1, in_progress=0, oldest_enqueued_monotonic_s=enqueued_s)
    # Computed at scrape time (a stuck loop shows a growing age): each scrape's age lies
    # between the clock read just before it and the one just after, however long it took.
    for _ in range(2):
        before_s = time.monotonic()
        age_s = value(parse(scrape_text(server.url)), "tomolive_queue_oldest_waiting_age_seconds")
        after_s = time.monotonic()
        assert before_s - enqueued_s <= age_s <= after_s - enqueued_s


def test_bad_inputs_never_become_labels_or_crash(served) -> None:
    metrics, server, _ = served
    summary = fake_summary()
    summary["counts"]["particles"] = {"/data/TS_01.mrc": 3, "ribosome": 1}
    summary["class_fractions"] = {"TS_01.mrc": 0.5, "membrane": float("nan")}
    summary["timings_s"]["not_a_stage"] = 1.0
    summary["confidence"] = float("nan")
    summary["input"] = {}
    metrics.observe_tomogram(summary)
    metrics.device_busy_seconds("/dev/nvidia0", 3.0)
    metrics.worker_restarted("gpu 0")
    with pytest.raises(ValueError, match="model reload result 'maybe' is not one of"):
        metrics.model_reloaded("maybe")
    samples = parse(scrape_text(server.url))
    label_values = {v for (_, labels) in samples for _, v in labels}
    assert not [v for v in label_values if "/" in v or v.endswith(".mrc")]
    assert value(samples, "tomolive_particles_found_total", **{"class": "ribosome"}) == 1
    assert value(samples, "tomolive_tomograms_finished_total", outcome="ok") == 1
    assert value(samples, "tomolive_voxels_processed_total") == 0
    assert value(samples, "tomolive_tomogram_confidence_ratio_count") == 0
    assert math.isnan(value(samples, "tomolive_last_tomogram_confidence_ratio"))
    assert not [k for k in samples if k[0] == "tomolive_last_tomogram_class_volume_ratio"]
    assert {dict(k[1])["device"] for k in samples
            if k[0] == "tomolive_device_busy_seconds_total"} == {"cpu", "cuda:0"}


def test_healthz_follows_the_health_callable(served) -> None:
    _, server, alive = served
    assert health_status(server.url) == (200, "ok\n")
    alive.clear()
    assert health_status(server.url) == (503, "unhealthy\n")
    alive.set()
    assert health_status(server.url)[0] == 200


def test_loop_health_turns_503_when_the_loop_goes_silent_or_stops() -> None:
    health = LoopHealth(max_silence_s=0.3)
    server = HttpServer(Metrics(process_metrics=False), port=0, health=health)
    try:
        health.beat()
        # Asked within the silence allowed since the beat, it is healthy; the check is skipped
        # when this machine was too slow to ask in time (it then says nothing either way).
        status = health_status(server.url)[0]
        if health.silence_s() <= 0.3:
            assert status == 200
        while health.silence_s() <= 0.3:  # no beat: the loop is stuck
            time.sleep(0.05)
        assert health_status(server.url)[0] == 503
        health.beat()
        assert health_status(server.url)[0] == 200
        health.stopping()
        health.beat()  # a loop still beating while it shuts down is not taking work
        assert health_status(server.url) == (503, "unhealthy\n")
    finally:
        server.stop()


def test_healthz_is_503_when_the_health_check_raises() -> None:
    def broken() -> bool:
        raise RuntimeError("main loop state unreadable")

    server = HttpServer(Metrics(), port=0, health=broken)
    try:
        assert health_status(server.url)[0] == 503
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.url + "/nothing", timeout=10)
    finally:
        server.stop()


def test_registries_are_independent_and_stop_frees_the_port() -> None:
    first, second = Metrics(process_metrics=False), Metrics(process_metrics=False)
    first.tomograms_discovered(5)
    server = HttpServer(second, port=0)
    port = server.port
    try:
        assert value(parse(scrape_text(server.url)), "tomolive_tomograms_discovered_total") == 0
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            HttpServer(first, port=port)
    finally:
        server.stop()
    server.stop()  # idempotent
    HttpServer(first, port=port).stop()  # the port is free again


def test_promtool_check_metrics_accepts_a_scrape(served) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; "
                    "scripts/install-prometheus.sh installs it, CI does)")
    metrics, server, _ = served
    metrics.set_model("default", "2", "ab" * 32)
    metrics.observe_tomogram(fake_summary())
    metrics.set_device_memory("cuda:0", 1024)
    result = subprocess.run([promtool, "check", "metrics"], input=scrape_text(server.url),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
