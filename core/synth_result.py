"""What every simulator returns (`SynthResult`), and the little geometry they share: its own
module so that the simulators (core.synth's cartoon, core.microscope with core.specimen) and
the dispatch in core.synth import it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .classes import SYNTH_CLASS_NAMES


@dataclass
class SynthResult:
    """A synthetic tomogram and its ground truth, all on the same [z, y, x] grid."""

    tomogram: np.ndarray  # float32; dense matter negative; mean 0, std 1
    labels: np.ndarray  # int8; 0 background, i = class_names[i - 1]
    particles: list[tuple[str, float, float, float]]  # (class, x, y, z) voxel indices
    voxel_size_a: float
    class_names: tuple[str, ...] = SYNTH_CLASS_NAMES
    info: dict[str, Any] = field(default_factory=dict)  # object counts, noise, SNR, parameters
    filaments: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (class, (n, 3) x y z)


def fibonacci_sphere(n: int) -> np.ndarray:
    """n roughly evenly spaced unit vectors (z, y, x)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([z, r * np.sin(phi), r * np.cos(phi)], axis=1)
