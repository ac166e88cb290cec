"""core.synth: determinism, content, physical consistency across voxel sizes, files."""

from __future__ import annotations

import csv

import mrcfile
import numpy as np
import pytest
from tomolive.core.classes import SYNTH_CLASS_NAMES
from tomolive.core.synth import synthesize, write_synth

# Boxes with the same physical extent ((shape - 1) * voxel size = 66 x 132 x 132 nm).
SHAPE_10A = (67, 133, 133)
SHAPE_13A = (51, 101, 101)


@pytest.fixture(scope="module")
def default_volume():
    return synthesize((64, 256, 256), 10.0, seed=0, simulator="cartoon")


@pytest.fixture(scope="module")
def small_10a():
    return synthesize(SHAPE_10A, 10.0, seed=3, simulator="cartoon")


def test_types_shapes_and_normalisation(default_volume):
    r = default_volume
    assert r.tomogram.dtype == np.float32 and r.labels.dtype == np.int8
    assert r.tomogram.shape == r.labels.shape == (64, 256, 256)
    assert r.voxel_size_a == 10.0
    assert tuple(r.class_names) == SYNTH_CLASS_NAMES
    assert abs(float(r.tomogram.mean())) < 1e-3
    assert abs(float(r.tomogram.std()) - 1.0) < 1e-3
    assert set(np.unique(r.labels)) <= set(range(len(SYNTH_CLASS_NAMES) + 1))
    assert 0.02 < r.info["snr"] < 1.0  # noisy, as tomograms are, but not hopeless


def test_every_class_present(default_volume):
    counts = np.bincount(default_volume.labels.ravel().astype(np.int64), minlength=6)
    for i, name in enumerate(SYNTH_CLASS_NAMES, start=1):
        assert counts[i] > 500, f"{name}: only {counts[i]} voxels"
    names = {p[0] for p in default_volume.particles}
    assert names == {"ribosome", "gold"}
    assert sum(p[0] == "ribosome" for p in default_volume.particles) >= 10


def test_particles_lie_inside_their_labels(default_volume):
    r = default_volume
    for name, x, y, z in r.particles:
        zi, yi, xi = (int(round(v)) for v in (z, y, x))
        assert 0 <= zi < 64 and 0 <= yi < 256 and 0 <= xi < 256
        assert r.labels[zi, yi, xi] == SYNTH_CLASS_NAMES.index(name) + 1, (name, x, y, z)


def test_ribosome_centre_is_label_centroid(default_volume):
    from scipy import ndimage

    r = default_volume
    components, _ = ndimage.label(r.labels == SYNTH_CLASS_NAMES.index("ribosome") + 1)
    for name, x, y, z in r.particles:
        if name != "ribosome":
            continue
        comp = components[int(round(z)), int(round(y)), int(round(x))]
        cz, cy, cx = ndimage.center_of_mass(components == comp)
        assert np.hypot(np.hypot(cz - z, cy - y), cx - x) < 1.0


def test_gold_is_densest_and_dark(default_volume):
    r = default_volume
    means = {name: float(r.tomogram[r.labels == i].mean())
             for i, name in enumerate(SYNTH_CLASS_NAMES, start=1)}
    background = float(r.tomogram[r.labels == 0].mean())
    # Dense matter is dark (negative); gold far darker than any protein or membrane.
    for name, mean in means.items():
        assert mean < background, name
        if name != "gold":
            assert means["gold"] < 3 * mean, (means["gold"], name, mean)


def test_deterministic_for_a_seed():
    calls = []
    a = synthesize((40, 96, 96), 10.0, seed=5, simulator="cartoon",
                   progress=lambda *args: calls.append(args))
    b = synthesize((40, 96, 96), 10.0, seed=5, simulator="cartoon")
    assert [c for c in calls if c[1] == 1.0] == [("scene", 1.0), ("render", 1.0), ("image", 1.0)]
    assert all(0.0 <= f <= 1.0 for _, f in calls)
    c = synthesize((40, 96, 96), 10.0, seed=6, simulator="cartoon")
    assert np.array_equal(a.tomogram, b.tomogram)
    assert np.array_equal(a.labels, b.labels)
    assert a.particles == b.particles
    assert not np.array_equal(a.labels, c.labels)
    assert not np.allclose(a.tomogram, c.tomogram)


def test_same_physical_scene_at_another_voxel_size(small_10a):
    coarse = synthesize(SHAPE_13A, 13.2, seed=3, simulator="cartoon")
    fine = small_10a
    assert len(fine.particles) == len(coarse.particles) > 0
    for (n1, *p1), (n2, *p2) in zip(fine.particles, coarse.particles, strict=True):
        assert n1 == n2
        # Physical positions (nm) agree to well within a voxel.
        assert np.allclose(np.array(p1) * 1.0, np.array(p2) * 1.32, atol=0.01)
    # Labelled physical volume per class agrees (sampling differs, not the scene).
    for i, name in enumerate(SYNTH_CLASS_NAMES, start=1):
        v_fine = np.count_nonzero(fine.labels == i) * 1.0**3
        v_coarse = np.count_nonzero(coarse.labels == i) * 1.32**3
        if v_fine or v_coarse:
            assert abs(v_fine - v_coarse) <= 0.05 * max(v_fine, v_coarse), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape_zyx must be 3 sizes >= 8"):
        synthesize((4, 64, 64), 10.0)
    with pytest.raises(ValueError, match="voxel_size_a must be > 0"):
        synthesize((16, 64, 64), 0.0)


def test_write_synth(tmp_path, small_10a):
    r = small_10a
    tomo, labels, table = tmp_path / "t.mrc", tmp_path / "t_labels.mrc", tmp_path / "t.csv"
    write_synth(r, tomo, labels_path=labels, particles_csv=table)
    with mrcfile.open(tomo) as m:
        assert m.data.dtype == np.float32
        assert np.array_equal(m.data, r.tomogram)
        assert float(m.voxel_size.x) == pytest.approx(10.0)
    with mrcfile.open(labels) as m:
        assert m.header.mode == 0
        assert np.array_equal(m.data, r.labels)
        assert float(m.voxel_size.z) == pytest.approx(10.0)
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "x", "y", "z"]
    assert len(rows) - 1 == len(r.particles)
    for row, (name, x, y, z) in zip(rows[1:], r.particles, strict=True):
        assert row[0] == name
        assert np.allclose([float(v) for v in row[1:]], [x, y, z], atol=1e-3)


def test_write_synth_int16(tmp_path, small_10a):
    path = tmp_path / "t16.mrc"
    write_synth(small_10a, path, dtype="int16")
    with mrcfile.open(path) as m:
        assert m.header.mode == 1
        stored = m.data.astype(np.float64)
    assert np.abs(stored).max() == 32000
    assert np.corrcoef(stored.ravel(), small_10a.tomogram.ravel())[0, 1] > 0.9999
    with pytest.raises(ValueError, match="dtype must be float32, float16 or int16, got 'int8'"):
        write_synth(small_10a, tmp_path / "x.mrc", dtype="int8")
