"""Idle CPU of the daemon watching a folder of N finished tomograms (issues 5 and 18).

Creates N small MRC files in folders of 100 and marks each as finished (a summary naming its
fingerprint, as the daemon itself writes), starts the real daemon (`tomolive run`) with the
default discovery settings (events, or polling with --discovery polling; a rescan every 30 s,
a full one every 300 s), waits until its start-up discovery is over (two rescans, no file
pending or unchecked, from /metrics, then --warmup seconds), then measures the CPU seconds of the
daemon and its worker processes over a window, from /proc. Last, it drops one new tomogram
into a new session folder and times how long the daemon takes to report it (its "ok" or
failure line in the log), to show that a cheap idle daemon still finds new work. Prints JSON.

    python bench/daemon_idle.py --files 100000 --seconds 330 --backlog /tmp/idle-backlog
    python bench/daemon_idle.py --files 1000 --seconds 60 --discovery polling
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from tomolive.core.fingerprint import input_fingerprint
from tomolive.core.result_folder import summary_path
from tomolive.core.volume import write_mrc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test harness's waiting helper, as bench/attack.py uses it

from tests.daemon_harness import wait_until  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children still running, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for candidate in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(c) for c in text]
    return found


def make_backlog(root: Path, count: int) -> None:
    incoming, outputs = root / "incoming", root / "outputs"
    data = np.zeros((8, 32, 32), np.float32)
    for i in range(count):
        folder = incoming / f"grid{i // 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"TS_{i:04d}.mrc"
        write_mrc(path, data, 10.0)
        done = outputs / folder.name / path.stem
        done.mkdir(parents=True, exist_ok=True)
        summary = {"input": {"fingerprint": input_fingerprint(path)}, "model": {}}
        summary_path(done).write_text(json.dumps(summary))


def metric(log_path: Path, name: str) -> float:
    """A sample from a real scrape of the daemon's /metrics (its address from the log)."""
    found = re.findall(r"metrics on (http://\S+)/metrics", log_path.read_text())
    if not found:
        return float("nan")
    with urllib.request.urlopen(f"{found[-1]}/metrics", timeout=10) as response:
        match = re.search(rf"^{name} (\S+)$", response.read().decode(), re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds to wait after start-up discovery is over")
    parser.add_argument("--discovery", default="auto")
    parser.add_argument("--rescan", type=float, default=30.0)
    parser.add_argument("--backlog", type=Path,
                        help="make the backlog here once and reuse it on later runs (100,000 "
                             "files take about 10 minutes to make); default: a temporary folder")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.backlog is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tomolive-idle-")))
        else:
            root = args.backlog
            root.mkdir(parents=True, exist_ok=True)
        marker = root / f".backlog-{args.files}"
        if not marker.exists():
            for folder in ("incoming", "outputs"):
                shutil.rmtree(root / folder, ignore_errors=True)
            make_backlog(root, args.files)
            marker.touch()
        (root / "models").mkdir(exist_ok=True)
        config = {"watch": [{"path": str(root / "incoming")}], "output_dir": str(root / "outputs"),
                  "models_dir": str(root / "models"), "devices": "cpu",
                  "discovery": args.discovery, "rescan_interval_seconds": args.rescan,
                  "metrics": {"port": 0}}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        log_path = root / "daemon.log"
        log = log_path.open("wb")
        started = time.monotonic()
        daemon = subprocess.Popen([sys.executable, "-m", "tomolive", "run", "--config",
                                   str(root / "config.yaml")], stdout=log, stderr=log)
        try:
            rescans = "tomolive_discovery_rescans_total"
            wait_until(lambda: metric(log_path, rescans) >= 2
                     and metric(log_path, "tomolive_discovery_pending") == 0
                     and metric(log_path, "tomolive_discovery_unchecked") == 0, 3600,
                     "start-up discovery (two rescans, every file judged and checked)")
            startup_s = time.monotonic() - started
            time.sleep(args.warmup)
            rescans_before = metric(log_path, rescans)
            start_cpu, start = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.seconds)
            used = cpu_seconds(daemon.pid) - start_cpu
            wall = time.monotonic() - start
            rescans_in_window = metric(log_path, rescans) - rescans_before
            processed = log_path.read_text().count(": ok in")
            new = root / "incoming" / "new_session" / "TS_new.mrc"
            new.parent.mkdir(exist_ok=True)
            write_mrc(new, np.zeros((32, 64, 64), np.float32), 10.0)
            written = time.monotonic()
            wait_until(lambda: "TS_new.mrc" in log_path.read_text(), 600, "the new tomogram")
            found_s = time.monotonic() - written
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            for folder in ("incoming", "outputs"):  # a reused backlog stays as it was made
                shutil.rmtree(root / folder / "new_session", ignore_errors=True)
    print(json.dumps({
        "files": args.files, "discovery": args.discovery, "rescan_interval_s": args.rescan,
        "full_rescan_interval_s": 300.0,
        "startup_s": round(startup_s, 1), "window_s": round(wall, 1), "cpu_s": round(used, 3),
        "cpu_fraction_of_one_core": round(used / wall, 4),
        "rescans_in_window": rescans_in_window,
        "tomograms_processed_during_window": processed,
        "new_tomogram_reported_after_s": round(found_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
