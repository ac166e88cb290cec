"""monitoring/: alert rules pass promtool and fire when they should; the dashboard is valid JSON
whose every query names a metric that a tomolive scrape really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tomolive.core.specimen_mask import THICK_SPECIMEN_NM
from tomolive.daemon.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "monitoring" / "alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
PROMETHEUS_EXAMPLE = REPO / "monitoring" / "prometheus.example.yml"
# Metric names in PromQL: ours, the process collector's, and Prometheus's own `up`.
METRIC_TOKEN = re.compile(r"\b(tomolive_[a-z0-9_]+|process_[a-z0-9_]+|up)\b(?!\s*\()")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; "
                    "scripts/install-prometheus.sh installs it, CI does)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def scraped_series_names() -> set[str]:
    """Every series name a daemon exposes once it has served a model and a tomogram."""
    metrics = Metrics(devices=["cpu", "cuda:0"])
    metrics.set_model("default", "1", "a" * 64, classes=["membrane", "ribosome"])
    metrics.set_device_memory("cuda:0", 1024)
    metrics.observe_tomogram({
        "timings_s": {"read": 1.0, "inference": 5.0, "total": 7.0},
        "class_fractions": {"membrane": 0.1, "ribosome": 0.02},
        "counts": {"particles": {"ribosome": 3}, "filaments": {}},
        "confidence": 0.8, "input": {"shape": [8, 8, 8]},
    })
    text = generate_latest(metrics.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def test_the_thick_lamellae_alert_uses_the_session_pages_threshold() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "TomoliveThickLamellae")
    threshold_m = float(re.search(r"\)\s*>\s*([0-9.e-]+)", rule["expr"]).group(1))
    assert threshold_m == pytest.approx(THICK_SPECIMEN_NM * 1e-9)


def test_promtool_check_rules_passes() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_check_config_accepts_the_example() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    job = config["scrape_configs"][0]
    assert job["job_name"] == "tomolive"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9847"]


def test_the_required_alerts_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {"TomoliveDown", "TomoliveNotKeepingUp", "TomoliveFailureRate", "TomoliveNoSuccess",
            "TomoliveConfidenceDrop", "TomoliveModelDoesNotFit", "TomolivePoorTomograms",
            "TomoliveThickLamellae"} <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_is_valid_and_covers_what_staff_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
    exprs = "\n".join(dashboard_exprs())
    for needed in ("tomolive_tomograms_discovered_total", "tomolive_tomograms_finished_total",
                   "tomolive_queue_length", "tomolive_queue_oldest_waiting_age_seconds",
                   "tomolive_model_info", "tomolive_tomogram_confidence_ratio_sum",
                   "tomolive_device_busy_seconds_total"):
        assert needed in exprs, needed
    assert re.search(r"histogram_quantile\(0\.95, sum by \(le, stage\) "
                     r"\(rate\(tomolive_stage_duration_seconds_bucket", exprs)


def test_every_metric_in_dashboard_and_alerts_is_exposed() -> None:
    exposed = scraped_series_names() | {"up"}
    queries = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    used = {name for q in queries for name in METRIC_TOKEN.findall(q)}
    assert len(used) >= 20  # the regex really finds the names
    assert not used - exposed, f"queries name metrics no scrape has: {sorted(used - exposed)}"


def test_metric_check_catches_a_wrong_name() -> None:
    # The check above must be able to fail: a histogram's base name is not a series.
    exposed = scraped_series_names()
    assert "tomolive_stage_duration_seconds_bucket" in exposed
    assert "tomolive_stage_duration_seconds" not in exposed
    assert METRIC_TOKEN.findall("rate(tomolive_stage_duration_seconds[5m])") == [
        "tomolive_stage_duration_seconds"]


ALERT_UNIT_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="tomolive", instance="gpu1:9847"}'
        values: '1 1 1 0x20'
      - series: 'tomolive_last_success_timestamp_seconds{job="tomolive", instance="gpu1:9847"}'
        values: '0x120'
      - series: 'tomolive_queue_length{job="tomolive", instance="gpu1:9847"}'
        values: '3x120'
      - series: 'tomolive_tomograms_in_progress{job="tomolive", instance="gpu1:9847"}'
        values: '0x120'
    alert_rule_test:
      - {eval_time: 4m, alertname: TomoliveDown, exp_alerts: []}
      - eval_time: 10m
        alertname: TomoliveDown
        exp_alerts:
          - exp_labels: {severity: critical, job: tomolive, instance: "gpu1:9847"}
      - {eval_time: 50m, alertname: TomoliveNoSuccess, exp_alerts: []}
      - eval_time: 75m
        alertname: TomoliveNoSuccess
        exp_alerts:
          - exp_labels: {severity: critical, job: tomolive, instance: "gpu1:9847"}

  - interval: 1m
    input_series:   # gpu1 falls behind (2 arrive per finished one), gpu2 keeps up
      - series: 'tomolive_tomograms_discovered_total{instance="gpu1"}'
        values: '0+2x300'
      - series: 'tomolive_tomograms_finished_total{instance="gpu1", outcome="ok"}'
        values: '0+1x300'
      - series: 'tomolive_queue_oldest_waiting_age_seconds{instance="gpu1"}'
        values: '0+60x300'
      - series: 'tomolive_tomograms_discovered_total{instance="gpu2"}'
        values: '0+1x300'
      - series: 'tomolive_tomograms_finished_total{instance="gpu2", outcome="ok"}'
        values: '0+1x300'
      - series: 'tomolive_queue_oldest_waiting_age_seconds{instance="gpu2"}'
        values: '0+60x300'
    alert_rule_test:
      - {eval_time: 40m, alertname: TomoliveNotKeepingUp, exp_alerts: []}
      - eval_time: 150m
        alertname: TomoliveNotKeepingUp
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1}

  - interval: 1m
    input_series:   # one failed attempt per two successes
      - series: 'tomolive_tomograms_finished_total{instance="gpu1", outcome="ok"}'
        values: '0+1x120'
      - series: 'tomolive_tomograms_finished_total{instance="gpu1", outcome="failed"}'
        values: '0+0.5x120'
      - series: 'tomolive_tomograms_finished_total{instance="gpu1", outcome="quarantined"}'
        values: '0x120'
    alert_rule_test:
      - eval_time: 60m
        alertname: TomoliveFailureRate
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1}

  - interval: 1m
    input_series:   # one tomogram per 10 min at confidence 0.9 for 20 h, then 0.6
      - series: 'tomolive_tomogram_confidence_ratio_count{instance="gpu1"}'
        values: '0+0.1x1440'
      - series: 'tomolive_tomogram_confidence_ratio_sum{instance="gpu1"}'
        values: '0+0.09x1200 108.06+0.06x239'
    alert_rule_test:
      - {eval_time: 1190m, alertname: TomoliveConfidenceDrop, exp_alerts: []}
      - eval_time: 1335m
        alertname: TomoliveConfidenceDrop
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1}

  - interval: 1m
    input_series:   # one tomogram per 10 min at SNR estimate 3.0 for 20 h, then 1.0
      - series: 'tomolive_tomogram_snr_ratio_count{instance="gpu1"}'
        values: '0+0.1x1440'
      - series: 'tomolive_tomogram_snr_ratio_sum{instance="gpu1"}'
        values: '0+0.3x1200 360.1+0.1x239'
    alert_rule_test:
      - {eval_time: 1190m, alertname: TomolivePoorTomograms, exp_alerts: []}
      - {eval_time: 1280m, alertname: TomolivePoorTomograms, exp_alerts: []}
      - eval_time: 1335m
        alertname: TomolivePoorTomograms
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1}

  - interval: 1m
    # One measured tomogram per 10 min at 180 nm for 4 h, then at 400 nm. The second segment
    # starts one step on: a sum that does not grow there would read as a counter reset.
    input_series:
      - series: 'tomolive_tomogram_specimen_thickness_meters_count{instance="gpu1"}'
        values: '0+0.1x480'
      - series: 'tomolive_tomogram_specimen_thickness_meters_sum{instance="gpu1"}'
        values: '0+18e-9x240 4.36e-6+40e-9x239'
    alert_rule_test:
      - {eval_time: 235m, alertname: TomoliveThickLamellae, exp_alerts: []}
      - {eval_time: 260m, alertname: TomoliveThickLamellae, exp_alerts: []}
      - eval_time: 380m
        alertname: TomoliveThickLamellae
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1}

  - interval: 1m
    input_series:   # one tomogram per 10 min: fitting (0.07) for 2 h, then not (0.25)
      - series: 'tomolive_tomogram_uncertain_ratio_count{instance="gpu1"}'
        values: '0+0.1x240'
      - series: 'tomolive_tomogram_uncertain_ratio_sum{instance="gpu1"}'
        values: '0+0.007x120 0.84+0.025x119'
    alert_rule_test:
      - {eval_time: 115m, alertname: TomoliveModelDoesNotFit, exp_alerts: []}
      - eval_time: 200m
        alertname: TomoliveModelDoesNotFit
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1}

  - interval: 1m
    input_series:   # a GPU faults every 5 minutes from minute 10; the other one never
      - series: 'tomolive_device_pauses_total{instance="gpu1", device="cuda:0"}'
        values: '0x10 1 1 1 1 1 2 2 2 2 2 3 3 3 3 3 4x30'
      - series: 'tomolive_device_pauses_total{instance="gpu1", device="cuda:1"}'
        values: '0x60'
    alert_rule_test:
      - {eval_time: 9m, alertname: TomoliveDeviceFaulting, exp_alerts: []}
      - eval_time: 27m
        alertname: TomoliveDeviceFaulting
        exp_alerts:
          - exp_labels: {severity: warning, instance: gpu1, device: "cuda:0"}
      - {eval_time: 60m, alertname: TomoliveDeviceFaulting, exp_alerts: []}
  - interval: 1m
    input_series:   # the output disk fills for 20 minutes, then is freed
      - series: 'tomolive_dispatch_paused{instance="gpu1"}'
        values: '0x5 1x20 0x10'
    alert_rule_test:
      - {eval_time: 8m, alertname: TomoliveOutputDiskFull, exp_alerts: []}
      - eval_time: 15m
        alertname: TomoliveOutputDiskFull
        exp_alerts:
          - exp_labels: {severity: critical, instance: gpu1}
      - {eval_time: 30m, alertname: TomoliveOutputDiskFull, exp_alerts: []}
"""


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    # Annotations are prose with templates; the unit tests check expressions, `for` and labels.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_file = tmp_path / "alerts-no-annotations.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    tests = yaml.safe_load(ALERT_UNIT_TESTS)
    tests["rule_files"] = [str(rules_file)]
    test_file = tmp_path / "alerts-test.yml"
    test_file.write_text(yaml.safe_dump(tests))
    result = run_promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
