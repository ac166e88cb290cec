"""core.slab_filters (the GPU path of preprocessing), run here on the CPU device: equal to
scipy.ndimage's filters, whatever the slab size, with halos longer than a slab or than the
volume, and in place."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from tomolive.core.slab_filters import (
    filter_volume_,
    gaussian_kernel,
    mean_kernel,
    reflect_indices,
)


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(3.0, 2.0, shape).astype(np.float32)


def _scipy_gaussian(data, sigmas_zyx):
    out = data.astype(np.float64)
    for axis, sigma in enumerate(sigmas_zyx):
        if sigma > 0:
            out = ndimage.gaussian_filter1d(out, sigma, axis=axis, mode="reflect")
    return out


@pytest.mark.parametrize("sigma", [0.3, 0.8, 2.6])
def test_gaussian_kernel_matches_scipy_impulse_response(sigma):
    impulse = np.zeros(41)
    impulse[20] = 1.0
    response = ndimage.gaussian_filter1d(impulse, sigma, mode="constant")
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    np.testing.assert_allclose(kernel, response[20 - radius:21 + radius], atol=1e-15)
    assert response[:20 - radius].sum() == 0  # nothing outside the kernel


def test_reflect_indices_follow_scipy_reflect_mode():
    n = 4
    line = np.arange(n, dtype=np.float64)
    padded = np.pad(line, 9, mode="symmetric")  # d c b a | a b c d, repeated
    np.testing.assert_array_equal(line[reflect_indices(-9, n + 9, n)], padded)


@pytest.mark.parametrize(("shape", "slab_slices"), [
    ((23, 17, 19), 3),     # slabs shorter than the z halo: lengthened to it
    ((23, 17, 19), 10),    # several slabs, a short last one
    ((23, 17, 19), None),  # one slab
    ((5, 6, 7), 2),        # a kernel longer than every axis: repeated reflection
])
def test_gaussian_equals_scipy(shape, slab_slices):
    data = _volume(shape)
    sigmas = (1.7, 0.9, 2.2) if shape[0] > 5 else (2.5, 2.5, 2.5)
    expected = _scipy_gaussian(data, sigmas)
    work = data.copy()
    out = filter_volume_(work, [gaussian_kernel(s) for s in sigmas], "cpu", slab_slices)
    assert out is work  # in place
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_z_mean_only_equals_scipy_and_leaves_planes_alone():
    data = _volume((30, 8, 9), seed=1)
    expected = ndimage.uniform_filter1d(data.astype(np.float64), 5, axis=0, mode="reflect")
    out = filter_volume_(data.copy(), [mean_kernel(5), None, None], "cpu", slab_slices=4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_in_plane_only_filter_needs_no_halo():
    data = _volume((7, 20, 20), seed=2)
    expected = _scipy_gaussian(data, (0.0, 1.2, 1.2))
    out = filter_volume_(data.copy(), [None, gaussian_kernel(1.2), gaussian_kernel(1.2)],
                         "cpu", slab_slices=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_filter_in_place():
    with pytest.raises(ValueError, match="float32"):
        filter_volume_(np.zeros((4, 4, 4)), [None, None, None], "cpu")
    with pytest.raises(ValueError, match="odd"):
        filter_volume_(np.zeros((4, 4, 4), np.float32), [np.ones(2) / 2, None, None], "cpu")
    with pytest.raises(ValueError, match="odd"):
        mean_kernel(4)
