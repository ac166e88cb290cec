"""`tomolive demo --once`: the README's main command runs the real daemon on synthetic
tomograms written slowly into its incoming folder, and exits 0 after their results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def test_demo_once_segments_every_tomogram_and_exits(tmp_path):
    folder = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "tomolive", "demo", "--once", "--dir", str(folder), "--count", "2"],
        capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "finished 2/2" in run.stdout
    model_grids = []
    for name, voxel_size_a in (("TS_01", 10.0), ("TS_02", 13.2)):
        summary = json.loads((folder / "outputs" / name / f"{name}_summary.json").read_text())
        model_grids.append(summary["input"]["model_grid_shape_zyx"])
        assert summary["voxel_size_a"] == pytest.approx(voxel_size_a)
        assert summary["input"]["dtype"] == ("float32" if name == "TS_01" else "int16")
        assert sum(summary["counts"]["particles"].values()) > 0
        assert f"{name}.mrc: ok" in run.stdout  # the daemon's own log line, passed through
    # One field of view at two voxel sizes: on the model's grid the two are the same size.
    assert model_grids[0] == pytest.approx(model_grids[1], abs=1)
