"""`tomolive segment`, `synth` and `evaluate` as a user runs them (issue 3's "must show"):
every contract file from a 64x256x256 synthetic tomogram with the shipped default model, and
the same physical particles found in a 13.2 Å int16 copy and in a copy whose thin axis is Y."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from tomolive.core.model import default_bundle_path, load_bundle
from tomolive.core.resample import fourier_rescale, grid_for
from tomolive.core.result_folder import output_paths
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.volume import read_mrc, write_mrc

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SHAPE_ZYX = (64, 256, 256)
VOXEL_A = 10.0
ORIGIN_XYZ_A = (120.0, -40.0, 15.0)


def tomolive(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tomolive", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def read_particles(path: Path) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["class"], []).append([float(row[k]) for k in "xyz"])
    return {name: np.array(xyz) for name, xyz in rows.items()}


def matched_fraction(a_xyz_a: np.ndarray, b_xyz_a: np.ndarray, within_a: float) -> float:
    """Fraction of particles in `a` with one in `b` within `within_a` Å (physical units)."""
    if len(a_xyz_a) == 0:
        return 0.0
    distances = np.linalg.norm(a_xyz_a[:, None, :] - b_xyz_a[None, :, :], axis=2)
    return float((distances.min(axis=1) <= within_a).mean())


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """Segment three files of one physical scene: 10 Å float32, 13.2 Å int16, Y-thin copy."""
    root = tmp_path_factory.mktemp("segment")
    result = synthesize(SHAPE_ZYX, VOXEL_A, seed=11, simulator="cartoon")
    original = root / "TS_A.mrc"
    write_mrc(original, result.tomogram, VOXEL_A, ORIGIN_XYZ_A)
    write_synth(result, root / "unused.mrc", labels_path=root / "TS_A_truth.mrc",
                particles_csv=root / "TS_A_truth.csv")
    # The same tomogram resampled to 13.2 Å, stored as int16 (scaled to use its range).
    volume = read_mrc(original)
    grid = grid_for(volume.data.shape, VOXEL_A, 13.2)
    rescaled = fourier_rescale(volume.data, grid)
    scale = 3000.0 / float(np.abs(rescaled).max())
    write_mrc(root / "TS_B.mrc", np.round(rescaled * scale).astype(np.int16), 13.2,
              ORIGIN_XYZ_A)
    # IMOD `tilt` output without rotation: the beam axis is the file's Y.
    write_mrc(root / "TS_C.mrc", np.ascontiguousarray(np.swapaxes(result.tomogram, 0, 1)),
              VOXEL_A, ORIGIN_XYZ_A)
    out = root / "out"
    run = tomolive("segment", original, root / "TS_B.mrc", root / "TS_C.mrc", "--out", out,
                   "--device", "cpu")
    assert run.returncode == 0, run.stderr
    return root, out, run


def test_every_contract_file_is_written_and_valid(segmented):
    root, out, run = segmented
    bundle = load_bundle(default_bundle_path())
    expected = output_paths(out, "TS_A", bundle.classes)
    assert {p.name for p in (out / "TS_A").iterdir()} == {p.name for p in expected.values()}
    for path in expected.values():
        if path.suffix == ".mrc":
            assert mrcfile.validate(str(path), print_file=open("/dev/null", "w")), path
    labels = read_mrc(expected["labels"])
    assert labels.data.shape == SHAPE_ZYX and labels.data.dtype == np.int8
    assert labels.voxel_size_a == pytest.approx(VOXEL_A)
    assert labels.origin_xyz_a == pytest.approx(ORIGIN_XYZ_A)
    assert 0 <= labels.data.min() and labels.data.max() <= len(bundle.classes)
    for spec in bundle.classes:
        if spec.is_particle:
            star = starfile.read(expected[f"star:{spec.name}"])
            table = star["particles"] if isinstance(star, dict) else star
            assert {"rlnTomoName", "rlnCoordinateX", "rlnCenteredCoordinateXAngst"} <= \
                set(table.columns)
        if spec.is_filament:
            mask = read_mrc(expected[f"mask:{spec.name}"]).data
            assert set(np.unique(mask)) <= {0, 1}
            assert np.array_equal(mask == 1, labels.data == bundle.classes.index(spec) + 1)
            starfile.read(expected[f"filaments:{spec.name}"])
    summary = json.loads(expected["summary"].read_text())
    assert summary["model"]["sha256"] == bundle.sha256
    assert set(summary["timings_s"]) >= {"read", "rescale", "preprocess", "inference",
                                         "cleanup", "particles", "filaments", "write"}
    removed = summary["cleanup_removed_fraction"]
    assert set(removed) == {spec.name for spec in bundle.classes}
    assert all(0.0 <= fraction <= 1.0 for fraction in removed.values())
    assert summary["warnings"] == [line for line in summary["warnings"] if "cleanup" in line]
    assert "TS_A: done in" in run.stdout


def test_same_physical_particles_at_13_2_A_int16_and_with_y_thin_axis(segmented):
    root, out, _ = segmented
    a = read_particles(out / "TS_A" / "TS_A_particles.csv")
    b = read_particles(out / "TS_B" / "TS_B_particles.csv")
    c = read_particles(out / "TS_C" / "TS_C_particles.csv")
    assert a.get("gold") is not None and len(a["gold"]) >= 3, a
    assert a.get("ribosome") is not None and len(a["ribosome"]) >= 10, a
    for name, diameter_nm in (("gold", 10.0), ("ribosome", 25.0)):
        a_phys = a[name] * VOXEL_A
        b_phys = b[name] * 13.2  # x, y, z voxel indices of the 13.2 Å grid, in Å
        # The Y-thin file's columns: x, y (= original z), z (= original y).
        c_phys = c[name][:, [0, 2, 1]] * VOXEL_A
        half_radius_a = diameter_nm * 10 / 4
        assert matched_fraction(a_phys, b_phys, half_radius_a) >= 0.8, name
        assert matched_fraction(b_phys, a_phys, half_radius_a) >= 0.8, name
        assert matched_fraction(a_phys, c_phys, VOXEL_A) >= 0.9, name
        assert matched_fraction(c_phys, a_phys, VOXEL_A) >= 0.9, name
    labels_c = read_mrc(out / "TS_C" / "TS_C_labels.mrc").data
    assert labels_c.shape == (SHAPE_ZYX[1], SHAPE_ZYX[0], SHAPE_ZYX[2])


def test_particles_match_the_ground_truth(segmented):
    root, out, _ = segmented
    run = tomolive("evaluate", "--pred", out / "TS_A" / "TS_A_labels.mrc",
                   "--truth", root / "TS_A_truth.mrc",
                   "--pred-particles", out / "TS_A" / "TS_A_particles.csv",
                   "--truth-particles", root / "TS_A_truth.csv", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["dice"]["membrane"] > 0.5, result
    assert result["particles"]["gold"]["f1"] > 0.7, result


def test_bad_input_fails_with_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "notes.mrc"
    bad.write_text("not a tomogram\n" * 200)
    run = tomolive("segment", bad, "--out", tmp_path / "out", "--device", "cpu")
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("tomolive: error:")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith(f"tomolive: error: {bad}: not an MRC file"), run.stderr
    assert not (tmp_path / "out" / "notes").exists()


def test_synth_then_evaluate_truth_against_itself(tmp_path):
    run = tomolive("synth", tmp_path / "s.mrc", "--labels", tmp_path / "l.mrc", "--particles",
                   tmp_path / "p.csv", "--shape", "40", "96", "96", "--seed", "3")
    assert run.returncode == 0, run.stderr
    run = tomolive("evaluate", "--pred", tmp_path / "l.mrc", "--truth", tmp_path / "l.mrc",
                   "--pred-particles", tmp_path / "p.csv", "--truth-particles",
                   tmp_path / "p.csv")
    assert run.returncode == 0, run.stderr
    assert "membrane" in run.stdout and "1.000" in run.stdout


def test_star_rows_name_a_warp_reconstructions_tilt_series(tmp_path):
    """`TS_07_10.00Apx.mrc` is Warp's reconstruction of tilt series TS_07: the output folder
    keeps the file's stem, the STAR rows say TS_07 (and TS_07.tomostar for WarpTools)."""
    from tomolive.core.model import default_bundle_path, load_bundle
    from tomolive.core.pipeline import segment_file
    from tomolive.core.synth import synthesize, write_synth

    path = tmp_path / "TS_07_10.00Apx.mrc"
    write_synth(synthesize((48, 128, 128), 10.0, seed=2, simulator="cartoon"), path)
    bundle = load_bundle(default_bundle_path())
    seg, out_dir = segment_file(path, tmp_path / "out", bundle)
    assert out_dir.name == "TS_07_10.00Apx" and seg.tilt_series_name == "TS_07"
    tables = [starfile.read(p) for p in sorted(out_dir.glob("*.star"))]
    names = {(t, m) for df in tables
             for t, m in zip(df.rlnTomoName, df.rlnMicrographName, strict=True)}
    assert sum(len(df) for df in tables) > 0  # particles or filament points to check
    assert names == {("TS_07", "TS_07.tomostar")}
    assert all((df.rlnDetectorPixelSize == seg.voxel_size_a).all() for df in tables)


def test_two_inputs_that_would_share_an_output_folder_are_refused_before_any_work(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "TS_01.mrc").write_bytes(b"not read: refused first")
    run = subprocess.run([sys.executable, "-m", "tomolive", "segment", "a/TS_01.mrc",
                          "b/TS_01.mrc", "--out", "out"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "tomolive: error: a/TS_01.mrc and b/TS_01.mrc would both write out/TS_01; segment "
        "them into different --out folders")
    assert not (tmp_path / "out").exists()
