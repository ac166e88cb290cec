"""core.evaluate: Dice, one-to-one particle matching, files; core.star's particle CSV reader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tomolive.core.classes import SYNTH_CLASS_NAMES, default_class
from tomolive.core.evaluate import (
    confusion_matrix,
    dice_per_class,
    evaluate,
    evaluate_files,
    format_table,
    match_particles,
    particle_radii_vox,
    where_truth_goes,
)
from tomolive.core.star import ParticleCsvError, read_particle_csv
from tomolive.core.volume import write_mrc

NAMES = ["a", "b", "c"]


def test_dice_exact_values():
    pred = np.array([[[1, 1, 0], [2, 0, 0]]], dtype=np.int8)
    truth = np.array([[[1, 0, 0], [2, 2, 0]]], dtype=np.int8)
    dice = dice_per_class(pred, truth, NAMES)
    assert dice["a"] == pytest.approx(2 * 1 / (2 + 1))
    assert dice["b"] == pytest.approx(2 * 1 / (1 + 2))
    assert math.isnan(dice["c"])  # absent from both: undefined
    assert dice_per_class(truth, truth, NAMES)["b"] == 1.0
    disjoint = dice_per_class(np.array([[[3, 0]]]), np.array([[[0, 3]]]), NAMES)
    assert disjoint["c"] == 0.0


def test_dice_ignores_values_outside_the_classes():
    pred = np.array([[[1, -1, 7, 1]]], dtype=np.int8)  # -1 and 7 count as background
    truth = np.array([[[1, 0, 0, 0]]], dtype=np.int8)
    assert dice_per_class(pred, truth, ["a"])["a"] == pytest.approx(2 / 3)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match=r"shapes differ: pred \(1, 1, 2\), truth \(1, 1, 3\)"):
        dice_per_class(np.zeros((1, 1, 2)), np.zeros((1, 1, 3)), NAMES)


def test_match_particles_counts():
    pred = [[0, 0, 0], [10, 0, 0], [20, 0, 0]]
    truth = [[0.5, 0, 0], [10, 1, 0], [50, 0, 0]]
    m = match_particles(np.array(pred), np.array(truth), max_distance=2.0)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["mean_distance"] == pytest.approx(0.75)
    # The distance limit is inclusive of closer pairs only.
    assert match_particles(np.array(pred), np.array(truth), 0.9)["tp"] == 1


def test_match_particles_is_one_to_one():
    # Two predictions on one true particle: one TP, one FP.
    m = match_particles(np.array([[0, 0, 0], [0.5, 0, 0]]), np.array([[0.2, 0, 0]]), 1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3)


def test_match_particles_maximises_matches():
    # Greedy by distance would pair A with X (0.4) and leave B unmatched; the best is A-Y, B-X.
    pred = np.array([[0.0, 0, 0], [1.3, 0, 0]])  # A, B
    truth = np.array([[0.4, 0, 0], [-0.9, 0, 0]])  # X, Y
    m = match_particles(pred, truth, 1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["f1"] == 1.0


def test_match_particles_identical_and_empty():
    xyz = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert match_particles(xyz, xyz, 0.5)["f1"] == 1.0  # zero distances still match
    none = match_particles(np.zeros((0, 3)), xyz, 0.5)
    assert math.isnan(none["precision"]) and none["recall"] == 0.0 and none["f1"] == 0.0
    assert (none["tp"], none["fp"], none["fn"]) == (0, 0, 2)
    nothing = match_particles(np.zeros((0, 3)), np.zeros((0, 3)), 0.5)
    assert math.isnan(nothing["f1"])
    with pytest.raises(ValueError, match="max_distance must be > 0, got 0"):
        match_particles(xyz, xyz, 0)


def test_particle_radii_from_classes():
    classes = [default_class(n) for n in SYNTH_CLASS_NAMES]
    radii = particle_radii_vox(classes, 10.0)
    assert radii == {"ribosome": pytest.approx(12.5), "gold": pytest.approx(5.0)}
    assert particle_radii_vox(classes, 20.0)["ribosome"] == pytest.approx(6.25)


def test_evaluate_uses_half_the_radius_per_class():
    labels = np.zeros((2, 4, 4), dtype=np.int8)
    labels[0, :2] = 1
    truth_rows = [("ribosome", 10.0, 10.0, 10.0), ("gold", 30.0, 30.0, 30.0)]
    pred_rows = [("ribosome", 16.0, 10.0, 10.0),  # 6 voxels off: within 12.5 / 2
                 ("gold", 32.6, 30.0, 30.0)]  # 2.6 voxels off: beyond 5 / 2
    result = evaluate(labels, labels, ["membrane", "ribosome"], pred_rows, truth_rows,
                      {"ribosome": 12.5, "gold": 5.0})
    assert result["dice"] == {"membrane": 1.0, "ribosome": None}  # undefined -> None (JSON)
    assert result["mean_dice"] == 1.0
    assert result["voxels"]["membrane"] == {"pred": 8, "truth": 8}
    rib, gold = result["particles"]["ribosome"], result["particles"]["gold"]
    assert (rib["tp"], rib["max_distance"]) == (1, 6.25)
    assert (gold["tp"], gold["fp"], gold["fn"], gold["f1"]) == (0, 1, 1, 0.0)
    assert gold["precision"] == 0.0
    json.dumps(result, allow_nan=False)  # strict JSON
    table = format_table(result)
    assert "membrane" in table and "1.000" in table
    assert table.splitlines()[-1].split()[:4] == ["gold", "0.000", "0.000", "0.000"]


def test_read_particle_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("class,x,y,z,score\nribosome,1,2,3,0.9\ngold,4.5,5,6,0.8\n"
                    "ribosome,7,8,9,0.7\n\n")
    tables = read_particle_csv(path)
    assert set(tables) == {"ribosome", "gold"}
    assert tables["ribosome"].tolist() == [[1, 2, 3], [7, 8, 9]]
    assert tables["gold"].tolist() == [[4.5, 5, 6]]
    only_header = tmp_path / "h.csv"
    only_header.write_text("class,x,y,z\n")
    assert read_particle_csv(only_header) == {}


@pytest.mark.parametrize("text, message", [
    ("", "empty file, expected a header 'class,x,y,z'"),
    ("name,x,y,z\nribosome,1,2,3\n", "header is 'name,x,y,z', expected it to start with "
                                     "'class,x,y,z'"),
    ("class,x,y,z\nribosome,1,2\n", "line 2 has 3 columns, expected 4"),
    ("class,x,y,z\nribosome,1,2,3\ngold,1,2,3,4\n", "line 3 has 5 columns, expected 4"),
    ("class,x,y,z\nribosome,1,two,3\n", "line 2: x, y, z must be numbers, got '1,two,3'"),
    ("class,x,y,z\nribosome,1,nan,3\n", "line 2: coordinates are not finite"),
    ("class,x,y,z\n,1,2,3\n", "line 2: empty class name"),
])
def test_read_particle_csv_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ParticleCsvError) as info:
        read_particle_csv(path)
    assert str(info.value) == f"{path}: {message}"


def test_read_particle_csv_missing_and_binary(tmp_path):
    with pytest.raises(ParticleCsvError, match=r"^.*missing\.csv: cannot read particle table: "
                                               r"No such file or directory$"):
        read_particle_csv(tmp_path / "missing.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ParticleCsvError, match=r"bin\.csv: not a CSV text file"):
        read_particle_csv(binary)


def test_evaluate_files_end_to_end(tmp_path):
    from tomolive.core.synth import synthesize, write_synth

    r = synthesize((49, 97, 97), 10.0, seed=2, simulator="cartoon")
    truth, table = tmp_path / "truth.mrc", tmp_path / "truth.csv"
    write_synth(r, tmp_path / "t.mrc", labels_path=truth, particles_csv=table)
    # A prediction that misses every membrane voxel and one particle.
    pred_labels = r.labels.copy()
    pred_labels[pred_labels == 1] = 0
    pred = write_mrc(tmp_path / "pred.mrc", pred_labels, 10.0)
    pred_table = tmp_path / "pred.csv"
    pred_table.write_text("class,x,y,z,score\n" + "".join(
        f"{n},{x + 1},{y},{z},0.5\n" for n, x, y, z in r.particles[1:]))
    classes = [default_class(n) for n in SYNTH_CLASS_NAMES]
    result = evaluate_files(pred, truth, classes, pred_table, table)
    assert result["dice"]["membrane"] == 0.0
    for name in ("microtubule", "actin", "ribosome", "gold"):
        assert result["dice"][name] == 1.0
    first = r.particles[0][0]
    assert result["particles"][first]["fn"] == 1
    assert sum(s["tp"] for s in result["particles"].values()) == len(r.particles) - 1
    assert result["voxel_size_a"] == pytest.approx(10.0)


def test_evaluate_files_shape_mismatch(tmp_path):
    a = write_mrc(tmp_path / "a.mrc", np.zeros((8, 8, 8), np.int8), 10.0)
    b = write_mrc(tmp_path / "b.mrc", np.zeros((8, 8, 9), np.int8), 10.0)
    with pytest.raises(ValueError, match=r"a\.mrc: shape \(8, 8, 8\) differs from .*b\.mrc "
                                         r"\(8, 8, 9\)"):
        evaluate_files(a, b, [default_class("membrane")])
    c = write_mrc(tmp_path / "c.mrc", np.zeros((8, 8, 8), np.int8), 13.2)
    with pytest.raises(ValueError, match=r"a\.mrc: voxel size 10 Å differs from .*c\.mrc "
                                         r"13\.2 Å"):
        evaluate_files(a, c, [default_class("membrane")])


def test_where_truth_goes_gives_each_truth_class_the_fractions_of_its_voxels_per_prediction():
    truth = np.zeros((1, 4, 10), np.int8)
    truth[0, 0, :] = 1  # ten voxels of class a
    pred = np.zeros_like(truth)
    pred[0, 0, :6] = 1  # six found as a, two taken for b, two missed
    pred[0, 0, 6:8] = 2
    pred[0, 3, :3] = 3  # background taken for c: not a truth class's voxels, so not listed
    conf = confusion_matrix(pred, truth, len(NAMES))
    assert where_truth_goes(conf, NAMES) == {"a": {"background": 0.2, "a": 0.6, "b": 0.2}}
