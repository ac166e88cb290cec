"""Training a model bundle from sparse labels (a few annotated slices of one or more tomograms).

Data path (the SAME core code as inference, so a model sees at training what it sees live):
read_mrc -> canonical view (beam axis first) -> grid_for / fourier_rescale to the model voxel
size -> apply_recipe (the bundle's preprocessing recipe) -> crop to the annotated region.
Labels go to the model grid by nearest neighbour through the same GridMap.

Labels: 0 background, i = the i-th class, 255 "not annotated" (int8 files store it as -1);
255 voxels never reach the loss, the sampler or the validation score. The region box is split
into a training part and a validation strip (`validation_fraction` of y or x, placed so that
as many classes as possible appear in both parts), whose labels are never trained on; the
validation Dice per class is computed periodically (the score users watch); the bundle keeps the
final weights, or optionally the best-scoring ones.

Patches are 2.5D (K slices in, labels of the centre slice), sampled class-balanced so rare
classes (gold, ribosomes) are seen, and augmented with flips, 90-degree and arbitrary-angle
XY rotations, intensity scale/shift and noise; K is 31 by default (TrainOptions.in_slices).
Loss: cross-entropy (ignore_index 255) + soft Dice over the foreground classes present in the
batch (optionally class-weighted cross-entropy).
AdamW with a warm-up and cosine decay over the run, whose length is `steps` or `max_minutes`,
whichever ends first. Options (off by default, not better in the issue-4 benchmark): validate and
save a moving average of the weights, with BatchNorm statistics re-estimated on whole training
slices (what inference sees) rather than on the class-balanced patches. Deterministic for a seed
on CPU.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage
from torch import nn

from .classes import ClassSpec, default_class
from .errors import one_line
from .model import BundleMeta, ModelBundle, UNet25D, architecture_dict
from .preprocess import DEFAULT_RECIPE, apply_recipe, validate_recipe
from .resample import GridMap, fourier_rescale, grid_for
from .volume import read_mrc, thin_axis, to_canonical

IGNORE = 255
# Fraction of the run spent warming the learning rate up, and where the cosine ends.
_WARMUP_FRACTION = 0.05
_FINAL_LR_FACTOR = 0.02
# How many times per run the validation Dice is computed (plus once at the end).
_VALIDATIONS_PER_RUN = 10
# Share of patches centred on a voxel of a randomly chosen foreground class (the rest are
# centred on any annotated voxel), so that rare classes are seen often.
_CLASS_BALANCED_SHARE = 0.7
_DICE_EPS = 1.0
# Fewer separate annotated objects (connected regions) of a class than this in the training part
# of the regions draws a warning: in the issue-4 benchmark, a region holding one short
# microtubule gave a model that called a fifth of the other tomograms' membrane microtubule.
MIN_EXAMPLES_PER_CLASS = 3


# --------------------------------------------------------------------------------------------
# Inputs


def parse_region(text: str) -> tuple[slice, slice, slice]:
    """"Z0:Z1,Y0:Y1,X0:X1" (voxels of the tomogram file, end exclusive; a bound may be empty,
    e.g. "40:56,:,:") to three slices. Raises ValueError naming the problem."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"region {text!r} must be Z0:Z1,Y0:Y1,X0:X1 (three ranges)")
    out = []
    for axis, part in zip("ZYX", parts, strict=True):
        bounds = part.split(":")
        if len(bounds) != 2:
            raise ValueError(f"region {text!r}: {axis} range {part!r} must be START:STOP")
        try:
            lo, hi = (int(b) if b.strip() else None for b in bounds)
        except ValueError:
            raise ValueError(f"region {text!r}: {axis} range {part!r} is not integers") from None
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            raise ValueError(f"region {text!r}: {axis} range {part!r} has a negative bound")
        if lo is not None and hi is not None and hi <= lo:
            raise ValueError(f"region {text!r}: {axis} range {part!r} is empty (stop <= start)")
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def format_region(region: Sequence[slice]) -> str:
    """The inverse of parse_region (for provenance)."""
    return ",".join(f"{s.start if s.start is not None else ''}:"
                    f"{s.stop if s.stop is not None else ''}" for s in region)


@dataclass
class TrainingSource:
    """One annotated tomogram. `region` is in the FILE's own [z, y, x] voxels (None = all);
    `voxel_size_a` overrides the tomogram header."""

    tomogram_path: str | Path
    labels_path: str | Path
    region: tuple[slice, slice, slice] | None = None
    voxel_size_a: float | None = None


@dataclass
class TrainOptions:
    """Training settings. The run stops at `steps` or `max_minutes`, whichever comes first
    (at least one must be given)."""

    steps: int | None = None
    max_minutes: float | None = None
    device: str = "auto"
    batch_size: int = 8
    patch_px: int = 96
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    validation_fraction: float = 0.2
    base_width: int = 16
    # z-slices the network sees around each labelled slice (odd). 31 (31 nm at 10 Å), not the
    # protocol's 5: with 5, a model trained on one region took a microtubule's side walls for
    # two membranes; in the issue-4 benchmark 21 raised actin Dice from 0.60/0.56 to 0.75/0.66,
    # and 31 raised microtubule Dice by 0.05-0.22 and membrane by up to 0.06 over 21 on six
    # tomograms (vesicle caps, which the missing wedge hides, are inferred from the slices
    # around them); 41 was worse in its one run. The first conv only grows: +3% inference
    # FLOPs over 21 (git log of this file).
    in_slices: int = 31
    levels: int = 5
    model_voxel_size_a: float | None = None  # default: the first tomogram's voxel size
    recipe: list[dict[str, Any]] | None = None  # default: preprocess.DEFAULT_RECIPE
    name: str | None = None  # default: "tomolive-model", or the parent's name when fine-tuning
    description: str = ""
    synthetic: bool = False  # provenance: the training data are synthetic (core.synth)
    augment: bool = True
    # Augmentation: arbitrary in-plane angles, not only 90°. On by default: trained on one
    # region whose microtubules all ran diagonally, a 21-slice model scored microtubule Dice
    # 0.59/0.08 without it and 0.90/0.88 with it (issue-4 benchmark, seed-20 region).
    rotate_any_angle: bool = True
    # Augmentation: half the patches blurred in-plane with a Gaussian of sigma up to this many
    # pixels (0 = off). Tried once for the 13.2 Å test's membranes (git log of this file).
    blur_max_px: float = 0.0
    # Augmentation: half the patches get a random in-plane amplitude spectrum, a radial gain
    # exp(u * k / Nyquist) with u drawn from +-spectrum_jitter, times a soft low-pass at 0.25-0.5
    # cycles/px (0 = off). Tomograms from other microscopes, CTF envelopes, reconstruction
    # filters (WBP ramps and roll-offs, SIRT-like) and B-factors differ most in exactly this;
    # the patch's mean and spread are kept, so only the spectrum's shape changes. Off by
    # default: issue 14's "model B" used 1.0 with two other changes and was not better.
    spectrum_jitter: float = 0.0
    # The options below are off by default: in the issue-4 benchmark (10 min, 1 thread, shared
    # CPU) they did not help (figures in the git log of this file).
    # Cross-entropy weight of class c: (background voxels / class-c voxels in the training
    # parts) ** power, at most 10 (0 = unweighted; patches are class-balanced either way).
    class_weight_power: float = 0.0
    ema_decay: float = 0.0  # weights validated and saved: this moving average (0 = off)
    calibrate_bn: bool = False  # BatchNorm statistics re-estimated on whole training slices
    # Which weights the bundle gets: "final" (the end of the cosine schedule) or "best" (the
    # best mean validation Dice seen). "final" by default: the validation strip of a small
    # region holds few voxels of some classes, and in the issue-4 benchmark "best" picked
    # step 686 of 2358, whose test Dice was far below the end's (git log of this file).
    keep: str = "final"

    def check(self) -> None:
        if self.steps is None and self.max_minutes is None:
            raise ValueError("training needs steps and/or max_minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, not {self.steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, not {self.max_minutes}")
        if not 0.0 <= self.validation_fraction < 0.9:
            raise ValueError(
                f"validation_fraction must be in [0, 0.9), not {self.validation_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), not {self.ema_decay}")
        if self.keep not in ("final", "best"):
            raise ValueError(f"keep must be 'final' or 'best', not {self.keep!r}")
        if not self.blur_max_px >= 0:
            raise ValueError(f"blur_max_px must be >= 0, not {self.blur_max_px}")
        if not self.spectrum_jitter >= 0:
            raise ValueError(f"spectrum_jitter must be >= 0, not {self.spectrum_jitter}")
        if not (1 <= self.in_slices <= 63 and self.in_slices % 2 == 1):
            raise ValueError(f"in_slices must be odd and 1..63 (a centre slice and as many on "
                             f"each side), not {self.in_slices}")
        if self.batch_size < 1 or self.patch_px < 8:
            raise ValueError(f"batch_size {self.batch_size} / patch_px {self.patch_px} too small")


@dataclass
class TrainProgress:
    """What the progress callback gets: `total_steps` is None for a time-only budget."""

    step: int
    total_steps: int | None
    elapsed_s: float
    loss: float
    validation_dice: dict[str, float] | None = None


@dataclass
class TrainedModel:
    """The trained network (unfused, CPU) and its metadata, ready for model.save_bundle."""

    network: UNet25D
    meta: BundleMeta


ProgressFn = Callable[[TrainProgress], None]


def load_class_overrides(yaml_path: str | Path) -> dict[str, dict[str, Any]]:
    """Per-class overrides from YAML: `{name: {field: value}}`, e.g.
    `ribosome: {diameter_nm: 28}` or `vesicle: {kind: membrane}`. Field names are checked."""
    path = Path(yaml_path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({one_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must map class names to fields, not {type(data).__name__}")
    known = set(ClassSpec.__dataclass_fields__) - {"name"}
    out: dict[str, dict[str, Any]] = {}
    for name, fields_ in data.items():
        if not isinstance(fields_, dict):
            raise ValueError(f"{path}: class {name!r} must map to fields, not {fields_!r}")
        unknown = sorted(set(fields_) - known)
        if unknown:
            raise ValueError(f"{path}: class {name!r} has unknown fields {unknown}")
        out[str(name)] = dict(fields_)
    return out


def class_specs_for(
    names: Sequence[str], overrides: dict[str, dict[str, Any]] | None = None
) -> list[ClassSpec]:
    """ClassSpecs in label order (label i = names[i-1]): known names get core.classes defaults,
    then the overrides; unknown names are 'other' unless overridden."""
    overrides = overrides or {}
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"class names {list(names)} must be non-empty")
    if len(set(names)) != len(names):
        raise ValueError(f"class names {list(names)} are not unique")
    extra = sorted(set(overrides) - set(names))
    if extra:
        raise ValueError(f"class overrides name classes that are not trained: {extra}")
    if len(names) > 126:
        raise ValueError(f"{len(names)} classes is too many (at most 126)")
    return [default_class(n, **overrides.get(n, {})) for n in names]


# --------------------------------------------------------------------------------------------
# Data: tomogram and labels on the model grid, region only


@dataclass
class _Part:
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
class _PreparedSource:
    train: list[_Part]
    validation: _Part | None
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


def _prepare_source(
    source: TrainingSource, n_classes: int, model_voxel_a: float, recipe: list[dict[str, Any]],
    in_slices: int, validation_fraction: float, patch_px: int, device: str,
) -> _PreparedSource:
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
                         in_slices // 2)
    del canonical
    train, validation = _split(image, labels, validation_fraction, patch_px)
    record = {
        "tomogram": str(tomo_path), "labels": str(labels_path),
        "region": format_region(source.region) if source.region else None,
        "voxel_size_a": volume.voxel_size_a,
        "model_grid_region_shape_zyx": [len(m) for m in model_idx],
    }
    return _PreparedSource(train, validation, record)


def _model_image(
    canonical: np.ndarray, grid: GridMap, model_voxel_a: float, recipe: list[dict[str, Any]],
    device: str, model_idx: list[np.ndarray], z_margin: int,
) -> np.ndarray:
    """The preprocessed model-grid image of the region box, with z_margin context slices on
    each side (edge slices repeated beyond the volume, as core.infer pads)."""
    data = fourier_rescale(canonical, grid, device=device)
    data = apply_recipe(data, model_voxel_a, recipe, device=device)
    mz = data.shape[0]
    z = np.arange(model_idx[0][0] - z_margin, model_idx[0][-1] + 1 + z_margin)
    z = np.clip(z, 0, mz - 1)
    ys, xs = model_idx[1], model_idx[2]
    image = data[z[:, None, None], ys[None, :, None], xs[None, None, :]].astype(np.float32)
    del data
    return image


def _split(
    image: np.ndarray, labels: np.ndarray, validation_fraction: float, patch_px: int
) -> tuple[list[_Part], _Part | None]:
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
    validation = _Part(np.ascontiguousarray(_take(image, axis, start, start + n_val)),
                       np.ascontiguousarray(_take(labels, axis, start, start + n_val)))
    validation.build_index()
    return train, (validation if validation.n_annotated else None)


def _take(array: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    return array[tuple(index)]


def _part(image: np.ndarray, labels: np.ndarray, patch_px: int) -> _Part:
    part = _Part(_pad_xy(image, patch_px, "reflect"), _pad_xy(labels, patch_px, IGNORE))
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


# --------------------------------------------------------------------------------------------
# Sampling and augmentation


class _Sampler:
    """Class-balanced 2.5D patches from the training parts of all sources (seeded numpy)."""

    def __init__(self, parts: list[_Part], in_slices: int, patch_px: int,
                 rng: np.random.Generator, augment: bool, rotate_any_angle: bool = False,
                 blur_max_px: float = 0.0, spectrum_jitter: float = 0.0) -> None:
        self.parts, self.k, self.p, self.rng, self.augment = parts, in_slices, patch_px, rng, \
            augment
        self.rotate = augment and rotate_any_angle
        self.blur_max_px = blur_max_px if augment else 0.0
        self.spectrum_jitter = spectrum_jitter if augment else 0.0
        self.classes = sorted({c for part in parts for c in part.index if c != 0})

    def _centre(self) -> tuple[_Part, int]:
        rng = self.rng
        if self.classes and rng.random() < _CLASS_BALANCED_SHARE:
            c = self.classes[rng.integers(len(self.classes))]
            owners = [p for p in self.parts if c in p.index]
            part = owners[rng.integers(len(owners))]
            choices = part.index[c]
        else:  # any annotated voxel: a part, then a class, each in proportion to its count
            sizes = np.array([p.n_annotated for p in self.parts], dtype=np.float64)
            part = self.parts[rng.choice(len(self.parts), p=sizes / sizes.sum())]
            keys = sorted(part.index)
            counts = np.array([len(part.index[c]) for c in keys], dtype=np.float64)
            choices = part.index[keys[rng.choice(len(keys), p=counts / counts.sum())]]
        return part, int(choices[rng.integers(len(choices))])

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        part, flat = self._centre()
        _, h, w = part.labels.shape
        z, y, x = np.unravel_index(flat, part.labels.shape)
        # A rotated patch is cut from a larger box (its diagonal) so that its corners hold
        # real data; where the part is too small, the corners are left unannotated.
        angle = float(self.rng.uniform(0.0, 90.0)) if self.rotate else 0.0
        q = min(h, w, int(math.ceil(self.p * math.sqrt(2))) + 2) if angle else self.p
        # The chosen voxel lands anywhere in the patch, not always at its centre.
        off = (q - self.p) // 2
        y0 = int(np.clip(y - off - self.rng.integers(self.p), 0, h - q))
        x0 = int(np.clip(x - off - self.rng.integers(self.p), 0, w - q))
        image = part.image[z:z + self.k, y0:y0 + q, x0:x0 + q]
        labels = part.labels[z, y0:y0 + q, x0:x0 + q]
        if angle:
            image, labels = _rotate(image, labels, angle, self.p)
        if self.augment:
            image, labels = self._augment(image, labels)
        return np.ascontiguousarray(image), np.ascontiguousarray(labels)

    def _augment(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k, axes=(1, 2)), np.rot90(labels, k)
        if rng.random() < 0.5:
            image, labels = image[:, :, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:  # the missing wedge is symmetric in z: a z flip is a valid view
            image = image[::-1]
        if self.blur_max_px > 0 and rng.random() < 0.5:
            # In-plane blur: a tomogram from a coarser pixel size or a weaker reconstruction,
            # rescaled to the model's grid, lacks the finest detail of the training tomogram.
            sigma = float(rng.uniform(0.0, self.blur_max_px))
            image = ndimage.gaussian_filter(np.ascontiguousarray(image, dtype=np.float32),
                                            (0.0, sigma, sigma), mode="reflect")
        if self.spectrum_jitter > 0 and rng.random() < 0.5:
            image = random_spectrum(image, rng, self.spectrum_jitter)
        scale = math.exp(rng.uniform(-0.25, 0.25))
        shift = rng.uniform(-0.25, 0.25)
        noise = rng.uniform(0.0, 0.3)
        # One float32 array, changed in place. The noise is drawn in float64 and cast: the same
        # random stream as before, so scripts/train_default_model.py still reproduces the
        # shipped weights.
        image = np.multiply(image, np.float32(scale), dtype=np.float32)
        image += np.float32(shift)
        if noise > 0:
            image += np.float32(noise) * rng.standard_normal(image.shape).astype(np.float32)
        return image, labels

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*(self.patch() for _ in range(size)), strict=True)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)).long()


def random_spectrum(image: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """`image` (z, y, x) with every slice's in-plane amplitude spectrum reshaped by one random
    smooth radial gain (see TrainOptions.spectrum_jitter); float32, same mean and std."""
    image = np.asarray(image, dtype=np.float32)
    _, h, w = image.shape
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.rfftfreq(w), indexing="ij"))
    cutoff = rng.uniform(0.25, 0.5)
    gain = np.exp(rng.uniform(-jitter, jitter) * k / 0.5)
    gain /= 1.0 + (k / cutoff) ** 8  # soft low-pass: a Butterworth of order 4
    gain[0, 0] = 1.0
    mean, std = float(image.mean()), float(image.std())
    out = np.fft.irfft2(np.fft.rfft2(image) * gain.astype(np.float32), s=(h, w))
    out_std = float(out.std())
    out = (out - out.mean()) * (std / out_std if out_std > 0 else 1.0) + mean
    return out.astype(np.float32)


def _rotate(image: np.ndarray, labels: np.ndarray, angle_deg: float, size: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """The centred size x size box of image [K, Q, Q] (bilinear, reflected at the border) and
    labels [Q, Q] (nearest; outside = 255) turned in-plane by `angle_deg`. Filaments and
    membranes run at any angle in a tomogram; 90-degree turns alone teach only four of them
    (issue 4: a model trained on diagonal microtubules called an upright one membrane).

    Only the output box is sampled (torch grid_sample), not the whole rotated Q x Q patch:
    1 ms instead of scipy.ndimage.rotate's 24 ms (rotating all of Q x Q) for a 21-slice patch,
    with the same values (tests/test_train.py).
    """
    q = labels.shape[0]
    a = -math.radians(angle_deg)  # the sense of scipy.ndimage.rotate(angle_deg, axes=(1, 2))
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    centre = (q - 1) / 2.0
    ys = centre + math.cos(a) * dy - math.sin(a) * dx
    xs = centre + math.sin(a) * dy + math.cos(a) * dx
    # grid_sample's normalised coordinates (align_corners=True: -1 and 1 are pixel centres).
    grid = torch.from_numpy(np.stack([xs, ys], axis=-1) * (2.0 / (q - 1)) - 1.0)
    grid = grid.to(torch.float32)[None]
    rot_image = F.grid_sample(torch.from_numpy(np.ascontiguousarray(image))[None], grid,
                              mode="bilinear", padding_mode="reflection", align_corners=True)
    # Labels + 1, so that grid_sample's zero padding marks the outside (-> 255).
    shifted = torch.from_numpy(labels.astype(np.float32) + 1.0)[None, None]
    rot_labels = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros",
                               align_corners=True)[0, 0].numpy().astype(np.int16) - 1
    rot_labels[rot_labels < 0] = IGNORE
    return rot_image[0].numpy(), rot_labels.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Loss and validation


def masked_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (voxels labelled 255 ignored) + soft Dice over the foreground classes
    present in `target`, computed on annotated voxels only. logits [B, C, H, W], target
    [B, H, W] int64. Predictions at ignored voxels do not change the value or the gradient."""
    valid = target != IGNORE
    n_valid = valid.sum()
    if int(n_valid) == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target, weight=class_weight, ignore_index=IGNORE,
                         reduction="sum") / n_valid
    n_classes = logits.shape[1]
    mask = valid.unsqueeze(1).to(logits.dtype)
    probs = torch.softmax(logits, dim=1) * mask
    onehot = F.one_hot(torch.where(valid, target, 0), n_classes).permute(0, 3, 1, 2)
    onehot = onehot.to(logits.dtype) * mask
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    present[0] = False
    if not bool(present.any()):
        return ce
    dice = (2 * inter + _DICE_EPS) / (denom + _DICE_EPS)
    return ce + dice_weight * (1.0 - dice[present].mean())


@torch.no_grad()
def _predict_part(network: nn.Module, part: _Part, in_slices: int, device: torch.device,
                  multiple: int) -> np.ndarray:
    """Argmax labels [Z, H, W] for a validation part (whole slices, padded to the multiple)."""
    z_n, h, w = part.labels.shape
    out = np.empty((z_n, h, w), dtype=np.uint8)
    for z0 in range(0, z_n, 4):
        x = _slice_batch(part, z0, min(z_n, z0 + 4), in_slices, device, multiple)
        out[z0:z0 + len(x)] = network(x).argmax(1)[:, :h, :w].cpu().numpy()
    return out


def _slice_batch(part: _Part, z0: int, z1: int, in_slices: int, device: torch.device,
                 multiple: int) -> torch.Tensor:
    """Network input for whole slices z0..z1 of a part, padded in y, x to the multiple."""
    _, h, w = part.labels.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    x = torch.from_numpy(np.stack([part.image[z:z + in_slices] for z in range(z0, z1)]))
    x = x.to(device)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else
                  "replicate")
    return x


@torch.no_grad()
def calibrate_batchnorm(network: nn.Module, parts: list[_Part], in_slices: int,
                        device: torch.device) -> None:
    """Re-estimate every BatchNorm's running mean and variance on the whole slices of `parts`.
    Training batches are class-balanced patches (mostly centred on rare classes); inference
    sees whole slices, so statistics from the former shift every layer at test time."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not parts:
        return
    multiple = network.size_multiple
    was_training = network.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
    network.train()
    for part in parts:
        z_n = part.labels.shape[0]
        for z0 in range(0, z_n, 4):
            network(_slice_batch(part, z0, min(z_n, z0 + 4), in_slices, device, multiple))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    network.train(was_training)


def validation_dice(
    network: nn.Module, parts: list[_Part], class_names: Sequence[str], in_slices: int,
    device: torch.device,
) -> dict[str, float]:
    """Dice per class over the annotated voxels of all validation parts. Classes without
    truth voxels there are left out (a fixed set for a run, so scores compare over time)."""
    multiple = network.size_multiple
    n = len(class_names) + 1
    inter, pred_n, true_n = np.zeros(n), np.zeros(n), np.zeros(n)
    was_training = network.training
    network.eval()
    for part in parts:
        pred = _predict_part(network, part, in_slices, device, multiple)
        valid = part.labels != IGNORE
        p, t = pred[valid], part.labels[valid]
        inter += np.bincount(t[p == t], minlength=n)[:n]
        pred_n += np.bincount(p, minlength=n)[:n]
        true_n += np.bincount(t, minlength=n)[:n]
    network.train(was_training)
    return {name: float(2 * inter[i] / (pred_n[i] + true_n[i]))
            for i, name in enumerate(class_names, start=1) if true_n[i] > 0}


# --------------------------------------------------------------------------------------------
# Training


def annotation_counts(parts: Sequence[_Part], class_names: Sequence[str]
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


def _resolve_device(spec: str) -> torch.device:
    try:
        from .infer import resolve_device
    except ImportError:  # pragma: no cover - infer is always there in a complete install
        return torch.device("cuda" if spec == "auto" and torch.cuda.is_available() else
                            ("cpu" if spec == "auto" else spec))
    return torch.device(resolve_device(spec))


def _check_init(init: ModelBundle, class_specs: list[ClassSpec], options: TrainOptions
                ) -> None:
    names = [c.name for c in init.meta.classes]
    wanted = [c.name for c in class_specs]
    if names != wanted:
        raise ValueError(
            f"{init.path}: fine-tuning needs the same classes in the same order: the model has "
            f"{names}, training asks for {wanted}"
        )
    if options.model_voxel_size_a is not None and \
            abs(options.model_voxel_size_a - init.meta.voxel_size_a) > 1e-6:
        raise ValueError(
            f"{init.path}: the model's voxel size is {init.meta.voxel_size_a} Å, training asks "
            f"for {options.model_voxel_size_a} Å (fine-tuning keeps the model's voxel size)"
        )
    if options.recipe is not None and options.recipe != init.meta.preprocess:
        raise ValueError(f"{init.path}: fine-tuning keeps the model's preprocessing recipe")


class _Schedule:
    """Progress in 0..1 (steps or wall time, whichever is further) and the learning rate."""

    def __init__(self, steps: int | None, max_minutes: float | None, base_lr: float) -> None:
        self.steps, self.budget_s, self.base_lr = steps, (max_minutes or 0) * 60.0, base_lr
        self.start = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def fraction(self, step: int) -> float:
        by_steps = step / self.steps if self.steps else 0.0
        by_time = self.elapsed_s / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(by_steps, by_time))

    def lr(self, fraction: float) -> float:
        if fraction < _WARMUP_FRACTION:
            return self.base_lr * (0.1 + 0.9 * fraction / _WARMUP_FRACTION)
        t = (fraction - _WARMUP_FRACTION) / (1.0 - _WARMUP_FRACTION)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return self.base_lr * (_FINAL_LR_FACTOR + (1.0 - _FINAL_LR_FACTOR) * cosine)


def _initial_network(arch: dict[str, Any], seed: int) -> UNet25D:
    """The network with its random initial weights drawn from `seed`. torch draws them from its
    global generator; fork_rng gives it back as it was, so core leaves the caller's random
    state alone (the weights are the same as after a torch.manual_seed(seed))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet25D(arch["in_slices"], arch["n_classes"], arch["base_width"], arch["levels"])


def train(
    sources: Sequence[TrainingSource],
    class_specs: Sequence[ClassSpec],
    options: TrainOptions,
    init_bundle: ModelBundle | None = None,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Train a 2.5D U-Net on annotated regions of one or more tomograms (module docstring).

    `init_bundle` fine-tunes an existing model: same classes (and order), its architecture,
    voxel size and recipe; the result's version is the parent's + 1 and `parent` names it.
    Returns the network (the final weights, or those with the best mean validation Dice:
    `options.keep`) on CPU. `warn` gets one line per class with too few annotated examples
    (`sparse_class_warnings`), before the first step; they are also in the metadata.
    """
    options.check()
    if not sources:
        raise ValueError("training needs at least one tomogram with labels")
    class_specs = list(class_specs)
    names = [c.name for c in class_specs]
    rng = np.random.default_rng(options.seed)
    device = _resolve_device(options.device)

    if init_bundle is not None:
        _check_init(init_bundle, class_specs, options)
        arch = dict(init_bundle.meta.architecture)
        model_voxel_a = float(init_bundle.meta.voxel_size_a)
        recipe = copy.deepcopy(init_bundle.meta.preprocess)
    else:
        arch = architecture_dict(options.in_slices, len(class_specs) + 1, options.base_width,
                                 options.levels)
        model_voxel_a = options.model_voxel_size_a or _first_voxel_size(sources[0])
        # Stored with every parameter explicit: a later change of a default cannot change
        # what this model's inputs look like.
        recipe = validate_recipe(options.recipe if options.recipe is not None else DEFAULT_RECIPE)
    in_slices = arch["in_slices"]

    prepared = [
        _prepare_source(s, len(class_specs), model_voxel_a, recipe, in_slices,
                        options.validation_fraction, options.patch_px, str(device))
        for s in sources
    ]
    network = _initial_network(arch, options.seed)
    if init_bundle is not None:
        network.load_state_dict(init_bundle.state_dict, strict=True)
    network = network.to(device).train()

    train_parts = [part for p in prepared for part in p.train]
    annotation = annotation_counts(train_parts, names)
    warnings = sparse_class_warnings(annotation)
    for message in warnings if warn is not None else ():
        warn(message)
    sampler = _Sampler(train_parts, in_slices, options.patch_px, rng, options.augment,
                       options.rotate_any_angle, options.blur_max_px,
                       options.spectrum_jitter)
    val_parts = [p.validation for p in prepared if p.validation is not None]
    best = _run(network, sampler, val_parts, names, options, in_slices, device, progress)

    network.load_state_dict(best["state"])
    network = network.to("cpu").eval()
    meta = _meta(options, init_bundle, arch, model_voxel_a, recipe, class_specs, prepared,
                 best, str(device), annotation, warnings)
    return TrainedModel(network=network, meta=meta)


def _first_voxel_size(source: TrainingSource) -> float:
    return float(read_mrc(source.tomogram_path, voxel_size_a=source.voxel_size_a,
                          check_finite=False).voxel_size_a)


def _run(
    network: UNet25D, sampler: _Sampler, val_parts: list[_Part], names: list[str],
    options: TrainOptions, in_slices: int, device: torch.device,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """The optimisation loop; returns the kept state (TrainOptions.keep) and its record."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.learning_rate,
                                  weight_decay=options.weight_decay)
    schedule = _Schedule(options.steps, options.max_minutes, options.learning_rate)
    best: dict[str, Any] = {"score": -1.0, "dice": {}, "step": 0, "state": None}
    averaged = _Averaged(network, options.ema_decay)
    weights = _class_weights(sampler.parts, network.arch["n_classes"],
                             options.class_weight_power, device)

    def check(step_: int) -> dict[str, float]:
        model = averaged.network
        if options.calibrate_bn:
            calibrate_batchnorm(model, sampler.parts, in_slices, device)
        return _validate(model, val_parts, names, in_slices, device, step_, best,
                         keep_state=options.keep == "best")

    next_check, step, loss_avg, dice = 1.0 / _VALIDATIONS_PER_RUN, 0, None, None
    checked_at = -1
    while True:
        fraction = schedule.fraction(step)
        if fraction >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(fraction)
        images, labels = sampler.batch(options.batch_size)
        loss = masked_loss(network(images.to(device)), labels.to(device),
                           class_weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        averaged.update(step)
        step += 1
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
        fraction = schedule.fraction(step)
        if fraction >= next_check or fraction >= 1.0:
            next_check = (math.floor(fraction * _VALIDATIONS_PER_RUN) + 1) / _VALIDATIONS_PER_RUN
            dice, checked_at = check(step), step
        if progress is not None:
            progress(TrainProgress(step, options.steps, schedule.elapsed_s, loss_avg, dice))
    if checked_at != step:  # no step ran
        dice = check(step)
    best["best_step"] = best["step"]
    if options.keep == "final" or best["state"] is None:
        best.update(step=step, dice=dice or {}, state=_cpu_state(averaged.network))
    best["steps"], best["elapsed_s"], best["final_loss"] = step, schedule.elapsed_s, loss_avg
    return best


def _class_weights(parts: list[_Part], n_classes: int, power: float, device: torch.device
                   ) -> torch.Tensor | None:
    """Cross-entropy class weights (TrainOptions.class_weight_power); None when power is 0."""
    if power == 0:
        return None
    counts = np.zeros(n_classes)
    for part in parts:
        for c, idx in part.index.items():
            counts[c] += len(idx)
    weights = np.clip((max(counts[0], 1.0) / np.maximum(counts, 1.0)) ** power, 1.0, 10.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


class _Averaged:
    """An exponential moving average of the weights (BatchNorm buffers copied): validated and
    saved instead of the raw weights, whose per-step noise made the validation Dice jump
    (actin 0.49 -> 0.07 between two checks). decay 0 = the raw network itself."""

    def __init__(self, network: UNet25D, decay: float) -> None:
        self.source, self.decay = network, decay
        self.network = copy.deepcopy(network).requires_grad_(False) if decay > 0 else network

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self.network is self.source:
            return
        # Short memory at the start, so early checks do not see the random initial weights.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        ema = list(self.network.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.source.parameters()], 1.0 - decay)
        for mine, theirs in zip(self.network.buffers(), self.source.buffers(), strict=True):
            mine.copy_(theirs)


def _validate(network: UNet25D, val_parts: list[_Part], names: list[str], in_slices: int,
              device: torch.device, step: int, best: dict[str, Any], keep_state: bool
              ) -> dict[str, float]:
    """Validation Dice per class; `best` follows the best mean (and keeps its weights when
    `keep_state`)."""
    dice = validation_dice(network, val_parts, names, in_slices, device) if val_parts else {}
    score = float(np.mean(list(dice.values()))) if dice else 0.0
    if score > best["score"]:
        best.update(score=score, dice=dice, step=step,
                    state=_cpu_state(network) if keep_state else None)
    return dice


def _cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}


def _meta(
    options: TrainOptions, init: ModelBundle | None, arch: dict[str, Any], model_voxel_a: float,
    recipe: list[dict[str, Any]], class_specs: list[ClassSpec],
    prepared: list[_PreparedSource], best: dict[str, Any], device: str,
    annotation: dict[str, dict[str, int]], warnings: list[str],
) -> BundleMeta:
    name = options.name or (init.meta.name if init is not None else "tomolive-model")
    training = {
        "synthetic": bool(options.synthetic),
        "sources": [p.record for p in prepared],
        "steps": best["steps"],
        "elapsed_s": round(best["elapsed_s"], 1),
        "kept": options.keep,
        "kept_step": best["step"],
        "best_validation_step": best["best_step"],
        "validation_dice": {k: round(v, 4) for k, v in best["dice"].items()},
        "validation_fraction": options.validation_fraction,
        "validation_classes_absent": [c.name for c in class_specs
                                      if c.name not in best["dice"]],
        "final_loss": None if best["final_loss"] is None else round(best["final_loss"], 4),
        "training_annotation": annotation,
        "warnings": warnings,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "patch_px": options.patch_px,
        "learning_rate": options.learning_rate,
        "max_minutes": options.max_minutes,
        "requested_steps": options.steps,
        "device": device,
        "augment": options.augment,
        "loss": "cross-entropy (ignore 255) + soft Dice",
        "rotate_any_angle": options.rotate_any_angle,
        "blur_max_px": options.blur_max_px,
        "spectrum_jitter": options.spectrum_jitter,
        "ema_decay": options.ema_decay,
        "class_weight_power": options.class_weight_power,
        "calibrate_bn": options.calibrate_bn,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return BundleMeta(
        name=name,
        version=init.meta.version + 1 if init is not None else 1,
        architecture=arch,
        voxel_size_a=float(model_voxel_a),
        classes=list(class_specs),
        preprocess=recipe,
        parent=init.meta.ref if init is not None else None,
        training=training,
        description=options.description,
    )
