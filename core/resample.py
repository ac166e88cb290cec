"""Rescaling a tomogram to the model's voxel size, and mapping between the two grids.

Fourier crop/pad (what IMOD's squeezevol does in real space, done in Fourier space) keeps
sample 0 aligned: model index i sits at input position i * scale, scale = input_n / model_n
per axis. `GridMap` is that exact mapping; everything that goes back to the input grid
(coordinates, labels) uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .volume import DEFAULT_MAX_MODEL_VOXELS

# Working slab: about this many input voxels at a time (float32 16 MiB; the mirrored FFT
# temporaries are a few times that), so host and device memory stay bounded.
_SLAB_VOXELS = 4 * 2**20


@dataclass(frozen=True)
class GridMap:
    """The exact mapping between an input grid and a model grid ([z, y, x] shapes)."""

    input_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name in ("input_shape", "model_shape"):
            shape = tuple(int(n) for n in getattr(self, name))
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"GridMap {name} must be 3 positive sizes, got {shape}")
            object.__setattr__(self, name, shape)

    @property
    def scale_zyx(self) -> tuple[float, float, float]:
        """Input voxels per model voxel, per axis."""
        return tuple(n / m for n, m in zip(self.input_shape, self.model_shape, strict=True))  # type: ignore[return-value]

    def to_model(self, zyx: np.ndarray) -> np.ndarray:
        """Input-grid positions (n, 3) or (3,), float voxels, to model-grid positions (float64)."""
        return np.asarray(zyx, dtype=np.float64) / np.asarray(self.scale_zyx)

    def to_input(self, zyx: np.ndarray) -> np.ndarray:
        """Model-grid positions (n, 3) or (3,) to input-grid positions (float64)."""
        return np.asarray(zyx, dtype=np.float64) * np.asarray(self.scale_zyx)

    def model_voxel_size_a(self, input_voxel_size_a: float) -> tuple[float, float, float]:
        """The model grid's actual voxel size per axis (z, y, x); shapes are rounded, so this
        differs slightly from the nominal model voxel size."""
        return tuple(input_voxel_size_a * s for s in self.scale_zyx)  # type: ignore[return-value]


def grid_for(
    input_shape: tuple[int, ...],
    input_voxel_a: float,
    model_voxel_a: float,
    max_model_voxels: int = DEFAULT_MAX_MODEL_VOXELS,
) -> GridMap:
    """The model grid for an input: each axis max(1, round(n * input_voxel / model_voxel)).

    Raises ValueError (one line) when that grid has more than `max_model_voxels` voxels: the
    check needs only the shapes, so it comes before anything is allocated.
    """
    if not (np.isfinite(input_voxel_a) and input_voxel_a > 0):
        raise ValueError(f"input voxel size {input_voxel_a} Å must be positive")
    if not (np.isfinite(model_voxel_a) and model_voxel_a > 0):
        raise ValueError(f"model voxel size {model_voxel_a} Å must be positive")
    ratio = input_voxel_a / model_voxel_a
    model = tuple(max(1, int(np.floor(n * ratio + 0.5))) for n in input_shape)
    _check_grid_size(model, input_voxel_a, model_voxel_a, max_model_voxels)
    return GridMap(tuple(input_shape), model)  # type: ignore[arg-type]


def _check_grid_size(model_shape: tuple[int, ...], input_voxel_a: float, model_voxel_a: float,
                     max_model_voxels: int) -> None:
    n_voxels = math.prod(model_shape)  # Python ints: no overflow however absurd the header
    if n_voxels > max_model_voxels:
        dims = " x ".join(str(n) for n in model_shape)
        raise ValueError(
            f"model grid {dims} (z, y, x) for {input_voxel_a:g} Å -> {model_voxel_a:g} Å is "
            f"{n_voxels:.3g} voxels ({n_voxels * 4 / 2**30:.3g} GiB as float32), above the "
            f"limit of {max_model_voxels:.3g} voxels: check the voxel size"
        )


def _resample_axis(t: torch.Tensor, dim: int, n_out: int, mirror: bool) -> torch.Tensor:
    """Fourier crop/pad of a real tensor along `dim` to `n_out` samples, mean preserved.

    With `mirror`, the line is extended by its reflection first, so the implied periodic
    signal has no jump at the ends (no Gibbs ringing from top to bottom slice); sample 0
    stays aligned either way.
    """
    n = t.shape[dim]
    if n == n_out:
        return t
    if mirror:
        t = torch.cat([t, t.flip(dim)], dim=dim)
        length, length_out = 2 * n, 2 * n_out
    else:
        length, length_out = n, n_out
    # norm="forward": coefficients are Fourier-series amplitudes, so the same spectrum read
    # back at any length keeps the mean (and the amplitudes).
    spec = torch.fft.rfft(t, dim=dim, norm="forward")
    del t
    shorter = min(length, length_out)
    if shorter % 2 == 0:
        nyquist = spec.narrow(dim, shorter // 2, 1)
        if length_out < length:
            nyquist.zero_()  # crop: this bin would alias (its sine part cannot be represented)
        else:
            nyquist.mul_(0.5)  # pad: split the old Nyquist between +/- frequencies
    # irfft trims or zero-pads the spectrum to length_out // 2 + 1 bins itself.
    out = torch.fft.irfft(spec, n=length_out, dim=dim, norm="forward")
    return out.narrow(dim, 0, n_out) if mirror else out


def _slab_tensor(slab: np.ndarray, device: str) -> torch.Tensor:
    # A fresh native float32 copy: memmap slabs are read-only, may be big-endian or uint16.
    return torch.from_numpy(np.array(slab, dtype=np.float32)).to(device)


def fourier_rescale(
    data: np.ndarray,
    grid: GridMap,
    device: str = "cpu",
    progress: Callable[[float], None] | None = None,
    mirror: bool = True,
) -> np.ndarray:
    """Rescale `data` (input grid, any dtype, may be a memmap) to the model grid, float32.

    Separable (x, y per z-slab, then z per y-chunk), which equals a 3-D Fourier crop/pad.
    Peak memory: one float32 buffer of max(nz, mz) x my x mx plus a slab; never a complex
    copy of the volume. `device` is a torch device string ("cpu", "cuda:0").
    """
    if tuple(data.shape) != grid.input_shape:
        raise ValueError(f"data shape {data.shape} does not match the grid {grid.input_shape}")
    nz, ny, nx = grid.input_shape
    mz, my, mx = grid.model_shape
    if grid.input_shape == grid.model_shape:
        return _float32_copy(data)
    buf = np.empty((max(nz, mz), my, mx), dtype=np.float32)
    step = max(1, _SLAB_VOXELS // (ny * nx))
    with torch.inference_mode():
        for z0 in range(0, nz, step):
            t = _slab_tensor(data[z0 : z0 + step], device)
            t = _resample_axis(t, 2, mx, mirror)
            t = _resample_axis(t, 1, my, mirror)
            buf[z0 : z0 + t.shape[0]] = t.cpu().numpy()
            if progress:
                progress(0.5 * min(nz, z0 + step) / nz)
        if mz != nz:
            # z in chunks of y rows, in place: each chunk is read whole before it is written.
            step = max(1, _SLAB_VOXELS // (max(nz, mz) * mx))
            for y0 in range(0, my, step):
                t = _slab_tensor(buf[:nz, y0 : y0 + step], device)
                buf[:mz, y0 : y0 + step] = _resample_axis(t, 0, mz, mirror).cpu().numpy()
                if progress:
                    progress(0.5 + 0.5 * min(my, y0 + step) / my)
    if progress:
        progress(1.0)
    if mz < nz:
        try:
            buf.resize((mz, my, mx))  # in place (realloc): C order keeps the first mz slices
        except ValueError:  # another reference exists (a debugger): fall back to a copy
            buf = buf[:mz].copy()
    return buf


def _float32_copy(data: np.ndarray) -> np.ndarray:
    out = np.empty(data.shape, dtype=np.float32)
    step = max(1, _SLAB_VOXELS // max(1, data.shape[1] * data.shape[2]))
    for z0 in range(0, data.shape[0], step):
        out[z0 : z0 + step] = data[z0 : z0 + step]
    return out


def model_to_input_indices(grid: GridMap) -> list[np.ndarray]:
    """Per axis, the nearest model index for each input index j: round(j / scale), clamped.

    Integer arithmetic (floor((2 j m + n) / 2n)), so halves round up exactly.
    """
    idx = []
    for n, m in zip(grid.input_shape, grid.model_shape, strict=True):
        j = np.arange(n, dtype=np.int64)
        idx.append(np.minimum((2 * j * m + n) // (2 * n), m - 1).astype(np.intp))
    return idx


def labels_to_input(labels_model: np.ndarray, grid: GridMap) -> np.ndarray:
    """Nearest-neighbour copy of a model-grid volume (labels int8, or any dtype) to the input
    grid. Memory: the output only."""
    if tuple(labels_model.shape) != grid.model_shape:
        raise ValueError(
            f"labels shape {labels_model.shape} does not match the model grid {grid.model_shape}"
        )
    iz, iy, ix = model_to_input_indices(grid)
    same_y = len(iy) == labels_model.shape[1] and bool((iy == np.arange(len(iy))).all())
    same_x = len(ix) == labels_model.shape[2] and bool((ix == np.arange(len(ix))).all())
    out = np.empty(grid.input_shape, dtype=labels_model.dtype)
    # Slice by slice with axis-wise takes: a 3-D np.ix_ gather costs ~10x more, and axes the
    # grid leaves unchanged (the usual case at the model's voxel size) are plain copies.
    for j, k in enumerate(iz):
        if j > 0 and k == iz[j - 1]:
            out[j] = out[j - 1]
            continue
        plane = labels_model[k]
        if not same_y:
            plane = np.take(plane, iy, axis=0)
        if not same_x:
            plane = np.take(plane, ix, axis=1)
        out[j] = plane
    return out


def _axis_corners(n_input: int, n_model: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per input index j along one axis, its model position j * n_model / n_input lies between
    two model samples: [(lower indices, their weights), (upper indices, their weights)], the
    weights linear (they sum to 1). One corner of weight 1 where the axis is not rescaled."""
    if n_input == n_model:
        return [(np.arange(n_model, dtype=np.intp), np.ones(n_model, dtype=np.float32))]
    position = np.arange(n_input, dtype=np.float64) * (n_model / n_input)
    lower = np.minimum(np.floor(position).astype(np.intp), n_model - 1)
    upper = np.minimum(lower + 1, n_model - 1)
    upper_weight = (position - lower).astype(np.float32)
    return [(lower, 1.0 - upper_weight), (upper, upper_weight)]


def resample_linear_u8(values_u8: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """A uint8 volume (probabilities as bytes) linearly interpolated to `out_shape`, one output
    slice at a time: model -> input grid and back use the same positions as the labels
    (output index j sits at j * n_in / n_out, `_axis_corners`). Memory: the output plus a few
    float32 temporaries of one output slice. Where the shapes are equal this is a copy."""
    out_shape = tuple(int(n) for n in out_shape)
    if tuple(values_u8.shape) == out_shape:
        return np.array(values_u8, dtype=np.uint8)
    corners_z, corners_y, corners_x = (_axis_corners(n_out, n_in) for n_out, n_in in
                                       zip(out_shape, values_u8.shape, strict=True))
    out = np.empty(out_shape, dtype=np.uint8)
    for j in range(out_shape[0]):
        plane = np.zeros(out_shape[1:], dtype=np.float32)
        for z_index, z_weight in corners_z:
            source = np.asarray(values_u8[int(z_index[j])], dtype=np.float32)
            for y_index, y_weight in corners_y:
                rows = source[y_index] * (float(z_weight[j]) * y_weight)[:, None]
                for x_index, x_weight in corners_x:
                    plane += rows[:, x_index] * x_weight[None, :]
        out[j] = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    return out


def labels_to_input_refined(labels_model: np.ndarray, confidence_u8: np.ndarray,
                            grid: GridMap) -> np.ndarray:
    """Labels (int8, model grid) to the input grid with sub-voxel boundaries.

    Each input voxel takes one of the labels of the (up to 8) model voxels around it: where
    they agree, that label; where they differ (a boundary), the label with the largest
    linearly interpolated probability, each model voxel giving its label the probability
    `confidence_u8 / 255` (the network's max softmax) and sharing the rest equally among the
    other labels present around the input voxel (exact where two classes meet, the usual case).

    Why: nearest-neighbour mapping to a coarser or finer input grid moves every boundary by up
    to half a model voxel; for a 4.5 nm membrane on a 10 Å model grid, mapped to 13.2 Å, that
    alone costs about 5% of its Dice. A label absent from a voxel's neighbours never appears,
    so components removed by cleanup stay removed. Where the grids are equal this is a copy.
    Memory: the output plus a few temporaries of one input slice.
    """
    if tuple(labels_model.shape) != grid.model_shape or \
            tuple(confidence_u8.shape) != grid.model_shape:
        raise ValueError(
            f"labels {labels_model.shape} and confidence {confidence_u8.shape} must both match "
            f"the model grid {grid.model_shape}"
        )
    if grid.input_shape == grid.model_shape:
        return labels_model.copy()
    corners_z, corners_y, corners_x = (_axis_corners(n, m) for n, m in
                                       zip(grid.input_shape, grid.model_shape, strict=True))
    # In-plane corners: flat indices into a model slice and their weights, the same for every
    # input slice (the z corner only scales the weights).
    model_width = grid.model_shape[2]
    plane_corners = [((y_index[:, None] * model_width + x_index[None, :]).reshape(-1),
                      (y_weight[:, None] * x_weight[None, :]).reshape(-1))
                     for y_index, y_weight in corners_y for x_index, x_weight in corners_x]
    out = np.empty(grid.input_shape, dtype=labels_model.dtype)
    for j in range(grid.input_shape[0]):
        corners = [(labels_model[int(z_index[j])].reshape(-1),
                    confidence_u8[int(z_index[j])].reshape(-1), float(z_weight[j]), flat, weight)
                   for z_index, z_weight in corners_z for flat, weight in plane_corners]
        out[j] = _refine_plane(corners).reshape(grid.input_shape[1:])
    return out


def _refine_plane(corners: list[tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]]
                  ) -> np.ndarray:
    """One input slice (flat) from its corners: (model slice labels, confidence, z weight,
    flat in-plane indices, in-plane weights) each (see labels_to_input_refined)."""
    labels = [plane_labels[flat] for plane_labels, _, _, flat, _ in corners]
    result = labels[0]
    if len(labels) == 1:
        return result
    boundary = np.flatnonzero(np.minimum.reduce(labels) != np.maximum.reduce(labels))
    if boundary.size == 0:
        return result
    corner_labels = np.stack([a[boundary] for a in labels])
    corner_p = np.stack([plane_conf[flat[boundary]] for _, plane_conf, _, flat, _ in corners]
                        ).astype(np.float32)
    corner_p *= np.float32(1.0 / 255.0)
    corner_w = np.stack([np.float32(z_weight) * weight[boundary]
                         for _, _, z_weight, _, weight in corners])
    candidates = np.unique(corner_labels)
    present = np.stack([(corner_labels == c).any(axis=0) for c in candidates])
    others = np.maximum(present.sum(axis=0) - 1, 1).astype(np.float32)
    share = (1.0 - corner_p) / others  # what a voxel gives each other label present
    scores = np.stack([
        np.where(present[i], (corner_w * np.where(corner_labels == c, corner_p, share)).sum(0),
                 -1.0)
        for i, c in enumerate(candidates)])
    result[boundary] = candidates[scores.argmax(axis=0)]
    return result
