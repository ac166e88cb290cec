"""Run the real daemon (`python -m tomolive run`) as a subprocess against real folders.

Shared by the daemon, metrics, Prometheus and multi-host tests: one piece of code that starts,
watches and stops daemons, and makes tiny models and tomograms for them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tomolive.core.classes import SYNTH_CLASS_NAMES, default_class
from tomolive.core.model import BundleMeta, UNet25D, save_bundle
from tomolive.core.preprocess import DEFAULT_RECIPE
from tomolive.core.result_folder import (
    SUMMARY_SUFFIX,
    is_unfinished_name,
    read_summary,
    stem_of_summary,
)
from tomolive.core.volume import write_mrc
from tomolive.daemon.holds import HOLD_DIR_ENV

TOMOGRAM_SHAPE_ZYX = (16, 64, 64)


def write_tiny_model(path: Path, name: str = "tiny", version: int = 1, seed: int = 0,
                     voxel_size_a: float = 10.0) -> Path:
    """A random-weight bundle small enough for fast CPU tests (the daemon's plumbing is
    what these tests check, not segmentation quality)."""
    import torch

    torch.manual_seed(seed)
    arch = {"name": "unet25d", "in_slices": 3, "base_width": 4, "levels": 5,
            "n_classes": len(SYNTH_CLASS_NAMES) + 1}
    network = UNet25D(in_slices=3, n_classes=arch["n_classes"], base_width=4, levels=5)
    meta = BundleMeta(name=name, version=version, architecture=arch, voxel_size_a=voxel_size_a,
                      classes=[default_class(n) for n in SYNTH_CLASS_NAMES],
                      preprocess=DEFAULT_RECIPE, description="random weights, for tests")
    save_bundle(path, network, meta)
    return path


def failure_records(outputs: Path) -> list[Path]:
    """The failure records (daemon/failure_records.py) in an output folder."""
    return sorted((outputs / ".tomolive" / "failures").glob("*.json"))


def tomogram_bytes(seed: int = 0, shape_zyx=TOMOGRAM_SHAPE_ZYX, voxel_size_a: float = 10.0,
                   scratch: Path | None = None, nan: bool = False) -> bytes:
    """The bytes of a small float32 MRC file (random noise with a few dark blobs)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape_zyx).astype(np.float32)
    if nan:
        data[shape_zyx[0] // 2, 3, 3] = np.nan
    scratch = scratch or Path(os.environ.get("TMPDIR", "/tmp"))
    path = scratch / f".scratch-{os.getpid()}-{seed}-{time.monotonic_ns()}.mrc"
    write_mrc(path, data, voxel_size_a)
    blob = path.read_bytes()
    path.unlink()
    return blob


def write_slowly(target: Path, blob: bytes, chunks: int = 6, pause_s: float = 0.3) -> None:
    """Write under the final name piece by piece, as reconstruction software does."""
    step = -(-len(blob) // chunks)
    with target.open("wb") as handle:
        for start in range(0, len(blob), step):
            handle.write(blob[start:start + step])
            handle.flush()
            time.sleep(pause_s)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def mount_tmpfs(folder: Path, size: str, remount: bool = False) -> None:
    """A small RAM file system at `folder` (root only): a disk that can really fill up."""
    options = f"remount,size={size}" if remount else f"size={size},mode=0755"
    command = ["mount", "-o", options, str(folder)] if remount else \
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    subprocess.run(command, check=True, capture_output=True)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               diagnose: Callable[[], str] = lambda: "") -> Any:
    """Poll `predicate` until it returns something true (returned) or `timeout_s` passes
    (AssertionError naming `what`, with `diagnose()` appended). Waits on a state, not a time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}\n{diagnose()}")


class Daemon:
    """One `tomolive run` subprocess with its own config in `root`."""

    def __init__(self, root: Path, name: str = "d1", **overrides: Any) -> None:
        self.root = root
        self.name = name
        self.incoming = root / "incoming"
        self.outputs = root / "outputs"
        self.models = root / "models"
        for folder in (self.incoming, self.outputs, self.models):
            folder.mkdir(parents=True, exist_ok=True)
        config = {
            "watch": [{"path": str(self.incoming), "patterns": ["*.mrc"]}],
            "output_dir": str(self.outputs),
            "models_dir": str(self.models),
            "devices": "cpu",
            "settle_seconds": 0.5,
            "rescan_interval_seconds": 1.0,
            "truncated_after_seconds": 2.0,
            "max_attempts": 2,
            "lease_seconds": 4.0,
            "shutdown_grace_seconds": 20.0,
            "metrics": {"host": "127.0.0.1", "port": 0},
        }
        config.update(overrides)
        self.config_path = root / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root / f"{name}.log"
        # Stage holds (tomolive.daemon.holds): a test parks a tomogram at a known point with
        # hold() instead of hoping that it is still running when it sends a signal.
        self.hold_dir = root / f"{name}-holds"
        self.hold_dir.mkdir(exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", HOLD_DIR_ENV: str(self.hold_dir),
                    **(env or {})}
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tomolive", "run", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=self.root)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 60.0,
                 what: str = "condition") -> Any:
        def ready() -> Any:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited ({self.process.returncode}) "
                                     f"while waiting for {what}:\n{self.log[-3000:]}")
            return predicate()

        return wait_until(ready, timeout_s, what, lambda: self.log[-3000:])

    def wait_for_failure_records_cleared(self, timeout_s: float = 30.0) -> None:
        """Until the output folder holds no failure record. A success clears its tomogram's
        record in the main loop after the worker has published the summary, so a test that
        has just seen a summary must wait for this state rather than look once."""
        self.wait_for(lambda: not failure_records(self.outputs), timeout_s,
                      "the failure records to be cleared")

    def wait_for_log(self, pattern: str, timeout_s: float = 60.0) -> re.Match:
        return self.wait_for(lambda: re.search(pattern, self.log, re.MULTILINE), timeout_s,
                             f"log line /{pattern}/")

    def metrics_url(self, timeout_s: float = 60.0) -> str:
        pattern = r"metrics on (http://\S+)/metrics"
        self.wait_for_log(pattern, timeout_s)
        return re.findall(pattern, self.log)[-1]  # the latest start's address

    def metric(self, name: str, **labels: str) -> float:
        """The value of a sample in a real scrape of the daemon's /metrics (`labels`: all of
        its labels, in the order the metric declares them)."""
        with urllib.request.urlopen(f"{self.metrics_url()}/metrics", timeout=10) as response:
            text = response.read().decode()
        selector = re.escape(name)
        if labels:
            selector += re.escape("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}")
        match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics:\n{text[:2000]}"
        return float(match.group(1))

    def wait_for_rescans(self, count: int = 2, timeout_s: float = 60.0) -> None:
        """Wait until the daemon has run `count` more full rescans of its watched folders:
        what a test needs before it asserts that nothing more happens."""
        name = "tomolive_discovery_rescans_total"
        target = self.metric(name) + count
        self.wait_for(lambda: self.metric(name) >= target, timeout_s, f"{count} more rescans")

    def append_seen(self, target: Path, blob: bytes, pieces: int, rescans: int = 3) -> None:
        """Append `blob` to `target` in `pieces` (a transfer that resumes), waiting after each
        until the daemon has rescanned `rescans` times: every partial state is provably seen
        (and, were it mistaken for complete, read), however fast or slow the machine."""
        step = -(-len(blob) // pieces)
        with target.open("ab") as handle:
            for start in range(0, len(blob), step):
                handle.write(blob[start:start + step])
                handle.flush()
                self.wait_for_rescans(rescans)

    def hold(self, stem: str, point: str) -> None:
        """Park `stem` at `point` (a pipeline stage, or "publish") when a worker reaches it."""
        (self.hold_dir / f"{stem}.hold").write_text(point)

    def wait_held(self, stem: str, timeout_s: float = 120.0) -> str:
        """Wait until a worker is parked on `stem`; returns the held marker's text."""
        marker = self.hold_dir / f"{stem}.held"
        return self.wait_for(lambda: marker.exists() and marker.read_text(), timeout_s,
                             f"{stem} held")

    def release(self, stem: str) -> None:
        (self.hold_dir / f"{stem}.hold").unlink(missing_ok=True)

    def summary(self, stem: str, rel: str = ".") -> dict | None:
        return read_summary(self.outputs / rel / stem)

    def wait_for_summary(self, stem: str, timeout_s: float = 90.0, rel: str = ".") -> dict:
        return self.wait_for(lambda: self.summary(stem, rel), timeout_s, f"summary of {stem}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL the daemon (a test's teardown: always, whatever the test did to it). A test
        may have stopped it or its workers with SIGSTOP: they are resumed first, so that they
        die with it rather than linger stopped."""
        if self.process is not None and self.process.poll() is None:
            for pid in [*descendant_pids(self.process.pid), self.process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait()
            self._log.close()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's children file; Linux >= 3.5)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in children.read_text().split()]
        except OSError:
            pass  # the thread or the process went away
    return found


def descendant_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in child_pids(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def partial_outputs(outputs: Path) -> list[Path]:
    """Hidden temporary or set-aside result folders a crash could leave (core.result_folder).
    Folders only: while a daemon runs, the gallery's atomic file writes (core.atomic) show the
    same infix for an instant after a summary appears; `unfinished_files` checks them once the
    daemon has stopped."""
    return [p for p in _names_under(outputs) if is_unfinished_name(p.name) and p.is_dir()]


def unfinished_files(outputs: Path) -> list[Path]:
    """Everything under `outputs` still under a temporary or set-aside name: after a clean stop
    (no write in flight) this must be empty, files and folders alike."""
    return [p for p in _names_under(outputs) if is_unfinished_name(p.name)]


def _names_under(folder: Path) -> list[Path]:
    """Every file and folder under `folder`; os.walk, unlike Path.rglob, shrugs off a folder
    renamed away while it walks (a publish finishing meanwhile)."""
    found = []
    for parent, folders, files in os.walk(folder):
        found += [Path(parent) / name for name in folders + files]
    return found


def summary_counts(outputs: Path) -> dict[str, int]:
    """How many summaries each stem has anywhere under the output folder (hidden folders too):
    every tomogram done exactly once means every count is 1."""
    counts: dict[str, int] = {}
    for path in outputs.rglob(f"*{SUMMARY_SUFFIX}"):
        stem = stem_of_summary(path)
        counts[stem] = counts.get(stem, 0) + 1
    return counts
