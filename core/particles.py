"""Particle picking from a label volume: watershed split, volume limits, centroids and scores.

Follows the published protocol: per connected component of the class, the Euclidean distance
transform, its local maxima at least half a particle diameter (one radius) apart as markers, and
a watershed on the negated distance to split touching particles. Pieces whose volume lies
outside [MIN_VOLUME_FRACTION, MAX_VOLUME_FRACTION] x the volume of a sphere of the expected
diameter are dropped: smaller ones are debris or slivers, larger ones are aggregates or
something else (a membrane patch labelled as the class) that a single coordinate would misplace.
Everything runs per component bounding box, so memory scales with the largest particle cluster,
not with the tomogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from .classes import ClassSpec
from .cleanup import label_compact

MIN_VOLUME_FRACTION = 0.2  # x sphere volume of the expected diameter
MAX_VOLUME_FRACTION = 3.0

_FACE = ndimage.generate_binary_structure(3, 1)


@dataclass
class ParticleTable:
    """Particles of one class: positions as float voxel coordinates (z, y, x) on some grid."""

    class_name: str
    zyx: np.ndarray  # float64 (n, 3)
    score: np.ndarray  # float32 (n,), mean class probability inside the particle, 0..1
    volume_voxels: np.ndarray  # int64 (n,), on the grid the particle was found on
    # Per-particle columns from core.context (membrane_distance_nm, compartment), or none.
    context: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.zyx = np.asarray(self.zyx, dtype=np.float64).reshape(-1, 3)
        self.score = np.asarray(self.score, dtype=np.float32).reshape(-1)
        self.volume_voxels = np.asarray(self.volume_voxels, dtype=np.int64).reshape(-1)
        n = len(self.zyx)
        if len(self.score) != n or len(self.volume_voxels) != n:
            raise ValueError(
                f"particle table {self.class_name!r}: {n} positions but {len(self.score)} "
                f"scores and {len(self.volume_voxels)} volumes"
            )
        self.context = {name: np.asarray(values).reshape(-1)
                        for name, values in self.context.items()}
        for name, values in self.context.items():
            if len(values) != n:
                raise ValueError(f"particle table {self.class_name!r}: {n} positions but "
                                 f"{len(values)} values of {name}")

    def __len__(self) -> int:
        return len(self.zyx)

    @classmethod
    def empty(cls, class_name: str) -> ParticleTable:
        return cls(class_name, np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    def with_coordinates(self, zyx: np.ndarray) -> ParticleTable:
        """The same particles at new positions (e.g. mapped to the input grid)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        if zyx.shape != self.zyx.shape:
            raise ValueError(
                f"particle table {self.class_name!r}: new coordinates have shape {zyx.shape}, "
                f"expected {self.zyx.shape}"
            )
        return ParticleTable(self.class_name, zyx.copy(), self.score.copy(),
                             self.volume_voxels.copy(),
                             {name: values.copy() for name, values in self.context.items()})

    def subset(self, keep: np.ndarray) -> ParticleTable:
        """The particles where `keep` (bool, one per particle) is True."""
        keep = np.asarray(keep, dtype=bool)
        return ParticleTable(self.class_name, self.zyx[keep], self.score[keep],
                             self.volume_voxels[keep],
                             {name: values[keep] for name, values in self.context.items()})


def sphere_volume_voxels(diameter_nm: float, voxel_size_a: float) -> float:
    radius_vox = diameter_nm * 10.0 / voxel_size_a / 2.0
    return 4.0 / 3.0 * math.pi * radius_vox**3


def find_particles(
    labels: np.ndarray,
    confidence: np.ndarray,
    class_index: int,
    spec: ClassSpec,
    voxel_size_a: float,
) -> ParticleTable:
    """Particles of class `class_index` (label value) in `labels` (int8 [z, y, x]).

    `confidence` is uint8 on the same grid (max class probability x 255); a particle's score is
    its mean inside the particle, divided by 255. Coordinates are centroids in voxels of this grid.
    """
    if labels.shape != confidence.shape:
        raise ValueError(
            f"labels {labels.shape} and confidence {confidence.shape} differ in shape"
        )
    if not spec.diameter_nm:
        raise ValueError(f"class {spec.name!r} has no diameter_nm: cannot pick particles")
    if voxel_size_a <= 0:
        raise ValueError(f"voxel_size_a must be positive, got {voxel_size_a}")
    radius_vox = spec.diameter_nm * 10.0 / voxel_size_a / 2.0
    sphere_vox = sphere_volume_voxels(spec.diameter_nm, voxel_size_a)
    lo_vox, hi_vox = MIN_VOLUME_FRACTION * sphere_vox, MAX_VOLUME_FRACTION * sphere_vox

    boxes = ndimage.find_objects(labels, max_label=class_index)
    if len(boxes) < class_index or boxes[class_index - 1] is None:
        return ParticleTable.empty(spec.name)
    cbox = boxes[class_index - 1]
    comps, n = label_compact(labels[cbox] == class_index, _FACE)
    zyx, scores, volumes = [], [], []
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        # The component's box in whole-volume coordinates.
        full = tuple(slice(s.start + c.start, s.stop + c.start)
                     for s, c in zip(box, cbox, strict=True))
        offset = np.array([s.start for s in full], dtype=np.float64)
        conf = confidence[full]
        for centre, score, vol in _split_component(comps[box] == i, conf, radius_vox):
            if lo_vox <= vol <= hi_vox:
                zyx.append(centre + offset)
                scores.append(score)
                volumes.append(vol)
    if not zyx:
        return ParticleTable.empty(spec.name)
    return ParticleTable(spec.name, np.array(zyx), np.array(scores), np.array(volumes))


def _split_component(
    mask: np.ndarray, conf: np.ndarray, radius_vox: float
) -> list[tuple[np.ndarray, float, int]]:
    """Watershed-split one component; (centroid in box voxels, score, volume) per piece."""
    # Pad by one voxel so that the distance transform sees background on every side.
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_edt(padded)
    peaks = peak_local_max(
        distance,
        min_distance=max(1, int(round(radius_vox))),
        labels=padded.astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) <= 1:
        pieces, n = padded.astype(np.int32), 1
    else:
        markers = np.zeros(padded.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        pieces = watershed(-distance, markers, mask=padded)
        n = len(peaks)
    pieces = pieces[1:-1, 1:-1, 1:-1]
    # Per-piece sums over foreground voxels only (bincount: one pass, no per-label loops).
    where = np.nonzero(pieces)
    piece = pieces[where]
    volumes = np.bincount(piece, minlength=n + 1)
    sums = np.bincount(piece, weights=conf[where], minlength=n + 1)
    coords = [np.bincount(piece, weights=w, minlength=n + 1) for w in where]
    out = []
    for k in range(1, n + 1):
        if volumes[k] > 0:
            centre = np.array([c[k] for c in coords]) / volumes[k]
            out.append((centre, float(sums[k] / volumes[k] / 255.0), int(volumes[k])))
    return out
