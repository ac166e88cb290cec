"""core.training: region parsing, class specs, the masked loss, tiny training runs end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage
from tomolive.core import training as T
from tomolive.core.model import BundleMeta, load_bundle, save_bundle
from tomolive.core.preprocess import DEFAULT_RECIPE, validate_recipe
from tomolive.core.synth import synthesize, write_synth
from tomolive.core.volume import write_mrc

SHAPE = (24, 64, 64)
NAMES = ["membrane", "microtubule", "actin", "ribosome", "gold"]


def tiny_options(**changes) -> T.TrainOptions:
    base = T.TrainOptions(steps=4, base_width=4, batch_size=2, patch_px=32, levels=3, seed=3,
                          in_slices=5)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic tomogram (float32, 10 Å) and its labels, with z 0-3, 20-23 and a block
    of z 8-15 left unannotated (255, stored as -1 in the int8 file)."""
    folder = tmp_path_factory.mktemp("train")
    result = synthesize(SHAPE, 10.0, seed=1, simulator="cartoon")
    labels = result.labels.astype(np.int8).copy()
    labels[:4] = -1
    labels[20:] = -1
    labels[8:16, :, :24] = -1  # a hole in the annotated slab
    write_synth(result, folder / "tomo.mrc")
    write_mrc(folder / "labels.mrc", labels, 10.0)
    return folder, result.tomogram, labels


def test_parse_region_reads_three_ranges_with_open_bounds():
    assert T.parse_region("4:20, 0:64,:") == (slice(4, 20), slice(0, 64), slice(None, None))
    assert T.format_region(T.parse_region("4:20,:32,8:")) == "4:20,:32,8:"


@pytest.mark.parametrize("text, message", [
    ("4:20,0:64", "must be Z0:Z1,Y0:Y1,X0:X1 (three ranges)"),
    ("4:20,0:64,a:9", "X range 'a:9' is not integers"),
    ("20:4,:,:", "Z range '20:4' is empty (stop <= start)"),
    ("4,:,:", "Z range '4' must be START:STOP"),
    ("-1:4,:,:", "Z range '-1:4' has a negative bound"),
])
def test_parse_region_rejects_bad_text(text, message):
    with pytest.raises(ValueError, match="region") as info:
        T.parse_region(text)
    assert message in str(info.value)


def test_class_specs_use_known_defaults_and_yaml_overrides(tmp_path):
    yaml_path = tmp_path / "classes.yaml"
    yaml_path.write_text("ribosome: {diameter_nm: 28}\nvesicle: {kind: membrane}\n")
    specs = T.class_specs_for(["ribosome", "gold", "vesicle"], T.load_class_overrides(yaml_path))
    assert [s.name for s in specs] == ["ribosome", "gold", "vesicle"]
    assert (specs[0].kind, specs[0].diameter_nm) == ("particle", 28.0)
    assert (specs[1].kind, specs[1].diameter_nm, specs[1].priority) == ("fiducial", 10.0, 10)
    assert specs[2].kind == "membrane"
    assert T.class_specs_for(["thing"])[0].kind == "other"


def test_class_overrides_reject_unknown_fields_and_untrained_classes(tmp_path):
    yaml_path = tmp_path / "classes.yaml"
    yaml_path.write_text("ribosome: {diameter: 28}\n")
    with pytest.raises(ValueError) as info:
        T.load_class_overrides(yaml_path)
    assert str(info.value) == f"{yaml_path}: class 'ribosome' has unknown fields ['diameter']"
    with pytest.raises(ValueError, match=r"name classes that are not trained: \['gold'\]"):
        T.class_specs_for(["ribosome"], {"gold": {"priority": 1}})
    with pytest.raises(ValueError, match="are not unique"):
        T.class_specs_for(["gold", "gold"])


def test_loss_ignores_predictions_and_gradients_at_unannotated_voxels():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16), generator=gen)
    ignored = torch.rand((2, 16, 16), generator=gen) < 0.4
    target[ignored] = T.IGNORE
    logits_a = torch.randn((2, 4, 16, 16), generator=gen)
    logits_b = logits_a.clone()
    # Wildly different predictions, but only where the voxel is not annotated.
    logits_b.permute(0, 2, 3, 1)[ignored] = 50 * torch.randn((int(ignored.sum()), 4),
                                                             generator=gen)
    grads = []
    for logits in (logits_a, logits_b):
        logits = logits.clone().requires_grad_(True)
        loss = T.masked_loss(logits, target)
        loss.backward()
        grads.append((float(loss.detach()), logits.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][0] > 0.5  # a real loss, not a constant
    keep = ~ignored
    assert torch.allclose(grads[0][1].permute(0, 2, 3, 1)[keep],
                          grads[1][1].permute(0, 2, 3, 1)[keep], atol=1e-7)
    assert float(grads[0][1].permute(0, 2, 3, 1)[ignored].abs().max()) == 0.0
    # The counter-check: the same change at annotated voxels does change the loss.
    logits_c = logits_a.clone()
    logits_c.permute(0, 2, 3, 1)[keep] += 5 * torch.randn((int(keep.sum()), 4), generator=gen)
    assert float(T.masked_loss(logits_c, target)) != pytest.approx(grads[0][0], rel=1e-3)


def _weights(trained: T.TrainedModel) -> dict[str, torch.Tensor]:
    return trained.network.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_training_writes_a_complete_bundle_that_loads(tiny, tmp_path):
    folder, _, _ = tiny
    seen = []
    source = T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc",
                              region=T.parse_region("6:18,:,:"))
    trained = T.train([source], T.class_specs_for(NAMES), tiny_options(synthetic=True),
                      progress=seen.append)
    out = save_bundle(tmp_path / "tiny.safetensors", trained.network, trained.meta)
    bundle = load_bundle(out)
    meta = bundle.meta
    # Every BundleMeta field is filled in.
    for f in dataclasses.fields(BundleMeta):
        value = getattr(meta, f.name)
        assert value is not None or f.name == "parent", f.name
    assert (meta.name, meta.version, meta.parent) == ("tomolive-model", 1, None)
    assert meta.architecture == {"name": "unet25d", "in_slices": 5, "base_width": 4,
                                 "levels": 3, "n_classes": 6}
    assert meta.voxel_size_a == 10.0
    assert [c.name for c in meta.classes] == NAMES
    assert meta.classes[3].diameter_nm == 25.0
    assert meta.preprocess == validate_recipe(DEFAULT_RECIPE)
    assert meta.z_edge == "reflect"  # inference builds this model's edge slices so
    training = meta.training
    assert training["synthetic"] is True and training["seed"] == 3
    assert training["z_edge_share"] == 0.25 and training["z_edge_parent"] is None
    assert training["steps"] == 4 and training["requested_steps"] == 4
    assert training["sources"] == [{
        "tomogram": str(folder / "tomo.mrc"), "labels": str(folder / "labels.mrc"),
        "region": "6:18,:,:", "voxel_size_a": 10.0,
        "model_grid_region_shape_zyx": [12, 64, 64]}]
    assert set(training["validation_dice"]) | set(training["validation_classes_absent"]) \
        == set(NAMES)
    assert training["validation_dice"], "the validation strip holds some class"
    assert all(0.0 <= v <= 1.0 for v in training["validation_dice"].values())
    assert training["elapsed_s"] >= 0 and 1 <= training["best_validation_step"] <= 4
    # The final weights are kept, and their validation Dice is the one recorded.
    assert (training["kept"], training["kept_step"]) == ("final", 4)
    assert training["validation_dice"] == pytest.approx(seen[-1].validation_dice, abs=1e-4)
    # The loaded weights are the trained ones; progress was reported every step.
    assert _same(bundle.state_dict, {k: v.float() if v.is_floating_point() else v
                                     for k, v in _weights(trained).items()})
    assert [p.step for p in seen] == [1, 2, 3, 4] and seen[-1].total_steps == 4
    assert seen[-1].validation_dice is not None


def test_unannotated_and_out_of_region_voxels_change_nothing(tiny, tmp_path):
    folder, _, labels = tiny
    specs = T.class_specs_for(NAMES)
    region = T.parse_region("4:20,:,:")
    # No validation strip: the final weights (not the best of a few checks) are compared.
    options = tiny_options(steps=6, validation_fraction=0.0)
    base = T.train([T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc", region)],
                   specs, options)
    # Same annotation, but "not annotated" stored as 255 in an int16 file instead of -1 in int8,
    # and the voxels outside the region (unused) filled with random classes.
    other = labels.astype(np.int16)
    other[other == -1] = 255
    rng = np.random.default_rng(7)
    outside = np.ones(labels.shape, dtype=bool)
    outside[4:20] = False
    other[outside] = rng.integers(0, 6, int(outside.sum()))
    write_mrc(tmp_path / "other.mrc", other, 10.0)
    again = T.train([T.TrainingSource(folder / "tomo.mrc", tmp_path / "other.mrc", region)],
                    specs, options)
    assert _same(_weights(base), _weights(again))
    # Counter-check: calling the unannotated voxels inside the region background changes it.
    other[other == 255] = 0
    write_mrc(tmp_path / "changed.mrc", other, 10.0)
    changed = T.train([T.TrainingSource(folder / "tomo.mrc", tmp_path / "changed.mrc", region)],
                      specs, options)
    assert not _same(_weights(base), _weights(changed))


def test_labels_are_resampled_to_the_model_grid_by_nearest_neighbour(tiny):
    folder, _, labels = tiny
    prepared = T.prepare_source(
        T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc", T.parse_region("4:20,:,:")),
        5, 20.0, DEFAULT_RECIPE, 5, 0.0, 8, "cpu")
    (part,) = prepared.train
    got = part.labels
    # Model index i sits at input i * 2; region z 4:20 -> model z 2..9.
    expected = labels[4:20:2, ::2, ::2].astype(np.int16)
    expected[expected == -1] = 255
    assert got.shape == (8, 32, 32)
    np.testing.assert_array_equal(got, expected)
    assert part.image.shape == (8 + 4, 32, 32)  # 2 context slices each side


def test_keep_best_keeps_the_best_validated_weights(tiny):
    folder, _, _ = tiny
    source = T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc")
    seen: list[T.TrainProgress] = []
    best = T.train([source], T.class_specs_for(NAMES), tiny_options(steps=10, keep="best"),
                   progress=seen.append)
    final = T.train([source], T.class_specs_for(NAMES), tiny_options(steps=10))
    scores = {p.step: p.validation_dice for p in seen}  # validated every step: 10 per run
    means = {step: np.mean(list(d.values())) for step, d in scores.items()}
    chosen = max(means, key=lambda step: (means[step], -step))  # the first of equal scores
    training = best.meta.training
    assert (training["kept"], training["kept_step"]) == ("best", chosen)
    assert training["best_validation_step"] == chosen
    assert training["validation_dice"] == pytest.approx(scores[chosen], abs=1e-4)
    # Same seed, same steps: the runs differ only in the weights kept.
    assert final.meta.training["best_validation_step"] == chosen
    assert _same(_weights(best), _weights(final)) == (chosen == 10)
    with pytest.raises(ValueError, match="keep must be 'final' or 'best'"):
        tiny_options(keep="last").check()


@pytest.mark.parametrize("angle_deg", [0.0, 17.0, 33.0, 90.0])
def test_rotation_matches_scipy_and_keeps_labels_on_their_voxels(angle_deg):
    """The augmentation's in-plane rotation equals scipy.ndimage.rotate (bilinear image, nearest
    labels) on the centred box, and cells beyond the patch are unannotated, not background."""
    q, size = 138, 96
    yy, xx = np.mgrid[0:q, 0:q]
    smooth = np.sin(yy / 7.0) + np.cos(xx / 5.0) + 0.01 * yy * xx / q
    image = np.stack([smooth, -smooth, 2 * smooth]).astype(np.float32)
    labels = ((yy // 20) % 2 * 2 + (xx // 25) % 3).astype(np.uint8)
    rotated_image, rotated_labels = T.rotate_patch(image, labels, angle_deg, size)
    o = (q - size) // 2
    want_image = ndimage.rotate(image, angle_deg, axes=(1, 2), reshape=False, order=1,
                                mode="reflect")[:, o:o + size, o:o + size]
    want_labels = ndimage.rotate(labels, angle_deg, reshape=False, order=0)[o:o + size,
                                                                            o:o + size]
    assert rotated_image.shape == (3, size, size) and rotated_image.dtype == np.float32
    np.testing.assert_allclose(rotated_image, want_image, atol=1e-4)
    np.testing.assert_array_equal(rotated_labels, want_labels)
    # A patch as large as the output box: turned by 45 degrees, its corners are outside.
    _, corners = T.rotate_patch(image[:, :size, :size], labels[:size, :size], 45.0, size)
    assert corners[0, 0] == T.IGNORE and corners[size // 2, size // 2] != T.IGNORE


def test_blur_augmentation_smooths_patches_and_is_off_by_default():
    rng = np.random.default_rng(0)
    part = T.Part(rng.standard_normal((9, 64, 64)).astype(np.float32),
                   rng.integers(0, 3, (5, 64, 64)).astype(np.uint8))
    part.build_index()

    def patches(**kwargs) -> np.ndarray:
        sampler = T.Sampler([part], 5, 32, np.random.default_rng(7), True, **kwargs)
        return sampler.batch(64)[0].numpy()

    plain, off, blurred = patches(), patches(blur_max_px=0.0), patches(blur_max_px=1.5)
    assert np.array_equal(plain, off)  # off: the same random stream as before the option

    def roughness(x: np.ndarray) -> float:  # mean squared difference of x-neighbours
        return float(np.mean(np.diff(x, axis=-1) ** 2))

    assert roughness(blurred) < 0.8 * roughness(plain)
    with pytest.raises(ValueError, match="blur_max_px must be >= 0"):
        tiny_options(blur_max_px=-1.0).check()


def test_z_edge_neighbourhoods_are_the_ones_inference_builds_at_a_volume_edge():
    from tomolive.core.infer import neighbour_indices

    # Every neighbourhood z_edge_indices makes is one core.infer feeds the network for a slice
    # within in_slices // 2 of the top or bottom (shifted so that the centre is slice 7), and
    # every such one is made.
    k, depth = 15, 40
    for z_edge in ("clamp", "reflect"):
        made = {tuple(T.z_edge_indices(k, np.random.default_rng(seed), z_edge))
                for seed in range(400)}
        at_edges = {tuple(neighbour_indices(z, depth, k, z_edge) - z + k // 2)
                    for z in [*range(k // 2 + 1), *range(depth - 1 - k // 2, depth)]}
        assert made == at_edges and len(made) == k  # the one with no edge in reach is shared

    rng = np.random.default_rng(0)
    part = T.Part(rng.standard_normal((9 + 4, 48, 48)).astype(np.float32),
                   rng.integers(0, 3, (9, 48, 48)).astype(np.uint8))
    part.build_index()
    before = part.image.copy()

    def patches(**kwargs) -> np.ndarray:
        sampler = T.Sampler([part], 5, 32, np.random.default_rng(7), True, **kwargs)
        return sampler.batch(64)[0].numpy()

    def repeated_slices(x: np.ndarray) -> int:
        """Patches with two z-neighbours alike: the part's slices are independent noise, so
        only a repeated edge slice (under the augmentation's own noise) makes them alike."""
        a, b = x[:, 1:].reshape(*x.shape[:1], x.shape[1] - 1, -1), x[:, :-1].reshape(
            *x.shape[:1], x.shape[1] - 1, -1)
        a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
        correlation = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
        return int((correlation > 0.5).any(axis=1).sum())

    assert np.array_equal(patches(), patches(z_edge_share=0.0))  # off: the stream as before
    assert repeated_slices(patches()) == 0
    # Half the patches get an edge, two thirds of those within reach of the centre (k = 5):
    # about 21 of 64.
    assert 10 < repeated_slices(patches(z_edge_share=0.5)) < 34
    assert np.array_equal(part.image, before)  # the part's image is not written through
    with pytest.raises(ValueError, match="z_edge_share must be in"):
        tiny_options(z_edge_share=1.5).check()


@pytest.mark.parametrize("in_slices", [0, 4, 65])
def test_in_slices_must_be_odd_and_in_range(in_slices):
    with pytest.raises(ValueError, match=f"in_slices must be odd and 1..63 .*not {in_slices}"):
        tiny_options(in_slices=in_slices).check()


def test_fine_tuning_increments_version_and_names_parent(tiny, tmp_path):
    folder, _, _ = tiny
    source = T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc")
    first = T.train([source], T.class_specs_for(NAMES), tiny_options(name="cells", steps=2))
    parent = load_bundle(save_bundle(tmp_path / "v1.safetensors", first.network, first.meta))
    tuned = T.train([source], T.class_specs_for(NAMES), tiny_options(steps=2, seed=4),
                    init_bundle=parent)
    assert (tuned.meta.name, tuned.meta.version, tuned.meta.parent) == ("cells", 2, "cells@1")
    assert tuned.meta.architecture == parent.meta.architecture
    assert not _same(_weights(tuned), parent.state_dict)
    with pytest.raises(ValueError) as info:
        T.train([source], T.class_specs_for(["membrane"]), tiny_options(), init_bundle=parent)
    assert str(info.value) == (
        f"{parent.path}: fine-tuning needs the same classes in the same order: the model has "
        f"{NAMES}, training asks for ['membrane']")


def _region_error(folder, region: str) -> str:
    """The message of the ValueError training on the tiny tomogram's `region` raises."""
    source = T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc", T.parse_region(region))
    with pytest.raises(ValueError) as info:
        T.train([source], T.class_specs_for(NAMES), tiny_options())
    return str(info.value)


def test_bad_label_volumes_name_the_file(tiny, tmp_path):
    folder, _, labels = tiny
    bad = labels.copy()
    bad[10, 5, 5] = 9
    write_mrc(tmp_path / "bad.mrc", bad, 10.0)
    with pytest.raises(ValueError) as info:
        T.train([T.TrainingSource(folder / "tomo.mrc", tmp_path / "bad.mrc")],
                T.class_specs_for(NAMES), tiny_options())
    assert str(info.value) == (
        f"{tmp_path / 'bad.mrc'}: label values [9] are not 0..5 (background and 5 classes) or "
        f"255 (not annotated)")
    write_mrc(tmp_path / "small.mrc", labels[:, :32], 10.0)
    with pytest.raises(ValueError) as info:
        T.train([T.TrainingSource(folder / "tomo.mrc", tmp_path / "small.mrc")],
                T.class_specs_for(NAMES), tiny_options())
    assert str(info.value).startswith(f"{tmp_path / 'small.mrc'}: label volume shape "
                                      f"(24, 32, 64) (z, y, x) does not match the tomogram")
    assert _region_error(folder, "0:4,:,:") == (
        f"{folder / 'labels.mrc'}: no annotated voxels (all 255) in the region")
    assert _region_error(folder, "4:30,:,:") == (
        f"{folder / 'tomo.mrc'}: region 4:30,:,: is outside the tomogram (axis z has 24 voxels)")
    with pytest.raises(ValueError, match="training needs steps and/or max_minutes"):
        T.train([T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc")],
                T.class_specs_for(NAMES), tiny_options(steps=None))


def test_validation_strip_is_chosen_so_classes_are_in_both_parts():
    labels = np.zeros((4, 40, 20), np.uint8)
    labels[:, ::3, ::3] = 1
    labels[:, 2:6, 5:9] = 2  # class 2 only near the start of y ...
    labels[:, 12:14, 5:9] = 2  # ... and a little further on
    image = np.zeros((8, 40, 20), np.float32)
    train_parts, validation = T.split_region(image, labels, 0.25, 8)
    # Strips are tried from the end of y; 8:18 is the first that shares class 2 with the rest.
    np.testing.assert_array_equal(validation.labels, labels[:, 8:18])
    assert [p.labels.shape for p in train_parts] == [(4, 8, 20), (4, 22, 20)]
    assert all(2 in p.index for p in train_parts[:1]) and 2 in validation.index


def test_classes_with_too_few_annotated_objects_are_warned_about(tiny, tmp_path):
    folder, _, _ = tiny
    labels = np.zeros(SHAPE, np.int8)
    for x0 in (4, 20, 36, 52):  # four separate membrane patches, one microtubule, no actin
        labels[10:14, 8:12, x0:x0 + 4] = 1
    labels[10:14, 40:44, 30:34] = 2
    write_mrc(tmp_path / "labels.mrc", labels, 10.0)
    lines: list[str] = []
    trained = T.train([T.TrainingSource(folder / "tomo.mrc", tmp_path / "labels.mrc")],
                      T.class_specs_for(["membrane", "microtubule", "actin"]),
                      tiny_options(steps=1, validation_fraction=0.0), warn=lines.append)
    training = trained.meta.training
    assert training["training_annotation"] == {
        "membrane": {"voxels": 4 * 64, "objects": 4},
        "microtubule": {"voxels": 64, "objects": 1},
        "actin": {"voxels": 0, "objects": 0}}
    assert lines == training["warnings"] == [
        "class 'microtubule': only 1 annotated object(s) (64 voxels) in the training part of "
        "the regions; annotate at least 3 before trusting the model on this class",
        "class 'actin': not annotated in the training part of the regions; the model cannot "
        "learn it"]
    assert T.sparse_class_warnings(training["training_annotation"], min_objects=5)[0].startswith(
        "class 'membrane': only 4 annotated object(s)")


def test_spectrum_augmentation_reshapes_the_spectrum_and_keeps_the_level():
    rng = np.random.default_rng(3)
    white = rng.standard_normal((5, 64, 64)).astype(np.float32) * 2.0 + 1.0
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij"))

    def corner_share(image):  # power beyond Nyquist along an axis: only the corners
        power = np.abs(np.fft.fft2(image - image.mean())) ** 2
        return power[:, k > 0.55].sum() / power.sum()

    shares = []
    for seed in range(4):
        out = T.random_spectrum(white, np.random.default_rng(seed), jitter=1.0)
        assert out.dtype == np.float32 and out.shape == white.shape
        assert out.mean() == pytest.approx(white.mean(), abs=1e-3)
        assert out.std() == pytest.approx(white.std(), rel=1e-3)
        shares.append(corner_share(out))
    # The low-pass at 0.25-0.5 cycles/px takes most of the corners' power; white noise has
    # ~11% there. Different draws give different spectra.
    assert corner_share(white) > 0.08 and max(shares) < 0.03, shares
    assert len({round(float(s), 6) for s in shares}) == 4
    with pytest.raises(ValueError, match="spectrum_jitter"):
        T.TrainOptions(steps=1, spectrum_jitter=-1.0).check()


def test_void_augmentation_erases_objects_beyond_a_surface_and_keeps_the_noise():
    rng = np.random.default_rng(5)
    k, q = 9, 48
    image = rng.standard_normal((k, q, q)).astype(np.float32)
    image[:, 20:28, :] += 6.0  # a wall across every slice, labelled 1 in the centre slice
    labels = np.zeros((q, q), np.uint8)
    labels[20:28, :] = 1
    centre_voids = 0
    for seed in range(40):
        out, out_labels = T.void_beyond_surface(image, labels, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == image.shape
        wall = out[:, 20:28, :].mean(axis=(1, 2)) - out[:, 32:, :].mean(axis=(1, 2))
        erased = wall < 2.0  # the wall stands out by 6 where the slice is real
        assert erased.any(), "every call makes at least one slice void"
        # The void is one run from the top or from the bottom.
        assert erased[: erased.sum()].all() or erased[k - erased.sum():].all()
        # Outside the void, the slices are the input's; inside, the level is kept.
        np.testing.assert_array_equal(out[~erased], image[~erased])
        assert abs(float(out[erased].mean()) - float(image.mean())) < 0.5
        # The void holds noise at 0.7-1.1 times the patch's spread, not a blank.
        assert 0.6 * image.std() < out[erased].std() < 1.2 * image.std()
        if erased[k // 2]:
            centre_voids += 1
            assert not out_labels.any(), "a centre slice in the void is all background"
        else:
            np.testing.assert_array_equal(out_labels, labels)
    assert 10 <= centre_voids <= 30, centre_voids
    with pytest.raises(ValueError, match="void_share"):
        T.TrainOptions(steps=1, void_share=1.5).check()


def test_training_is_reproducible_and_leaves_torch_global_random_state_alone(tiny):
    """The same seed gives the same weights, and core does not reseed the caller's torch."""
    folder, _, _ = tiny
    source = T.TrainingSource(folder / "tomo.mrc", folder / "labels.mrc",
                              region=T.parse_region("6:18,:,:"))
    torch.manual_seed(12345)
    before = torch.get_rng_state()
    runs = [T.train([source], T.class_specs_for(NAMES), tiny_options(steps=2)).network
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
