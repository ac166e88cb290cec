"""Figures a facility ranks its tomograms by (issue 21, item 3), from arrays the pipeline
already holds: an SNR estimate of the input and the network's confidence per class.

`adjacent_slice_snr`: neighbouring z-slices of a tomogram at 5-15 Å share almost all of their
signal (membranes, filaments and particles span several nm) while much of their noise is
independent, so half the variance of their difference estimates the noise variance and the
rest of each slice's variance is signal: SNR = (var(s) - var(s_z - s_z+1) / 2) / (var(s_z -
s_z+1) / 2), over pairs in the central half of the volume. It is the even/odd idea along z.
Signal that changes between slices counts as noise and reconstruction noise is partly
correlated between slices, so it is not an absolute SNR: it ranks tomograms of one facility
(same voxel size and reconstruction) and follows their trend.
"""

from __future__ import annotations

import math

import numpy as np

from .cleanup import component_sizes

# Slice pairs sampled (evenly over the central half): enough for a stable figure, cheap on
# any volume.
SNR_SLICE_PAIRS = 16


def adjacent_slice_snr(data: np.ndarray, pairs: int = SNR_SLICE_PAIRS) -> float:
    """The SNR estimate of a [z, y, x] volume (any real dtype; memory maps are fine); NaN
    when it has fewer than 4 slices or no variance."""
    depth = data.shape[0]
    if depth < 4:
        return math.nan
    start, stop = depth // 4, max(depth // 4 + 1, (3 * depth) // 4)
    zs = np.unique(np.linspace(start, min(stop, depth - 1) - 1, pairs).round().astype(int))
    total, noise = 0.0, 0.0
    for z in zs:
        a = np.asarray(data[z], dtype=np.float64)
        b = np.asarray(data[z + 1], dtype=np.float64)
        total += 0.5 * (a.var() + b.var())
        noise += 0.5 * (a - b).var()
    if noise <= 0:
        return math.nan
    return max(total - noise, 0.0) / noise


def class_statistics(labels: np.ndarray, confidence_u8: np.ndarray, n_classes: int
                     ) -> tuple[list[int], list[float]]:
    """Per class 1..n_classes: its voxel count, and the mean probability the network gave the
    label over its voxels (0..1; NaN for a class with no voxel).

    Counted slab by slab (core.cleanup.component_sizes): ndimage.sum_labels bincounts the whole
    volume with float64 weights, 16 bytes per voxel at once (5 GB for a 300x1024x1024 tomogram).
    """
    counts = component_sizes(labels, n_classes)[1:]
    sums = component_sizes(labels, n_classes, weights=confidence_u8)[1:]
    means = [float(s / c / 255.0) if c else math.nan for s, c in zip(sums, counts, strict=True)]
    return [int(c) for c in counts], means
