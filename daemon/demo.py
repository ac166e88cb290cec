"""`tomolive demo`: the whole service on synthetic tomograms, as a facility would run it.

Creates a demo folder with incoming/, outputs/ and models/ and a configuration, starts the real
daemon (`tomolive run`) as a subprocess, writes synthetic tomograms slowly into incoming/ the
way reconstruction software does (under the final name, slab by slab; one of them at 13.2 Å
stored as int16), follows the results and prints them. With `--once` it stops the daemon
(SIGTERM, as systemd would) when they are done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..core.result_folder import read_summary

# Every demo tomogram images the same field, 64 x 256 x 256 nm (z, y, x): 64 x 256 x 256
# voxels at 10 Å, fewer at a coarser voxel size, as binning a reconstruction gives. Rescaled to
# the model's voxel size, each is about as much work; a fixed voxel count at 13.2 Å was a field
# 2.3 times larger, and more than half the demo's time.
DEMO_FIELD_NM_ZYX = (64.0, 256.0, 256.0)
WRITE_CHUNKS = 8  # a tomogram arrives in this many pieces
WRITE_PAUSE_S = 0.4  # between pieces: the daemon must wait until the file is complete
RESULT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class DemoTomogram:
    name: str
    voxel_size_a: float
    dtype: str
    seed: int


def demo_tomograms(count: int) -> list[DemoTomogram]:
    kinds = [(10.0, "float32"), (13.2, "int16"), (10.0, "float16")]
    return [DemoTomogram(f"TS_{i + 1:02d}", *kinds[i % len(kinds)], seed=100 + i)
            for i in range(count)]


def demo_shape_zyx(voxel_size_a: float) -> tuple[int, int, int]:
    """The voxels that hold DEMO_FIELD_NM_ZYX at `voxel_size_a`."""
    z, y, x = (round(n * 10.0 / voxel_size_a) for n in DEMO_FIELD_NM_ZYX)
    return z, y, x


def run_demo(folder: Path, once: bool, count: int = 3) -> int:
    folder = folder.absolute()
    config_path = _prepare_folder(folder)
    print(f"demo folder {folder}: the daemon watches incoming/, writes outputs/, "
          f"loads models from models/ (empty: the shipped default model)", flush=True)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tomolive", "run", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder,
    )
    threading.Thread(target=_echo, args=(daemon.stdout,), daemon=True).start()
    tomograms = demo_tomograms(count)
    finished: dict[str, dict] = {}
    try:
        for tomogram in tomograms:
            _write_slowly(folder / "incoming", tomogram)
        finished = _wait_for_results(folder / "outputs", tomograms, daemon)
        _print_results(folder / "outputs", finished)
        if not once:
            print("the daemon keeps running: drop .mrc files into "
                  f"{folder / 'incoming'}; Ctrl-C stops it", flush=True)
            daemon.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=180)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    ok = len(finished) == len(tomograms)
    return 0 if ok and daemon.returncode == 0 else 1


def _prepare_folder(folder: Path) -> Path:
    for sub in ("incoming", "outputs", "models"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = {
        "watch": [{"path": "incoming", "patterns": ["*.mrc", "*.rec"], "recursive": True}],
        "output_dir": "outputs",
        "models_dir": "models",
        "devices": "auto",
        "settle_seconds": 2.0,
        "rescan_interval_seconds": 5.0,
        "metrics": {"host": "127.0.0.1", "port": 0},  # any free port: demos must not collide
    }
    path = folder / "config.yaml"
    path.write_text("# written by `tomolive demo`\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _echo(stream) -> None:
    for line in stream:
        print(f"  [daemon] {line.rstrip()}", flush=True)


def _write_slowly(incoming: Path, tomogram: DemoTomogram) -> None:
    """Write an MRC under its final name, a slab at a time, as AreTomo does."""
    from ..core.synth import synthesize
    from ..core.volume import write_mrc

    result = synthesize(demo_shape_zyx(tomogram.voxel_size_a), tomogram.voxel_size_a,
                        tomogram.seed)
    data = _as_dtype(result.tomogram, tomogram.dtype)
    staging = incoming.parent / f".{tomogram.name}.staging.mrc"  # outside the watched folder
    write_mrc(staging, data, tomogram.voxel_size_a)
    blob = staging.read_bytes()
    staging.unlink()
    target = incoming / f"{tomogram.name}.mrc"
    print(f"writing {target.name} ({tomogram.voxel_size_a:g} Å, {tomogram.dtype}, "
          f"{len(blob) / 1e6:.0f} MB) in {WRITE_CHUNKS} pieces", flush=True)
    chunk = -(-len(blob) // WRITE_CHUNKS)
    with target.open("wb") as handle:
        for start in range(0, len(blob), chunk):
            handle.write(blob[start:start + chunk])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(WRITE_PAUSE_S)


def _as_dtype(tomogram: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":  # as a detector-count tomogram: scaled to use the integer range
        scale = 3000.0 / max(float(np.abs(tomogram).max()), 1e-6)
        return np.round(tomogram * scale).astype(np.int16)
    return tomogram.astype(dtype)


def _wait_for_results(outputs: Path, tomograms: list[DemoTomogram],
                      daemon: subprocess.Popen) -> dict[str, dict]:
    finished: dict[str, dict] = {}
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while len(finished) < len(tomograms) and time.monotonic() < deadline:
        if daemon.poll() is not None:
            print(f"the daemon exited with status {daemon.returncode}", flush=True)
            break
        for tomogram in tomograms:
            summary = read_summary(outputs / tomogram.name)
            if tomogram.name not in finished and summary is not None:
                finished[tomogram.name] = summary
                print(f"finished {len(finished)}/{len(tomograms)}: {tomogram.name}", flush=True)
        time.sleep(0.5)
    return finished


def _print_results(outputs: Path, finished: dict[str, dict]) -> None:
    print(f"\nresults in {outputs}:")
    for name, summary in finished.items():
        counts = summary.get("counts", {})
        parts = [f"{k}: {v}" for k, v in counts.get("particles", {}).items()]
        parts += [f"{k} filaments: {v}" for k, v in counts.get("filaments", {}).items()]
        total = summary.get("timings_s", {}).get("total", 0.0)
        print(f"  {name} ({summary.get('voxel_size_a', 0):g} Å) in {total:.1f}s: "
              + ", ".join(parts))
        folder = outputs / name
        for path in sorted(folder.iterdir()):
            print(f"      {path.name}")
