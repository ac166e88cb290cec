"""core.training.distill: the combination rule, and single-feature models -> one joint bundle."""

from __future__ import annotations

import numpy as np
import pytest
from tomolive.core import training as T
from tomolive.core.classes import default_class
from tomolive.core.model import load_bundle, save_bundle
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.training.distill import combine_labels, distill
from tomolive.core.volume import write_mrc


def test_combination_rule_priority_then_confidence_then_order_and_annotations_win():
    membrane, gold = default_class("membrane"), default_class("gold")  # priorities 1 and 10
    actin, tube = default_class("actin"), default_class("microtubule")  # both priority 2
    joint = [membrane, gold, actin, tube]
    shape = (1, 1, 6)
    # voxel:            0   1   2   3   4   5
    m_labels = np.array([1, 1, 0, 0, 0, 1], np.int8).reshape(shape)
    g_labels = np.array([0, 1, 0, 0, 0, 0], np.int8).reshape(shape)
    a_labels = np.array([0, 0, 1, 1, 1, 0], np.int8).reshape(shape)
    t_labels = np.array([0, 0, 1, 1, 0, 0], np.int8).reshape(shape)
    conf = {
        "m": np.array([200, 250, 0, 0, 0, 90], np.uint8).reshape(shape),
        "g": np.array([0, 100, 0, 0, 0, 0], np.uint8).reshape(shape),
        "a": np.array([0, 0, 150, 180, 180, 0], np.uint8).reshape(shape),
        "t": np.array([0, 0, 160, 180, 0, 0], np.uint8).reshape(shape),
    }
    results = [(m_labels, conf["m"]), (g_labels, conf["g"]), (a_labels, conf["a"]),
               (t_labels, conf["t"])]
    classes = [[membrane], [gold], [actin], [tube]]
    out = combine_labels(results, classes, joint)
    # 0 membrane alone; 1 gold beats membrane by priority despite lower confidence;
    # 2 microtubule beats actin (same priority) by confidence; 3 exact tie -> actin, given first;
    # 4 actin alone; 5 membrane alone.
    np.testing.assert_array_equal(out.ravel(), [1, 2, 4, 3, 3, 1])
    annotations = np.array([-1, 0, -1, 4, -1, 2], np.int8).reshape(shape)
    out = combine_labels(results, classes, joint, annotations)
    np.testing.assert_array_equal(out.ravel(), [1, 0, 4, 4, 3, 2])


def test_duplicate_classes_across_models_are_rejected(tmp_path):
    from tomolive.core.training.distill import joint_classes

    class Fake:  # only .meta.classes and .path are read
        def __init__(self, name, path):
            self.meta = type("M", (), {"classes": [default_class(name)]})()
            self.path = path

    with pytest.raises(ValueError) as info:
        joint_classes([Fake("gold", tmp_path / "a"), Fake("gold", tmp_path / "b")])
    assert str(info.value) == (f"{tmp_path / 'b'}: class 'gold' is also predicted by "
                               f"{tmp_path / 'a'} (give one model per class)")


@pytest.fixture(scope="module")
def single_models(tmp_path_factory):
    """Two tiny single-feature models (membrane; gold) and two tiny tomograms."""
    folder = tmp_path_factory.mktemp("distill")
    tomograms = []
    for seed in (1, 2):
        result = synthesize((24, 64, 64), 10.0, seed=seed, simulator="cartoon")
        write_synth(result, folder / f"t{seed}.mrc")
        tomograms.append(folder / f"t{seed}.mrc")
        if seed == 1:
            for index, name in ((1, "membrane"), (5, "gold")):
                write_mrc(folder / f"{name}.mrc", (result.labels == index).astype(np.int8), 10.0)
    bundles = []
    for name in ("membrane", "gold"):
        trained = T.train(
            [T.TrainingSource(tomograms[0], folder / f"{name}.mrc")], T.class_specs_for([name]),
            T.TrainOptions(steps=3, base_width=4, levels=3, batch_size=2, patch_px=32,
                           name=name))
        bundles.append(load_bundle(save_bundle(folder / f"{name}.safetensors",
                                               trained.network, trained.meta)))
    return folder, bundles, tomograms


def test_distill_end_to_end_gives_a_joint_bundle(single_models):
    folder, bundles, tomograms = single_models
    options = T.TrainOptions(steps=3, base_width=4, levels=3, batch_size=2, patch_px=32,
                             name="joint", seed=1)
    seen = []
    trained = distill(bundles, tomograms, options, progress=seen.append)
    out = save_bundle(folder / "joint.safetensors", trained.network, trained.meta)
    meta = load_bundle(out).meta
    assert (meta.name, meta.version, meta.parent) == ("joint", 1, None)
    assert [c.name for c in meta.classes] == ["membrane", "gold"]
    assert meta.architecture["n_classes"] == 3
    assert meta.voxel_size_a == bundles[0].meta.voxel_size_a
    training = meta.training
    assert [d["model"] for d in training["distilled_from"]] == ["membrane@1", "gold@1"]
    assert [d["sha256"] for d in training["distilled_from"]] == [b.sha256 for b in bundles]
    assert "highest class priority" in training["combination_rule"]
    assert [s["tomogram"] for s in training["sources"]] == [str(t) for t in tomograms]
    assert training["steps"] == 3 and [p.step for p in seen] == [1, 2, 3]


def test_distill_annotations_must_match_the_tomogram(single_models, tmp_path):
    folder, bundles, tomograms = single_models
    write_mrc(tmp_path / "ann.mrc", np.zeros((24, 32, 64), np.int8), 10.0)
    with pytest.raises(ValueError) as info:
        distill(bundles, tomograms[:1], T.TrainOptions(steps=1, base_width=4, levels=3),
                annotations=[tmp_path / "ann.mrc"])
    assert str(info.value) == (
        f"{tmp_path / 'ann.mrc'}: annotation shape (24, 32, 64) does not match the tomogram "
        f"{tomograms[0]} (24, 64, 64)")
