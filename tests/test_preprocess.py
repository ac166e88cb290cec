"""core.preprocess: each step against a direct computation; recipe validation messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from tomolive.core.preprocess import (
    DEFAULT_RECIPE,
    RecipeError,
    apply_recipe,
    robust_stats,
    validate_recipe,
)


def _noise(shape=(16, 32, 32), seed=0, loc=100.0, scale=7.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def test_z_window_mean_equals_direct_mean():
    data = _noise(shape=(9, 12, 10))
    r = 2
    padded = np.pad(data.astype(np.float64), ((r, r), (0, 0), (0, 0)), mode="symmetric")
    direct = np.stack([padded[z : z + 2 * r + 1].mean(axis=0) for z in range(data.shape[0])])
    out = apply_recipe(data.copy(), 10.0, [{"step": "z_window_mean", "radius": r}])
    np.testing.assert_allclose(out, direct, rtol=1e-5)
    # interior slices are the plain mean of the 5 slices around them
    np.testing.assert_allclose(out[4], data[2:7].mean(axis=0), rtol=1e-5)
    same = apply_recipe(data.copy(), 10.0, [{"step": "z_window_mean", "radius": 0}])
    np.testing.assert_array_equal(same, data)


def test_normalize_robust_gives_median_0_mad_1_and_clips():
    data = _noise(shape=(32, 64, 64))
    data[5, 5, 5:15] = 1e6  # gold-like outliers must not move the statistics
    out = apply_recipe(data, 10.0, [{"step": "normalize_robust", "clip_sigma": 3.0}])
    assert np.median(out) == pytest.approx(0.0, abs=0.02)
    mad_sigma = 1.4826 * np.median(np.abs(out - np.median(out)))
    assert mad_sigma == pytest.approx(1.0, abs=0.02)
    assert out.max() == pytest.approx(3.0) and out.min() == pytest.approx(-3.0)
    assert out[5, 5, 5] == pytest.approx(3.0)


def test_robust_stats_subsample_and_flat_fallback():
    data = _noise(shape=(40, 80, 80), loc=-20.0, scale=4.0)
    median, sigma = robust_stats(data, sample_voxels=5000)
    assert median == pytest.approx(-20.0, abs=0.3)
    assert sigma == pytest.approx(4.0, rel=0.05)
    flat = np.zeros((8, 16, 16), np.float32)
    flat[0, 0, :4] = 2.0  # MAD is 0: falls back to the standard deviation
    assert robust_stats(flat, 4096)[1] == pytest.approx(float(flat.std()), rel=1e-6)
    assert robust_stats(np.zeros((8, 8, 8), np.float32), 1000) == (0.0, 1.0)


def test_lowpass_matches_scipy_gaussian_in_angstrom():
    data = _noise(shape=(12, 24, 20))
    out = apply_recipe(data.copy(), 4.0, [{"step": "lowpass_gaussian", "sigma_a": 8.0}])
    np.testing.assert_allclose(out, ndimage.gaussian_filter(data, 2.0, mode="reflect"), atol=1e-4)
    # per-axis voxel sizes (z, y, x), as GridMap.model_voxel_size_a gives them
    aniso = apply_recipe(data.copy(), (8.0, 4.0, 2.0), [{"step": "lowpass_gaussian",
                                                         "sigma_a": 8.0}])
    expect = ndimage.gaussian_filter(data, (1.0, 2.0, 4.0), mode="reflect")
    np.testing.assert_allclose(aniso, expect, atol=1e-4)


def test_default_recipe_in_place_deterministic_bounded():
    data = _noise()
    assert validate_recipe(DEFAULT_RECIPE) == json.loads(json.dumps(validate_recipe(
        DEFAULT_RECIPE)))  # JSON-serialisable for the model bundle
    work = data.copy()
    out = apply_recipe(work, 13.2, DEFAULT_RECIPE)
    assert out is work  # float32 C-contiguous input is reused, no copy
    again = apply_recipe(data.copy(), 13.2, DEFAULT_RECIPE)
    np.testing.assert_array_equal(out, again)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out).max() <= 5.0


def test_non_float32_input_is_copied_not_modified():
    data = (np.random.default_rng(1).normal(0, 50, (8, 16, 16))).astype(np.int16)
    before = data.copy()
    out = apply_recipe(data, 10.0, DEFAULT_RECIPE)
    assert out.dtype == np.float32 and out is not data
    np.testing.assert_array_equal(data, before)
    view = _noise()[:, ::2]  # not contiguous
    assert apply_recipe(view, 10.0, []).flags.c_contiguous


def test_non_finite_input_is_an_error():
    data = _noise()
    data[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        apply_recipe(data, 10.0, [{"step": "lowpass_gaussian", "sigma_a": 8.0}])


def test_validate_fills_defaults():
    assert validate_recipe([{"step": "z_window_mean"}, {"step": "normalize_robust"}]) == [
        {"step": "z_window_mean", "radius": 2},
        {"step": "normalize_robust", "clip_sigma": 5.0, "sample_voxels": 2**21},
    ]
    original = [{"step": "lowpass_gaussian", "sigma_a": 6}]
    validate_recipe(original)[0]["sigma_a"] = 99
    assert original[0]["sigma_a"] == 6  # a copy


@pytest.mark.parametrize(
    "recipe,message",
    [
        ({"step": "lowpass_gaussian"}, "preprocessing recipe must be a list of steps, got dict"),
        ([{"step": "lowpass"}], "step 1: unknown step 'lowpass' (known: normalize_robust, "
                                "lowpass_gaussian, z_window_mean)"),
        ([{"sigma_a": 8.0}], "step 1: must be a dict with a 'step' name"),
        ([{"step": "z_window_mean"}, {"step": "lowpass_gaussian", "sigma": 8}],
         "step 2 (lowpass_gaussian): unknown parameter 'sigma' (known: sigma_a)"),
        ([{"step": "lowpass_gaussian", "sigma_a": -1}],
         "step 1 (lowpass_gaussian): sigma_a must be a number >= 0 (Å), got -1"),
        ([{"step": "normalize_robust", "clip_sigma": "5"}],
         "clip_sigma must be a number > 0, got '5'"),
        ([{"step": "normalize_robust", "clip_sigma": float("inf")}],
         "clip_sigma must be a number > 0, got inf"),
        ([{"step": "z_window_mean", "radius": 1.5}],
         "radius must be an integer >= 0 (slices), got 1.5"),
        ([{"step": "z_window_mean", "radius": True}],
         "radius must be an integer >= 0 (slices), got True"),
    ],
)
def test_validate_rejects_bad_recipes(recipe, message):
    with pytest.raises(RecipeError) as err:
        validate_recipe(recipe)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(RecipeError):  # apply_recipe validates too
        apply_recipe(_noise(shape=(8, 8, 8)), 10.0, recipe)
