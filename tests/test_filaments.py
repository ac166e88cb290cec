"""core.filaments: skeleton tracing, junction splitting, length filter, resampling, directions."""

import numpy as np
import pytest
from tomolive.core.classes import ClassSpec
from tomolive.core.filaments import Filament, trace_filaments

VOXEL_A = 10.0  # 1 nm voxels
SPEC = ClassSpec("actin", "filament", min_length_nm=10.0, point_spacing_nm=2.0)
SHAPE = (32, 64, 64)


def _grid():
    zz, yy, xx = np.indices(SHAPE)
    return np.stack([zz, yy, xx], axis=-1).astype(np.float64)


def _segment(p0, p1, radius):
    """A straight tube (capsule) from p0 to p1 (z, y, x)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    axis = p1 - p0
    length = np.linalg.norm(axis)
    axis /= length
    rel = _grid() - p0
    t = np.clip(rel @ axis, 0, length)
    return np.linalg.norm(rel - t[..., None] * axis, axis=-1) <= radius


def _half_ring(radius=25.0, tube=2.5, centre=(16, 32, 32)):
    """A semicircular tube of arc length pi * radius in the plane z = centre[0]."""
    g = _grid()
    dy, dx = g[..., 1] - centre[1], g[..., 2] - centre[2]
    ring = np.sqrt((np.hypot(dy, dx) - radius) ** 2 + (g[..., 0] - centre[0]) ** 2) <= tube
    return ring & (dx >= 0)


def test_curved_tube_traced_to_one_filament_of_the_right_length():
    radius, centre = 25.0, (16, 32, 32)
    filaments = trace_filaments(_half_ring(radius, centre=centre), SPEC, VOXEL_A)
    assert len(filaments) == 1
    f = filaments[0]
    assert f.length_voxels() == pytest.approx(np.pi * radius, rel=0.05)
    # Points lie on the ring's centre line, every ~2 nm.
    r = np.hypot(f.points_zyx[:, 1] - centre[1], f.points_zyx[:, 2] - centre[2])
    assert np.abs(r - radius).max() < 1.5
    assert np.abs(f.points_zyx[:, 0] - centre[0]).max() < 0.5
    steps = np.linalg.norm(np.diff(f.points_zyx, axis=0), axis=1)
    assert np.all((steps > 1.5) & (steps <= 2.0 + 1e-9))
    # Unit tangents, along the ring (perpendicular to the radius) away from the ends.
    assert np.allclose(np.linalg.norm(f.directions_zyx, axis=1), 1.0)
    radial = np.stack([np.zeros(len(r)), f.points_zyx[:, 1] - centre[1],
                       f.points_zyx[:, 2] - centre[2]], axis=1) / r[:, None]
    cos = np.abs((radial * f.directions_zyx).sum(axis=1))[3:-3]
    assert np.degrees(np.arcsin(np.clip(cos, 0, 1))).max() < 10.0


def test_straight_filament_directions_and_scaling():
    mask = _segment((4, 32, 32), (28, 32, 32), 1.5)
    spec = ClassSpec("mt", "filament", min_length_nm=5.0, point_spacing_nm=8.0)
    (f,) = trace_filaments(mask, spec, 20.0)  # 2 nm voxels: a point every 4 voxels
    assert np.allclose(np.abs(f.directions_zyx), [1, 0, 0], atol=1e-6)
    assert np.allclose(np.diff(f.points_zyx[:, 0]), 4.0)
    assert np.allclose(f.points_zyx[:, 1:], 32.0)


def test_hollow_tube_is_traced_along_its_axis():
    """A model may label only a microtubule's wall: the lumen is filled before thinning."""
    direction = np.array([0.0, 0.6, 0.8])  # oblique in the xy plane
    start = np.array([16.0, 8.0, 6.0])
    length = 60.0
    rel = _grid() - start
    t = rel @ direction
    radial = np.linalg.norm(rel - t[..., None] * direction, axis=-1)
    wall = (radial >= 3.5) & (radial <= 6.5) & (t >= 0) & (t <= length)
    spec = ClassSpec("microtubule", "filament", min_length_nm=20.0, point_spacing_nm=4.0)
    (f,) = trace_filaments(wall, spec, VOXEL_A)
    assert f.length_voxels() == pytest.approx(length, rel=0.10)
    off_axis = f.points_zyx - start
    off_axis -= (off_axis @ direction)[:, None] * direction
    # Within about a diameter of an oblique open end the lumen is not enclosed in any slice, so
    # the trace may bend towards the wall there: check the interior.
    assert np.linalg.norm(off_axis, axis=1)[3:-3].max() < 1.5
    assert np.abs(np.abs(f.directions_zyx[3:-3] @ direction) - 1).max() < 0.02
    # Without lumen filling the wall thins to a loop around the lumen, not the axis.
    no_fill = ClassSpec("microtubule", "filament", min_length_nm=20.0, point_spacing_nm=4.0,
                        extra={"lumen_diameter_nm": 0})
    traced = trace_filaments(wall, no_fill, VOXEL_A)
    assert not (len(traced) == 1 and abs(traced[0].length_voxels() - length) < 6)


def test_y_junction_splits_into_three_pieces():
    centre = (16, 32, 32)
    arms = [(16, 4, 32), (16, 56, 8), (16, 56, 56)]
    mask = np.zeros(SHAPE, dtype=bool)
    for end in arms:
        mask |= _segment(centre, end, 2.0)
    filaments = trace_filaments(mask, SPEC, VOXEL_A)
    assert len(filaments) == 3
    expected = sorted(np.linalg.norm(np.subtract(end, centre)) for end in arms)
    lengths = sorted(f.length_voxels() for f in filaments)
    # Each piece runs from the junction to the tip of its arm (the capsule's end, radius 2).
    for got, want in zip(lengths, expected, strict=True):
        assert want - 1.0 < got <= want + 2.5
    for f in filaments:
        ends = f.points_zyx[[0, -1]]
        assert np.linalg.norm(ends - centre, axis=1).min() < 3.0
        assert np.allclose(np.linalg.norm(f.directions_zyx, axis=1), 1.0)


def test_short_pieces_are_dropped_and_short_twigs_do_not_split():
    mask = np.zeros((16, 32, 64), dtype=bool)
    mask[8, 16, 5:60] = True  # 55 voxels
    mask[8, 17:19, 30] = True  # a 2-voxel twig on it
    mask[8, 5, 10:14] = True  # an isolated 4-voxel piece
    filaments = trace_filaments(mask, SPEC, VOXEL_A)
    assert len(filaments) == 1
    assert filaments[0].length_voxels() == pytest.approx(54.0, abs=2.0)
    # Without a minimum length every piece is kept: the twig splits the line.
    keep_all = ClassSpec("actin", "filament", point_spacing_nm=2.0)
    assert len(trace_filaments(mask, keep_all, VOXEL_A)) == 4  # 2 halves, twig, isolated


def test_empty_mask_and_bad_input():
    assert trace_filaments(np.zeros((8, 8, 8), bool), SPEC, VOXEL_A) == []
    with pytest.raises(ValueError, match=r"filament mask must be 3-D \[z, y, x\], got shape"):
        trace_filaments(np.zeros((8, 8), bool), SPEC, VOXEL_A)
    with pytest.raises(ValueError, match="filament has 2 points but 1 directions"):
        Filament(np.zeros((2, 3)), np.zeros((1, 3)))


def test_the_local_radius_at_a_free_end_is_the_distance_transforms_value():
    # _extend_end reads one voxel's distance to the background; computed for that voxel alone
    # it must equal the whole window's Euclidean distance transform there, bit for bit.
    from scipy import ndimage
    from tomolive.core.filaments import _distance_to_background

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        field = ndimage.gaussian_filter(rng.standard_normal((17, 17, 17)), 2.5)
        window = field > rng.uniform(-1.5, 0.5) * field.std()
        point = tuple(int(i) for i in rng.integers(0, 17, 3))
        if window[point]:
            assert (_distance_to_background(window, point)
                    == ndimage.distance_transform_edt(window)[point])
            checked += 1
    assert checked > 20
    full = np.ones((9, 9, 9), dtype=bool)  # no background at all: the transform's convention
    assert (_distance_to_background(full, (4, 4, 4))
            == ndimage.distance_transform_edt(full)[4, 4, 4])
