"""Re-threshold a finished result without running the network: `tomolive repick OUT/STEM`.

The folder's probability maps (core.probability_maps; written by `segment
--save-probabilities`, every class) are brought back to the model grid the summary names, the
decision rule is applied with new thresholds (core.decision), and cleanup, particles,
filaments and every output are redone exactly as `core.pipeline.segment` does them
(`post_process`). The new folder is published like any result (core.export): the old one stays
in place, whole, until the new one is complete. What a repick changed is recorded in the
summary under "repick"; the input fingerprint and the model stay those of the segmentation, so
a daemon treats the folder as done.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .classes import ClassSpec
from .decision import decide_saved, threshold_vector
from .export import write_outputs
from .fingerprint import input_fingerprint
from .pipeline import SegmentOptions, StageTimer, cleanup_warnings, post_process
from .probability_maps import SavedMaps, read_model_grid
from .resample import GridMap
from .result_folder import probability_file_name, read_summary, summary_number
from .segmentation import Segmentation
from .specimen_mask import SpecimenSlab
from .stages import Progress
from .volume import VolumeError, canonical_shape, read_mrc


def repick_folder(
    folder: str | Path,
    *,
    thresholds: Mapping[str, float] | None = None,
    min_size_nm3: Mapping[str, float] | None = None,
    min_length_nm: Mapping[str, float] | None = None,
    progress: Progress | None = None,
    before_publish: Callable[[], None] | None = None,
) -> tuple[Segmentation, Path]:
    """Redo `folder`'s outputs from its probability maps. Thresholds and sizes not given stay
    as the segmentation (or an earlier repick) had them. ValueError (one line, naming the
    folder or file) when the folder cannot be repicked; nothing is changed then."""
    start = time.perf_counter()
    folder = Path(folder)
    summary = _read_result(folder)
    settings = dict(summary.get("settings") or {})
    kept_thresholds = {**(settings.get("thresholds") or {}), **dict(thresholds or {})}
    options = SegmentOptions(
        thresholds=kept_thresholds,
        min_size_nm3={**(settings.get("min_size_nm3") or {}), **dict(min_size_nm3 or {})},
        min_length_nm={**(settings.get("min_length_nm") or {}), **dict(min_length_nm or {})},
        save_probabilities=True,
        specimen_mask=bool(settings.get("specimen_mask", False)))
    try:
        classes = options.classes_for([ClassSpec.from_json(c) for c in summary["classes"]])
        vector = threshold_vector(classes, options.thresholds)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None
    names = tuple(spec.name for spec in classes)
    paths = _probability_paths(folder, summary["stem"], names)
    grid, beam_axis = _grids(folder, summary)
    timings_s: dict[str, float] = {}
    timer = StageTimer(timings_s)
    with timer.stage("read"):
        values_u8 = read_model_grid(paths, names, grid, beam_axis)
    with timer.stage("decide"):
        labels, confidence = decide_saved(values_u8, vector)
    del values_u8
    specimen = _specimen(folder, summary)
    outputs = post_process(labels, confidence, classes, float(summary["model"]["voxel_size_a"]),
                           grid, beam_axis, timer, progress, specimen=specimen,
                           mask_outside_specimen=options.specimen_mask)
    seg = Segmentation(
        stem=folder.name,
        voxel_size_a=float(summary["voxel_size_a"]),
        origin_xyz_a=tuple(float(v) for v in summary["origin_xyz_a"]),  # type: ignore[arg-type]
        classes=classes,
        **outputs,
        specimen=specimen,
        beam_axis=beam_axis,
        confidence=_figure(summary, "confidence"),
        uncertain_fraction=_figure(summary, "uncertain_fraction"),
        snr_estimate=_figure(summary, "snr_estimate"),
        warnings=cleanup_warnings(outputs["cleanup_removed_fraction"]),
        timings_s=timings_s,
        model=dict(summary["model"]),
        input=dict(summary["input"]),
        settings={**settings, **{key: value for key, value in options.to_json().items()
                                 if key in ("thresholds", "min_size_nm3", "min_length_nm",
                                            "specimen_mask")}},
        tilt_series_name=str(summary.get("tilt_series_name") or ""),
        probabilities=SavedMaps(names, paths),
        summary_extra={"repick": {
            "segmented_utc": (summary.get("repick") or {}).get("segmented_utc")
            or summary.get("written_utc"),
            "thresholds": dict(options.thresholds),
            "min_size_nm3": dict(options.min_size_nm3),
            "min_length_nm": dict(options.min_length_nm),
        }},
    )
    out_dir = write_outputs(folder.parent, seg, tomogram=_preview_background(summary),
                            start_time=start, before_publish=before_publish)
    return seg, out_dir


def _read_result(folder: Path) -> dict[str, Any]:
    summary = read_summary(folder)
    if summary is None:
        raise ValueError(f"{folder}: no readable summary: not a finished tomolive result")
    needed = ("stem", "classes", "model", "input", "voxel_size_a", "origin_xyz_a")
    missing = [key for key in needed if key not in summary]
    if not missing and "model_grid_shape_zyx" not in summary["input"]:
        missing = ["input.model_grid_shape_zyx"]
    if missing:
        raise ValueError(f"{folder}: the summary lacks {', '.join(missing)} (written by an "
                         "older tomolive?): segment it again with --save-probabilities")
    return summary


def _probability_paths(folder: Path, stem: str, names: tuple[str, ...]) -> dict[str, Path]:
    paths = {name: folder / probability_file_name(stem, name) for name in names}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise ValueError(f"{folder}: no probability map for {', '.join(missing)} (repick needs "
                         "every class's: segment with --save-probabilities)")
    return paths


def _grids(folder: Path, summary: dict[str, Any]) -> tuple[GridMap, int]:
    record = summary["input"]
    try:
        beam_axis = "zyx".index(str(record.get("beam_axis", "z")))
        input_shape = canonical_shape(tuple(int(n) for n in record["shape_zyx"]), beam_axis)
        return GridMap(input_shape, tuple(record["model_grid_shape_zyx"])), beam_axis
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{folder}: the summary's input grid is unusable ({error})") from None


def _specimen(folder: Path, summary: dict[str, Any]) -> SpecimenSlab | None:
    """The slab the segmentation measured (none in results from before it was measured)."""
    record = summary.get("specimen")
    if not record:
        return None
    try:
        return SpecimenSlab.from_json(record)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{folder}: the summary's specimen record is unusable ({error})"
                         ) from None


def _preview_background(summary: dict[str, Any]) -> np.ndarray | None:
    """The input tomogram for the preview, when it is still the file that was segmented;
    otherwise the preview shows the labels on black."""
    record = summary["input"]
    path = record.get("path")
    try:
        if not path or input_fingerprint(path) != record.get("fingerprint"):
            return None
        data = read_mrc(path, voxel_size_a=float(summary["voxel_size_a"]),
                        check_finite=False).data
    except (OSError, VolumeError, ValueError):
        return None
    return data if list(data.shape) == list(summary["input"]["shape_zyx"]) else None


def _figure(summary: dict[str, Any], key: str) -> float:
    """A per-tomogram figure carried over from the summary (null there: NaN)."""
    value = summary_number(summary.get(key))
    return math.nan if value is None else value
