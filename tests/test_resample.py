"""core.resample: grid mapping, Fourier crop/pad accuracy, labels back to the input grid
(nearest neighbour, and refined at boundaries by the confidence)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tomolive.core.resample as resample
from tomolive.core.resample import (
    GridMap,
    fourier_rescale,
    grid_for,
    labels_to_input,
    labels_to_input_refined,
)
from tomolive.core.volume import read_mrc, write_mrc


def _blob(shape, centre_zyx, sigma=3.0, background=0.1):
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = (zz - centre_zyx[0]) ** 2 + (yy - centre_zyx[1]) ** 2 + (xx - centre_zyx[2]) ** 2
    return (np.exp(-r2 / (2 * sigma**2)) + background).astype(np.float32)


def _centroid(vol, background=0.1, floor=0.01):
    w = np.clip(vol - background, 0, None)
    w[w < floor] = 0  # ignore ringing/background far from the blob
    grids = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    return np.array([(w * g).sum() / w.sum() for g in grids])


def test_grid_for_shapes():
    g = grid_for((64, 256, 256), 10.0, 13.2)
    assert g.model_shape == (48, 194, 194)  # round(64 * 10 / 13.2) = 48, round(193.9) = 194
    assert g.scale_zyx == (64 / 48, 256 / 194, 256 / 194)
    assert g.model_voxel_size_a(10.0) == pytest.approx((13.3333333, 13.19587629, 13.19587629))
    assert grid_for((3, 3, 3), 1.0, 100.0).model_shape == (1, 1, 1)  # never 0
    assert grid_for((40, 50, 60), 10.0, 10.0).model_shape == (40, 50, 60)
    with pytest.raises(ValueError, match="model voxel size 0 Å must be positive"):
        grid_for((40, 50, 60), 10.0, 0)
    with pytest.raises(ValueError, match="3 positive sizes"):
        GridMap((40, 50), (40, 50, 60))


def test_gridmap_round_trips():
    g = grid_for((61, 200, 173), 9.7, 13.2)
    pts = np.random.default_rng(0).random((100, 3)) * np.array(g.input_shape)
    np.testing.assert_allclose(g.to_model(g.to_input(pts)), pts, atol=1e-9, rtol=0)
    np.testing.assert_allclose(g.to_input(g.to_model(pts)), pts, atol=1e-9, rtol=0)
    # sample 0 stays aligned; the last model voxel sits at (m - 1) * scale
    np.testing.assert_allclose(g.to_input([0, 0, 0]), [0, 0, 0])
    np.testing.assert_allclose(
        g.to_input(np.array(g.model_shape) - 1),
        (np.array(g.model_shape) - 1) * np.array(g.input_shape) / np.array(g.model_shape),
    )


@pytest.mark.parametrize("model_voxel_a", [13.2, 7.3])
@pytest.mark.parametrize("mirror", [True, False])
def test_blob_lands_where_the_grid_map_says(model_voxel_a, mirror):
    centre = np.array([30.3, 25.7, 37.45])  # sub-voxel, different on each axis
    vol = _blob((64, 64, 64), centre)
    g = grid_for(vol.shape, 10.0, model_voxel_a)
    out = fourier_rescale(vol, g, mirror=mirror)
    assert out.shape == g.model_shape and out.dtype == np.float32
    err = _centroid(out) - g.to_model(centre)
    assert np.abs(err).max() < 0.1, err
    assert out.mean() == pytest.approx(vol.mean(), rel=1e-5)


def test_blob_on_anisotropic_grid_keeps_axes_apart():
    centre = np.array([14.2, 40.6, 21.9])
    vol = _blob((32, 64, 48), centre, sigma=2.5)
    g = GridMap((32, 64, 48), (24, 70, 36))  # z and x shrink, y grows
    err = _centroid(fourier_rescale(vol, g)) - g.to_model(centre)
    assert np.abs(err).max() < 0.1, err


def test_band_limited_signal_is_exact():
    """Without mirroring the result is the trigonometric interpolant: a periodic band-limited
    signal is reproduced at the model positions i * scale, including the Nyquist split."""
    for n, m in [(40, 30), (30, 40), (33, 26), (16, 32)]:
        g = GridMap((8, 8, n), (8, 8, m))
        j = np.arange(n)
        k = n // 2 if (n, m) == (16, 32) else 3  # (16, 32): the input's Nyquist cosine
        line = np.cos(2 * np.pi * k * j / n + (0.0 if k == n // 2 else 0.3))
        vol = np.broadcast_to(line, (8, 8, n)).astype(np.float32)
        out = fourier_rescale(vol, g, mirror=False)
        t = np.arange(m) * n / m
        expect = np.cos(2 * np.pi * k * t / n + (0.0 if k == n // 2 else 0.3))
        np.testing.assert_allclose(out[3, 4], expect, atol=1e-5, err_msg=f"{n}->{m}")


def test_mean_preserved_on_noise():
    vol = np.random.default_rng(4).normal(5.0, 1.0, (24, 40, 36)).astype(np.float32)
    g = grid_for(vol.shape, 10.0, 13.2)
    exact = fourier_rescale(vol, g, mirror=False)
    assert exact.mean(dtype=np.float64) == pytest.approx(vol.mean(dtype=np.float64), rel=1e-6)
    mirrored = fourier_rescale(vol, g)
    assert mirrored.mean(dtype=np.float64) == pytest.approx(vol.mean(dtype=np.float64), rel=2e-3)


def test_equal_shapes_copy_without_fft():
    vol = np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)
    out = fourier_rescale(vol, GridMap(vol.shape, vol.shape))
    assert out.dtype == np.float32 and not np.shares_memory(out, vol)
    np.testing.assert_array_equal(out, vol)


def test_one_axis_only_leaves_the_others_untouched():
    vol = np.random.default_rng(5).random((16, 24, 20)).astype(np.float32)
    out = fourier_rescale(vol, GridMap(vol.shape, (16, 24, 15)), mirror=False)
    # a pure x crop must not change the y or z content: column sums over x give the mean
    np.testing.assert_allclose(out.mean(axis=2), vol.mean(axis=2), atol=1e-5)


def test_slabs_give_the_same_result(monkeypatch):
    vol = np.random.default_rng(6).random((20, 30, 28)).astype(np.float32)
    g = grid_for(vol.shape, 10.0, 13.2)
    whole = fourier_rescale(vol, g)
    monkeypatch.setattr(resample, "_SLAB_VOXELS", 30 * 28 * 3)  # 3-plane slabs, odd chunks
    calls = []
    slabbed = fourier_rescale(vol, g, progress=calls.append)
    np.testing.assert_allclose(slabbed, whole, atol=1e-6)
    assert calls[-1] == 1.0 and calls == sorted(calls) and len(calls) > 3


def test_memmap_input_of_any_mode_matches_array(tmp_path):
    data = (np.random.default_rng(7).normal(0, 300, (16, 32, 24))).astype(np.int16)
    vol = read_mrc(write_mrc(tmp_path / "i.mrc", data, 10.0))
    g = grid_for(vol.data.shape, 10.0, 13.2)
    np.testing.assert_allclose(
        fourier_rescale(vol.data, g), fourier_rescale(data.astype(np.float32), g), atol=1e-3
    )


def test_memory_stays_near_the_output(monkeypatch, tmp_path):
    """numpy allocations (tracemalloc sees them) stay near one output-sized buffer: no float
    copy of the whole input (which is larger than the output) is made."""
    data = np.random.default_rng(8).normal(size=(64, 128, 128)).astype(np.float32)
    vol = read_mrc(write_mrc(tmp_path / "m.mrc", data, 10.0))
    del data
    g = grid_for(vol.data.shape, 10.0, 13.2)
    monkeypatch.setattr(resample, "_SLAB_VOXELS", 128 * 128 * 4)
    peaks_during_work: list[int] = []
    tracemalloc.start()
    try:
        out = fourier_rescale(vol.data, g, progress=lambda _: peaks_during_work.append(
            tracemalloc.get_traced_memory()[1]))
        current_after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    input_f32 = 64 * 128 * 128 * 4
    buffer = 64 * 97 * 97 * 4  # max(nz, mz) * my * mx float32
    assert out.shape == (48, 97, 97)
    # The peak is read at the last progress report, just before the buffer shrinks to the
    # output in place (ndarray.resize, a realloc that does not move). tracemalloc's own peak
    # would count that realloc twice on NumPy >= 2.5, which registers the new block before
    # it forgets the old one (measured: same address, RSS falls, max RSS unchanged), so the
    # whole-run peak there is an artefact of the bookkeeping, not memory the process used.
    assert max(peaks_during_work) < buffer + 1.5 * 2**20 < input_f32, peaks_during_work
    assert current_after < out.nbytes + 0.5 * 2**20, current_after  # shrunk, not copied


def test_labels_to_input_nearest():
    g = GridMap((30, 41, 20), (23, 31, 20))
    labels = np.random.default_rng(9).integers(0, 5, g.model_shape).astype(np.int8)
    out = labels_to_input(labels, g)
    assert out.shape == g.input_shape and out.dtype == np.int8
    for j in [(0, 0, 0), (29, 40, 19), (7, 13, 5), (15, 20, 11)]:
        nearest = np.minimum(np.floor(np.array(j) / np.array(g.scale_zyx) + 0.5),
                             np.array(g.model_shape) - 1).astype(int)
        assert out[j] == labels[tuple(nearest)], j
    # every input voxel takes the label of the model voxel nearest to it
    pos = g.to_model(np.argwhere(np.ones(g.input_shape, bool)))
    idx = np.minimum(np.floor(pos + 0.5), np.array(g.model_shape) - 1).astype(int)
    np.testing.assert_array_equal(out.ravel(), labels[tuple(idx.T)])


def test_labels_box_maps_to_the_physical_box():
    g = grid_for((64, 64, 64), 10.0, 13.2)  # scale 4/3
    labels = np.zeros(g.model_shape, np.int8)
    labels[12:24, 6:18, 30:36] = 2
    out = labels_to_input(labels, g)
    zs, ys, xs = (np.flatnonzero(out.any(axis=a)) for a in [(1, 2), (0, 2), (0, 1)])
    # model voxels 12..23 cover input positions 16..30.67; nearest-neighbour edges at +-0.5 voxel
    assert (zs.min(), zs.max()) == (16, 31)
    assert (ys.min(), ys.max()) == (8, 23)
    assert (xs.min(), xs.max()) == (40, 47)
    assert set(np.unique(out)) == {0, 2}
    with pytest.raises(ValueError, match="does not match the model grid"):
        labels_to_input(labels[1:], g)


def _ramp_prediction(grid: GridMap, boundary_x_model: float, ramp_vox: float):
    """A two-class prediction on the model grid whose class-1 probability rises linearly along
    x through 0.5 at `boundary_x_model`: (argmax labels, max-softmax confidence u8)."""
    x = np.arange(grid.model_shape[2], dtype=np.float64)
    p1 = np.clip(0.5 + (x - boundary_x_model) / ramp_vox, 0.0, 1.0)
    p1 = np.broadcast_to(p1, grid.model_shape)
    labels = (p1 > 0.5).astype(np.int8)
    confidence = np.round(np.maximum(p1, 1 - p1) * 255).astype(np.uint8)
    return labels, confidence


# (input, model, boundary in model voxels): a coarser input (13.2 Å -> 10 Å) and a finer one;
# each boundary lies between an input voxel and the model voxel nearest to it, and no input
# voxel lies within the confidence's quantisation error of it.
@pytest.mark.parametrize("input_shape, model_shape, boundary", [
    ((6, 9, 30), (8, 12, 40), 13.2), ((6, 9, 40), (8, 12, 30), 13.8)])
def test_refined_labels_put_the_boundary_where_the_probability_crosses(input_shape, model_shape,
                                                                       boundary):
    g = GridMap(input_shape, model_shape)
    labels, confidence = _ramp_prediction(g, boundary, ramp_vox=6.0)
    refined = labels_to_input_refined(labels, confidence, g)
    x_model = np.arange(g.input_shape[2]) * (g.model_shape[2] / g.input_shape[2])
    expected = np.broadcast_to((x_model > boundary).astype(np.int8), g.input_shape)
    np.testing.assert_array_equal(refined, expected)
    # nearest neighbour moves it by up to half a model voxel: here it gets some voxels wrong
    assert (labels_to_input(labels, g) != expected).any()


def test_refined_labels_only_take_labels_of_the_surrounding_model_voxels():
    g = GridMap((13, 17, 19), (10, 23, 14))  # finer and coarser axes mixed
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, g.model_shape).astype(np.int8)
    confidence = rng.integers(60, 256, g.model_shape).astype(np.uint8)
    refined = labels_to_input_refined(labels, confidence, g)
    assert refined.dtype == np.int8 and refined.shape == g.input_shape
    around = []
    for n, m in zip(g.input_shape, g.model_shape, strict=True):
        pos = np.arange(n) * m / n
        lower = np.minimum(np.floor(pos).astype(int), m - 1)
        around.append((lower, np.minimum(lower + 1, m - 1)))
    zi, yi, xi = np.meshgrid(*[np.arange(n) for n in g.input_shape], indexing="ij")
    allowed = np.zeros(g.input_shape, bool)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                allowed |= labels[around[0][a][zi], around[1][b][yi], around[2][c][xi]] == refined
    assert allowed.all()
    # where all model voxels around agree, that label (not a blend)
    uniform = np.zeros(g.model_shape, np.int8)
    uniform[:, :, 7:] = 3
    out = labels_to_input_refined(uniform, confidence, g)
    assert set(np.unique(out)) == {0, 3}


def test_refined_labels_equal_grids_copy_and_shape_errors():
    g = GridMap((5, 6, 7), (5, 6, 7))
    labels = np.random.default_rng(1).integers(0, 3, g.model_shape).astype(np.int8)
    confidence = np.full(g.model_shape, 200, np.uint8)
    out = labels_to_input_refined(labels, confidence, g)
    np.testing.assert_array_equal(out, labels)
    assert out is not labels
    with pytest.raises(ValueError, match="must both match the model grid"):
        labels_to_input_refined(labels, confidence[1:], g)
