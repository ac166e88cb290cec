"""core.particles: watershed split of touching particles, centroids, scores, volume limits."""

import numpy as np
import pytest
from scipy import ndimage
from tomolive.core.classes import ClassSpec
from tomolive.core.particles import ParticleTable, find_particles

VOXEL_A = 10.0  # 1 nm voxels
RIBO = ClassSpec("ribosome", "particle", diameter_nm=10.0)  # radius 5 voxels


def _sphere(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def _two_touching(shape=(32, 64, 64)):
    """Two radius-5 spheres 9 voxels apart (overlapping: one blob), different confidences."""
    a, b = (16, 30, 27), (16, 30, 36)
    labels = np.zeros(shape, dtype=np.int8)
    labels[_sphere(shape, a, 5) | _sphere(shape, b, 5)] = 2
    confidence = np.zeros(shape, dtype=np.uint8)
    confidence[:, :, :32] = 200  # left sphere (the split plane is x = 31.5)
    confidence[:, :, 32:] = 100
    return labels, confidence, a, b


def test_two_touching_spheres_split_with_centroids_and_scores():
    labels, confidence, a, b = _two_touching()
    assert ndimage.label(labels == 2)[1] == 1  # really one connected blob
    table = find_particles(labels, confidence, 2, RIBO, VOXEL_A)
    assert table.class_name == "ribosome"
    assert len(table) == 2
    order = np.argsort(table.zyx[:, 2])
    zyx, score = table.zyx[order], table.score[order]
    assert np.abs(zyx[0] - a).max() <= 1.0
    assert np.abs(zyx[1] - b).max() <= 1.0
    assert score[0] == pytest.approx(200 / 255, abs=0.02)
    assert score[1] == pytest.approx(100 / 255, abs=0.02)
    assert table.zyx.dtype == np.float64 and table.score.dtype == np.float32
    assert table.volume_voxels.dtype == np.int64
    # The two pieces together are the whole blob, each about one sphere.
    assert table.volume_voxels.sum() == (labels == 2).sum()
    assert all(400 < v < 560 for v in table.volume_voxels)


def test_other_classes_are_ignored():
    labels, confidence, _, _ = _two_touching()
    labels[2:6, 2:6, 2:6] = 1
    assert len(find_particles(labels, confidence, 1, RIBO, VOXEL_A)) == 0  # 64 voxels: too small
    assert len(find_particles(labels, confidence, 3, RIBO, VOXEL_A)) == 0  # absent class


def test_volume_limits_drop_too_small_and_too_large_pieces():
    labels, confidence, _, _ = _two_touching()
    labels[2:4, 2:4, 2:4] = 2  # 8 voxels: below 0.2 x 524
    table = find_particles(labels, confidence, 2, RIBO, VOXEL_A)
    assert len(table) == 2
    # Expecting 30 nm particles, 10 nm blobs are too small; expecting 4 nm particles (34 voxels),
    # they are too large and only the 8-voxel cube fits.
    big = ClassSpec("ribosome", "particle", diameter_nm=30.0)
    small = ClassSpec("ribosome", "particle", diameter_nm=4.0)
    assert len(find_particles(labels, confidence, 2, big, VOXEL_A)) == 0
    table = find_particles(labels, confidence, 2, small, VOXEL_A)
    assert np.allclose(table.zyx, [[2.5, 2.5, 2.5]]) and list(table.volume_voxels) == [8]


def test_separate_spheres_and_offsets():
    shape = (24, 48, 40)
    labels = np.zeros(shape, dtype=np.int8)
    centres = [(6, 8, 9), (17, 38, 30), (12, 24, 20)]
    for c in centres:
        labels[_sphere(shape, c, 4)] = 1
    confidence = np.full(shape, 255, dtype=np.uint8)
    spec = ClassSpec("gold", "fiducial", diameter_nm=8.0)
    table = find_particles(labels, confidence, 1, spec, VOXEL_A)
    found = sorted(map(tuple, np.round(table.zyx, 6)))
    assert found == sorted((float(z), float(y), float(x)) for z, y, x in centres)
    assert np.allclose(table.score, 1.0)


def test_with_coordinates_returns_a_new_table():
    table = ParticleTable("gold", [[1, 2, 3], [4, 5, 6]], [0.5, 0.25], [10, 20])
    moved = table.with_coordinates(table.zyx * 2)
    assert np.array_equal(moved.zyx, [[2, 4, 6], [8, 10, 12]])
    assert np.array_equal(table.zyx, [[1, 2, 3], [4, 5, 6]])
    assert np.array_equal(moved.score, table.score) and moved.class_name == "gold"
    with pytest.raises(ValueError, match=r"new coordinates have shape \(1, 3\), expected \(2, 3\)"):
        table.with_coordinates(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="2 positions but 1 scores and 2 volumes"):
        ParticleTable("gold", [[1, 2, 3], [4, 5, 6]], [0.5], [10, 20])


def test_bad_inputs_are_rejected_with_a_message():
    labels = np.zeros((8, 8, 8), np.int8)
    with pytest.raises(ValueError, match=r"labels \(8, 8, 8\) and confidence \(8, 8, 4\) differ"):
        find_particles(labels, np.zeros((8, 8, 4), np.uint8), 1, RIBO, VOXEL_A)
    membrane = ClassSpec("membrane", "membrane")
    with pytest.raises(ValueError, match="class 'membrane' has no diameter_nm"):
        find_particles(labels, np.zeros((8, 8, 8), np.uint8), 1, membrane, VOXEL_A)
