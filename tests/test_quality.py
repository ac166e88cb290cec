"""core.quality (issue 21, item 3): the SNR estimate follows the noise, and per-class confidence
is the mean probability over each class's voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from tomolive.core.quality import adjacent_slice_snr, class_confidence
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


def test_class_confidence_is_the_mean_probability_over_each_class():
    labels = np.zeros((4, 8, 8), np.int8)
    labels[0, :2] = 1
    labels[1, :1] = 2
    confidence = np.full(labels.shape, 255, np.uint8)
    confidence[0, 0] = 51  # half of class 1 at 0.2, half at 1.0
    result = class_confidence(labels, confidence, 3)
    assert result[:2] == pytest.approx([0.6, 1.0])
    assert math.isnan(result[2])
