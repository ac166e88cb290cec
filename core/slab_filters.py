"""Separable 1-D filters (Gaussian, moving mean) of a host [z, y, x] volume, computed with torch
on any device (the GPU path of core.preprocess), z-slab by z-slab and in place.

The results equal scipy.ndimage's `gaussian_filter1d` (truncate 4.0) and `uniform_filter1d`
(odd sizes) with mode "reflect" (d c b a | a b c d) up to float32 rounding, so a model sees the
same inputs whichever device preprocessed them.

Memory: one slab of `slab_slices` slices plus the z halo is on the device at a time; the host
keeps only the caller's array and a copy of the halo's original slices (the slabs before it
have already been overwritten when a slab needs them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# About this many bytes of input per slab on the device (the filter needs about 3x that).
_SLAB_BYTES = 256 * 2**20
_GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage's default: the kernel reaches 4 sigma


def gaussian_kernel(sigma_vox: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d's weights: radius int(4 sigma + 0.5), sum 1."""
    radius = int(_GAUSSIAN_TRUNCATE * float(sigma_vox) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma_vox) ** 2)
    return weights / weights.sum()


def mean_kernel(size: int) -> np.ndarray:
    """scipy.ndimage.uniform_filter1d's weights for an odd `size` (a centred window)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"mean_kernel needs an odd size >= 1, not {size}")
    return np.full(size, 1.0 / size)


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices into an axis of length n for positions start..stop-1 beyond its ends, by
    scipy's 'reflect' rule (the edge voxel repeated: d c b a | a b c d), any distance."""
    positions = np.arange(start, stop, dtype=np.int64)
    period = 2 * n
    folded = np.mod(positions, period)
    return np.where(folded < n, folded, period - 1 - folded)


def filter_volume_(
    data: np.ndarray, kernels_zyx: Sequence[np.ndarray | None], device: str | torch.device,
    slab_slices: int | None = None,
) -> np.ndarray:
    """Correlate `data` (float32, C-contiguous, writable) in place with one 1-D kernel per axis
    (None = that axis untouched), each of odd length, edges by reflection. Returns `data`."""
    if data.ndim != 3 or data.dtype != np.float32 or not data.flags.c_contiguous \
            or not data.flags.writeable:
        raise ValueError("filter_volume_ needs a writable C-contiguous float32 [z, y, x] array")
    for kernel in kernels_zyx:
        if kernel is not None and len(kernel) % 2 == 0:
            raise ValueError(f"kernels must have odd lengths, not {len(kernel)}")
    device = torch.device(device)
    nz = data.shape[0]
    z_kernel = kernels_zyx[0]
    halo = 0 if z_kernel is None else len(z_kernel) // 2
    slab = slab_slices or max(1, _SLAB_BYTES // max(1, data[0].nbytes))
    # A slab at least as long as the halo: then every original slice a slab needs is either
    # in it, after it (not yet written) or within the halo before it (saved).
    slab = max(slab, halo + 1) if halo < nz else nz
    weights = [None if k is None else [float(w) for w in k] for k in kernels_zyx]
    saved_start, saved = 0, np.empty((0,) + data.shape[1:], np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        wanted = reflect_indices(z0 - halo, z1 + halo, nz)
        source = _gather_slices(data, wanted, z0, saved_start, saved)
        block = torch.from_numpy(source).to(device)
        block = _correlate(block, weights[1], axis=1)
        block = _correlate(block, weights[2], axis=2)
        if weights[0] is not None:
            block = _correlate_valid_z(block, weights[0])
        saved_start = max(0, z1 - halo)
        saved = data[saved_start:z1].copy()
        data[z0:z1] = block.cpu().numpy()
    return data


def _gather_slices(data: np.ndarray, wanted: np.ndarray, z0: int, saved_start: int,
                   saved: np.ndarray) -> np.ndarray:
    """The ORIGINAL slices `wanted` (slices before z0 are already filtered: from `saved`)."""
    out = np.empty((len(wanted),) + data.shape[1:], np.float32)
    for i, z in enumerate(wanted):
        out[i] = saved[z - saved_start] if z < z0 else data[z]
    return out


def _correlate(block: torch.Tensor, weights: list[float] | None, axis: int) -> torch.Tensor:
    """`block` correlated along `axis` with `weights`, output the same size (reflected ends)."""
    if weights is None or weights == [1.0]:
        return block
    radius = len(weights) // 2
    n = block.shape[axis]
    index = torch.from_numpy(reflect_indices(-radius, n + radius, n)).to(block.device)
    padded = block.index_select(axis, index)
    return _weighted_sum(padded, weights, axis, n)


def _correlate_valid_z(block: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The slices of `block` (z halo on both sides) that have their full z neighbourhood."""
    return _weighted_sum(block, weights, 0, block.shape[0] - (len(weights) - 1))


def _weighted_sum(padded: torch.Tensor, weights: list[float], axis: int, n: int
                  ) -> torch.Tensor:
    out = torch.zeros_like(padded.narrow(axis, 0, n))
    for k, weight in enumerate(weights):
        out.add_(padded.narrow(axis, k, n), alpha=weight)
    return out

