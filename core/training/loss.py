"""The training loss: cross-entropy with unannotated voxels ignored, plus soft Dice; optional
class weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import Part
from .options import IGNORE

_DICE_EPS = 1.0


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


def class_weights(parts: list[Part], n_classes: int, power: float, device: torch.device
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
