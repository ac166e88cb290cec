"""`tomolive segment --copick` on real copick projects (interop/copick.py): a project built in
tmp with copick's own writers, the CLI as a subprocess, the results read back with copick."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

# copick comes with the test extra: these tests run in CI, never skip.
import copick
import mrcfile
import numpy as np
import pytest
from tomolive.core.classes import default_class
from tomolive.core.filaments import Filament
from tomolive.core.model import default_bundle_path, load_bundle
from tomolive.core.synth import synthesize
from tomolive.interop import copick as cp

from tests.daemon_harness import write_tiny_model

VOXEL_A = 10.0
SHAPE_ZYX = (32, 64, 64)
SESSION = "roundtrip-1"
# The model's classes, numbered as the model numbers them (label value = class index).
OBJECTS = [
    {"name": "membrane", "is_particle": False, "label": 1},
    {"name": "microtubule", "is_particle": False, "label": 2},
    {"name": "actin", "is_particle": False, "label": 3},
    {"name": "ribosome", "is_particle": True, "label": 4, "radius": 125.0},
    {"name": "gold", "is_particle": True, "label": 5, "radius": 50.0},
]


def tomolive(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tomolive", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def write_config(folder: Path, objects=OBJECTS) -> Path:
    config = {
        "config_type": "filesystem", "name": "tomolive test", "version": "1.31.0",
        "pickable_objects": objects,
        "overlay_root": str(folder / "overlay"), "static_root": str(folder / "static"),
        "overlay_fs_args": {"auto_mkdir": True}, "static_fs_args": {"auto_mkdir": True},
    }
    path = folder / "copick_config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def make_project(folder: Path, runs: dict[str, np.ndarray | None], objects=OBJECTS,
                 spacing_a: float = VOXEL_A, tomo_type: str = "wbp") -> Path:
    """A copick project: each run with its tomogram written through copick (None: a run with
    a voxel spacing but no tomogram)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder, objects)
    root = copick.from_file(str(config))
    for name, data in runs.items():
        run = root.new_run(name)
        spacing = run.new_voxel_spacing(spacing_a)
        if data is not None:
            spacing.new_tomogram(tomo_type).from_numpy(data.astype(np.float32))
    return config


def segment_here(capsys, config: Path, model: Path, *args: str) -> tuple[int, str, str]:
    """`tomolive segment --copick CONFIG --model MODEL --device cpu ARGS` in this process (no
    interpreter start: the failure cases stay fast); exit status, stdout, stderr."""
    from tomolive.daemon.cli import main

    code = main(["segment", "--copick", str(config), "--model", str(model), "--device", "cpu",
                 *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(folder: Path) -> dict[str, int]:
    """Every file below `folder` with its size: what a failed command must leave unchanged."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """The default model on a 32x64x64 cartoon tomogram in a copick run, through the CLI, with
    the usual result folder beside (`--out`) for comparison."""
    folder = tmp_path_factory.mktemp("copick")
    scene = synthesize(SHAPE_ZYX, VOXEL_A, seed=1, simulator="cartoon")
    config = make_project(folder / "project", {"TS_01": scene.tomogram})
    out = folder / "out"
    run = tomolive("segment", "--copick", config, "--copick-session", SESSION, "--out", out,
                   "--device", "cpu", "--precision", "float32")
    assert run.returncode == 0, run.stderr
    return config, out, run


def read_csv_particles(path: Path) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["class"], []).append([float(row[k]) for k in "xyz"])
    return {name: np.array(xyz).reshape(-1, 3) for name, xyz in rows.items()}


def test_round_trip_picks_equal_the_pipeline_particles(roundtrip):
    config, out, run = roundtrip
    root = copick.from_file(str(config))
    copick_run = root.get_run("TS_01")
    expected = read_csv_particles(out / "TS_01" / "TS_01_particles.csv")  # voxels, x y z
    assert sum(len(v) for v in expected.values()) > 0, "the scene should yield particles"
    for name in ("ribosome", "gold"):
        picks = copick_run.get_picks(object_name=name, user_id="tomolive", session_id=SESSION)
        assert len(picks) == 1, name
        got, _ = picks[0].numpy()
        want = expected.get(name, np.zeros((0, 3))) * VOXEL_A  # index * voxel size, in Å
        assert got.shape == want.shape, name
        order_got = np.lexsort(got.T[::-1])
        order_want = np.lexsort(want.T[::-1])
        # The CSV holds 3 decimals of a voxel (0.005 Å at 10 Å).
        np.testing.assert_allclose(got[order_got], want[order_want], atol=0.01)
        assert picks[0].user_id == "tomolive" and picks[0].session_id == SESSION
        assert picks[0].trust_orientation is False
    assert "TS_01: done in" in run.stdout and "copick TS_01" in run.stdout


def test_round_trip_multilabel_equals_the_label_volume(roundtrip):
    config, out, _ = roundtrip
    copick_run = copick.from_file(str(config)).get_run("TS_01")
    segs = copick_run.get_segmentations(user_id="tomolive", session_id=SESSION,
                                        name=cp.MULTILABEL_NAME, is_multilabel=True)
    assert len(segs) == 1
    assert segs[0].voxel_size == VOXEL_A
    got = segs[0].numpy()
    with mrcfile.open(out / "TS_01" / "TS_01_labels.mrc") as mrc:
        labels = np.asarray(mrc.data)
    assert got.shape == labels.shape == SHAPE_ZYX
    np.testing.assert_array_equal(got.astype(np.int16), labels.astype(np.int16))
    # One binary segmentation per mask class, the label volume's voxels of that class.
    for index, name in ((1, "membrane"), (2, "microtubule"), (3, "actin")):
        binary = copick_run.get_segmentations(user_id="tomolive", session_id=SESSION,
                                              name=name, is_multilabel=False)
        assert len(binary) == 1, name
        np.testing.assert_array_equal(binary[0].numpy(), (labels == index).astype(np.uint8))


def test_round_trip_filament_centre_lines_are_picks(roundtrip):
    config, out, _ = roundtrip
    copick_run = copick.from_file(str(config)).get_run("TS_01")
    for name in ("microtubule", "actin"):
        picks = copick_run.get_picks(object_name=name, user_id="tomolive", session_id=SESSION)
        assert len(picks) == 1, name  # written even when no filament was traced
        ids = picks[0].instance_ids()
        assert (ids >= 1).all()


def test_no_config_no_runs_and_no_tomogram_fail_with_one_line_each(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "tiny.safetensors")
    missing = tmp_path / "nowhere.json"
    code, out, err = segment_here(capsys, missing, model)
    assert code == 1
    assert err.strip().splitlines() == [
        f"tomolive: error: {missing}: copick config not found"]

    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(empty)
    before = tree(empty)
    code, out, err = segment_here(capsys, config, model)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tomolive: error: {config}: "), lines
    assert "no runs" in lines[0]
    assert tree(empty) == before

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out, err = segment_here(capsys, bad, model)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{bad}: not a copick config (invalid JSON" in lines[0], lines

    project = tmp_path / "no-tomogram"
    config = make_project(project, {"TS_empty": None})
    before = tree(project)
    code, out, err = segment_here(capsys, config, model)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("tomolive: error:")]
    assert errors == [f"tomolive: error: {config}: run TS_empty: no tomogram at any voxel "
                      "spacing"], err
    assert tree(project) == before


def test_a_failed_run_does_not_stop_the_others(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "tiny.safetensors")
    data = np.random.default_rng(0).standard_normal((16, 32, 32)).astype(np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data, "TS_b": None})
    code, out, err = segment_here(capsys, config, model)
    assert code == 1
    assert "TS_a: done in" in out
    assert "run TS_b: no tomogram" in err
    root = copick.from_file(str(config))
    assert root.get_run("TS_a").get_segmentations(user_id="tomolive")
    assert not root.get_run("TS_b").get_segmentations()
    assert not root.get_run("TS_b").picks


def test_a_class_without_an_object_is_skipped_with_a_warning(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "tiny.safetensors", name="tiny", version=7)
    data = np.random.default_rng(1).standard_normal((16, 32, 32)).astype(np.float32)
    objects = [o for o in OBJECTS if o["name"] not in ("gold", "actin")]
    config = make_project(tmp_path / "p", {"TS_a": data}, objects=objects)
    config_text = config.read_text()
    code, out, err = segment_here(capsys, config, model, "--run", "TS_a")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and any("class gold" in w for w in warnings)
    assert any("class actin" in w for w in warnings)
    assert config.read_text() == config_text  # never rewritten
    copick_run = copick.from_file(str(config)).get_run("TS_a")
    names = {p.pickable_object_name for p in copick_run.picks}
    assert names == {"ribosome", "microtubule"}
    assert all(p.session_id == "tiny-v7" for p in copick_run.picks)  # the default session


def test_unknown_run_and_invalid_session_are_one_line_errors(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "tiny.safetensors")
    data = np.zeros((16, 32, 32), np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data})
    before = tree(tmp_path / "p")
    code, out, err = segment_here(capsys, config, model, "--run", "TS_x")
    assert code == 1
    assert f"tomolive: error: {config}: run TS_x: no such run in the project" in err
    code, out, err = segment_here(capsys, config, model, "--copick-session", "my session")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(
        "tomolive: error: copick session id 'my session' is not valid")
    assert tree(tmp_path / "p") == before


def test_spacing_nearest_the_model_and_the_first_tomogram_type(tmp_path):
    data = np.random.default_rng(2).standard_normal((16, 32, 32)).astype(np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data}, spacing_a=7.84, tomo_type="wbp")
    root = copick.from_file(str(config))
    spacing = root.get_run("TS_a").new_voxel_spacing(15.68)
    spacing.new_tomogram("denoised").from_numpy(data[::2, ::2, ::2].copy())
    spacing.new_tomogram("wbp").from_numpy(data[::2, ::2, ::2].copy())
    project = cp.open_project(config)
    source = cp.find_tomogram(project, "TS_a", model_voxel_a=10.0)
    assert (source.voxel_size_a, source.tomo_type) == (7.84, "wbp")
    source = cp.find_tomogram(project, "TS_a", model_voxel_a=14.0)
    assert (source.voxel_size_a, source.tomo_type) == (15.68, "denoised")
    source = cp.find_tomogram(project, "TS_a", model_voxel_a=14.0, tomo_type="wbp")
    assert source.tomo_type == "wbp"
    source = cp.find_tomogram(project, "TS_a", model_voxel_a=14.0, voxel_spacing_a=7.84)
    assert source.voxel_size_a == 7.84
    volume = cp.read_tomogram(source)  # the full-resolution level, not a downscaled one
    assert volume.data.shape == data.shape and volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, data)
    assert volume.voxel_size_a == 7.84
    with pytest.raises(ValueError, match="no 'ctf' tomogram at any voxel spacing"):
        cp.find_tomogram(project, "TS_a", 10.0, tomo_type="ctf")
    with pytest.raises(ValueError, match=r"at voxel spacing 5 Å \(tomograms at 7.84, 15.68 Å\)"):
        cp.find_tomogram(project, "TS_a", 10.0, voxel_spacing_a=5.0)


def test_coordinates_are_index_times_voxel_size_in_xyz():
    zyx = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    xyz = cp.voxel_indices_to_xyz_a(zyx, 7.5)
    np.testing.assert_allclose(xyz, [[22.5, 15.0, 7.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cp.xyz_a_to_voxel_indices(xyz, 7.5), zyx)


def test_filament_transforms_turn_z_onto_the_tangent():
    directions_zyx = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]])
    filament = Filament(points_zyx=np.arange(12.0).reshape(4, 3), directions_zyx=directions_zyx)
    xyz, transforms, ids = cp.filament_points([filament, filament], 10.0)
    assert xyz.shape == (8, 3) and list(ids) == [1] * 4 + [2] * 4
    for transform, direction in zip(transforms, np.concatenate([directions_zyx] * 2),
                                    strict=True):
        rotation = transform[:3, :3]
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        np.testing.assert_allclose(rotation @ [0, 0, 1.0], direction[::-1], atol=1e-12)


def test_multilabel_values_are_the_objects_labels(tmp_path):
    classes = [default_class(n) for n in ("membrane", "ribosome")]
    config = write_config(tmp_path, [{"name": "membrane", "is_particle": False, "label": 7},
                                     {"name": "ribosome", "is_particle": True, "label": 300}])
    (tmp_path / "overlay").mkdir()
    project = cp.Project(root=copick.from_file(str(config)), config_path=config)
    lut = cp.label_lookup(classes, cp.match_objects(project, classes))
    assert lut.dtype == np.uint16 and list(lut[:3]) == [0, 7, 300]


def test_default_model_session_id():
    bundle = load_bundle(default_bundle_path())
    session = cp.default_session_id(bundle.meta.name, bundle.meta.version)
    assert session == cp.check_session_id(session)
    assert "_" not in session


def test_a_static_tomogram_is_read_and_results_go_to_the_overlay(tmp_path, capsys):
    """A portal-style project: the tomogram in the read-only static root, results in the
    overlay; a re-run replaces tomolive's session and leaves another user's picks alone."""
    model = write_tiny_model(tmp_path / "tiny.safetensors")
    data = np.random.default_rng(3).standard_normal((16, 32, 32)).astype(np.float32)
    folder = tmp_path / "p"
    folder.mkdir()
    config = write_config(folder)
    # Write the tomogram with a config whose overlay is the project's static root.
    static_config = json.loads(config.read_text())
    static_config["overlay_root"] = static_config.pop("static_root")
    staged = tmp_path / "static_config.json"
    staged.write_text(json.dumps(static_config))
    copick.from_file(str(staged)).new_run("TS_s").new_voxel_spacing(VOXEL_A) \
        .new_tomogram("wbp").from_numpy(data)
    root = copick.from_file(str(config))
    alice = root.get_run("TS_s").new_picks("ribosome", "manual", user_id="alice")
    alice.from_numpy(np.array([[100.0, 200.0, 50.0]]))
    static_before = tree(folder / "static")
    for _ in range(2):
        code, out, err = segment_here(capsys, config, model, "--copick-session", "s1")
        assert code == 0, err
    assert tree(folder / "static") == static_before
    run = copick.from_file(str(config)).get_run("TS_s")
    ours = [p for p in run.picks if p.user_id == "tomolive"]
    assert sorted(p.pickable_object_name for p in ours) == [
        "actin", "gold", "microtubule", "ribosome"]  # once each after two runs
    (theirs,) = [p for p in run.picks if p.user_id == "alice"]
    np.testing.assert_allclose(theirs.numpy()[0], [[100.0, 200.0, 50.0]])
    segs = run.get_segmentations(user_id="tomolive", session_id="s1")
    assert len(segs) == 4  # the multilabel one and membrane, microtubule, actin
    assert all(s.numpy().shape == data.shape for s in segs)


@pytest.mark.slow
def test_watch_segments_runs_as_they_appear(tmp_path):
    """`--watch`: a run there at the start and one added later are each segmented once, after
    their tomogram stopped changing; SIGTERM stops the watcher cleanly."""
    import signal
    import time

    model = write_tiny_model(tmp_path / "tiny.safetensors")
    data = np.random.default_rng(4).standard_normal((16, 32, 32)).astype(np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data})

    def done(name: str) -> bool:
        run = copick.from_file(str(config)).get_run(name)
        return run is not None and bool(run.get_segmentations(
            user_id="tomolive", name=cp.MULTILABEL_NAME, is_multilabel=True))

    def wait_for(name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(name):
            assert watcher.poll() is None, watcher.communicate()
            assert time.monotonic() < deadline, f"{name} not segmented"
            time.sleep(0.2)

    watcher = subprocess.Popen(
        [sys.executable, "-m", "tomolive", "segment", "--copick", str(config), "--model",
         str(model), "--device", "cpu", "--watch", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("TS_a")
        root = copick.from_file(str(config))
        root.new_run("TS_b").new_voxel_spacing(VOXEL_A).new_tomogram("wbp").from_numpy(data)
        wait_for("TS_b")
        # A third run takes the watcher at least two more looks (seen, then unchanged), and in
        # each of them TS_a and TS_b are there, done: the state that proves nothing is
        # segmented twice, without guessing how long a look takes.
        root.new_run("TS_c").new_voxel_spacing(VOXEL_A).new_tomogram("wbp").from_numpy(data)
        wait_for("TS_c")
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert sum(line.startswith("TS_a: done in") for line in lines) == 1, out
    assert sum(line.startswith("TS_b: done in") for line in lines) == 1, out
    assert sum(line.startswith("TS_c: done in") for line in lines) == 1, out
    assert "tomolive: error" not in err, err


def test_fingerprint_waits_for_the_metadata_and_follows_the_data(tmp_path):
    data = np.zeros((16, 32, 32), np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data})
    project = cp.open_project(config)
    source = cp.find_tomogram(project, "TS_a", 10.0)
    first = cp.tomogram_fingerprint(source)
    assert first is not None and first == cp.tomogram_fingerprint(source)
    attrs = Path(source.tomogram.overlay_path) / ".zattrs"
    text = attrs.read_text()
    attrs.unlink()  # as while copick is still writing the levels
    assert cp.tomogram_fingerprint(source) is None
    attrs.write_text(text)
    source.tomogram.from_numpy(np.ones((16, 32, 32), np.float32))
    assert cp.tomogram_fingerprint(source) not in (None, first)


def test_implausible_spacing_and_tiny_tomograms_are_refused_before_segmenting(tmp_path):
    data = np.zeros((16, 32, 32), np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data, "TS_b": data[:4]}, spacing_a=1.0)
    project = cp.open_project(config)
    with pytest.raises(ValueError, match=r"run TS_a: .*voxel spacing 1 Å is outside"):
        cp.read_tomogram(cp.find_tomogram(project, "TS_a", 10.0))
    source = cp.find_tomogram(project, "TS_b", 10.0)
    with pytest.raises(ValueError, match=r"run TS_b: .*too small to segment"):
        cp.read_tomogram(source, voxel_size_bounds_a=(0.5, 50.0))


def test_write_results_of_a_known_segmentation_read_back_with_copick(tmp_path):
    """Known particles and a known filament, written through copick and read back: points in Å
    (x, y, z = index * voxel size), scores, filament ids in order, +Z along the tangent."""
    from tomolive.core.particles import ParticleTable
    from tomolive.core.segmentation import Segmentation

    data = np.zeros((16, 32, 32), np.float32)
    config = make_project(tmp_path / "p", {"TS_a": data}, spacing_a=7.5)
    project = cp.open_project(config)
    source = cp.find_tomogram(project, "TS_a", 10.0)
    classes = [default_class(n) for n in ("membrane", "microtubule", "actin", "ribosome",
                                          "gold")]
    labels = np.zeros(data.shape, np.int8)
    labels[2:4] = 1
    labels[8, 10:20, 5] = 2
    particles = {"ribosome": ParticleTable("ribosome", [[1.0, 2.0, 3.0], [4.5, 5.25, 6.0]],
                                           [0.9, 0.6], [10, 12]),
                 "gold": ParticleTable("gold", np.zeros((0, 3)), [], [])}
    tangent = np.tile([0.0, 1.0, 0.0], (3, 1))
    filament = Filament(points_zyx=[[8.0, 10.0, 5.0], [8.0, 14.0, 5.0], [8.0, 18.0, 5.0]],
                        directions_zyx=tangent)
    seg = Segmentation(stem="TS_a", labels=labels, voxel_size_a=7.5, origin_xyz_a=(0, 0, 0),
                       classes=classes, particles=particles,
                       filaments={"microtubule": [filament], "actin": []})
    match = cp.match_objects(project, classes)
    written = cp.write_results(project, source, seg, "known", match)
    assert written[-1] == f"{cp.MULTILABEL_NAME} segmentation"
    run = copick.from_file(str(config)).get_run("TS_a")

    (ribosomes,) = run.get_picks(object_name="ribosome", user_id="tomolive", session_id="known")
    xyz, _ = ribosomes.numpy()
    np.testing.assert_allclose(xyz, [[22.5, 15.0, 7.5], [45.0, 39.375, 33.75]])
    np.testing.assert_allclose(ribosomes.scores(), [0.9, 0.6], rtol=1e-6)
    (gold,) = run.get_picks(object_name="gold", user_id="tomolive", session_id="known")
    assert gold.numpy()[0].shape == (0, 3)

    (tubes,) = run.get_picks(object_name="microtubule", user_id="tomolive", session_id="known")
    xyz, transforms = tubes.numpy()
    np.testing.assert_allclose(xyz, [[37.5, 75.0, 60.0], [37.5, 105.0, 60.0],
                                     [37.5, 135.0, 60.0]])
    assert list(tubes.instance_ids()) == [1, 1, 1]
    np.testing.assert_allclose(transforms[:, :3, :3] @ [0, 0, 1.0], [[0, 1.0, 0]] * 3,
                               atol=1e-12)

    (multilabel,) = run.get_segmentations(user_id="tomolive", session_id="known",
                                          is_multilabel=True)
    np.testing.assert_array_equal(multilabel.numpy(), labels)
    assert multilabel.voxel_size == 7.5
    assert cp.is_done(cp.open_project(config), source, "known")
    assert not cp.is_done(cp.open_project(config), source, "other")
