"""One call, one tomogram: `segment(volume, bundle, options) -> Segmentation`.

The data flow is one way (docs/architecture.md): the input is memory-mapped, rescaled to the
model's grid slab by slab, preprocessed with the bundle's own recipe, predicted, cleaned up and
turned into particles and filaments on the (smaller) model grid; only the label volume and the
coordinates are mapped back to the input grid and the file's own axis order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .classes import ClassSpec
from .cleanup import clean_labels
from .context import add_particle_context
from .decision import check_class_values, threshold_vector
from .export import write_outputs
from .filaments import Filament, trace_filaments
from .fingerprint import input_fingerprint
from .infer import InferenceOptions, Prediction, predict, prepare_network
from .model import ModelBundle
from .particles import ParticleTable, find_particles
from .preprocess import apply_recipe
from .probability_maps import ModelGridMaps
from .quality import adjacent_slice_snr, class_statistics
from .resample import GridMap, fourier_rescale, grid_for, labels_to_input_refined
from .result_folder import check_output_names
from .segmentation import Segmentation
from .specimen_mask import SpecimenSlab, clear_outside, find_specimen
from .stages import Progress
from .star import WARP_RECONSTRUCTION_NAME, tilt_series_name
from .volume import (
    DEFAULT_MAX_MODEL_VOXELS,
    DEFAULT_VOXEL_SIZE_BOUNDS_A,
    Volume,
    from_canonical,
    read_mrc,
    release_pages,
    swap_zyx_columns,
    thin_axis,
    to_canonical,
)

# The confidence signal ignores this fraction of slices at the top and the bottom of the
# volume: they are mostly empty ice and reconstruction artefacts, where any model is unsure.
_CONFIDENCE_Z_MARGIN = 0.25


@dataclass
class SegmentOptions:
    """What a caller may choose per run; everything scientific comes from the bundle."""

    inference: InferenceOptions = field(default_factory=InferenceOptions)
    voxel_size_a: float | None = None  # overrides a header that lies
    # Plausibility: a voxel size outside these bounds (Å), or a model grid of more voxels, is
    # refused with a one-line error before anything is allocated.
    voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A
    max_model_voxels: int = DEFAULT_MAX_MODEL_VOXELS
    # How the STAR files name the tilt series (core.star.tilt_series_name), from the input's
    # stem; None: the stem as it is.
    tilt_series_pattern: str | None = WARP_RECONSTRUCTION_NAME
    # The decision rule (core.decision): per class, the probability a voxel needs to be that
    # class; classes not named beat the background (the argmax).
    thresholds: dict[str, float] = field(default_factory=dict)
    # Cleanup and tracing per class, overriding the bundle's (nm^3 and nm).
    min_size_nm3: dict[str, float] = field(default_factory=dict)
    min_length_nm: dict[str, float] = field(default_factory=dict)
    # STEM_<class>_prob.mrc for every class (True) or the named ones: soft maps to look at,
    # and what `tomolive repick` re-thresholds (it needs every class). One byte per voxel and
    # class is held on the model grid until they are written.
    save_probabilities: bool | tuple[str, ...] = False
    # Clear what the network called outside the specimen slab (core.specimen_mask), except
    # fiducials, and write STEM_specimen_mask.mrc. The slab is measured (thickness, tilt) and
    # recorded either way. Off by default: on the validation tomograms, whose specimen fills
    # the volume, the slab found cut 20-31 % of the labelled voxels (docs/specimen_mask.md).
    specimen_mask: bool = False

    def to_json(self) -> dict[str, Any]:
        inference = self.inference
        return {
            "device": str(inference.device),
            "batch_size": inference.batch_size,
            "tile_size_px": inference.tile_size_px,
            "tta_flips": inference.tta_flips,
            "precision": inference.precision,
            "precision_used": _precision_used(inference),
            "voxel_size_override_a": self.voxel_size_a,
            "voxel_size_bounds_a": list(self.voxel_size_bounds_a),
            "max_model_voxels": self.max_model_voxels,
            "tilt_series_pattern": self.tilt_series_pattern,
            "thresholds": dict(self.thresholds),
            "min_size_nm3": dict(self.min_size_nm3),
            "min_length_nm": dict(self.min_length_nm),
            "save_probabilities": (self.save_probabilities
                                   if isinstance(self.save_probabilities, bool)
                                   else list(self.save_probabilities)),
            "specimen_mask": self.specimen_mask,
        }

    def classes_for(self, classes: list[ClassSpec]) -> list[ClassSpec]:
        """The bundle's classes with this run's cleanup overrides; ValueError (one line) for
        an unknown class, a negative size or a length asked of a class that is no filament."""
        check_class_values(self.min_size_nm3, classes, "min-size", low=0.0)
        check_class_values(self.min_length_nm, classes, "min-length", low=0.0,
                           kinds=("filament",))
        return [replace(spec, **({"min_component_nm3": self.min_size_nm3[spec.name]}
                                 if spec.name in self.min_size_nm3 else {}),
                        **({"min_length_nm": self.min_length_nm[spec.name]}
                           if spec.name in self.min_length_nm else {}))
                for spec in classes]

    def probability_classes(self, classes: list[ClassSpec]) -> tuple[str, ...]:
        """The classes whose maps to write, in output order; ValueError for an unknown name."""
        if self.save_probabilities is True:
            return tuple(spec.name for spec in classes)
        if not self.save_probabilities:
            return ()
        asked = set(self.save_probabilities)
        check_class_values(dict.fromkeys(asked, 1.0), classes, "save-probabilities", low=0.0)
        return tuple(spec.name for spec in classes if spec.name in asked)


class StageTimer:
    """Wall-clock seconds per stage, accumulated into a dict."""

    def __init__(self, timings_s: dict[str, float]) -> None:
        self.timings_s = timings_s

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings_s[name] = self.timings_s.get(name, 0.0) + elapsed


def segment(
    volume: Volume,
    bundle: ModelBundle,
    options: SegmentOptions | None = None,
    *,
    network: Any = None,
    progress: Progress | None = None,
    stem: str | None = None,
    timings_s: dict[str, float] | None = None,
) -> Segmentation:
    """Segment one tomogram with one model bundle.

    `network` is the bundle's prepared network (`infer.prepare_network`); pass it to reuse one
    across tomograms, otherwise it is built here. `timings_s` may carry stages measured by the
    caller (the read).
    """
    options = options or SegmentOptions()
    timings_s = dict(timings_s or {})
    timer = StageTimer(timings_s)
    meta = bundle.meta
    model_voxel_a = float(meta.voxel_size_a)
    # Options that name classes are checked before any work.
    classes = options.classes_for(list(bundle.classes))
    names = [spec.name for spec in classes]
    thresholds = threshold_vector(classes, options.thresholds)
    saved = options.probability_classes(classes)
    beam_axis = thin_axis(volume.data.shape)
    canonical = to_canonical(volume.data, beam_axis)

    with timer.stage("rescale"):
        try:
            grid = grid_for(canonical.shape, volume.voxel_size_a, model_voxel_a,
                            options.max_model_voxels)
        except ValueError as error:
            raise ValueError(f"{volume.path or 'tomogram'}: {error}") from None
        model_data = fourier_rescale(canonical, grid, device=_device_name(options))
        snr_estimate = adjacent_slice_snr(model_data)  # before preprocessing filters it
    with timer.stage("specimen"):
        specimen = find_specimen(model_data, tuple(
            v / 10.0 for v in grid.model_voxel_size_a(volume.voxel_size_a)))
    _report(progress, "rescale", 1.0)
    # The input is not needed again until the preview reads three slices: its touched pages
    # would otherwise count towards peak memory.
    release_pages(volume.data)
    with timer.stage("preprocess"):
        model_data = apply_recipe(model_data, model_voxel_a, meta.preprocess,
                                  device=_device_name(options))
    _report(progress, "preprocess", 1.0)
    with timer.stage("inference"):
        if network is None:
            network = prepare_network(bundle, options.inference.device)
        n_slices = model_data.shape[0]
        prediction = predict(
            network, model_data, meta.architecture["in_slices"], options.inference,
            progress=None if progress is None else
            (lambda done: progress("inference", done / n_slices)),
            z_edge=meta.z_edge,
            thresholds=thresholds,
            keep_probabilities=[names.index(name) + 1 for name in saved],
        )
    del model_data  # the largest float array of the run: free it before post-processing
    outputs = post_process(prediction.labels, prediction.confidence, classes, model_voxel_a,
                           grid, beam_axis, timer, progress,
                           specimen=specimen, mask_outside_specimen=options.specimen_mask)
    return Segmentation(
        stem=stem or (volume.path.stem if volume.path else "tomogram"),
        voxel_size_a=volume.voxel_size_a,
        origin_xyz_a=tuple(volume.origin_xyz_a),
        classes=list(classes),
        **outputs,
        specimen=specimen,
        beam_axis=beam_axis,
        confidence=_specimen_confidence(prediction.confidence),
        uncertain_fraction=_uncertain_fraction(prediction),
        snr_estimate=snr_estimate,
        warnings=[*(volume.header.notes if volume.header is not None else ()),
                  *cleanup_warnings(outputs["cleanup_removed_fraction"])],
        probabilities=(ModelGridMaps(saved, prediction.probabilities_u8, grid, beam_axis)
                       if saved else None),
        timings_s=timings_s,
        model=_model_record(bundle),
        input={
            "path": str(volume.path) if volume.path else None,
            "shape_zyx": list(volume.data.shape),
            "dtype": str(volume.data.dtype),
            "voxel_size_a": volume.voxel_size_a,
            "origin_xyz_a": list(volume.origin_xyz_a),
            "beam_axis": "zyx"[beam_axis],
            "model_grid_shape_zyx": list(grid.model_shape),
        },
        settings=options.to_json(),
    )


def post_process(labels: np.ndarray, confidence_u8: np.ndarray, classes: list[ClassSpec],
                 model_voxel_a: float, grid: GridMap, beam_axis: int,
                 timer: StageTimer | None = None, progress: Progress | None = None,
                 *, specimen: SpecimenSlab | None = None,
                 mask_outside_specimen: bool = False) -> dict[str, Any]:
    """Everything after the network, shared by `segment` and `core.repick`: cleanup, particles
    and filaments on the model grid (labels int8 and confidence uint8 there), then labels and
    coordinates mapped to the input grid. Returns Segmentation fields: labels, particles,
    filaments, class_fractions, class_confidence, cleanup_removed_fraction, outside_specimen.
    `labels` is cleaned in place. `specimen`, the slab (core.specimen_mask), gives the
    particles their distance to its surfaces; with `mask_outside_specimen`, what the network
    called outside it is cleared first (fiducials exempt: gold sits on the surfaces) and no
    particle or filament point outside it is reported."""
    timer = timer or StageTimer({})
    removed_fraction: dict[str, float] = {}
    outside: dict[str, dict[str, int]] = {}
    masking = specimen is not None and mask_outside_specimen
    if masking:
        with timer.stage("specimen"):
            outside["voxels"] = _clear_outside_specimen(labels, specimen, classes)
    with timer.stage("cleanup"):
        labels = clean_labels(labels, classes, model_voxel_a, removed_fraction)
    _report(progress, "cleanup", 1.0)
    with timer.stage("particles"):
        particles = {
            spec.name: find_particles(labels, confidence_u8, index + 1, spec, model_voxel_a)
            for index, spec in enumerate(classes) if spec.is_particle
        }
        if masking:
            particles, outside["particles"] = _particles_inside(particles, specimen, classes,
                                                                labels.shape)
        particles = add_particle_context(particles, labels, classes, model_voxel_a, specimen)
    _report(progress, "particles", 1.0)
    with timer.stage("filaments"):
        filaments = {
            spec.name: trace_filaments(labels == index + 1, spec, model_voxel_a)
            for index, spec in enumerate(classes) if spec.is_filament
        }
        if masking:
            filaments, outside["filament_points"] = _filaments_inside(filaments, specimen,
                                                                      labels.shape)
    _report(progress, "filaments", 1.0)
    with timer.stage("write"):  # mapping back is part of producing the outputs
        input_grid_labels = labels_to_input_refined(labels, confidence_u8, grid)
        input_labels = np.ascontiguousarray(from_canonical(input_grid_labels, beam_axis))
    names = [spec.name for spec in classes]
    counts, mean_confidence = class_statistics(labels, confidence_u8, len(classes))
    return {
        "labels": input_labels,
        "particles": {name: _particles_to_input(table, grid, beam_axis)
                      for name, table in particles.items()},
        "filaments": {name: [filament_to_input(f, grid, beam_axis) for f in found]
                      for name, found in filaments.items()},
        "class_fractions": {name: count / max(labels.size, 1)
                            for name, count in zip(names, counts, strict=True)},
        "class_confidence": dict(zip(names, mean_confidence, strict=True)),
        "cleanup_removed_fraction": removed_fraction,
        "outside_specimen": outside,
    }


def _inside_specimen_classes(classes: list[ClassSpec]) -> list[ClassSpec]:
    """The classes that live inside the specimen: all but fiducials (gold beads sit on the
    surfaces, outside the slab)."""
    return [spec for spec in classes if spec.kind != "fiducial"]


def _clear_outside_specimen(labels: np.ndarray, specimen: SpecimenSlab,
                            classes: list[ClassSpec]) -> dict[str, int]:
    inside = _inside_specimen_classes(classes)
    values = [classes.index(spec) + 1 for spec in inside]
    cleared = clear_outside(labels, specimen, values)
    return {spec.name: cleared[value] for spec, value in zip(inside, values, strict=True)}


def _particles_inside(tables: dict[str, ParticleTable], specimen: SpecimenSlab,
                      classes: list[ClassSpec], shape_zyx: tuple[int, ...]
                      ) -> tuple[dict[str, ParticleTable], dict[str, int]]:
    """The tables without the particles whose centre lies outside the slab (fiducials kept),
    and how many were dropped per class. Labels outside are cleared already; a particle
    astride a surface can still have its centre outside."""
    inside_names = {spec.name for spec in _inside_specimen_classes(classes)}
    kept, dropped = {}, {}
    for name, table in tables.items():
        if name not in inside_names or not len(table):
            kept[name] = table
            continue
        keep = specimen.contains(table.zyx, shape_zyx)
        kept[name] = table.subset(keep)
        dropped[name] = int(len(table) - keep.sum())
    return kept, dropped


def _filaments_inside(filaments: dict[str, list[Filament]], specimen: SpecimenSlab,
                      shape_zyx: tuple[int, ...]) -> tuple[dict[str, list[Filament]],
                                                           dict[str, int]]:
    """Filaments without their points outside the slab (split where they leave it; pieces
    of fewer than two points dropped), and how many points were dropped per class."""
    kept, dropped = {}, {}
    for name, found in filaments.items():
        pieces, count = [], 0
        for filament in found:
            inside = specimen.contains(filament.points_zyx, shape_zyx)
            count += int((~inside).sum())
            pieces += [piece for piece in filament.split(inside) if len(piece) >= 2]
        kept[name], dropped[name] = pieces, count
    return kept, dropped


def segment_file(
    path: str | Path,
    out_parent: str | Path,
    bundle: ModelBundle,
    options: SegmentOptions | None = None,
    *,
    network: Any = None,
    progress: Progress | None = None,
    before_publish: Callable[[], None] | None = None,
    stem: str | None = None,
) -> tuple[Segmentation, Path]:
    """Read, segment and write one file: `out_parent/STEM/` appears whole or not at all.

    `stem`: the output folder's name (default: the file's stem; the daemon passes the name
    that keeps two inputs sharing a stem apart).

    `before_publish` runs just before the output folder is renamed into place; raising there
    (for example because a lease was lost) abandons the result without publishing it.
    """
    options = options or SegmentOptions()
    path = Path(path)
    timings_s: dict[str, float] = {}
    start = time.perf_counter()
    # Before anything is read (a test passes no bundle to prove the order).
    stem = stem or path.stem
    check_output_names(path, stem, bundle.classes if bundle is not None else [])
    fingerprint = input_fingerprint(path)
    with StageTimer(timings_s).stage("read"):
        volume = read_mrc(path, voxel_size_a=options.voxel_size_a,
                          voxel_size_bounds_a=options.voxel_size_bounds_a)
    _report(progress, "read", 1.0)
    seg = segment(volume, bundle, options, network=network, progress=progress,
                  stem=stem, timings_s=timings_s)
    seg.input["fingerprint"] = fingerprint
    # From the input's name, not the output folder's (TS_01_mrc when TS_01.rec is beside it).
    seg.tilt_series_name = tilt_series_name(path.stem, options.tilt_series_pattern)
    out_dir = write_outputs(Path(out_parent), seg, tomogram=volume.data, start_time=start,
                            before_publish=before_publish)
    _report(progress, "write", 1.0)
    return seg, out_dir


def _precision_used(inference: InferenceOptions) -> str:
    from .infer import reduced_precision_dtype, resolve_device

    dtype = reduced_precision_dtype(resolve_device(inference.device), inference.precision)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def _device_name(options: SegmentOptions) -> str:
    from .infer import resolve_device

    return str(resolve_device(options.inference.device))


def _report(progress: Progress | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


# Cleanup removing more than this share of what the network called a class is worth a line in
# the summary: the class was found but erased by size rules that do not fit this data.
_CLEANUP_WARNING_FRACTION = 0.5


def cleanup_warnings(removed_fraction: dict[str, float]) -> list[str]:
    return [f"cleanup removed {fraction:.0%} of the {name} voxels the network found "
            "(components below the class's minimum size): check its cleanup settings"
            for name, fraction in removed_fraction.items()
            if fraction > _CLEANUP_WARNING_FRACTION]


def _model_record(bundle: ModelBundle) -> dict[str, Any]:
    return {
        "name": bundle.meta.name,
        "version": bundle.meta.version,
        "sha256": bundle.sha256,
        "path": str(bundle.path) if bundle.path else None,
        "voxel_size_a": bundle.meta.voxel_size_a,
    }


def _central(per_z: np.ndarray) -> np.ndarray:
    """The central slices (the specimen) of a [z, ...] array: `_CONFIDENCE_Z_MARGIN` off each
    end, all of it when too thin for that."""
    n_z = per_z.shape[0]
    margin = int(n_z * _CONFIDENCE_Z_MARGIN)
    return per_z[margin:n_z - margin] if n_z - 2 * margin > 0 else per_z


def _specimen_confidence(confidence_u8: np.ndarray) -> float:
    """Mean max class probability over the central slices (the specimen), in 0..1."""
    return float(_central(confidence_u8).mean(dtype=np.float64) / 255.0)


def _uncertain_fraction(prediction: Prediction) -> float:
    """The model-fit signal over the central slices (core.infer.FIT_CANDIDATE_PROB): the share
    of the voxels where the model sees something at which it cannot decide; NaN when it sees
    nothing there."""
    if prediction.candidates_per_z is None or prediction.uncertain_per_z is None:
        return float("nan")
    candidates = int(_central(prediction.candidates_per_z).sum())
    uncertain = int(_central(prediction.uncertain_per_z).sum())
    return uncertain / candidates if candidates else float("nan")


def points_to_input(zyx_model: np.ndarray, grid: GridMap, beam_axis: int) -> np.ndarray:
    """Model-grid (canonical) voxel coordinates -> the input file's own voxel coordinates."""
    zyx = grid.to_input(np.asarray(zyx_model, dtype=np.float64).reshape(-1, 3))
    return swap_zyx_columns(zyx, beam_axis)


def _particles_to_input(table: ParticleTable, grid: GridMap, beam_axis: int) -> ParticleTable:
    return replace(table, zyx=points_to_input(table.zyx, grid, beam_axis))


def filament_to_input(filament: Filament, grid: GridMap, beam_axis: int) -> Filament:
    directions = np.asarray(filament.directions_zyx, dtype=np.float64).reshape(-1, 3)
    directions = directions * np.asarray(grid.scale_zyx)  # tangents stretch with the grid
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    directions = directions / np.where(norms > 0, norms, 1.0)
    return Filament(points_zyx=points_to_input(filament.points_zyx, grid, beam_axis),
                    directions_zyx=swap_zyx_columns(directions, beam_axis))
