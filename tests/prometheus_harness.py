"""A real Prometheus server on loopback for tests: throw-away config and storage, HTTP API queries.

Shared by test_prometheus_real.py (an in-process HttpServer) and test_daemon_metrics.py (the
running daemon). Needs Debian's `prometheus` package (scripts/install-prometheus.sh; CI has it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "monitoring" / "alerts.yml"
POLL_LIMIT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A prometheus process with a throw-away config and storage; `api()` queries it."""

    def __init__(self, binary: str, tmp: Path, target: str,
                 rule_files: Sequence[Path] = (ALERTS,)) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "tomolive",
                                "static_configs": [{"targets": [target]}]}],
        }
        tmp.mkdir(parents=True, exist_ok=True)
        config_file = tmp / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            reply = json.load(response)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                    timeout=5) as response:
            return response.status == 200

    def wait_for(self, what: str, check: Callable[[], bool],
                 limit_s: float = POLL_LIMIT_S) -> None:
        """Poll `check` until True; fail with the server's log after `limit_s`."""
        deadline = time.monotonic() + limit_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited ({self.process.returncode}):\n{self.log()}")
            try:
                if check():
                    return
            except (OSError, AssertionError, KeyError, IndexError) as exc:
                last_error = exc  # not up yet, or no sample yet
            time.sleep(0.25)
        pytest.fail(f"prometheus: {what} not seen in {limit_s} s "
                    f"(last error: {last_error!r}):\n{self.log()}")


def scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


@contextmanager
def running_prometheus(tmp: Path, target: str,
                       rule_files: Sequence[Path] = (ALERTS,)) -> Iterator[Prometheus]:
    """A ready Prometheus scraping `target` ("host:port"); always terminated on exit.

    Skips the test when the `prometheus` binary is missing."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; "
                    "scripts/install-prometheus.sh installs it, CI does)")
    server = Prometheus(binary, tmp, target, rule_files)
    try:
        server.wait_for("its own readiness", server.ready)
        yield server
    finally:
        server.stop()  # always: a leaked prometheus would outlive the test run
