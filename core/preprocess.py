"""Preprocessing recipes: named steps with parameters, stored in the model bundle and applied
by this one function in training and in inference (Pom normalised per box in training but per
volume at inference; here both use the same whole-volume code).

Apply a recipe to the WHOLE tomogram on the model grid, then crop any training region: the
normalisation statistics are per volume, so cropping first would change them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .slab_filters import filter_volume_, gaussian_kernel, mean_kernel

# Why this default: the low-pass (sigma 8 Å, FWHM about 2 nm, well below the 4-5 nm bilayers,
# 7 nm actin or 10 nm gold) removes the near-Nyquist noise whose level differs between
# reconstructions and voxel sizes, so one model sees comparable inputs from every source; the
# robust normalisation then puts the background at median 0 / MAD-sigma 1 regardless of the
# file's units (int8, int16, float), and the clip at 5 sigma stops gold fiducials and hot
# pixels from dominating. Normalising last means the network input is always bounded.
DEFAULT_RECIPE: list[dict[str, Any]] = [
    {"step": "lowpass_gaussian", "sigma_a": 8.0},
    {"step": "normalize_robust", "clip_sigma": 5.0},
]

_MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian is 0.6745 sigma


class RecipeError(ValueError):
    """A preprocessing recipe with an unknown step or a bad parameter."""


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# step -> parameter -> (default, check, what the check means)
_STEPS: dict[str, dict[str, tuple[Any, Callable[[Any], bool], str]]] = {
    "normalize_robust": {
        "clip_sigma": (5.0, _positive, "a number > 0"),
        # Statistics from a strided subsample of about this many voxels (deterministic).
        "sample_voxels": (2**21, lambda v: _count(v) and v >= 1000, "an integer >= 1000"),
    },
    "lowpass_gaussian": {
        "sigma_a": (8.0, _non_negative, "a number >= 0 (Å)"),
    },
    "z_window_mean": {
        "radius": (2, _count, "an integer >= 0 (slices)"),
    },
}


def validate_recipe(recipe: Any) -> list[dict[str, Any]]:
    """Check a recipe and return a copy with every parameter's default filled in."""
    if not isinstance(recipe, (list, tuple)):
        raise RecipeError(
            f"preprocessing recipe must be a list of steps, got {type(recipe).__name__}"
        )
    out = []
    for i, step in enumerate(recipe, start=1):
        if not isinstance(step, dict) or not isinstance(step.get("step"), str):
            raise RecipeError(f"preprocessing recipe step {i}: must be a dict with a 'step' name")
        name = step["step"]
        if name not in _STEPS:
            raise RecipeError(
                f"preprocessing recipe step {i}: unknown step {name!r} (known: {', '.join(_STEPS)})"
            )
        spec = _STEPS[name]
        unknown = sorted(set(step) - set(spec) - {"step"})
        if unknown:
            raise RecipeError(
                f"preprocessing recipe step {i} ({name}): unknown parameter {unknown[0]!r} "
                f"(known: {', '.join(spec)})"
            )
        clean: dict[str, Any] = {"step": name}
        for param, (default, check, meaning) in spec.items():
            value = step.get(param, default)
            if not check(value):
                raise RecipeError(
                    f"preprocessing recipe step {i} ({name}): {param} must be {meaning}, "
                    f"got {value!r}"
                )
            clean[param] = copy.deepcopy(value)
        out.append(clean)
    return out


def apply_recipe(
    data_f32: np.ndarray,
    voxel_size_a: float | tuple[float, float, float],
    recipe: list[dict[str, Any]],
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
) -> np.ndarray:
    """Apply `recipe` to a [z, y, x] volume; returns float32, finite.

    Works IN PLACE when `data_f32` is a writable C-contiguous float32 array (the caller's array
    is overwritten); otherwise on one float32 copy. `voxel_size_a` is one number or per axis
    (z, y, x) (see `GridMap.model_voxel_size_a`). Deterministic. On "cpu" the filters are
    scipy's; on another torch device (a GPU) they run there, z-slab by z-slab
    (core.slab_filters), equal to scipy's up to float32 rounding. The robust statistics and
    the scaling stay on the CPU (a strided subsample and one in-place pass).
    """
    on_cpu = torch.device(device).type == "cpu"
    steps = validate_recipe(recipe)
    if data_f32.ndim != 3:
        raise ValueError(f"apply_recipe needs a 3-D [z, y, x] array, got shape {data_f32.shape}")
    data = data_f32
    if not (data.dtype == np.float32 and data.flags.c_contiguous and data.flags.writeable):
        data = np.array(data_f32, dtype=np.float32, order="C")
    voxel_zyx = np.broadcast_to(np.asarray(voxel_size_a, dtype=np.float64), (3,))
    for i, step in enumerate(steps):
        _APPLY[step["step"]](data, voxel_zyx, step, None if on_cpu else device)
        if progress:
            progress((i + 1) / len(steps))
    if not _all_finite(data):
        raise ValueError("preprocessing produced NaN or Inf values (non-finite input?)")
    return data


def _normalize_robust(data: np.ndarray, voxel_zyx: np.ndarray, p: dict[str, Any],
                      device: str | None) -> None:
    """(x - median) / (1.4826 MAD), clipped to +-clip_sigma; stats from a strided subsample.
    On the CPU whatever the device: a subsample and one in-place pass are cheap."""
    del device
    median, sigma = robust_stats(data, p["sample_voxels"])
    data -= np.float32(median)
    data *= np.float32(1.0 / sigma)
    np.clip(data, -p["clip_sigma"], p["clip_sigma"], out=data)


def robust_stats(data: np.ndarray, sample_voxels: int = 2**21) -> tuple[float, float]:
    """(median, sigma) from a deterministic strided subsample; sigma = 1.4826 MAD, falling back
    to the standard deviation (then 1) where the MAD is 0 (flat or heavily quantised data)."""
    stride = max(1, math.ceil((data.size / sample_voxels) ** (1 / 3)))
    sample = np.asarray(data[::stride, ::stride, ::stride], dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    median = float(np.median(sample))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(sample - median)))
    if not sigma > 0:
        sigma = float(sample.std())
    if not sigma > 0:
        sigma = 1.0
    return median, sigma


def _lowpass_gaussian(data: np.ndarray, voxel_zyx: np.ndarray, p: dict[str, Any],
                      device: str | None) -> None:
    """Separable Gaussian, sigma in Å converted per axis; edges by reflection. In place: the
    ndimage 1-D filters work through a line buffer, so output=input is safe."""
    sigmas_vox = [p["sigma_a"] / voxel_a for voxel_a in voxel_zyx]
    if device is not None:
        kernels = [gaussian_kernel(s) if s > 0 else None for s in sigmas_vox]
        filter_volume_(data, kernels, device)
        return
    for axis, sigma_vox in enumerate(sigmas_vox):
        if sigma_vox > 0:
            ndimage.gaussian_filter1d(data, sigma_vox, axis=axis, output=data, mode="reflect")


def _z_window_mean(data: np.ndarray, voxel_zyx: np.ndarray, p: dict[str, Any],
                   device: str | None) -> None:
    """Pom's z_sum as a mean: each slice becomes the mean of the 2r+1 slices around it; the
    ends are mirrored (d c b a | a b c d)."""
    if p["radius"] == 0:
        return
    size = 2 * p["radius"] + 1
    if device is not None:
        filter_volume_(data, [mean_kernel(size), None, None], device)
    else:
        ndimage.uniform_filter1d(data, size, axis=0, output=data, mode="reflect")


# Each step: (volume, voxel size per axis in Å, parameters, torch device or None for scipy).
_APPLY: dict[str, Callable[[np.ndarray, np.ndarray, dict[str, Any], str | None], None]] = {
    "normalize_robust": _normalize_robust,
    "lowpass_gaussian": _lowpass_gaussian,
    "z_window_mean": _z_window_mean,
}


def _all_finite(data: np.ndarray) -> bool:
    step = max(1, 2**24 // max(1, data.shape[1] * data.shape[2]))
    return all(np.isfinite(data[z0 : z0 + step]).all() for z0 in range(0, data.shape[0], step))
