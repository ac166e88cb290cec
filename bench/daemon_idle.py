"""Idle CPU of the daemon watching a folder of N finished tomograms (issue 5).

Creates N small MRC files and marks each as finished (a summary naming its fingerprint, as
the daemon itself writes), starts the real daemon (`tomolive run`) with the default discovery
settings (events + a full rescan every 30 s), lets it settle, then measures the CPU seconds
of the daemon and its worker processes over a window, from /proc. Prints JSON.

    python bench/daemon_idle.py --files 1000 --seconds 60 [--discovery polling]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from tomolive.core.fingerprint import input_fingerprint
from tomolive.core.volume import write_mrc


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
        (done / f"{path.stem}_summary.json").write_text(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--discovery", default="auto")
    parser.add_argument("--rescan", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tomolive-idle-") as tmp:
        root = Path(tmp)
        make_backlog(root, args.files)
        (root / "models").mkdir()
        config = {"watch": [{"path": str(root / "incoming")}], "output_dir": str(root / "outputs"),
                  "models_dir": str(root / "models"), "devices": "cpu",
                  "discovery": args.discovery, "rescan_interval_seconds": args.rescan,
                  "metrics": {"port": 0}}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        log = (root / "daemon.log").open("wb")
        daemon = subprocess.Popen([sys.executable, "-m", "tomolive", "run", "--config",
                                   str(root / "config.yaml")], stdout=log, stderr=log)
        try:
            time.sleep(args.warmup)
            start_cpu, start = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.seconds)
            used = cpu_seconds(daemon.pid) - start_cpu
            wall = time.monotonic() - start
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
        processed = (root / "daemon.log").read_text().count(": ok in")
    print(json.dumps({
        "files": args.files, "discovery": args.discovery, "rescan_interval_s": args.rescan,
        "window_s": round(wall, 1), "cpu_s": round(used, 3),
        "cpu_fraction_of_one_core": round(used / wall, 4),
        "tomograms_processed_during_run": processed,
    }, indent=2))


if __name__ == "__main__":
    main()
