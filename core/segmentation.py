"""The result of segmenting one tomogram: what `core.pipeline.segment` returns and
`core.export` writes. Everything here is on the INPUT grid, in the file's own axis order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .classes import ClassSpec
from .filaments import Filament
from .particles import ParticleTable
from .probability_maps import ProbabilityMaps
from .specimen_mask import SpecimenSlab
from .volume import canonical_shape, from_canonical


@dataclass
class Segmentation:
    stem: str
    labels: np.ndarray  # int8 [z, y, x], input grid; value = class index (0 background)
    voxel_size_a: float  # the input's voxel size (after any override)
    origin_xyz_a: tuple[float, float, float]
    classes: list[ClassSpec]  # label value i + 1 is classes[i]
    particles: dict[str, ParticleTable] = field(default_factory=dict)  # input-grid voxels
    filaments: dict[str, list[Filament]] = field(default_factory=dict)  # input-grid voxels
    class_fractions: dict[str, float] = field(default_factory=dict)
    confidence: float = float("nan")  # mean max class probability inside the specimen, 0..1
    # The model-fit signal (core.infer.FIT_CANDIDATE_PROB): of the specimen's voxels where the
    # model sees something, the share where it cannot decide; high when the model does not fit.
    uncertain_fraction: float = float("nan")
    # Quality figures (core.quality): the input's SNR estimate on the model grid, and per class
    # the mean probability the network gave the label over the class's voxels (NaN: none).
    snr_estimate: float = float("nan")
    class_confidence: dict[str, float] = field(default_factory=dict)
    # Per class: the fraction of the network's voxels that cleanup's own rules removed.
    cleanup_removed_fraction: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one line each, for the summary
    timings_s: dict[str, float] = field(default_factory=dict)  # per stage
    model: dict[str, Any] = field(default_factory=dict)  # name, version, sha256
    input: dict[str, Any] = field(default_factory=dict)  # path, fingerprint, shape, mode, ...
    settings: dict[str, Any] = field(default_factory=dict)
    # The tilt series' name, for the STAR files (core.star.tilt_series_name); "": the stem.
    tilt_series_name: str = ""
    # Per-class probability maps to write (STEM_<class>_prob.mrc), when asked for.
    probabilities: ProbabilityMaps | None = None
    # The specimen slab (core.specimen_mask) on this tomogram's canonical field; None when
    # not measured (a result from before it). `beam_axis`: the input's thin axis, to write
    # the mask in the file's own axis order.
    specimen: SpecimenSlab | None = None
    beam_axis: int = 0
    # What was cleared or dropped outside the slab: {"voxels" (model grid), "particles",
    # "filament_points": {class: count}}; empty when the mask was off.
    outside_specimen: dict[str, dict[str, int]] = field(default_factory=dict)
    # Extra summary entries (a repick's record of what it changed).
    summary_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def masks_specimen(self) -> bool:
        """Whether the outputs were masked to the specimen (and STEM_specimen_mask.mrc is
        written): a slab was measured and the run asked for it."""
        return self.specimen is not None and bool(self.settings.get("specimen_mask"))

    def specimen_mask(self) -> np.ndarray:
        """The slab as int8 on the input grid, in the file's axis order (1 inside)."""
        assert self.specimen is not None
        mask = self.specimen.mask(canonical_shape(self.labels.shape, self.beam_axis))
        return from_canonical(mask, self.beam_axis)

    def class_index(self, name: str) -> int:
        for i, spec in enumerate(self.classes):
            if spec.name == name:
                return i + 1
        raise KeyError(name)
