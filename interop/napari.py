"""A napari reader for a tomolive result folder (`napari OUT/TS_01`).

Layers, all in the input tomogram's voxel grid scaled to Ångström (the summary's voxel size):
the tomogram itself when its input file is still where the summary says (memory-mapped, never
copied), the label volume with the classes' colours, one points layer per particle class
(from `STEM_particles.csv`, sized by the class diameter) and one path-shapes layer per
filament class (from `STEM_<class>.mod`, a path per traced filament). napari itself is not a
dependency: the reader returns napari's layer-data tuples from plain arrays, so it is tested
without a display (tests/test_napari_reader.py).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.classes import ClassSpec
from ..core.result_folder import read_summary, summary_path

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2's reader hook: our reader when `path` is a result folder (or a file in one)."""
    if isinstance(path, list):
        path = path[0] if len(path) == 1 else ""
    return read_result if result_folder(path) is not None else None


def result_folder(path: str | os.PathLike[str]) -> Path | None:
    """The result folder `path` is or lies in (it holds its summary), else None."""
    candidate = Path(path)
    folder = candidate if candidate.is_dir() else candidate.parent
    return folder if summary_path(folder).is_file() else None


def read_result(path: str | list[str]) -> list[LayerData]:
    if isinstance(path, list):
        path = path[0]
    folder = result_folder(path)
    if folder is None:
        raise ValueError(f"{path}: not a tomolive result folder (no NAME_summary.json)")
    summary = read_summary(folder)
    if summary is None:
        raise ValueError(f"{path}: the result's summary {summary_path(folder)} is not readable")
    stem = summary["stem"]
    scale = (float(summary["voxel_size_a"]),) * 3
    classes = [ClassSpec.from_json(spec) for spec in summary["classes"]]
    layers = _tomogram_layer(summary, scale)
    layers.append(_labels_layer(folder / f"{stem}_labels.mrc", classes, stem, scale))
    layers += _particle_layers(folder / f"{stem}_particles.csv", classes, stem, scale)
    layers += _filament_layers(folder, classes, stem, scale)
    return layers


def _tomogram_layer(summary: dict[str, Any], scale: tuple[float, ...]) -> list[LayerData]:
    import mrcfile

    source = (summary.get("input") or {}).get("path")
    if not source or not Path(source).is_file():
        return []  # moved or on another host: the results still open without it
    data = mrcfile.mmap(source, mode="r", permissive=True).data
    if list(data.shape) != list(summary["shape_zyx"]):
        return []  # not the file that was segmented any more
    return [(data, {"name": summary["stem"], "scale": scale}, "image")]


def _labels_layer(path: Path, classes: list[ClassSpec], stem: str,
                  scale: tuple[float, ...]) -> LayerData:
    import mrcfile

    data = mrcfile.mmap(path, mode="r").data
    colours = {0: "transparent", None: "transparent"}
    colours.update({index: spec.color for index, spec in enumerate(classes, start=1)})
    features = {"class": ["background", *[spec.name for spec in classes]]}
    return (data, {"name": f"{stem} labels", "scale": scale, "colormap": colours,
                   "features": features}, "labels")


def _particle_layers(path: Path, classes: list[ClassSpec], stem: str,
                     scale: tuple[float, ...]) -> list[LayerData]:
    rows: dict[str, list[list[float]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["class"], []).append(
                [float(row["z"]), float(row["y"]), float(row["x"]), float(row["score"])])
    layers = []
    for spec in classes:
        if not spec.is_particle:
            continue
        table = np.array(rows.get(spec.name, []), dtype=np.float64).reshape(-1, 4)
        diameter_px = (spec.diameter_nm or 1.0) * 10.0 / scale[0]
        layers.append((table[:, :3], {
            "name": f"{stem} {spec.name}", "scale": scale, "size": diameter_px,
            "face_color": spec.color, "features": {"score": table[:, 3]},
            "out_of_slice_display": True,
        }, "points"))
    return layers


def _filament_layers(folder: Path, classes: list[ClassSpec], stem: str,
                     scale: tuple[float, ...]) -> list[LayerData]:
    from imodmodel.models import ImodModel

    from ..core.imod import imod_xyz_to_voxels  # the inverse of how the .mod was written

    layers = []
    for spec in classes:
        if not spec.is_filament:
            continue
        path = folder / f"{stem}_{spec.name}.mod"
        objects = ImodModel.from_file(path).objects if path.is_file() else []
        paths = [imod_xyz_to_voxels(contour.points) for obj in objects
                 for contour in obj.contours if len(contour.points) >= 2]
        layers.append((paths, {
            "name": f"{stem} {spec.name}", "scale": scale, "shape_type": "path",
            "edge_color": spec.color, "edge_width": 2.0,
        }, "shapes"))
    return layers
