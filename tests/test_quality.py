"""core.quality (issue 21, item 3): the SNR estimate follows the noise, and per-class confidence
is the mean probability over each class's voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from tomolive.core.quality import adjacent_slice_snr, class_statistics
from tomolive.core.synth import synthesize


def test_the_snr_estimate_recovers_a_known_snr_of_smooth_signal_in_white_noise():
    # Signal smooth along z (structures span several slices), varied in the plane; the SNR is
    # that of the central half, which the estimate samples.
    rng = np.random.default_rng(0)
    signal = gaussian_filter(rng.standard_normal((64, 128, 128)), (6.0, 1.0, 1.0))
    signal /= signal[16:48].std()
    for true_snr in (0.3, 1.0, 3.0):
        noisy = signal + rng.standard_normal(signal.shape) / math.sqrt(true_snr)
        assert adjacent_slice_snr(noisy.astype(np.float32)) == pytest.approx(true_snr, rel=0.1)


def test_the_snr_estimate_falls_with_the_dose_of_a_simulated_acquisition():
    # The same specimen imaged at a quarter of the dose: shot noise up, estimate down.
    kwargs = {"seed": 3, "simulator": "microscope", "thickness_nm": 150.0}
    high = synthesize((48, 128, 128), 10.0, dose_e_per_a2=160.0, **kwargs).tomogram
    low = synthesize((48, 128, 128), 10.0, dose_e_per_a2=40.0, **kwargs).tomogram
    assert adjacent_slice_snr(low) < 0.8 * adjacent_slice_snr(high)


def test_a_volume_too_thin_or_flat_has_no_estimate():
    assert math.isnan(adjacent_slice_snr(np.zeros((3, 16, 16), np.float32)))
    assert math.isnan(adjacent_slice_snr(np.ones((16, 16, 16), np.float32)))


def test_class_statistics_count_each_class_and_average_its_probability():
    labels = np.zeros((4, 8, 8), np.int8)
    labels[0, :2] = 1
    labels[1, :1] = 2
    confidence = np.full(labels.shape, 255, np.uint8)
    confidence[0, 0] = 51  # half of class 1 at 0.2, half at 1.0
    counts, result = class_statistics(labels, confidence, 3)
    assert counts == [16, 8, 0]
    assert result[:2] == pytest.approx([0.6, 1.0])
    assert math.isnan(result[2])


def test_class_statistics_agree_with_whole_volume_sums_across_slabs():
    # Slabs of about 4 M voxels: 70 planes of 256 x 256 are one of 64 planes and one of 6.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (70, 256, 256)).astype(np.int8)
    confidence = rng.integers(0, 256, labels.shape).astype(np.uint8)
    counts, means = class_statistics(labels, confidence, 3)
    for value in (1, 2, 3):
        inside = labels == value
        assert counts[value - 1] == int(inside.sum())
        assert means[value - 1] == pytest.approx(confidence[inside].mean() / 255.0, rel=1e-12)
