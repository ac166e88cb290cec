"""Throughput of the real daemon: N tomograms dropped at once, time until all are done.

Starts `tomolive run` (devices and workers as given), waits until it serves, copies N
synthetic tomograms into the watched folder at once, and waits for their N summaries. Prints
JSON: wall seconds from the drop to the last summary, tomograms per minute, and the median
per-stage seconds from the summaries. Run it with --workers-per-gpu 1 and 2 to see whether a
second worker per GPU overlaps one tomogram's CPU stages with the other's inference.

    python bench/daemon_throughput.py --devices auto --workers-per-gpu 2 --tomograms 6
    python bench/daemon_throughput.py --devices cpu --tomograms 2 --shape 32 128 128  # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from tomolive.core.result_folder import summary_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test harness's waiting helper, as bench/attack.py uses it

from tests.daemon_harness import wait_until  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="auto", help="auto, cpu, or GPU indices: 0,1")
    parser.add_argument("--workers-per-gpu", type=int, default=2)
    parser.add_argument("--tomograms", type=int, default=6)
    parser.add_argument("--shape", nargs=3, type=int, default=[200, 1024, 1024])
    parser.add_argument("--pixel-size", type=float, default=10.0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    devices = args.devices if args.devices in ("auto", "cpu") else \
        [int(d) for d in args.devices.split(",")]
    with tempfile.TemporaryDirectory(prefix="tomolive-throughput-") as tmp:
        root = Path(tmp)
        staging, incoming, outputs = root / "staging", root / "incoming", root / "outputs"
        for folder in (staging, incoming, outputs, root / "models"):
            folder.mkdir()
        # One synthetic tomogram (the cartoon simulator: quick to make at any size), copied.
        subprocess.run([sys.executable, "-m", "tomolive", "synth", str(staging / "t.mrc"),
                        "--simulator", "cartoon", "--shape", *map(str, args.shape),
                        "--pixel-size", str(args.pixel_size)], check=True,
                       stdout=subprocess.DEVNULL)
        config = {"watch": [{"path": str(incoming)}], "output_dir": str(outputs),
                  "models_dir": str(root / "models"), "devices": devices,
                  "workers_per_gpu": args.workers_per_gpu, "settle_seconds": 1.0,
                  "metrics": {"port": 0}, "inference": {"precision": args.precision}}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        log_path = root / "daemon.log"
        with log_path.open("wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "tomolive", "run", "--config",
                                       str(root / "config.yaml")], stdout=log, stderr=log)
            try:
                wait_until(lambda: "tomolive serving" in log_path.read_text(), 600, "the daemon")
                for i in range(args.tomograms):  # staged next door, renamed in: whole at once
                    shutil.copy(staging / "t.mrc", staging / f"TS_{i:02d}.mrc")
                dropped = time.monotonic()
                for i in range(args.tomograms):
                    (staging / f"TS_{i:02d}.mrc").rename(incoming / f"TS_{i:02d}.mrc")
                summaries = [summary_path(outputs / f"TS_{i:02d}")
                             for i in range(args.tomograms)]
                wait_until(lambda: all(p.exists() for p in summaries), args.timeout,
                         "every summary")
                wall_s = time.monotonic() - dropped
            finally:
                daemon.terminate()
                daemon.wait(timeout=120)
        timings = [json.loads(p.read_text())["timings_s"] for p in summaries]
    stages = sorted({k for t in timings for k in t})
    print(json.dumps({
        "devices": args.devices, "workers_per_gpu": args.workers_per_gpu,
        "tomograms": args.tomograms, "shape_zyx": args.shape, "precision": args.precision,
        "wall_s": round(wall_s, 1), "tomograms_per_min": round(60 * args.tomograms / wall_s, 2),
        "median_stage_s": {k: round(statistics.median(t.get(k, 0.0) for t in timings), 2)
                           for k in stages},
    }, indent=2))


if __name__ == "__main__":
    main()
