"""core.cleanup: small components, holes, opening, class priority, units."""

import numpy as np
import pytest
from tomolive.core.classes import ClassSpec
from tomolive.core.cleanup import clean_labels

VOXEL_A = 10.0  # 1 nm voxels: 1 voxel = 1 nm^3


def _labels() -> np.ndarray:
    return np.zeros((32, 64, 64), dtype=np.int8)


def test_removes_small_component_keeps_big():
    labels = _labels()
    labels[5:15, 5:15, 5:15] = 1  # 1000 voxels
    labels[20:23, 40:43, 40:43] = 1  # 27 voxels
    spec = ClassSpec("membrane", "membrane", min_component_nm3=100.0)
    out = clean_labels(labels, [spec], VOXEL_A)
    assert out is labels  # in place
    assert (out == 1).sum() == 1000
    assert out[5:15, 5:15, 5:15].min() == 1
    assert out[20:23, 40:43, 40:43].max() == 0


def test_component_size_is_physical():
    """The same 27-voxel blob is 216 nm^3 at 20 A voxels and survives a 100 nm^3 minimum."""
    labels = _labels()
    labels[20:23, 40:43, 40:43] = 1
    spec = ClassSpec("membrane", "membrane", min_component_nm3=100.0)
    assert (clean_labels(labels, [spec], 20.0) == 1).sum() == 27


def test_fills_small_hole_not_big_one_nor_open_cavity():
    labels = _labels()
    labels[2:14, 2:14, 2:14] = 1
    labels[7:9, 7:9, 7:9] = 0  # 8-voxel enclosed hole
    labels[18:30, 2:14, 2:14] = 1
    labels[21:27, 5:11, 5:11] = 0  # 216-voxel enclosed hole
    labels[2:14, 30:42, 30:42] = 1
    labels[6:9, 34:37, 30:37] = 0  # 63-voxel cavity open to the outside at x=30
    spec = ClassSpec("membrane", "membrane", fill_holes_nm3=50.0)
    out = clean_labels(labels, [spec], VOXEL_A)
    assert out[7:9, 7:9, 7:9].min() == 1
    assert out[21:27, 5:11, 5:11].max() == 0
    assert out[6:9, 34:37, 30:37].max() == 0


def test_priority_gold_fills_over_membrane_but_membrane_never_over_gold():
    membrane = ClassSpec("membrane", "membrane", fill_holes_nm3=50.0, priority=1)
    gold = ClassSpec("gold", "fiducial", diameter_nm=10.0, fill_holes_nm3=50.0, priority=10)
    labels = _labels()
    # A gold shell whose 8-voxel core was labelled membrane: gold claims it.
    labels[2:8, 2:8, 2:8] = 2
    labels[4:6, 4:6, 4:6] = 1
    # A membrane shell around an 8-voxel gold particle: the gold stays gold.
    labels[16:22, 30:36, 30:36] = 1
    labels[18:20, 32:34, 32:34] = 2
    out = clean_labels(labels, [membrane, gold], VOXEL_A)
    assert out[2:8, 2:8, 2:8].min() == 2 and out[2:8, 2:8, 2:8].max() == 2
    assert (out[18:20, 32:34, 32:34] == 2).all()
    assert (out[16:22, 30:36, 30:36] == 1).sum() == 6**3 - 8


def test_priority_order_does_not_depend_on_class_order():
    membrane = ClassSpec("membrane", "membrane", fill_holes_nm3=50.0, priority=1)
    gold = ClassSpec("gold", "fiducial", diameter_nm=10.0, fill_holes_nm3=50.0, priority=10)
    labels = _labels()
    labels[2:8, 2:8, 2:8] = 1  # gold is value 1 here
    labels[4:6, 4:6, 4:6] = 2  # membrane inside
    out = clean_labels(labels, [gold, membrane], VOXEL_A)
    assert (out[2:8, 2:8, 2:8] == 1).all()


def test_opening_removes_thin_spike_and_debris_is_removed():
    labels = _labels()
    labels[8:20, 20:32, 20:32] = 1
    labels[14, 26, 32:50] = 1  # 1-voxel spike sticking out
    spec = ClassSpec("ribo", "particle", diameter_nm=10.0, opening_radius_nm=1.5,
                     min_component_nm3=20.0)
    out = clean_labels(labels, [spec], VOXEL_A)
    assert out[14, 26, 33:50].max() == 0
    assert out[11:17, 23:29, 23:29].min() == 1  # the body survives


def _tube_walls(labels: np.ndarray, value: int) -> None:
    """What a 2.5D network finds of a tube lying along x (25 voxels across, at 1 nm): its top
    and bottom walls (5 slices each), not the slices between them, where the side walls run
    parallel to the beam; those middle slices were called background and membrane (value 1)."""
    labels[3:8, 10:35, 5:60] = value  # top wall
    labels[23:28, 10:35, 5:60] = value  # bottom wall
    labels[8:23, 10:12, 5:60] = 1  # side walls called membrane
    labels[8:23, 33:35, 5:60] = 1


def test_close_along_z_fills_a_tube_between_its_top_and_bottom_walls():
    membrane = ClassSpec("membrane", "membrane", priority=1)
    tube = ClassSpec("microtubule", "filament", close_z_nm=25.0, priority=2)
    labels = _labels()
    _tube_walls(labels, 2)
    out = clean_labels(labels, [membrane, tube], VOXEL_A)
    assert (out[3:28, 10:35, 5:60] == 2).all()  # lumen and side walls: the tube's
    assert (out == 2).sum() == 25 * 25 * 55
    assert (out == 1).sum() == 0


def test_close_along_z_leaves_long_gaps_open_columns_and_higher_priority():
    gold = ClassSpec("gold", "fiducial", diameter_nm=10.0, priority=10)
    tube = ClassSpec("microtubule", "filament", close_z_nm=10.0, priority=2)
    labels = _labels()
    labels[2, 5, 5] = labels[12, 5, 5] = 2  # a 9-voxel gap: < 10 nm, filled
    labels[2, 6, 6] = labels[13, 6, 6] = 2  # a 10-voxel gap: not < 10 nm, left
    labels[20:25, 8, 8] = 2  # nothing below: the column above it is not filled
    labels[2, 9, 9] = labels[8, 9, 9] = 2
    labels[5, 9, 9] = 1  # a gold voxel in the gap stays gold
    out = clean_labels(labels, [gold, tube], VOXEL_A)
    assert (out[2:13, 5, 5] == 2).all()
    assert (out[3:13, 6, 6] == 0).all()
    assert (out[:20, 8, 8] == 0).all() and (out[25:, 8, 8] == 0).all()
    assert out[5, 9, 9] == 1 and (out[[3, 4, 6, 7], 9, 9] == 2).all()


def test_close_along_z_is_physical():
    """A 9-voxel gap at 20 Å voxels is 18 nm: filled under a 25 nm rule, not a 15 nm one."""
    for close_nm, filled in ((25.0, True), (15.0, False)):
        labels = _labels()
        labels[2, 5, 5] = labels[12, 5, 5] = 1
        spec = ClassSpec("microtubule", "filament", close_z_nm=close_nm)
        out = clean_labels(labels, [spec], 20.0)
        assert bool((out[3:12, 5, 5] == 1).all()) is filled


def test_rules_without_sizes_change_nothing():
    labels = _labels()
    labels[3, 3, 3] = 1
    spec = ClassSpec("other")
    assert (clean_labels(labels.copy(), [spec], VOXEL_A) == labels).all()


def test_bad_inputs_are_rejected_with_a_message():
    spec = ClassSpec("membrane", "membrane", min_component_nm3=10.0)
    labels = _labels()
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"labels hold values 0..3 but only 0..1 are defined"):
        clean_labels(labels, [spec], VOXEL_A)
    with pytest.raises(ValueError, match="labels must be int8, got float32"):
        clean_labels(np.zeros((4, 4, 4), np.float32), [spec], VOXEL_A)
    with pytest.raises(ValueError, match=r"labels must be 3-D \[z, y, x\], got shape \(4, 4\)"):
        clean_labels(np.zeros((4, 4), np.int8), [spec], VOXEL_A)
    with pytest.raises(ValueError, match="voxel_size_a must be positive, got 0"):
        clean_labels(_labels(), [spec], 0)


@pytest.mark.parametrize("stride", [3, 2])  # 27,000 components (uint16) and 75,625 (int32)
def test_label_compact_gives_scipys_labels_whatever_the_component_count(stride):
    from scipy import ndimage
    from tomolive.core.cleanup import label_compact

    mask = np.zeros((50, 110, 110) if stride == 2 else (90, 90, 90), bool)
    mask[::stride, ::stride, ::stride] = True  # isolated voxels: one component each
    structure = ndimage.generate_binary_structure(3, 1)
    expected, expected_n = ndimage.label(mask, structure=structure)
    labels, n = label_compact(mask, structure)
    assert n == expected_n == mask.sum()
    assert labels.dtype == (np.uint16 if n <= 65535 else np.int32)
    assert np.array_equal(labels, expected)


def _broken_tube(labels: np.ndarray, gap_vox: int) -> int:
    """Five 4x4x6 pieces along x, `gap_vox` apart: a filament the network found in fragments.
    Returns the voxel count."""
    x = 2
    for _ in range(5):
        labels[10:14, 30:34, x:x + 6] = 1
        x += 6 + gap_vox
    return 5 * 4 * 4 * 6


def test_fragments_closer_than_the_join_gap_are_sized_together_and_kept():
    """Each 96-voxel piece is below the 300 nm^3 minimum, their sum (480) is not: joined across
    3 nm gaps they survive; without joining, or with gaps wider than the join, they go."""
    spec = ClassSpec("microtubule", "filament", min_component_nm3=300.0, join_gap_nm=4.0)
    labels = _labels()
    total = _broken_tube(labels, gap_vox=3)
    removed: dict[str, float] = {}
    out = clean_labels(labels, [spec], VOXEL_A, removed)
    assert (out == 1).sum() == total  # nothing removed, nothing added
    assert removed == {"microtubule": 0.0}
    unjoined = _labels()
    _broken_tube(unjoined, gap_vox=3)
    removed = {}
    clean_labels(unjoined, [ClassSpec("microtubule", "filament", min_component_nm3=300.0)],
                 VOXEL_A, removed)
    assert (unjoined == 1).sum() == 0 and removed == {"microtubule": 1.0}
    far = _labels()
    _broken_tube(far, gap_vox=6)  # wider than the 4 nm join
    clean_labels(far, [spec], VOXEL_A)
    assert (far == 1).sum() == 0


def test_removed_fraction_counts_what_the_size_rule_erased():
    labels = _labels()
    labels[5:15, 5:15, 5:15] = 1  # 1000 voxels, kept
    labels[20:23, 40:43, 40:43] = 1  # 27 voxels, removed
    labels[25:27, 50:52, 50:52] = 2  # 8 voxels of a class without rules
    removed: dict[str, float] = {}
    clean_labels(labels, [ClassSpec("membrane", "membrane", min_component_nm3=100.0),
                          ClassSpec("other")], VOXEL_A, removed)
    assert removed == pytest.approx({"membrane": 27 / 1027, "other": 0.0})


def test_removed_fraction_stays_the_share_of_the_networks_voxels_when_closing_grew_them():
    """A small piece whose z-gap the closing filled (growing it), then removed as too small:
    all the network's voxels of the class were removed, and not more than all of them."""
    labels = _labels()
    labels[5:15, 5:15, 5:15] = 1  # 1000 voxels, kept
    labels[20, 40:43, 40:43] = 1  # a small piece: two 9-voxel layers 4 voxels apart in z,
    labels[25, 40:43, 40:43] = 1  # so the closing adds 36 voxels before the size rule runs
    removed: dict[str, float] = {}
    out = clean_labels(labels, [ClassSpec("microtubule", "filament", close_z_nm=6.0,
                                          min_component_nm3=100.0)], VOXEL_A, removed)
    assert (out[18:28, 38:45, 38:45] == 0).all()  # the grown piece went
    assert removed == pytest.approx({"microtubule": 18 / 1018})


@pytest.mark.parametrize("shape", [(20, 31, 17), (5, 40, 40), (1, 12, 30), (40, 3, 50)])
def test_ball_dilation_and_opening_equal_scipys_exactly(shape):
    # dilate_ball and open_ball replace binary_dilation / binary_opening with a ball (10-20x
    # faster): the same voxels, at the array's border too, for radii larger than an axis.
    from scipy import ndimage
    from tomolive.core.cleanup import _ball, dilate_ball, open_ball

    rng = np.random.default_rng(sum(shape))
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    field /= field.std()
    for threshold in (0.5, 1.5, -3.0):  # sparse, sparser, full
        mask = field > threshold
        for radius in (0.5, 1.0, 2.5, 3.7, 6.0):
            ball = _ball(radius)
            assert np.array_equal(dilate_ball(mask, radius),
                                  ndimage.binary_dilation(mask, structure=ball)), radius
            assert np.array_equal(open_ball(mask, radius),
                                  ndimage.binary_opening(mask, structure=ball)), radius
