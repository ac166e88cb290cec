"""core.infer: batched, tiled, blended inference to int8 labels and uint8 confidence."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from tomolive.core.classes import default_class
from tomolive.core.infer import (
    InferenceOptions,
    Prediction,
    auto_batch_size,
    edge_indices,
    iter_probabilities,
    neighbour_indices,
    predict,
    prepare_network,
    resolve_device,
    tile_starts,
)
from tomolive.core.model import (
    BundleMeta,
    architecture_dict,
    build_network,
    fuse_for_inference,
    load_bundle,
    save_bundle,
)

TINY = architecture_dict(in_slices=5, n_classes=3, base_width=4, levels=5)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPE = (32, 64, 64)




def _exact(**options) -> InferenceOptions:
    """CPU float32: the equivalence tests below pin down the exact path (bfloat16 has its
    own test)."""
    return InferenceOptions(device="cpu", precision="float32", **options)


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = gaussian_filter(rng.standard_normal(SHAPE), (1, 2, 2)).astype(np.float32)
    return data / data.std()


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """A tiny net trained briefly to threshold smooth noise into 3 classes (a local task).

    A trained net is what tiling is meant for: its outputs are confident and local, whereas a
    random 5-level net reacts to every padded border within its ~180 px receptive field.
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = _volume()
    truth = np.digitize(data, [-0.5, 0.7]).astype(np.int64)
    network = build_network(TINY)
    optimiser = torch.optim.Adam(network.parameters(), 1e-2)
    network.train()
    for _ in range(40):  # 32 x 32 crops keep this to a second or two
        z = rng.integers(0, SHAPE[0], 8)
        y0, x0 = rng.integers(0, 33, 2)
        crop = (slice(y0, y0 + 32), slice(x0, x0 + 32))
        x = torch.from_numpy(data[neighbour_indices(z, SHAPE[0], 5)][(..., *crop)])
        target = torch.from_numpy(truth[z][(..., *crop)])
        loss = torch.nn.functional.cross_entropy(network(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return network.eval(), data, truth


@pytest.fixture(scope="module")
def plain(trained) -> Prediction:
    network, data, _ = trained
    return predict(network, data, 5, _exact())


def _all_probs(network, data, options) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([p for _, p in iter_probabilities(network, data, 5, options)])


# ------------------------------------------------------------------------------ helpers


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    with pytest.raises(ValueError, match="device 'tpu' is not one of auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="expected cuda:N with N a GPU index"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1' requested but CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_neighbour_indices_clamp_at_edges() -> None:
    assert neighbour_indices(0, 32, 5).tolist() == [0, 0, 0, 1, 2]
    assert neighbour_indices(31, 32, 5).tolist() == [29, 30, 31, 31, 31]
    assert neighbour_indices(np.array([5, 6]), 32, 3).tolist() == [[4, 5, 6], [5, 6, 7]]
    assert neighbour_indices(0, 1, 5).tolist() == [0, 0, 0, 0, 0]


def test_neighbour_indices_reflect_at_edges_as_numpy_pads() -> None:
    assert neighbour_indices(0, 32, 5, "reflect").tolist() == [2, 1, 0, 1, 2]
    assert neighbour_indices(31, 32, 5, "reflect").tolist() == [29, 30, 31, 30, 29]
    assert neighbour_indices(0, 1, 5, "reflect").tolist() == [0, 0, 0, 0, 0]
    # A volume thinner than the neighbourhood bounces back and forth, as np.pad's reflect.
    for depth in (2, 3, 7):
        volume = np.arange(depth)
        padded = np.pad(volume, 9, mode="reflect")
        for z in range(depth):
            assert neighbour_indices(z, depth, 19, "reflect").tolist() == \
                padded[z:z + 19].tolist()
    with pytest.raises(ValueError, match="z_edge must be one of clamp, reflect, not 'wrap'"):
        edge_indices(np.array([-1]), 8, "wrap")


def test_predict_builds_edge_neighbourhoods_by_the_rule_it_is_given(trained, plain) -> None:
    network, data, _ = trained
    reflected = predict(network, data, 5, _exact(), z_edge="reflect")
    # Only the two slices at each edge see slices beyond the volume (in_slices 5).
    assert np.array_equal(reflected.labels[2:-2], plain.labels[2:-2])
    assert not np.array_equal(reflected.confidence[:2], plain.confidence[:2])
    x = torch.from_numpy(data[neighbour_indices(np.array([0, 31]), SHAPE[0], 5, "reflect")])
    with torch.inference_mode():
        expected = torch.softmax(network(x), 1).argmax(1).numpy()
    assert np.array_equal(reflected.labels[[0, 31]], expected)


@pytest.mark.parametrize(
    ("length", "tile_max", "overlap"), [(1024, 512, 64), (1000, 512, 32), (300, 128, 40)]
)
def test_tile_starts_cover_with_overlap(length: int, tile_max: int, overlap: int) -> None:
    starts, tile = tile_starts(length, tile_max, overlap, 16)
    assert tile % 16 == 0 and tile <= tile_max
    assert starts[0] == 0 and starts[-1] + tile == length
    gaps = [a + tile - b for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= overlap
    # Fewest tiles: one tile fewer could not cover the axis with this overlap.
    n = len(starts) - 1
    assert n * tile_max - (n - 1) * overlap < length


def test_tile_starts_single_tile_is_padded_to_multiple() -> None:
    assert tile_starts(100, 512, 64, 16) == ([0], 112)
    assert tile_starts(64, 64, 16, 16) == ([0], 64)


def test_options_validation() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, not 0"):
        InferenceOptions(batch_size=0)
    with pytest.raises(ValueError, match="tile_size_px 32 must exceed tile_overlap_px"):
        InferenceOptions(tile_size_px=32, tile_overlap_px=32)


# ------------------------------------------------------------------------------ predict


def test_predict_shapes_dtypes_and_progress(trained, plain: Prediction) -> None:
    network, data, truth = trained
    assert plain.labels.shape == SHAPE and plain.labels.dtype == np.int8
    assert plain.confidence.shape == SHAPE and plain.confidence.dtype == np.uint8
    assert set(np.unique(plain.labels)) == {0, 1, 2}
    assert plain.confidence.min() >= 255 // 3  # max of 3 probabilities is at least 1/3
    assert (plain.labels == truth).mean() > 0.7  # the fixture learned its task
    seen: list[int] = []
    predict(network, data, 5, _exact(batch_size=12), seen.append)
    assert seen == [12, 24, 32]


def test_probabilities_sum_to_one_and_match_prediction(trained, plain) -> None:
    network, data, _ = trained
    for options in (_exact(),
                    _exact(tile_size_px=48, tile_overlap_px=16)):
        probs = _all_probs(network, data, options)
        assert probs.shape == (32, 3, 64, 64)
        torch.testing.assert_close(probs.sum(1), torch.ones(32, 64, 64), atol=1e-5, rtol=0)
    probs = _all_probs(network, data, _exact())
    best, arg = probs.max(1)
    assert np.array_equal(arg.numpy(), plain.labels)
    assert np.array_equal(np.round(best.numpy() * 255).astype(np.uint8), plain.confidence)


def test_deterministic_and_batch_size_independent(trained, plain) -> None:
    network, data, _ = trained
    again = predict(network, data, 5, _exact())
    assert np.array_equal(again.labels, plain.labels)
    assert np.array_equal(again.confidence, plain.confidence)
    other = predict(network, data, 5, _exact(batch_size=5))
    assert (other.labels == plain.labels).mean() > 0.999
    assert np.abs(other.confidence.astype(int) - plain.confidence).max() <= 1


def test_tiled_matches_untiled(trained, plain) -> None:
    network, data, _ = trained
    options = _exact(tile_size_px=48, tile_overlap_px=16)
    assert tile_starts(64, 48, 16, 16) == ([0, 16], 48)  # really tiled, 2 x 2 tiles
    tiled = predict(network, data, 5, options)
    assert (tiled.labels == plain.labels).mean() > 0.99
    diff = np.abs(tiled.confidence.astype(int) - plain.confidence)
    assert diff.mean() < 2 and np.percentile(diff, 99) <= 8


def test_slices_not_a_multiple_and_thin_volumes(trained) -> None:
    network, data, _ = trained
    odd = np.ascontiguousarray(data[:3, :50, :37])
    result = predict(network, odd, 5, _exact())
    assert result.labels.shape == (3, 50, 37) and result.confidence.shape == (3, 50, 37)
    probs = _all_probs(network, odd, _exact())
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 50, 37), atol=1e-5, rtol=0)
    # Tiled along x only, with the tiles' y padded.
    wide = np.ascontiguousarray(data[:2, :20, :])
    tiled = predict(network, wide, 5, _exact(tile_size_px=48,
                                                        tile_overlap_px=16))
    assert tiled.labels.shape == (2, 20, 64)


def test_flip_tta(trained, plain) -> None:
    network, data, truth = trained
    options = _exact(tta_flips=True)
    tta = predict(network, data, 5, options)
    assert tta.labels.shape == SHAPE
    assert not np.array_equal(tta.confidence, plain.confidence)  # the flips were averaged in
    assert (tta.labels == plain.labels).mean() > 0.9
    assert (tta.labels == truth).mean() > 0.7
    probs = _all_probs(network, data[:4], options)
    torch.testing.assert_close(probs.sum(1), torch.ones(4, 64, 64), atol=1e-5, rtol=0)


def test_fused_matches_unfused(trained, plain) -> None:
    network, data, _ = trained
    fused = predict(fuse_for_inference(network), data, 5, _exact())
    assert (fused.labels == plain.labels).mean() > 0.999
    assert np.abs(fused.confidence.astype(int) - plain.confidence).max() <= 1


def test_predict_leaves_torch_thread_count_alone(trained) -> None:
    """core changes no process-wide torch state: the thread count is the caller's."""
    network, data, _ = trained
    before = torch.get_num_threads()
    predict(network, data[:2], 5, _exact())
    assert torch.get_num_threads() == before


def test_bundle_round_trip_gives_identical_predictions(trained, tmp_path: Path) -> None:
    network, data, _ = trained
    meta = BundleMeta(name="thresholds", version=1, architecture=TINY, voxel_size_a=10.0,
                      classes=[default_class("membrane"), default_class("actin")])
    path = save_bundle(tmp_path / "thresholds.safetensors", network, meta)
    bundle = load_bundle(path)
    options = _exact()
    prepared = prepare_network(bundle, "cpu")
    assert not prepared.training
    from_file = predict(prepared, data, bundle.meta.in_slices, options)
    channels_last = fuse_for_inference(network).to(memory_format=torch.channels_last)
    reference = predict(channels_last, data, 5, options)
    assert np.array_equal(from_file.labels, reference.labels)
    assert np.array_equal(from_file.confidence, reference.confidence)


def test_channels_last_matches_default_layout(trained, plain) -> None:
    network, data, _ = trained
    nhwc = predict(copy.deepcopy(network).to(memory_format=torch.channels_last), data, 5,
                   _exact())
    assert (nhwc.labels == plain.labels).mean() > 0.999
    assert np.abs(nhwc.confidence.astype(int) - plain.confidence).max() <= 1


def test_auto_batch_size() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert auto_batch_size(cpu, 256 * 256) == 2
    assert auto_batch_size(cpu, 1024 * 1024) == 1
    assert auto_batch_size(cpu, 64 * 64) == 32
    assert auto_batch_size(cuda, 512 * 512) == 8
    assert auto_batch_size(cuda, 16 * 16) == 64


def test_precision_means_what_it_says_on_any_cpu(monkeypatch) -> None:
    from tomolive.core import infer

    cpu = torch.device("cpu")
    assert infer.reduced_precision_dtype(cpu, "float32") is None
    assert infer.reduced_precision_dtype(cpu, "bfloat16") is torch.bfloat16
    monkeypatch.setattr(infer, "_cpu_has_native_bf16", lambda: True)
    assert infer.reduced_precision_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(infer, "_cpu_has_native_bf16", lambda: False)
    assert infer.reduced_precision_dtype(cpu, "auto") is None  # emulated bf16 is slower
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16"):
        InferenceOptions(precision="fp8")


def test_bfloat16_labels_agree_with_float32(trained) -> None:
    network, data, _ = trained
    exact = predict(network, data, 5, _exact())
    fast = predict(network, data, 5, InferenceOptions(device="cpu", precision="bfloat16"))
    assert exact.labels.shape == fast.labels.shape
    assert float((exact.labels == fast.labels).mean()) >= 0.995
    assert np.abs(exact.confidence.astype(int) - fast.confidence.astype(int)).mean() < 2.0
