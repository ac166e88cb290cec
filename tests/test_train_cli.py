"""`tomolive train` and `tomolive distill` as a user runs them, on tiny synthetic data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tomolive.core.model import load_bundle
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.volume import write_mrc

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def tomolive(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tomolive", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_train_single_feature_models_then_distill_them(tmp_path):
    result = synthesize((40, 96, 96), 10.0, seed=5, simulator="cartoon")
    tomogram = tmp_path / "t.mrc"
    write_synth(result, tomogram)
    singles, warned = [], []
    for index, name, keep in ((1, "membrane", "final"), (5, "gold", "best")):
        labels = (result.labels == index).astype(np.int8)
        labels[:, :, 80:] = -1  # not annotated (255 in an unsigned file)
        write_mrc(tmp_path / f"{name}.mrc", labels, 10.0)
        out = tmp_path / f"{name}.safetensors"
        run = tomolive("train", "--tomogram", tomogram, "--labels", tmp_path / f"{name}.mrc",
                       "--classes", name, "--region", "8:32,0:96,0:96", "--steps", "3",
                       "--base-width", "4", "--device", "cpu", "--keep", keep, "--out", out)
        assert run.returncode == 0, run.stderr
        assert f"{out}: {name} v1 ({keep} weights, step " in run.stdout
        bundle = load_bundle(out)
        assert [c.name for c in bundle.classes] == [name]
        assert bundle.meta.training["steps"] == 3 and bundle.meta.training["kept"] == keep
        for line in bundle.meta.training["warnings"]:  # printed as they are recorded
            assert f"warning: {line}" in run.stderr
        warned += bundle.meta.training["warnings"]
        singles.append(out)
    # the region holds two membranes (fewer in its training part): the user is told
    assert any(line.startswith("class 'membrane': only ") for line in warned), warned

    joint = tmp_path / "joint.safetensors"
    run = tomolive("distill", "--models", *singles, "--tomograms", tomogram, "--steps", "2",
                   "--base-width", "4", "--device", "cpu", "--out", joint)
    assert run.returncode == 0, run.stderr
    assert "joint model of membrane, gold" in run.stdout
    meta = load_bundle(joint).meta
    assert [c.name for c in meta.classes] == ["membrane", "gold"]
    assert len(meta.training["distilled_from"]) == 2


def test_train_rejects_a_missing_stop_condition_in_one_line(tmp_path):
    run = tomolive("train", "--tomogram", tmp_path / "t.mrc", "--labels", tmp_path / "l.mrc",
                   "--classes", "membrane", "--out", tmp_path / "m.safetensors")
    assert run.returncode == 1
    assert run.stderr.strip() == "tomolive: error: give --steps N and/or --max-minutes M"


def test_train_option_sets_a_tuning_field_and_refuses_others_in_one_line(tmp_path):
    result = synthesize((24, 64, 64), 10.0, seed=7, simulator="cartoon")
    tomogram, labels = tmp_path / "t.mrc", tmp_path / "t_labels.mrc"
    write_synth(result, tomogram)
    write_mrc(labels, (result.labels == 1).astype(np.int8), 10.0)
    common = ["train", "--tomogram", tomogram, "--labels", labels, "--classes", "membrane",
              "--steps", "1", "--base-width", "4", "--device", "cpu"]
    out = tmp_path / "m.safetensors"
    run = tomolive(*common, "--option", "class_weight_power=0.5", "--option", "patch_px=32",
                   "--option", "keep=best", "--out", out)
    assert run.returncode == 0, run.stderr
    training = load_bundle(out).meta.training
    assert training["class_weight_power"] == 0.5 and training["patch_px"] == 32
    assert training["kept"] == "best"  # the option wins over --keep's default
    run = tomolive(*common, "--option", "steps=9", "--out", tmp_path / "x.safetensors")
    assert run.returncode == 1 and not (tmp_path / "x.safetensors").exists()
    assert run.stderr.strip().startswith(
        "tomolive: error: option 'steps' is not a training option; one of batch_size, ")
    run = tomolive(*common, "--option", "patch_px=big", "--out", tmp_path / "x.safetensors")
    assert run.stderr.strip() == "tomolive: error: option patch_px='big' is not an int"


def test_train_init_default_fine_tunes_the_shipped_model(tmp_path):
    from tomolive.core.classes import SYNTH_CLASS_NAMES
    from tomolive.core.model import default_bundle_path

    result = synthesize((40, 96, 96), 10.0, seed=6)
    tomogram, labels = tmp_path / "t.mrc", tmp_path / "t_labels.mrc"
    write_synth(result, tomogram, labels)
    out = tmp_path / "tuned.safetensors"
    run = tomolive("train", "--tomogram", tomogram, "--labels", labels,
                   "--classes", ",".join(SYNTH_CLASS_NAMES), "--region", "8:32,0:96,0:96",
                   "--steps", "2", "--device", "cpu", "--init", "default", "--out", out)
    assert run.returncode == 0, run.stderr
    parent = load_bundle(default_bundle_path())
    tuned = load_bundle(out)
    assert tuned.meta.parent == parent.meta.ref
    assert tuned.meta.version == parent.meta.version + 1
    assert tuned.meta.architecture == parent.meta.architecture
