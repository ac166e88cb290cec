"""The specimen mask (issue 21, item 1): the slab's surfaces, thickness and tilt found from the
tomogram itself, on lamellae simulated as a microscope images them (vacuum and ice outside,
tilted) and on hand-made volumes (a wedge, a volume that is all specimen); and the pipeline
reporting nothing outside the slab but gold, writing the mask, and recording what it removed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from scipy import ndimage
from tomolive.core.filaments import Filament
from tomolive.core.infer import InferenceOptions
from tomolive.core.microscope import simulate_tomogram
from tomolive.core.model import default_bundle_path, load_bundle
from tomolive.core.pipeline import SegmentOptions, segment_file
from tomolive.core.specimen import SpecimenParams
from tomolive.core.specimen_mask import SpecimenSlab, Surface, clear_outside, find_specimen
from tomolive.core.volume import write_mrc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A field of 192 nm gives the plane fit 6 x 6 tiles of 32 nm; on a 128 nm field one lamella
# in four came out 13 nm off (docs/specimen_mask.md): the method needs a field of view.
SHAPE_ZYX = (120, 192, 192)
VOXEL_A = 10.0


def _lamella(seed: int, outside: str, thickness_nm: float, tilt_x_deg: float,
             tilt_y_deg: float):
    rng = np.random.default_rng(seed)
    params = replace(SpecimenParams.sample(rng), outside=outside, thickness_nm=thickness_nm,
                     slab_tilt_x_deg=tilt_x_deg, slab_tilt_y_deg=tilt_y_deg, contamination=2)
    return simulate_tomogram(SHAPE_ZYX, VOXEL_A, seed=seed, specimen=params)


def _true_heights_nm(info: dict, samples: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The simulated slab's surfaces (core.specimen.Slab) on the same grid as `heights_nm`."""
    normal = np.asarray(info["slab_normal_zyx"])
    centre = np.asarray(info["slab_centre_nm"])
    half = info["params"]["thickness_nm"] / 2
    extent = np.asarray(SHAPE_ZYX) * VOXEL_A / 10
    yy, xx = np.meshgrid(np.linspace(0, extent[1], samples), np.linspace(0, extent[2], samples),
                         indexing="ij")
    def height(offset):
        return centre[0] + (offset - (yy - centre[1]) * normal[1]
                            - (xx - centre[2]) * normal[2]) / normal[0]
    return height(-half), height(half)


@pytest.fixture(scope="module")
def lamellae():
    return {"vacuum": _lamella(1, "vacuum", 70.0, 2.0, 5.0),
            "ice": _lamella(9, "ice", 80.0, -4.0, -10.0)}


@pytest.mark.parametrize("outside", ["vacuum", "ice"])
def test_surfaces_thickness_and_tilt_of_a_simulated_lamella(lamellae, outside):
    result = lamellae[outside]
    info = result.info["specimen"]
    slab = find_specimen(result.tomogram, (VOXEL_A / 10,) * 3)
    assert slab.lower.found and slab.upper.found
    lower, upper = slab.heights_nm()
    true_lower, true_upper = _true_heights_nm(info)
    assert np.abs(lower - true_lower).mean() <= 5.0
    assert np.abs(upper - true_upper).mean() <= 5.0
    true_thickness = info["params"]["thickness_nm"]
    assert slab.thickness_nm()["mean"] == pytest.approx(true_thickness, rel=0.10)
    true_tilt = math.degrees(math.acos(abs(info["slab_normal_zyx"][0])))
    assert slab.tilt_deg() == pytest.approx(true_tilt, abs=2.5)
    assert 0.2 < slab.void_fraction() < 0.8


def _textured(shape, inside: np.ndarray, seed: int = 0) -> np.ndarray:
    """Specimen-like structure (3-8 nm blobs) where `inside`, white noise everywhere: band
    energy about 13 times the void's (the simulator's lamellae: 2-8 times)."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    texture /= texture.std()
    return (0.15 * texture * inside + 0.3 * rng.standard_normal(shape)).astype(np.float32)


def test_a_wedge_shaped_lamella_gets_two_planes():
    shape = (90, 128, 128)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    lower_true = 20.0 + 0.08 * y  # nm at 1 nm voxels
    upper_true = 75.0 - 0.06 * x
    volume = _textured(shape, (z >= lower_true) & (z <= upper_true))
    slab = find_specimen(volume, (1.0, 1.0, 1.0))
    assert slab.lower.dz_dy == pytest.approx(0.08, abs=0.02)
    assert slab.lower.dz_dx == pytest.approx(0.0, abs=0.02)
    assert slab.upper.dz_dx == pytest.approx(-0.06, abs=0.02)
    assert slab.upper.dz_dy == pytest.approx(0.0, abs=0.02)
    assert slab.lower.z0_nm == pytest.approx(20.0, abs=3.0)
    assert slab.upper.z0_nm == pytest.approx(75.0, abs=3.0)
    thickness = slab.thickness_nm()
    assert thickness["min"] < thickness["mean"] < thickness["max"]  # a wedge, not a slab


def test_tiles_lifted_by_contamination_do_not_tilt_the_plane():
    # A flat slab z 25-70 nm; over a third of the field (two of the six tile columns and
    # one more tile) specimen-like clutter sits 15-30 nm above the upper surface, as ice
    # contamination or a cluster of gold beads does. A plane fitted by least squares from
    # all tiles is pulled towards those tiles (tilted and lifted); the surface must stay flat.
    shape = (110, 192, 192)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    clutter = (z >= 85) & (z <= 100) & ((x < 64) | ((y >= 160) & (x >= 96) & (x < 128)))
    volume = _textured(shape, ((z >= 25) & (z <= 70)) | clutter)
    slab = find_specimen(volume, (1.0, 1.0, 1.0))
    assert slab.upper.found and slab.lower.found
    assert slab.upper.tilt_deg() < 1.0
    # The texture's own blur puts both surfaces about 3 nm out (as in the wedge test).
    assert np.abs(slab.heights_nm()[1] - 70.0).mean() < 4.0
    assert slab.thickness_nm()["mean"] == pytest.approx(45.0, rel=0.15)


def test_a_faint_layer_in_the_void_is_not_taken_for_the_surface():
    # Above the slab (z 30-65) a faint textured layer (z 80-90) whose energy lies between the
    # void's and the specimen's, like scattered ice crystals: its crossings are the outermost
    # ones above the threshold, but the profile never rises from there to the specimen's level.
    shape = (110, 128, 128)
    z = np.arange(shape[0], dtype=float)[:, None, None]
    slab_mask = np.broadcast_to((z >= 30) & (z <= 65), shape)
    volume = _textured(shape, slab_mask)
    faint = _textured(shape, np.broadcast_to((z >= 80) & (z <= 90), shape), seed=1)
    rng = np.random.default_rng(2)
    volume += 0.45 * (faint - 0.3 * rng.standard_normal(shape)).astype(np.float32)
    slab = find_specimen(volume, (1.0, 1.0, 1.0))
    assert slab.upper.found
    assert np.abs(slab.heights_nm()[1] - 65.0).mean() < 4.0


def test_a_volume_of_specimen_to_its_edges_is_all_specimen():
    shape = (80, 96, 96)
    slab = find_specimen(_textured(shape, np.ones(shape, dtype=bool)), (1.0, 1.0, 1.0))
    assert not slab.found
    assert slab.void_fraction() == 0.0
    assert slab.mask(shape).all()
    assert math.isnan(slab.depth_nm(np.array([[40.0, 48.0, 48.0]]), shape)[0])


def test_a_surface_beyond_the_volume_is_not_found_and_does_not_cut():
    shape = (80, 96, 96)
    z = np.arange(shape[0])[:, None, None]
    volume = _textured(shape, np.broadcast_to(z >= 30, shape))  # specimen from z 30 upwards
    slab = find_specimen(volume, (1.0, 1.0, 1.0))
    assert slab.lower.found and not slab.upper.found
    assert slab.lower.z0_nm == pytest.approx(30.0, abs=3.0)
    mask = slab.mask(shape)
    assert mask[-1].all() and not mask[10].any()
    assert slab.summary()["thickness_is_lower_bound"]


def test_a_volume_too_thin_to_tell_is_all_specimen():
    slab = find_specimen(np.zeros((16, 64, 64), dtype=np.float32), (1.0, 1.0, 1.0))
    assert not slab.found and slab.mask((16, 64, 64)).all()


def _tilted_slab() -> SpecimenSlab:
    return SpecimenSlab(Surface(20.0, 0.1, 0.0, True), Surface(60.0, 0.1, 0.0, True),
                        (80.0, 100.0, 100.0), 4.0)


def test_mask_contains_depth_and_json_agree_on_any_grid():
    slab = _tilted_slab()
    for shape in ((80, 100, 100), (40, 50, 50)):  # 1 nm and 2 nm voxels over the same field
        mask = slab.mask(shape)
        points = np.argwhere(np.ones(shape, dtype=bool))[::97].astype(float)
        inside = slab.contains(points, shape)
        assert np.array_equal(inside, mask[tuple(points.astype(int).T)].astype(bool))
        depth = slab.depth_nm(points, shape)
        assert np.array_equal(depth >= 0, inside)
    # A point 30 nm above the lower surface at y = 50 nm, 10 nm below the upper one.
    cos_tilt = math.cos(math.atan(0.1))
    assert slab.depth_nm(np.array([[55.0, 50.0, 0.0]]), (80, 100, 100))[0] == \
        pytest.approx(10.0 * cos_tilt)
    assert slab.depth_nm(np.array([[5.0, 50.0, 0.0]]), (80, 100, 100))[0] == \
        pytest.approx(-20.0 * cos_tilt)
    again = SpecimenSlab.from_json(json.loads(json.dumps(slab.to_json())))
    assert again == slab
    assert slab.thickness_nm()["mean"] == pytest.approx(40.0 * cos_tilt)
    assert slab.tilt_deg() == pytest.approx(math.degrees(math.atan(0.1)))


def test_clear_outside_clears_only_the_named_values():
    slab = _tilted_slab()
    labels = np.full((80, 100, 100), 1, dtype=np.int8)
    labels[:, :, 50:] = 2
    expected_outside = int((slab.mask(labels.shape) == 0)[:, :, :50].sum())
    cleared = clear_outside(labels, slab, [1])
    assert cleared == {1: expected_outside}
    assert not ((labels == 1) & (slab.mask(labels.shape) == 0)).any()
    assert (labels[:, :, 50:] == 2).all()  # value 2 (say, gold) kept everywhere


def test_a_filament_split_where_it_leaves_a_region():
    points = np.column_stack([np.arange(6.0), np.zeros(6), np.zeros(6)])
    filament = Filament(points, np.tile([1.0, 0.0, 0.0], (6, 1)))
    pieces = filament.split(np.array([True, True, False, True, True, True]))
    assert [len(p) for p in pieces] == [2, 3]
    assert np.array_equal(pieces[1].points_zyx[:, 0], [3.0, 4.0, 5.0])


def _outside_true_slab(zyx_vox: np.ndarray, info: dict, margin_nm: float) -> np.ndarray:
    """Points (input voxels, 1 nm) farther than `margin_nm` outside the simulated slab."""
    normal = np.asarray(info["slab_normal_zyx"])
    depth = (np.asarray(zyx_vox) * VOXEL_A / 10 - np.asarray(info["slab_centre_nm"])) @ normal
    return np.abs(depth) > info["params"]["thickness_nm"] / 2 + margin_nm


@pytest.fixture(scope="module")
def segmented_lamella(lamellae, tmp_path_factory):
    """The vacuum lamella segmented with the shipped model, with the mask and without, once
    in the usual axis order and once with the beam along the file's y axis."""
    root = tmp_path_factory.mktemp("lamella")
    tomogram = lamellae["vacuum"].tomogram
    write_mrc(root / "lamella.mrc", tomogram, VOXEL_A, (0.0, 0.0, 0.0))
    write_mrc(root / "lamella_yz.mrc", np.ascontiguousarray(np.swapaxes(tomogram, 0, 1)),
              VOXEL_A, (0.0, 0.0, 0.0))
    bundle = load_bundle(default_bundle_path())
    inference = InferenceOptions(device="cpu", precision="float32")
    results = {}
    # Three whole segmentations with the shipped model: big tensors, where the module's one
    # thread (for its tiny ones) only made this fixture slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, min(2, os.cpu_count() or 1)))
    try:
        for name, mask in (("on", True), ("off", False)):
            seg, folder = segment_file(root / "lamella.mrc", root / name, bundle,
                                       SegmentOptions(inference=inference, specimen_mask=mask))
            results[name] = (seg, folder)
        results["yz"] = segment_file(root / "lamella_yz.mrc", root / "yz", bundle,
                                     SegmentOptions(inference=inference, specimen_mask=True))
    finally:
        torch.set_num_threads(threads)
    return results


def test_nothing_but_gold_is_reported_outside_the_specimen(segmented_lamella, lamellae):
    info = lamellae["vacuum"].info["specimen"]
    on, _ = segmented_lamella["on"]
    off, _ = segmented_lamella["off"]
    for name, table in on.particles.items():
        if name != "gold":
            assert on.specimen.contains(table.zyx, on.labels.shape).all(), name
            # and, against the truth, none beyond the surface error the test above allows
            assert not _outside_true_slab(table.zyx, info, 5.0).any(), name
    for name, found in on.filaments.items():
        for filament in found:
            assert on.specimen.contains(filament.points_zyx, on.labels.shape).all(), name
    non_gold = [on.class_index(s.name) for s in on.classes if s.kind != "fiducial"]
    outside = on.specimen_mask() == 0
    assert not (np.isin(on.labels, non_gold) & outside).any()
    # Without the mask the same tomogram shows what the mask removes.
    off_outside = int((np.isin(off.labels, non_gold) & outside).sum())
    assert off_outside > 0
    assert sum(on.outside_specimen["voxels"].values()) > 0
    assert not off.outside_specimen


def test_the_mask_file_and_the_summary_record(segmented_lamella):
    seg, folder = segmented_lamella["on"]
    path = folder / "lamella_specimen_mask.mrc"
    with mrcfile.open(path, permissive=True) as mrc:
        mask = np.asarray(mrc.data)
        assert mrc.voxel_size.x == pytest.approx(VOXEL_A)
    assert mask.dtype == np.int8 and mask.shape == seg.labels.shape
    assert set(np.unique(mask)) == {0, 1}
    summary = json.loads((folder / "lamella_summary.json").read_text())
    record = summary["specimen"]
    assert record["mask_applied"] and record["found"]
    assert record["thickness_nm"]["min"] <= record["thickness_nm"]["mean"] \
        <= record["thickness_nm"]["max"]
    assert SpecimenSlab.from_json(record) == seg.specimen
    assert set(record["outside_specimen"]) == {"voxels", "particles", "filament_points"}
    _, off_folder = segmented_lamella["off"]
    assert not (off_folder / "lamella_specimen_mask.mrc").exists()
    off_record = json.loads((off_folder / "lamella_summary.json").read_text())["specimen"]
    assert not off_record["mask_applied"] and off_record["thickness_nm"] == record["thickness_nm"]


def test_the_mask_follows_the_files_axis_order(segmented_lamella):
    seg, _ = segmented_lamella["on"]
    turned, folder = segmented_lamella["yz"]
    with mrcfile.open(folder / "lamella_yz_specimen_mask.mrc", permissive=True) as mrc:
        mask = np.asarray(mrc.data)
    assert mask.shape == turned.labels.shape
    agree = (np.swapaxes(mask, 0, 1) == seg.specimen_mask()).mean()
    assert agree > 0.99  # the same slab found through the other axis order


def test_particles_carry_their_distance_to_the_specimen_surface(segmented_lamella):
    seg, folder = segmented_lamella["on"]
    ribosomes = seg.particles["ribosome"]
    if len(ribosomes):
        depth = ribosomes.context["specimen_surface_distance_nm"]
        assert np.all(depth >= 0)
        assert np.allclose(depth, seg.specimen.depth_nm(ribosomes.zyx, seg.labels.shape))
    header = (folder / "lamella_particles.csv").read_text().splitlines()[0].split(",")
    assert "specimen_surface_distance_nm" in header
    star = (folder / "lamella_ribosome.star").read_text()
    assert "tomoliveSpecimenSurfaceDistanceNm" in star


def test_the_cli_turns_the_mask_on(tmp_path, lamellae):
    from tomolive.daemon.cli import main

    path = tmp_path / "t.mrc"
    write_mrc(path, lamellae["ice"].tomogram[:, :64, :64], VOXEL_A, (0.0, 0.0, 0.0))
    for flags, name in (([], "off"), (["--specimen-mask"], "on")):
        assert main(["segment", str(path), "--out", str(tmp_path / name), "--device", "cpu",
                     *flags]) == 0
        summary = json.loads((tmp_path / name / "t" / "t_summary.json").read_text())
        assert summary["settings"]["specimen_mask"] is (name == "on")
        assert summary["specimen"]["mask_applied"] is (name == "on")
        assert Path(tmp_path / name / "t" / "t_specimen_mask.mrc").exists() is (name == "on")
