"""core.export: the output folder contract, file contents, atomic publish and failure handling."""

import csv
import fnmatch
import json
import logging
import math
import os
import re
import stat
import time
import types

import imodmodel
import mrcfile
import numpy as np
import pytest
import starfile
from imodmodel.models import ImodModel
from PIL import Image
from scipy.spatial.transform import Rotation
from tomolive.core import export, result_folder
from tomolive.core.classes import default_class
from tomolive.core.export import write_outputs
from tomolive.core.filaments import Filament
from tomolive.core.imod import imod_xyz_to_voxels
from tomolive.core.particles import ParticleTable
from tomolive.core.result_folder import check_output_names, output_paths
from tomolive.core.segmentation import Segmentation
from tomolive.core.star import (
    WARP_RECONSTRUCTION_NAME,
    check_name_pattern,
    relion_tilt_psi_deg,
    tilt_series_name,
)

SHAPE = (16, 40, 48)  # z, y, x all different so that axis mix-ups show
VOXEL_A = 13.2
ORIGIN = (10.0, -20.0, 30.0)


def _classes():
    return [default_class(n) for n in ("membrane", "microtubule", "ribosome", "gold")]


def _segmentation(stem="TS_01", fill=1) -> Segmentation:
    labels = np.zeros(SHAPE, dtype=np.int8)
    labels[2:6, 5:30, 5:40] = fill  # membrane
    labels[8, 20, 4:44] = 2  # microtubule along x
    labels[10:14, 30:34, 10:14] = 3  # ribosome
    ribo = ParticleTable("ribosome", [[11.5, 31.5, 11.5], [3.0, 4.0, 5.25]], [0.9, 0.5], [64, 30])
    tube = Filament([[8, 20, 4], [8, 20, 12], [8, 20, 20]], [[0, 0, 1]] * 3)
    oblique = Filament([[2, 2, 2], [3, 3, 3]], [[1 / math.sqrt(3)] * 3] * 2)
    return Segmentation(
        stem=stem, labels=labels, voxel_size_a=VOXEL_A, origin_xyz_a=ORIGIN, classes=_classes(),
        particles={"ribosome": ribo}, filaments={"microtubule": [tube, oblique]},
        class_fractions={"membrane": 0.1}, confidence=float("nan"),
        timings_s={"inference": 1.5, "write": 100.0},
        model={"name": "m", "version": "1", "sha256": "ab"}, input={"path": "/data/TS_01.mrc"},
        settings={"device": "cpu"},
    )


def _tomogram():
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


def test_writes_exactly_the_contract_files(tmp_path):
    seg = _segmentation()
    folder = write_outputs(tmp_path, seg, _tomogram())
    assert folder == tmp_path / "TS_01"
    paths = output_paths(tmp_path, "TS_01", seg.classes)
    assert {p.name for p in folder.iterdir()} == {p.name for p in paths.values()}
    assert {p.name for p in paths.values()} == {
        "TS_01_labels.mrc", "TS_01_microtubule_mask.mrc", "TS_01_ribosome.star",
        "TS_01_gold.star", "TS_01_particles.csv", "TS_01_microtubule_filaments.star",
        "TS_01_microtubule.mod", "TS_01_ribosome.mod", "TS_01_gold.mod",
        "TS_01_preview.png", "TS_01_sweep.webp", "TS_01_sweep_planes.webp",
        "TS_01_sweep_labels.png", "TS_01_summary.json",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["TS_01"]  # no temporary folder left
    for key in ("labels", "mask:microtubule"):
        assert mrcfile.validate(str(paths[key])), key
    with mrcfile.open(paths["labels"]) as mrc:
        assert mrc.header.mode == 0
        assert np.array_equal(mrc.data, seg.labels)
        assert np.allclose(mrc.voxel_size.tolist(), (VOXEL_A,) * 3)
        assert np.allclose([mrc.header.origin[a] for a in "xyz"], ORIGIN)
    with mrcfile.open(paths["mask:microtubule"]) as mrc:
        assert mrc.data.dtype == np.int8
        assert np.array_equal(mrc.data, (seg.labels == 2).astype(np.int8))
        assert np.allclose([mrc.header.origin[a] for a in "xyz"], ORIGIN)


def test_particle_star_and_csv(tmp_path):
    seg = _segmentation()
    write_outputs(tmp_path, seg)
    paths = output_paths(tmp_path, "TS_01", seg.classes)
    df = starfile.read(paths["star:ribosome"])
    assert list(df.columns) == [
        "rlnTomoName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
        "rlnCoordinateZ", "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
        "rlnCenteredCoordinateZAngst", "rlnDetectorPixelSize", "rlnAutopickFigureOfMerit",
    ]
    assert list(df.rlnTomoName) == ["TS_01", "TS_01"]
    assert list(df.rlnMicrographName) == ["TS_01.tomostar"] * 2  # what WarpTools matches
    assert np.allclose(df.rlnDetectorPixelSize, VOXEL_A)  # the pixel coordinates' pixel size
    assert np.allclose(df.rlnCoordinateX, [11.5, 5.25])
    assert np.allclose(df.rlnCoordinateY, [31.5, 4.0])
    assert np.allclose(df.rlnCoordinateZ, [11.5, 3.0])
    assert np.allclose(df.rlnCenteredCoordinateXAngst, (np.array([11.5, 5.25]) - 24) * VOXEL_A)
    assert np.allclose(df.rlnCenteredCoordinateYAngst, (np.array([31.5, 4.0]) - 20) * VOXEL_A)
    assert np.allclose(df.rlnCenteredCoordinateZAngst, (np.array([11.5, 3.0]) - 8) * VOXEL_A)
    assert np.allclose(df.rlnAutopickFigureOfMerit, [0.9, 0.5])
    gold = starfile.read(paths["star:gold"])  # no gold particles: header only
    assert len(gold) == 0 and "rlnCoordinateX" in gold.columns
    with open(paths["particles_csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "x", "y", "z", "score"]
    assert [r[0] for r in rows[1:]] == ["ribosome", "ribosome"]
    assert np.allclose([[float(v) for v in r[1:]] for r in rows[1:]],
                       [[11.5, 31.5, 11.5, 0.9], [5.25, 4.0, 3.0, 0.5]])


def test_filament_star(tmp_path):
    seg = _segmentation()
    write_outputs(tmp_path, seg)
    df = starfile.read(output_paths(tmp_path, "TS_01", seg.classes)["filaments:microtubule"])
    assert list(df.rlnHelicalTubeID) == [1, 1, 1, 2, 2]
    assert np.allclose(df.rlnCoordinateX, [4, 12, 20, 2, 3])
    assert np.allclose(df.rlnCoordinateY, [20, 20, 20, 2, 3])
    assert np.allclose(df.rlnCoordinateZ, [8, 8, 8, 2, 3])
    assert np.allclose(df.rlnHelicalTrackLengthAngst, [0, 8 * VOXEL_A, 16 * VOXEL_A, 0,
                                                       math.sqrt(3) * VOXEL_A], atol=0.01)
    assert np.allclose(df.rlnAngleTilt[:3], 90.0)  # a filament along x lies in the xy plane
    # The angles rotate the particle's Z axis onto the filament: RELION's ZYZ Euler angles are
    # those of the inverse of the particle-to-tomogram rotation.
    dirs_xyz = np.array([[1, 0, 0]] * 3 + [[1 / math.sqrt(3)] * 3] * 2)
    for tilt, psi, d in zip(df.rlnAngleTilt, df.rlnAnglePsi, dirs_xyz, strict=True):
        z_axis = Rotation.from_euler("ZYZ", [0, tilt, psi], degrees=True).inv().as_matrix()[:, 2]
        assert abs(np.dot(z_axis, d)) == pytest.approx(1.0, abs=1e-4)


def test_imod_models_read_back_by_imodmodel_give_the_same_points(tmp_path):
    seg = _segmentation()
    write_outputs(tmp_path, seg)
    paths = output_paths(tmp_path, "TS_01", seg.classes)
    # Particles: one scattered object named after the class, a point per particle, in IMOD's
    # convention (x, y + 0.5 from a voxel centre; z on the slice).
    ribosomes = imodmodel.read(paths["imod:ribosome"])
    expected_zyx = seg.particles["ribosome"].zyx
    assert np.allclose(ribosomes[["x", "y", "z"]].to_numpy(),
                       expected_zyx[:, ::-1] + [0.5, 0.5, 0.0], atol=0.01)
    assert np.allclose(imod_xyz_to_voxels(ribosomes[["x", "y", "z"]].to_numpy()), expected_zyx,
                       atol=0.01)
    model = ImodModel.from_file(paths["imod:ribosome"])
    assert (model.header.xmax, model.header.ymax, model.header.zmax) == SHAPE[::-1]
    assert model.header.pixelsize == pytest.approx(VOXEL_A / 10) and model.header.units == -9
    (obj,) = model.objects
    assert obj.header.name == "ribosome" and obj.header.flags.scattered
    assert obj.header.pdrawsize == round(default_class("ribosome").diameter_nm * 10 / VOXEL_A / 2)
    # Filaments: one open contour per filament, points in order.
    tubes = imodmodel.read(paths["imod:microtubule"])
    for contour_id, filament in enumerate(seg.filaments["microtubule"]):
        points = tubes[tubes.contour_id == contour_id][["x", "y", "z"]].to_numpy()
        assert np.allclose(imod_xyz_to_voxels(points), filament.points_zyx, atol=0.01)
    (tube_obj,) = ImodModel.from_file(paths["imod:microtubule"]).objects
    assert tube_obj.header.flags.open and not tube_obj.header.flags.scattered
    assert len(tube_obj.contours) == 2
    # A class without particles is an object with no contours: still a valid model.
    (gold_obj,) = ImodModel.from_file(paths["imod:gold"]).objects
    assert gold_obj.header.name == "gold" and gold_obj.contours == []


def test_relion_angles_for_random_directions():
    d = np.random.default_rng(1).normal(size=(20, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)  # (z, y, x)
    tilt, psi = relion_tilt_psi_deg(d)
    for t, p, (z, y, x) in zip(tilt, psi, d, strict=True):
        z_axis = Rotation.from_euler("ZYZ", [0, t, p], degrees=True).inv().as_matrix()[:, 2]
        assert np.allclose(z_axis, [x, y, z], atol=1e-9)


def test_summary_is_last_and_complete(tmp_path):
    seg = _segmentation()
    write_outputs(tmp_path, seg, start_time=time.perf_counter() - 1000.0)
    paths = output_paths(tmp_path, "TS_01", seg.classes)
    summary = json.loads(paths["summary"].read_text())
    assert summary["stem"] == "TS_01"
    assert summary["model"] == {"name": "m", "version": "1", "sha256": "ab"}
    assert summary["input"] == {"path": "/data/TS_01.mrc"}
    assert summary["settings"] == {"device": "cpu"}
    assert summary["counts"] == {"particles": {"ribosome": 2, "gold": 0},
                                 "filaments": {"microtubule": 2}}
    assert summary["class_fractions"] == {"membrane": 0.1}
    assert summary["confidence"] is None  # NaN is not JSON
    assert summary["timings_s"]["inference"] == 1.5
    assert 100.0 < summary["timings_s"]["write"] < summary["timings_s"]["total"]
    assert summary["tomolive_version"] and summary["written_utc"].endswith("+00:00")
    assert summary["shape_zyx"] == list(SHAPE) and summary["voxel_size_a"] == VOXEL_A
    assert summary["files"][-1] == "TS_01_summary.json"
    last = paths["summary"].stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= last for p in paths.values())


def test_preview_shows_classes_in_their_colours(tmp_path):
    seg = _segmentation()
    write_outputs(tmp_path, seg)  # no tomogram: labels on black
    image = Image.open(output_paths(tmp_path, "TS_01", seg.classes)["preview"])
    assert image.mode == "RGB" and max(image.size) <= 1200
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
    # The membrane (#f4c542) is in the central z slice, blended half and half with black.
    assert (0xF4 // 2, 0xC5 // 2, 0x42 // 2) in colours
    assert (0xF4, 0xC5, 0x42) in colours  # the legend box
    with_tomo = tmp_path / "b"
    write_outputs(with_tomo, seg, _tomogram())
    assert Image.open(with_tomo / "TS_01" / "TS_01_preview.png").size == image.size


def test_replaces_an_existing_folder(tmp_path):
    write_outputs(tmp_path, _segmentation(fill=1))
    (tmp_path / "TS_01" / "stale.txt").write_text("old")
    folder = write_outputs(tmp_path, _segmentation(fill=4))
    with mrcfile.open(folder / "TS_01_labels.mrc") as mrc:
        assert mrc.data[3, 10, 10] == 4
    assert not (folder / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["TS_01"]


def test_failure_while_writing_publishes_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_preview", boom)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(tmp_path, _segmentation())
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_result(tmp_path, monkeypatch):
    write_outputs(tmp_path, _segmentation(fill=1))
    monkeypatch.setattr(export, "write_particle_csv", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_outputs(tmp_path, _segmentation(fill=4))
    assert [p.name for p in tmp_path.iterdir()] == ["TS_01"]
    with mrcfile.open(tmp_path / "TS_01" / "TS_01_labels.mrc") as mrc:
        assert mrc.data[3, 10, 10] == 1
    assert (tmp_path / "TS_01" / "TS_01_summary.json").exists()


def test_before_publish_can_abandon_the_result(tmp_path):
    def lost_lease():
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        write_outputs(tmp_path, _segmentation(), before_publish=lost_lease)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_rejected_with_a_message(tmp_path):
    seg = _segmentation()
    with pytest.raises(ValueError, match=r"TS_01: tomogram shape \(4, 4, 4\) differs from labels"):
        write_outputs(tmp_path, seg, np.zeros((4, 4, 4), np.float32))
    seg.labels = seg.labels.astype(np.uint8)
    with pytest.raises(ValueError, match="TS_01: labels must be int8"):
        write_outputs(tmp_path, seg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"),
                         [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_published_folder_and_files_honour_the_umask(tmp_path, umask, folder_mode, file_mode):
    seen_during_write = []
    old = os.umask(umask)
    try:
        folder = write_outputs(tmp_path, _segmentation(), _tomogram(),
                               before_publish=lambda: seen_during_write.extend(
                                   p.name for p in tmp_path.iterdir()))
    finally:
        os.umask(old)
    # Still built under the hidden name daemon.service cleans up, then renamed into place.
    assert len(seen_during_write) == 1
    assert fnmatch.fnmatch(seen_during_write[0], ".TS_01.tmp-*")
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode
    files = list(folder.iterdir())
    assert len(files) == len(output_paths(tmp_path, "TS_01", _segmentation().classes))
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path.name


def test_an_unreadable_result_is_warned_about_once(tmp_path, caplog):
    """The daemon's "is it done?" check on a summary another user left unreadable: one warning,
    not one per rescan; a different error, or the same one after a readable spell, warns again."""
    from tomolive.daemon.scheduler import QueueItem
    from tomolive.daemon.service import Service

    errors = [PermissionError(13, "Permission denied")] * 3 + [None] + \
        [PermissionError(13, "Permission denied")]

    def status_of(item):
        error = errors.pop(0)
        if error is not None:
            raise error
        return "done", "fingerprint"

    fake = types.SimpleNamespace(_status_of=status_of, _parked={}, _unreadable_warned={})
    item = QueueItem(path=tmp_path / "TS_01.mrc", out_parent=tmp_path / "out", stem="TS_01",
                     key="k",
                     rel_output="TS_01", mtime_ns=0)
    with caplog.at_level(logging.WARNING, logger="tomolive.service"):
        for _ in range(3):  # three rescans while the summary stays unreadable
            Service._queue_or_park(fake, item)
        assert item.path in fake._parked
        assert len(caplog.records) == 1 and "Permission denied" in caplog.records[0].message
        Service._queue_or_park(fake, item)  # readable again: done
        assert item.path not in fake._parked
        Service._queue_or_park(fake, item)
    assert len(caplog.records) == 2


@pytest.mark.parametrize("stem, expected", [
    ("new\nline", "new_line"), ("a b", "a b"), ("_private", "_private"), ("data_x", "data_x"),
    ("esc\x1b[31mred", "esc_[31mred"), ('say "hi" now', "say _hi_ now"),
    ("it's", "it_s")])
def test_star_names_survive_hostile_stems(tmp_path, stem, expected):
    seg = _segmentation(stem=stem)
    write_outputs(tmp_path, seg)
    df = starfile.read(output_paths(tmp_path, stem, seg.classes)["star:ribosome"])
    assert list(df.rlnTomoName) == [expected, expected]  # one row per particle, name intact
    assert np.allclose(df.rlnCoordinateX, [11.5, 5.25])


def test_a_name_too_long_for_its_outputs_is_refused_naming_the_input(tmp_path):
    classes = _segmentation().classes
    check_output_names(tmp_path / "ok.mrc", "a" * 200, classes)  # fits
    with pytest.raises(ValueError) as error:
        check_output_names(tmp_path / ("b" * 240 + ".mrc"), "b" * 240, classes)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/{'b' * 240}.mrc: file name too long for its outputs")
    assert "240-byte stem, at most" in message and "rename the file" in message
    with pytest.raises(ValueError, match="too long"):  # bytes, not characters, count
        check_output_names(tmp_path / "u.mrc", "ü" * 120, classes)


def test_sweep_is_a_small_animation_through_z(tmp_path):
    """STEM_sweep.webp (the session page's animation): one frame per plane for a thin volume,
    classes in their colours, downsampled for a large one."""
    seg = _segmentation()
    folder = write_outputs(tmp_path, seg, _tomogram())
    sweep = Image.open(folder / "TS_01_sweep.webp")
    assert sweep.format == "WEBP" and sweep.is_animated
    assert sweep.n_frames == min(SHAPE[0], result_folder.SWEEP_FRAMES)
    assert sweep.size == (SHAPE[2], SHAPE[1])
    assert (folder / "TS_01_sweep.webp").stat().st_size < 300_000
    big = np.zeros((100, 700, 500), dtype=np.int8)
    frames = export.sweep_frames(export.sweep_layers(big, None), seg.classes)
    assert len(frames) == result_folder.SWEEP_FRAMES
    assert max(frames[0].size) == export.SWEEP_MAX_PX


def test_sweep_layers_stack_the_planes_and_the_label_values_frame_by_frame(tmp_path):
    """The per-class toggles' inputs: the gray planes and the labels, one plane below the
    other, the labels lossless (a pixel's gray level is its class's label value)."""
    seg = _segmentation()
    folder = write_outputs(tmp_path, seg, _tomogram())
    frames = min(SHAPE[0], result_folder.SWEEP_FRAMES)
    planes = Image.open(folder / "TS_01_sweep_planes.webp")
    labels = np.asarray(Image.open(folder / "TS_01_sweep_labels.png"))
    assert planes.size == (SHAPE[2], SHAPE[1] * frames) and labels.shape == planes.size[::-1]
    z_planes = result_folder.sweep_planes(SHAPE[0])
    stacked = np.concatenate([seg.labels[z] for z in z_planes]).astype(np.uint8)
    assert np.array_equal(labels, stacked)


def test_sweep_frames_overlay_the_class_colour():
    classes = _segmentation().classes
    labels = np.zeros((4, 8, 8), dtype=np.int8)
    labels[2, 2:6, 2:6] = 1  # the first class
    frames = export.sweep_frames(export.sweep_layers(labels, None), classes)
    pixel = np.asarray(frames[2])[4, 4]
    expected = np.array(export._rgb(classes[0].color)) * export.OVERLAY_ALPHA
    assert np.allclose(pixel, expected, atol=2)
    assert not np.asarray(frames[0]).any()


def test_summary_has_the_filament_length_per_class(tmp_path):
    seg = _segmentation()
    folder = write_outputs(tmp_path, seg, _tomogram())
    summary = json.loads((folder / "TS_01_summary.json").read_text())
    lengths = summary["filament_length_nm"]
    assert set(lengths) == {s.name for s in seg.classes if s.is_filament}
    expected = sum(float(np.linalg.norm(np.diff(f.points_zyx, axis=0), axis=1).sum())
                   for f in seg.filaments.get("microtubule", [])) * seg.voxel_size_a / 10
    assert lengths["microtubule"] == pytest.approx(expected)


@pytest.mark.parametrize("input_stem, pattern, expected", [
    ("TS_01_10.00Apx", WARP_RECONSTRUCTION_NAME, "TS_01"),  # Warp(Tools)' reconstruction name
    ("TS_01_7Apx", WARP_RECONSTRUCTION_NAME, "TS_01"),
    ("TS_01", WARP_RECONSTRUCTION_NAME, "TS_01"),
    ("Apx", WARP_RECONSTRUCTION_NAME, "Apx"),
    ("TS_01_10.00Apx", None, "TS_01_10.00Apx"),
    ("lamella3_rec_bin4", r"(?P<name>.+)_rec_bin\d+", "lamella3"),
])
def test_tilt_series_names_come_from_the_input_stem(input_stem, pattern, expected):
    assert tilt_series_name(input_stem, pattern) == expected


def test_star_files_name_the_tilt_series_not_the_output_folder(tmp_path):
    """A Warp reconstruction in a folder shared with another file of its stem: the output
    folder is qualified, the STAR rows still name the tilt series as RELION and Warp know it."""
    seg = _segmentation()
    seg.stem, seg.tilt_series_name = "TS_01_10.00Apx_mrc", "TS_01"
    write_outputs(tmp_path, seg)
    for key in ("star:ribosome", "filaments:microtubule"):
        df = starfile.read(output_paths(tmp_path, seg.stem, seg.classes)[key])
        assert set(df.rlnTomoName) <= {"TS_01"} and set(df.rlnMicrographName) <= {
            "TS_01.tomostar"}


@pytest.mark.parametrize("pattern, message", [
    ("(unclosed", "not a regular expression"), ("TS_(.+)", "needs a group (?P<name>"),
])
def test_a_bad_name_pattern_is_refused_with_the_reason(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_name_pattern(pattern)
