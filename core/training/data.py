"""Training data on the model grid: each source read, rescaled and preprocessed by the same
core code as inference, its labels mapped by nearest neighbour, the region split into training
parts and a validation strip; what the training parts hold per class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..infer import edge_indices
from ..preprocess import apply_recipe
from ..resample import GridMap, fourier_rescale, grid_for
from ..volume import read_mrc, thin_axis, to_canonical
from .options import IGNORE, TrainingSource, format_region

# Fewer separate annotated objects (connected regions) of a class than this in the training part
# of the regions draws a warning: in bench/train_quality.py, a region holding one short
# microtubule gave a model that called a fifth of the other tomograms' membrane microtubule.
MIN_EXAMPLES_PER_CLASS = 3


@dataclass
class Part:
    """A training or validation block: image [Z + 2 r, H, W] float32, labels [Z, H, W] uint8
    (the centre slices), and per-class flat indices of annotated label voxels."""

    image: np.ndarray
    labels: np.ndarray
    index: dict[int, np.ndarray] = field(default_factory=dict)

    def build_index(self) -> None:
        flat = self.labels.reshape(-1)
        self.index = {int(c): np.flatnonzero(flat == c)
                      for c in np.unique(flat) if c != IGNORE}

    @property
    def n_annotated(self) -> int:
        return sum(len(v) for v in self.index.values())


@dataclass
class PreparedSource:
    train: list[Part]
    validation: Part | None
    record: dict[str, Any]


def _labels_u8(raw: np.ndarray, path: Path, n_classes: int) -> np.ndarray:
    """Label values as uint8 (int8 -1 and any 255 -> 255); raises on values that are not
    0..n_classes or 255."""
    if raw.dtype.kind == "f":
        if not np.all(raw == np.round(raw)):
            raise ValueError(f"{path}: label volume has non-integer values (float MRC)")
    values = raw.astype(np.int16)
    values[values == -1] = IGNORE
    bad = (values < 0) | ((values > n_classes) & (values != IGNORE))
    if bad.any():
        wrong = sorted({int(v) for v in np.unique(values[bad])})[:5]
        raise ValueError(
            f"{path}: label values {wrong} are not 0..{n_classes} (background and "
            f"{n_classes} classes) or 255 (not annotated)"
        )
    return values.astype(np.uint8)


def _model_range(lo: int, hi: int, n_in: int, n_model: int) -> tuple[np.ndarray, np.ndarray]:
    """Model indices whose nearest input voxel lies in [lo, hi), and those input voxels."""
    model_idx = np.arange(n_model, dtype=np.int64)
    nearest = np.minimum(np.floor(model_idx * (n_in / n_model) + 0.5).astype(np.int64), n_in - 1)
    keep = (nearest >= lo) & (nearest < hi)
    return model_idx[keep], nearest[keep]


def _canonical_region(
    region: tuple[slice, slice, slice] | None, file_shape: tuple[int, ...], beam_axis: int,
    path: Path,
) -> list[tuple[int, int]]:
    """The region (file axis order) as (lo, hi) per canonical axis, checked against the shape."""
    region = region or (slice(None),) * 3
    bounds = []
    for axis, (s, n) in enumerate(zip(region, file_shape, strict=True)):
        lo = 0 if s.start is None else s.start
        hi = n if s.stop is None else s.stop
        if lo >= n or hi > n or hi <= lo:
            raise ValueError(
                f"{path}: region {format_region(region)} is outside the tomogram "
                f"(axis {'zyx'[axis]} has {n} voxels)"
            )
        bounds.append((lo, hi))
    if beam_axis != 0:
        bounds[0], bounds[beam_axis] = bounds[beam_axis], bounds[0]
    return bounds


def prepare_source(
    source: TrainingSource, n_classes: int, model_voxel_a: float, recipe: list[dict[str, Any]],
    in_slices: int, validation_fraction: float, patch_px: int, device: str,
    z_edge: str = "clamp",
) -> PreparedSource:
    """Rescale + preprocess the whole tomogram (as inference does), crop the region, split."""
    tomo_path, labels_path = Path(source.tomogram_path), Path(source.labels_path)
    volume = read_mrc(tomo_path, voxel_size_a=source.voxel_size_a)
    labels_vol = read_mrc(labels_path, voxel_size_a=volume.voxel_size_a, check_finite=False)
    if labels_vol.shape != volume.shape:
        raise ValueError(
            f"{labels_path}: label volume shape {labels_vol.shape} (z, y, x) does not match "
            f"the tomogram {tomo_path} {volume.shape}"
        )
    beam_axis = thin_axis(volume.shape)
    bounds = _canonical_region(source.region, volume.shape, beam_axis, tomo_path)
    canonical = to_canonical(volume.data, beam_axis)
    grid = grid_for(canonical.shape, volume.voxel_size_a, model_voxel_a)
    model_idx, input_idx = [], []
    for (lo, hi), n_in, n_model in zip(bounds, grid.input_shape, grid.model_shape, strict=True):
        m, i = _model_range(lo, hi, n_in, n_model)
        if len(m) == 0:
            raise ValueError(f"{tomo_path}: region is smaller than one model voxel")
        model_idx.append(m)
        input_idx.append(i)
    raw = to_canonical(labels_vol.data, beam_axis)[np.ix_(*input_idx)]
    labels = _labels_u8(np.asarray(raw), labels_path, n_classes)
    if not (labels != IGNORE).any():
        raise ValueError(f"{labels_path}: no annotated voxels (all 255) in the region")
    image = _model_image(canonical, grid, model_voxel_a, recipe, device, model_idx,
                         in_slices // 2, z_edge)
    del canonical
    train, validation = split_region(image, labels, validation_fraction, patch_px)
    record = {
        "tomogram": str(tomo_path), "labels": str(labels_path),
        "region": format_region(source.region) if source.region else None,
        "voxel_size_a": volume.voxel_size_a,
        "model_grid_region_shape_zyx": [len(m) for m in model_idx],
    }
    return PreparedSource(train, validation, record)


def _model_image(
    canonical: np.ndarray, grid: GridMap, model_voxel_a: float, recipe: list[dict[str, Any]],
    device: str, model_idx: list[np.ndarray], z_margin: int, z_edge: str,
) -> np.ndarray:
    """The preprocessed model-grid image of the region box, with z_margin context slices on
    each side (beyond the volume, built as core.infer builds them: core.infer.edge_indices)."""
    data = fourier_rescale(canonical, grid, device=device)
    data = apply_recipe(data, model_voxel_a, recipe, device=device)
    mz = data.shape[0]
    z = np.arange(model_idx[0][0] - z_margin, model_idx[0][-1] + 1 + z_margin)
    z = edge_indices(z, mz, z_edge)
    ys, xs = model_idx[1], model_idx[2]
    image = data[z[:, None, None], ys[None, :, None], xs[None, None, :]].astype(np.float32)
    del data
    return image


def split_region(
    image: np.ndarray, labels: np.ndarray, validation_fraction: float, patch_px: int
) -> tuple[list[Part], Part | None]:
    """Training parts and one validation strip (`validation_fraction` of y or of x), which
    never share label voxels. Of the candidate strips (5 positions along each in-plane axis)
    the one where most foreground classes are present in both the strip and the rest wins, so
    that the validation Dice covers the classes; ties go to the end of the longer axis."""
    if validation_fraction <= 0:
        return [_part(image, labels, patch_px)], None
    counts_all = np.bincount(labels.reshape(-1), minlength=256)
    best: tuple[int, int, int, int] | None = None  # (score, -order, axis, start)
    order = 0
    for axis in sorted((1, 2), key=lambda a: -labels.shape[a]):
        n = labels.shape[axis]
        n_val = int(round(n * validation_fraction))
        if n_val < 1 or n - n_val < 1:
            continue
        for start in np.linspace(n - n_val, 0, 5).round().astype(int):
            strip = labels.take(range(start, start + n_val), axis=axis)
            counts_val = np.bincount(strip.reshape(-1), minlength=256)
            shared = (counts_val[1:IGNORE] > 0) & (counts_all[1:IGNORE] > counts_val[1:IGNORE])
            key = (int(shared.sum()), -order, axis, int(start))
            best = key if best is None or key[:2] > best[:2] else best
            order += 1
    if best is None:
        raise ValueError(
            f"region is too small ({labels.shape[1]} x {labels.shape[2]} model voxels in y, x) "
            f"to keep a validation part of {validation_fraction:.0%}; use a larger region"
        )
    _, _, axis, start = best
    n_val = int(round(labels.shape[axis] * validation_fraction))
    pieces = [(0, start), (start + n_val, labels.shape[axis])]
    train = [_part(_take(image, axis, lo, hi), _take(labels, axis, lo, hi), patch_px)
             for lo, hi in pieces if hi > lo]
    train = [part for part in train if part.n_annotated]
    if not train:
        raise ValueError("the training part of the region has no annotated voxels")
    validation = Part(np.ascontiguousarray(_take(image, axis, start, start + n_val)),
                       np.ascontiguousarray(_take(labels, axis, start, start + n_val)))
    validation.build_index()
    return train, (validation if validation.n_annotated else None)


def _take(array: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    return array[tuple(index)]


def _part(image: np.ndarray, labels: np.ndarray, patch_px: int) -> Part:
    part = Part(_pad_xy(image, patch_px, "reflect"), _pad_xy(labels, patch_px, IGNORE))
    part.build_index()
    return part


def _pad_xy(array: np.ndarray, size: int, mode: str | int) -> np.ndarray:
    """Pad y and x at the end to at least `size` (reflect for images, a constant for labels)."""
    pad_y, pad_x = max(0, size - array.shape[1]), max(0, size - array.shape[2])
    if not pad_y and not pad_x:
        return np.ascontiguousarray(array)
    widths = ((0, 0), (0, pad_y), (0, pad_x))
    if isinstance(mode, str):
        return np.pad(array, widths, mode="symmetric")  # any size, unlike "reflect"
    return np.pad(array, widths, mode="constant", constant_values=mode)


def annotation_counts(parts: Sequence[Part], class_names: Sequence[str]
                      ) -> dict[str, dict[str, int]]:
    """Per class: annotated voxels and separate objects (3-D connected regions, faces
    touching) in the training parts, on the model grid."""
    counts = {}
    for i, name in enumerate(class_names, start=1):
        voxels = sum(len(part.index.get(i, ())) for part in parts)
        objects = sum(ndimage.label(part.labels == i)[1] for part in parts) if voxels else 0
        counts[name] = {"voxels": int(voxels), "objects": int(objects)}
    return counts


def sparse_class_warnings(counts: dict[str, dict[str, int]],
                          min_objects: int = MIN_EXAMPLES_PER_CLASS) -> list[str]:
    """One line per class with fewer than `min_objects` annotated objects in the training
    part: a model learns a class from its examples, and one or two seen from one side do not
    teach it the others."""
    out = []
    for name, c in counts.items():
        if c["objects"] == 0:
            out.append(f"class {name!r}: not annotated in the training part of the regions; "
                       "the model cannot learn it")
        elif c["objects"] < min_objects:
            out.append(f"class {name!r}: only {c['objects']} annotated object(s) "
                       f"({c['voxels']} voxels) in the training part of the regions; annotate "
                       f"at least {min_objects} before trusting the model on this class")
    return out
