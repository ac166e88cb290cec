"""What training takes and gives: the sources, the options, progress reports, the trained
model, and the class settings (with YAML overrides)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..classes import ClassSpec, default_class
from ..errors import one_line
from ..model import BundleMeta, UNet25D, check_z_edge

IGNORE = 255  # label value of voxels nobody annotated (int8 files store it as -1)


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
    # z-slices the network sees around each labelled slice (odd). 5, the protocol's own, chosen
    # on realistic data: trained from scratch on val_1 z 48:64 for 10 CPU-minutes and scored on
    # val_2 / val_3 (bench/validation_training.py, tolerant Dice), 5 slices gave membrane
    # 0.80 / 0.84 and microtubule 0.40 / 0.49 over four seeds, against 0.64 / 0.60 and
    # 0.17 / 0.21 for 31 (two seeds), with ribosome F1 0.78 / 0.78 against 0.55 / 0.58. With
    # seed 0, 1, 3 and 11 slices scored microtubule 0.23-0.32 / 0.33-0.39 against 5's
    # 0.51 / 0.62, and lower ribosome F1; 1 and 3 matched 5 on membrane. On this project's own
    # cartoon tomograms (bench/train_quality.py) 31 had won, by reading a microtubule's walls
    # and the vesicle caps the missing wedge hides from the slices around. A likely reason (not
    # tested): in realistic tomograms those slices hold missing-wedge streaks and crowded
    # density that 16 annotated slices cannot teach a wide input to ignore. The shipped default
    # model has 31 (its bundle says so), and fine-tuning keeps a model's own count.
    in_slices: int = 5
    levels: int = 5
    model_voxel_size_a: float | None = None  # default: the first tomogram's voxel size
    recipe: list[dict[str, Any]] | None = None  # default: preprocess.DEFAULT_RECIPE
    name: str | None = None  # default: "tomolive-model", or the parent's name when fine-tuning
    description: str = ""
    synthetic: bool = False  # provenance: the training data are synthetic (core.synth)
    augment: bool = True
    # Augmentation: arbitrary in-plane angles, not only 90°. On by default: trained on one
    # region whose microtubules all ran diagonally, a 21-slice model scored microtubule Dice
    # 0.59/0.08 without it and 0.90/0.88 with it (bench/train_quality.py, seed-20 region).
    rotate_any_angle: bool = True
    # Augmentation: half the patches blurred in-plane with a Gaussian of sigma up to this many
    # pixels (0 = off). The default model's script uses 1.5 (simulated resolution varies).
    blur_max_px: float = 0.0
    # Augmentation: half the patches get a random in-plane amplitude spectrum, a radial gain
    # exp(u * k / Nyquist) with u drawn from +-spectrum_jitter, times a soft low-pass at 0.25-0.5
    # cycles/px (0 = off). Tomograms from other microscopes, CTF envelopes, reconstruction
    # filters (WBP ramps and roll-offs, SIRT-like) and B-factors differ most in exactly this;
    # the patch's mean and spread are kept, so only the spectrum's shape changes. Off by
    # default: issue 14's "model B" used 1.0 with two other changes and was not better.
    spectrum_jitter: float = 0.0
    # What stands in for the slices beyond a volume's top and bottom (core.model.Z_EDGE_MODES),
    # recorded in the bundle, so that inference builds its inputs the same way. "reflect": a
    # repeated ("clamp") slice repeats its noise in up to in_slices // 2 + 1 slices, which the
    # network reads as a straight structure running in z.
    z_edge: str = "reflect"
    # Share of patches that see a volume's top or bottom as inference builds it, at a random
    # depth within in_slices // 2 of the edge. A few annotated slices from a tomogram's middle
    # never show the network an edge: fine-tuned on val_1 z 48:64 without this, it called 17%
    # of val_2's outer slices microtubule (Dice 0.16; 0.46 with the outer 15 slices'
    # microtubules removed). scripts/train_default_model.py sets 0: its whole synthetic
    # volumes hold real edges.
    z_edge_share: float = 0.25
    # Share of patches in which a specimen surface crosses the neighbourhood: the slices beyond
    # it hold only the patch's own noise (core.training.void_beyond_surface), and a centre
    # slice in that void is all background. A few slices from a specimen's middle never show
    # the network the vacuum or ice above and below a lamella. Off by default: at 0.25,
    # `--init default` on val_1 z 48:64 (bench/validation_training.py, 10 min, seeds 0 and 1,
    # about 650 steps) gained membrane (0.79 / 0.71 against 0.77 / 0.64 on val_2 / val_3) and
    # ribosome Dice (0.72 / 0.86 against 0.72 / 0.82) but lost microtubule (0.14 / 0.21 against
    # 0.19 / 0.30) and some actin (0.93 / 0.89 against 0.94 / 0.91).
    void_share: float = 0.0
    # The options below are off by default: in bench/train_quality.py (10 min, 1 thread,
    # shared CPU) none of them raised the test tomograms' Dice.
    # Cross-entropy weight of class c: (background voxels / class-c voxels in the training
    # parts) ** power, at most 10 (0 = unweighted; patches are class-balanced either way).
    class_weight_power: float = 0.0
    ema_decay: float = 0.0  # weights validated and saved: this moving average (0 = off)
    calibrate_bn: bool = False  # BatchNorm statistics re-estimated on whole training slices
    # Which weights the bundle gets: "final" (the end of the cosine schedule) or "best" (the
    # best mean validation Dice seen). "final" by default: the validation strip of a small
    # region holds few voxels of some classes, and in bench/train_quality.py "best" picked
    # step 686 of 2358, whose test Dice was far below the end's.
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
        check_z_edge(self.z_edge)
        if not 0.0 <= self.z_edge_share <= 1.0:
            raise ValueError(f"z_edge_share must be in [0, 1], not {self.z_edge_share}")
        if not 0.0 <= self.void_share <= 1.0:
            raise ValueError(f"void_share must be in [0, 1], not {self.void_share}")
        if not self.spectrum_jitter >= 0:
            raise ValueError(f"spectrum_jitter must be >= 0, not {self.spectrum_jitter}")
        if not (1 <= self.in_slices <= 63 and self.in_slices % 2 == 1):
            raise ValueError(f"in_slices must be odd and 1..63 (a centre slice and as many on "
                             f"each side), not {self.in_slices}")
        if self.batch_size < 1 or self.patch_px < 8:
            raise ValueError(f"batch_size {self.batch_size} / patch_px {self.patch_px} too small")


# Fields `parse_option` may set: the tuning knobs. The others (sources of data, names, budget,
# device) have flags of their own on `tomolive train`.
TUNABLE_OPTIONS = ("batch_size", "patch_px", "learning_rate", "weight_decay",
                   "validation_fraction", "base_width", "in_slices", "levels", "augment",
                   "rotate_any_angle", "blur_max_px", "spectrum_jitter", "z_edge",
                   "z_edge_share", "void_share", "class_weight_power", "ema_decay",
                   "calibrate_bn", "keep")


def parse_option(text: str) -> tuple[str, Any]:
    """"NAME=VALUE" for a TrainOptions tuning field (TUNABLE_OPTIONS), VALUE converted to the
    field's type. Raises ValueError naming the problem."""
    name, sep, value = str(text).partition("=")
    name, value = name.strip().replace("-", "_"), value.strip()
    if not sep or not name:
        raise ValueError(f"option {text!r} must be NAME=VALUE")
    if name not in TUNABLE_OPTIONS:
        raise ValueError(f"option {name!r} is not a training option; one of "
                         f"{', '.join(TUNABLE_OPTIONS)}")
    kind = type(getattr(TrainOptions(), name))
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return name, value.lower() in ("true", "1", "yes")
        return name, kind(value)
    except ValueError:
        article = "an" if kind is int else "a"
        raise ValueError(f"option {name}={value!r} is not {article} {kind.__name__}") from None


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
