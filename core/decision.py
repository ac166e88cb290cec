"""How a voxel's label follows from its class probabilities: the one rule, shared by inference
(`core.infer.predict`) and by re-thresholding saved probability maps (`core.repick`).

Foreground class c *passes* at a voxel when its probability p_c reaches its threshold t_c or,
for a class without a threshold, when p_c exceeds the background's probability. The label is
the passing class with the highest probability, or background when none passes. Without any
threshold this is exactly the argmax over all classes (ties go to the lower index, as
torch.max breaks them), so a default run is unchanged by the rule's existence.

Why thresholds per class: one decision rule never suits every tomogram. A thin, rare class
(a microtubule the model half-believes) needs a lower bar to survive; a class that fires on
ice or carbon needs a higher one. The voxel's confidence is the probability of the label it
got (for background without thresholds: the maximum, as before).

Probabilities are saved as unsigned bytes, 0..255 for 0..1 (`to_u8`); the background is not
saved: it is what the foreground classes leave. When the maps are saved, labels are decided
from those bytes (`decide_bytes`), by inference and by a repick alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from .classes import ClassSpec

# A class without a threshold: "beat the background" (the argmax rule).
NO_THRESHOLD = math.nan


def threshold_vector(classes: Sequence[ClassSpec], thresholds: Mapping[str, float] | None
                     ) -> list[float]:
    """Per foreground class in output order, its threshold or NO_THRESHOLD; names are checked
    (`check_class_values`)."""
    thresholds = dict(thresholds or {})
    check_class_values(thresholds, classes, "threshold", low=0.0, high=1.0, low_open=True)
    return [float(thresholds.get(spec.name, NO_THRESHOLD)) for spec in classes]


def decide(probs: torch.Tensor, thresholds: Sequence[float] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (int64) and the chosen label's probability for probabilities [B, C, H, W]
    (channel 0 the background); `thresholds` has C - 1 entries (NO_THRESHOLD for none)."""
    if not thresholds or all(math.isnan(t) for t in thresholds):
        best, labels = probs.max(dim=1)
        return labels, best
    if len(thresholds) != probs.shape[1] - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {probs.shape[1] - 1} classes")
    foreground, background = probs[:, 1:], probs[:, :1]
    bar = torch.tensor(thresholds, dtype=probs.dtype, device=probs.device).view(1, -1, 1, 1)
    passing = torch.where(torch.isnan(bar), foreground > background, foreground >= bar)
    score = torch.where(passing, foreground, torch.full_like(foreground, -1.0))
    top, index = score.max(dim=1)
    found = top >= 0
    labels = torch.where(found, index + 1, torch.zeros_like(index))
    return labels, torch.where(found, top, probs[:, 0])


def to_u8(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities (0..1) as unsigned bytes 0..255, rounded to nearest."""
    return (probs * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def threshold_bytes(threshold: float) -> int:
    """The smallest byte value q with q / 255 >= `threshold`."""
    return int(math.ceil(threshold * 255.0 - 1e-9))


def decide_bytes(foreground_u8: np.ndarray, thresholds: Sequence[float] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`decide` on probabilities saved as bytes, in integer arithmetic so that inference (when
    it saves the maps) and a repick (`decide_saved`) agree to the voxel: foreground bytes
    [C - 1, ...] (class first) -> labels int8 and the chosen label's probability as bytes.
    The background is what the foreground leaves, 255 - their sum, at least 0. Class by class
    with a running best (a tie goes to the lower class, as in `decide`): no class-axis copy."""
    n_classes = foreground_u8.shape[0]
    if thresholds and len(thresholds) != n_classes:
        raise ValueError(f"{len(thresholds)} thresholds for {n_classes} classes")
    background = np.full(foreground_u8.shape[1:], 255, dtype=np.int16)
    for values in foreground_u8:
        background -= values
    np.maximum(background, 0, out=background)
    best = np.full(foreground_u8.shape[1:], -1, dtype=np.int16)
    labels = np.zeros(foreground_u8.shape[1:], dtype=np.int8)
    for index, values in enumerate(foreground_u8):
        threshold = thresholds[index] if thresholds else NO_THRESHOLD
        passing = (values > background if math.isnan(threshold)
                   else values >= threshold_bytes(threshold))
        better = passing & (values > best)
        best[better] = values[better]
        labels[better] = index + 1
    chosen = np.where(labels > 0, best, background).astype(np.uint8)
    return labels, chosen


def decide_saved(values_u8: np.ndarray, thresholds: Sequence[float] | None = None,
                 slab_voxels: int = 2**22) -> tuple[np.ndarray, np.ndarray]:
    """`decide_bytes` over saved maps: bytes [C - 1, z, y, x] of every foreground class (model
    grid) -> labels int8 and the chosen label's probability as bytes, both [z, y, x], one slab
    of about `slab_voxels` voxels per class at a time."""
    depth = values_u8.shape[1]
    labels = np.empty(values_u8.shape[1:], dtype=np.int8)
    confidence = np.empty(values_u8.shape[1:], dtype=np.uint8)
    step = max(1, slab_voxels // max(1, int(np.prod(values_u8.shape[2:]))))
    for z0 in range(0, depth, step):
        labels[z0:z0 + step], confidence[z0:z0 + step] = decide_bytes(
            values_u8[:, z0:z0 + step], thresholds)
    return labels, confidence


def check_class_values(values: Mapping[str, float], classes: Iterable[ClassSpec], what: str,
                       *, low: float, high: float | None = None, low_open: bool = False,
                       kinds: tuple[str, ...] | None = None) -> None:
    """Raise ValueError (one line) for an unknown class name, a value out of range, or a class
    of the wrong kind; `what` names the option in the message."""
    by_name = {spec.name: spec for spec in classes}
    for name, value in values.items():
        if name not in by_name:
            raise ValueError(f"{what} {name}={value:g}: unknown class {name!r} (the model's "
                             f"classes: {', '.join(by_name) or 'none'})")
        if kinds is not None and by_name[name].kind not in kinds:
            raise ValueError(f"{what} {name}={value:g}: {name} is a {by_name[name].kind} class; "
                             f"{what} applies to {' and '.join(kinds)} classes")
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bounds = (f"{'above' if low_open else 'at least'} {low:g}"
                      + ("" if high is None else f" and at most {high:g}"))
            raise ValueError(f"{what} {name}={value:g}: must be {bounds}")


def parse_class_values(items: Iterable[str], what: str) -> dict[str, float]:
    """'CLASS=VALUE' strings (command-line options) -> {class: value}; one-line errors."""
    parsed: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            value = float(text)
        except ValueError:
            raise ValueError(f"{what} {item!r}: expected CLASS=NUMBER, such as "
                             "membrane=0.4") from None
        if name in parsed:
            raise ValueError(f"{what} {name}: given twice")
        parsed[name] = value
    return parsed
