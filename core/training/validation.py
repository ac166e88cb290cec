"""Scoring a network during training on the validation strips, and BatchNorm recalibration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..infer import InferenceOptions, predict
from ..model import UNet25D
from .data import Part
from .options import IGNORE


def _predict_part(network: nn.Module, part: Part, in_slices: int, device: torch.device
                  ) -> np.ndarray:
    """Labels [Z, H, W] of a validation part's centre slices, predicted by core.infer.predict,
    the code that serves the model (float32, no flips): a model is scored during training as
    it will segment. The part's image carries in_slices // 2 slices of context on each side."""
    options = InferenceOptions(device=str(device), batch_size=4, precision="float32")
    labels = predict(network, part.image, in_slices, options).labels
    context = in_slices // 2
    return labels[context:context + part.labels.shape[0]].astype(np.uint8)


def slice_batch(part: Part, z0: int, z1: int, in_slices: int, device: torch.device,
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
def calibrate_batchnorm(network: nn.Module, parts: list[Part], in_slices: int,
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
            network(slice_batch(part, z0, min(z_n, z0 + 4), in_slices, device, multiple))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    network.train(was_training)


def validation_dice(
    network: nn.Module, parts: list[Part], class_names: Sequence[str], in_slices: int,
    device: torch.device,
) -> dict[str, float]:
    """Dice per class over the annotated voxels of all validation parts. Classes without
    truth voxels there are left out (a fixed set for a run, so scores compare over time)."""
    n = len(class_names) + 1
    inter, pred_n, true_n = np.zeros(n), np.zeros(n), np.zeros(n)
    was_training = network.training
    network.eval()
    for part in parts:
        pred = _predict_part(network, part, in_slices, device)
        valid = part.labels != IGNORE
        p, t = pred[valid], part.labels[valid]
        inter += np.bincount(t[p == t], minlength=n)[:n]
        pred_n += np.bincount(p, minlength=n)[:n]
        true_n += np.bincount(t, minlength=n)[:n]
    network.train(was_training)
    return {name: float(2 * inter[i] / (pred_n[i] + true_n[i]))
            for i, name in enumerate(class_names, start=1) if true_n[i] > 0}


@dataclass
class Checkpoint:
    """The best-scoring weights seen so far in a run, and their score."""

    score: float = -1.0  # mean validation Dice over the classes scored
    dice: dict[str, float] = field(default_factory=dict)
    step: int = 0
    state: dict[str, torch.Tensor] | None = None  # CPU copy; None unless kept


def validate_and_keep(network: UNet25D, val_parts: list[Part], names: list[str],
                      in_slices: int, device: torch.device, step: int, best: Checkpoint,
                      keep_state: bool) -> dict[str, float]:
    """Validation Dice per class; `best` follows the best mean (and keeps its weights when
    `keep_state`)."""
    dice = validation_dice(network, val_parts, names, in_slices, device) if val_parts else {}
    score = float(np.mean(list(dice.values()))) if dice else 0.0
    if score > best.score:
        best.score, best.dice, best.step = score, dice, step
        best.state = cpu_state(network) if keep_state else None
    return dice


def cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (what a kept checkpoint holds), in the standard memory
    layout whatever the network's (training runs channels_last on the CPU)."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in network.state_dict().items()}
