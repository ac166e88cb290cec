"""A real Prometheus server on loopback scrapes a tomolive HttpServer (fed fake summaries in
this process), and its HTTP API returns the finished count and the stage histogram we fed; every
dashboard query and alert rule is accepted and evaluated by that server.

Needs Debian's `prometheus` package (scripts/install-prometheus.sh; CI installs it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tomolive.core.stages import STAGES
from tomolive.daemon.http_server import HttpServer
from tomolive.daemon.metrics import Metrics

from .prometheus_harness import REPO, Prometheus, running_prometheus, scalar
from .test_monitoring_files import alert_rules

DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def fake_summary(scale: float = 1.0) -> dict:
    """A STEM_summary.json-like dict: 40 s x scale of inference, small other stages."""
    timings = {stage: 0.05 * (i + 1) * scale for i, stage in enumerate(STAGES)}
    timings["inference"] = 40.0 * scale
    timings["total"] = sum(timings.values()) + 0.3
    return {
        "input": {"shape_zyx": [32, 64, 64]},
        "timings_s": timings,
        "class_fractions": {"membrane": 0.12, "ribosome": 0.01},
        "counts": {"particles": {"ribosome": 7}, "filaments": {}},
        "confidence": 0.9,
    }


@pytest.fixture
def served() -> Iterator[tuple[Metrics, HttpServer]]:
    metrics = Metrics(devices=["cpu"])
    server = HttpServer(metrics, host="127.0.0.1", port=0)
    try:
        yield metrics, server
    finally:
        server.stop()


@pytest.fixture
def prometheus(served, tmp_path: Path) -> Iterator[Prometheus]:
    _, server = served
    with running_prometheus(tmp_path, f"127.0.0.1:{server.port}") as server_process:
        yield server_process


def test_prometheus_sees_finished_count_and_stage_histogram(served, prometheus) -> None:
    metrics, _ = served
    metrics.set_model("default", "2", "ab" * 32)
    metrics.tomograms_discovered(3)
    metrics.observe_tomogram(fake_summary(1.0))
    metrics.observe_tomogram(fake_summary(2.0))
    ok = 'tomolive_tomograms_finished_total{job="tomolive", outcome="ok"}'
    prometheus.wait_for("up == 1", lambda: scalar(prometheus.query('up{job="tomolive"}')) == 1)
    prometheus.wait_for("2 finished", lambda: scalar(prometheus.query(ok)) == 2)

    # Counters move in Prometheus as they move in the daemon.
    metrics.observe_tomogram(fake_summary(0.5))
    metrics.tomogram_failed(quarantined=True)
    prometheus.wait_for("3 finished", lambda: scalar(prometheus.query(ok)) == 3)
    prometheus.wait_for("1 quarantined", lambda: scalar(prometheus.query(
        'tomolive_tomograms_finished_total{outcome="quarantined"}')) == 1)

    inference = 'stage="inference", job="tomolive"'
    assert scalar(prometheus.query(f"tomolive_stage_duration_seconds_count{{{inference}}}")) == 3
    # 20 s, 40 s and 80 s of inference (fake_summary scales 40 s).
    assert scalar(prometheus.query(f"tomolive_stage_duration_seconds_sum{{{inference}}}")) \
        == pytest.approx(140.0)
    assert scalar(prometheus.query(
        f'tomolive_stage_duration_seconds_bucket{{{inference}, le="60.0"}}')) == 2
    assert scalar(prometheus.query(
        f'tomolive_stage_duration_seconds_bucket{{{inference}, le="+Inf"}}')) == 3
    assert scalar(prometheus.query("tomolive_tomograms_discovered_total")) == 3
    model = prometheus.query("tomolive_model_info")
    assert [r["metric"]["version"] for r in model] == ["2"]
    # The median from the buckets lies inside the bucket that holds the middle observation.
    median = scalar(prometheus.query(
        "histogram_quantile(0.5, sum by (le) (tomolive_stage_duration_seconds_bucket"
        f"{{{inference}}}))"))
    assert 30.0 <= median <= 60.0


def test_prometheus_accepts_every_dashboard_query_and_alert_rule(served, prometheus) -> None:
    metrics, _ = served
    metrics.set_model("default", "2", "ab" * 32)
    metrics.observe_tomogram(fake_summary())
    prometheus.wait_for("a scrape with the model", lambda: bool(
        prometheus.query("tomolive_model_info")))

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\$instance\b", ".*", target["expr"])
            assert "$" not in expr, f"{panel['title']}: unhandled variable in {expr}"
            prometheus.query(expr)  # raises unless Prometheus parses and evaluates it

    groups = {}

    def rules_evaluated() -> bool:
        groups.update({g["name"]: g for g in prometheus.api("rules")["groups"]})
        rules = groups["tomolive"]["rules"]
        # Never-evaluated rules report the zero time, 0001-01-01T00:00:00Z.
        return len(rules) == len(alert_rules()) and not [r for r in rules
                                        if r["lastEvaluation"].startswith("0001")]

    prometheus.wait_for("the alert rules evaluated", rules_evaluated)
    for rule in groups["tomolive"]["rules"]:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # With a live, healthy daemon nothing should fire (TomoliveDown needs up == 0).
    firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []
