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
XY rotations, intensity scale/shift and noise; K is 5 by default (TrainOptions.in_slices).
Loss: cross-entropy (ignore_index 255) + soft Dice over the foreground classes present in the
batch (optionally class-weighted cross-entropy).
AdamW with a warm-up and cosine decay over the run, whose length is `steps` or `max_minutes`,
whichever ends first. Options (off by default, not better in bench/train_quality.py): validate and
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..classes import ClassSpec
from ..model import BundleMeta, ModelBundle, UNet25D, architecture_dict
from ..preprocess import DEFAULT_RECIPE, validate_recipe
from ..volume import read_mrc
from .data import Part, PreparedSource, annotation_counts, prepare_source, sparse_class_warnings
from .loss import class_weights, masked_loss
from .options import ProgressFn, TrainedModel, TrainingSource, TrainOptions, TrainProgress
from .sampling import Sampler
from .validation import Checkpoint, calibrate_batchnorm, cpu_state, validate_and_keep

# Fraction of the run spent warming the learning rate up, and where the cosine ends.
_WARMUP_FRACTION = 0.05
_FINAL_LR_FACTOR = 0.02
# How many times per run the validation Dice is computed (plus once at the end).
_VALIDATIONS_PER_RUN = 10


def _memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on the CPU, where oneDNN's convolutions run faster in it: a training step
    (batch 8, 31 x 96 x 96, one thread, AVX2) took about 0.74 s against 0.82 s (forward 0.23 against
    0.29, backward 0.50 against 0.52). Elsewhere unmeasured, so left as it is."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


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
        prepare_source(s, len(class_specs), model_voxel_a, recipe, in_slices,
                        options.validation_fraction, options.patch_px, str(device),
                        options.z_edge)
        for s in sources
    ]
    network = _initial_network(arch, options.seed)
    if init_bundle is not None:
        network.load_state_dict(init_bundle.state_dict, strict=True)
    network = network.to(device, memory_format=_memory_format(device)).train()

    train_parts = [part for p in prepared for part in p.train]
    annotation = annotation_counts(train_parts, names)
    warnings = sparse_class_warnings(annotation)
    for message in warnings if warn is not None else ():
        warn(message)
    sampler = Sampler(train_parts, in_slices, options.patch_px, rng, options.augment,
                       options.rotate_any_angle, options.blur_max_px,
                       options.spectrum_jitter, options.z_edge_share, options.z_edge,
                       options.void_share)
    val_parts = [p.validation for p in prepared if p.validation is not None]
    run = _run(network, sampler, val_parts, names, options, in_slices, device, progress)

    network.load_state_dict(run.kept.state)
    network = network.to("cpu").eval()
    meta = _meta(options, init_bundle, arch, model_voxel_a, recipe, class_specs, prepared,
                 run, str(device), annotation, warnings)
    return TrainedModel(network=network, meta=meta)


def _first_voxel_size(source: TrainingSource) -> float:
    return float(read_mrc(source.tomogram_path, voxel_size_a=source.voxel_size_a,
                          check_finite=False).voxel_size_a)


@dataclass
class RunResult:
    """What the optimisation loop ends with: the weights kept (TrainOptions.keep) and the run."""

    kept: Checkpoint
    best_step: int  # the step of the best validation score (whatever was kept)
    steps: int
    elapsed_s: float
    final_loss: float | None  # the loss's moving average at the end


def _run(
    network: UNet25D, sampler: Sampler, val_parts: list[Part], names: list[str],
    options: TrainOptions, in_slices: int, device: torch.device,
    progress: ProgressFn | None,
) -> RunResult:
    """The optimisation loop: AdamW on the schedule, validation checks along the way."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.learning_rate,
                                  weight_decay=options.weight_decay)
    schedule = _Schedule(options.steps, options.max_minutes, options.learning_rate)
    best = Checkpoint()
    averaged = _Averaged(network, options.ema_decay)
    weights = class_weights(sampler.parts, network.arch["n_classes"],
                             options.class_weight_power, device)

    def check(step_: int) -> dict[str, float]:
        model = averaged.network
        if options.calibrate_bn:
            calibrate_batchnorm(model, sampler.parts, in_slices, device)
        return validate_and_keep(model, val_parts, names, in_slices, device, step_, best,
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
        images = images.to(device, memory_format=_memory_format(device))
        loss = masked_loss(network(images), labels.to(device),
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
    best_step = best.step
    kept = best
    if options.keep == "final" or best.state is None:
        kept = Checkpoint(best.score, dice or {}, step, cpu_state(averaged.network))
    return RunResult(kept, best_step, step, schedule.elapsed_s, loss_avg)


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


def _meta(
    options: TrainOptions, init: ModelBundle | None, arch: dict[str, Any], model_voxel_a: float,
    recipe: list[dict[str, Any]], class_specs: list[ClassSpec],
    prepared: list[PreparedSource], run: RunResult, device: str,
    annotation: dict[str, dict[str, int]], warnings: list[str],
) -> BundleMeta:
    name = options.name or (init.meta.name if init is not None else "tomolive-model")
    training = {
        "synthetic": bool(options.synthetic),
        "sources": [p.record for p in prepared],
        "steps": run.steps,
        "elapsed_s": round(run.elapsed_s, 1),
        "kept": options.keep,
        "kept_step": run.kept.step,
        "best_validation_step": run.best_step,
        "validation_dice": {k: round(v, 4) for k, v in run.kept.dice.items()},
        "validation_fraction": options.validation_fraction,
        "validation_classes_absent": [c.name for c in class_specs
                                      if c.name not in run.kept.dice],
        "final_loss": None if run.final_loss is None else round(run.final_loss, 4),
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
        "z_edge_share": options.z_edge_share,
        "void_share": options.void_share,
        "z_edge_parent": init.meta.z_edge if init is not None else None,
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
        z_edge=options.z_edge,
    )
