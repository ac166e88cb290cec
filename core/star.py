"""STAR and CSV: the coordinate tables tomolive writes for subtomogram averaging and reads
back for scoring, in one place so that every writer and reader agrees on columns and units.

Coordinates: tables hold float (z, y, x) voxel positions on the input grid; files use x, y, z.
STAR files are RELION 5 style (`data_particles`, `rlnTomoName`, `rlnCoordinateX/Y/Z` in pixels
= the same 0-based voxel indices as the CSV, and `rlnCenteredCoordinateX/Y/ZAngst` =
(coordinate - size / 2) * voxel size). Filament points carry `rlnHelicalTubeID` (1-based per
filament), `rlnHelicalTrackLengthAngst`, and `rlnAngleTilt`/`rlnAnglePsi` that put the particle's
Z axis along the filament (RELION's helical convention; the twist `rlnAngleRot` is left out):
direction (x, y, z) = (-sin(tilt) cos(psi), sin(tilt) sin(psi), cos(tilt)).
The CSV is `class,x,y,z[,score]` in the same voxel indices.

Names: `rlnTomoName` is the tilt series' name, which RELION 5's tomograms.star and Warp's
`.tomostar` files use, not the output folder's: `tilt_series_name` takes it from the input file's
name (Warp(Tools) writes reconstructions as `TS_01_10.00Apx.mrc`: the tilt series is `TS_01`),
through a configurable pattern. `rlnMicrographName` is `NAME.tomostar`, what WarpTools'
`ts_export_particles` matches rows to tilt series by; `rlnDetectorPixelSize` is the pixel size
(Å) of the pixel coordinates, what `--coords_angpix` must be given as.

Text in, text out: the callers write it (core.export fsyncs it into the folder it publishes).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # types only: the daemon's main process reads STAR files without scipy
    from .filaments import Filament
    from .particles import ParticleTable

STAR_VERSION = "# version 50001"  # RELION 5
ParticleTables = dict[str, np.ndarray]  # class name -> [n, 3] float64 x, y, z


class ParticleCsvError(ValueError):
    """A particle table that cannot be read; the message starts with the file's path."""


def star_text(block: str, columns: dict[str, list[str]]) -> str:
    """One STAR data block with one loop; `columns` maps each label to its values as text."""
    lines = [STAR_VERSION, "", f"data_{block}", "", "loop_"]
    lines += [f"_{name} #{i}" for i, name in enumerate(columns, start=1)]
    lines += [" ".join(row) for row in zip(*columns.values(), strict=True)]
    return "\n".join(lines) + "\n\n"


# A STAR value that starts like this would be read as syntax, not as a string.
_STAR_RESERVED_STARTS = ("_", "#", "$", "'", '"', ";", "data_", "loop_", "save_", "global_",
                         "stop_")


def star_string(value: str) -> str:
    """A string as one STAR value: control characters (a newline would end the row) and
    quotes (which STAR readers disagree on) become `_`; quoted when it holds whitespace or
    would otherwise read as syntax."""
    value = "".join(c if c.isprintable() and c not in "'\"" else "_" for c in value)
    if value and not any(c.isspace() for c in value) and \
            not value.lower().startswith(_STAR_RESERVED_STARTS):
        return value
    return f'"{value}"'


def _fmt(values: np.ndarray, digits: int) -> list[str]:
    return [f"{v:.{digits}f}" for v in np.asarray(values, dtype=np.float64)]


# Warp(Tools)' reconstruction names: the tilt series, then the pixel size (TS_01_10.00Apx).
WARP_RECONSTRUCTION_NAME = r"^(?P<name>.+?)_\d+(?:\.\d+)?Apx$"


def tilt_series_name(input_stem: str, pattern: str | None = WARP_RECONSTRUCTION_NAME) -> str:
    """The name of the tilt series a tomogram was reconstructed from: the `name` group of
    `pattern` (a regular expression) matched against the input file's stem, or the stem when
    it does not match (or `pattern` is None)."""
    found = re.fullmatch(pattern, input_stem) if pattern else None
    return found.group("name") if found and found.group("name") else input_stem


def check_name_pattern(pattern: str) -> str:
    """`pattern` if it is a regular expression with a `name` group, else ValueError."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"not a regular expression ({error})") from None
    if "name" not in compiled.groupindex:
        raise ValueError("needs a group (?P<name>...) for the tilt series' name")
    return pattern


def _coordinate_columns(
    zyx: np.ndarray, tomo_name: str, shape_zyx: tuple[int, ...], voxel_size_a: float
) -> dict[str, list[str]]:
    columns = {"rlnTomoName": [star_string(tomo_name)] * len(zyx),
               "rlnMicrographName": [star_string(f"{tomo_name}.tomostar")] * len(zyx)}
    for axis, k in (("X", 2), ("Y", 1), ("Z", 0)):
        columns[f"rlnCoordinate{axis}"] = _fmt(zyx[:, k], 3)
    for axis, k in (("X", 2), ("Y", 1), ("Z", 0)):
        centred = (zyx[:, k] - shape_zyx[k] / 2.0) * voxel_size_a
        columns[f"rlnCenteredCoordinate{axis}Angst"] = _fmt(centred, 3)
    columns["rlnDetectorPixelSize"] = [f"{voxel_size_a:.4f}"] * len(zyx)
    return columns


def particle_star_text(
    table: ParticleTable, tomo_name: str, shape_zyx: tuple[int, ...], voxel_size_a: float
) -> str:
    """One particle class as a RELION 5 style STAR file (block `particles`)."""
    columns = _coordinate_columns(table.zyx, tomo_name, shape_zyx, voxel_size_a)
    columns["rlnAutopickFigureOfMerit"] = _fmt(table.score, 5)
    for name, values in table.context.items():  # core.context's columns
        columns[CONTEXT_STAR_LABELS[name]] = _context_text(name, values)
    return star_text("particles", columns)


# core.context's columns in STAR files: RELION keeps labels it does not know.
CONTEXT_STAR_LABELS = {"membrane_distance_nm": "tomoliveMembraneDistanceNm",
                       "specimen_surface_distance_nm": "tomoliveSpecimenSurfaceDistanceNm",
                       "compartment": "tomoliveCompartment"}


def _context_text(name: str, values: np.ndarray) -> list[str]:
    if name == "compartment":
        return [str(int(v)) for v in values]
    return ["nan" if not math.isfinite(float(v)) else f"{float(v):.2f}" for v in values]


def particle_csv_text(rows: Iterable[Sequence[object]], with_score: bool = True,
                      context: Sequence[str] = ()) -> str:
    """`class,x,y,z[,score][,context...]` from rows (class, x, y, z[, score][, context...]) in
    0-based voxel indices; `context` names core.context's columns the rows carry."""
    lines = [",".join(["class", "x", "y", "z", *(["score"] if with_score else []), *context])]
    for row in rows:
        name, x, y, z = row[:4]
        cells = [str(name), f"{float(x):.3f}", f"{float(y):.3f}", f"{float(z):.3f}"]
        if with_score:
            cells.append(f"{float(row[4]):.5f}")
        rest = row[5:] if with_score else row[4:]
        cells += [_context_text(column, np.array([value]))[0]
                  for column, value in zip(context, rest, strict=True)]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def table_rows(tables: Iterable[ParticleTable], context: Sequence[str] = ()
               ) -> Iterable[tuple[object, ...]]:
    """(class, x, y, z, score, *context) for every particle of `tables`, for
    `particle_csv_text`; a table without a context column gets NaN (0 for a compartment)."""
    for table in tables:
        columns = [table.context.get(name, np.full(len(table), 0 if name == "compartment"
                                                   else math.nan)) for name in context]
        for i, ((z, y, x), score) in enumerate(zip(table.zyx, table.score, strict=True)):
            yield (table.class_name, x, y, z, score, *(values[i] for values in columns))


def relion_tilt_psi_deg(directions_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RELION tilt and psi (degrees) that align a particle's Z axis with each unit direction."""
    d = np.asarray(directions_zyx, dtype=np.float64)
    dz, dy, dx = d[:, 0], d[:, 1], d[:, 2]
    tilt = np.degrees(np.arccos(np.clip(dz, -1.0, 1.0)))
    psi = np.degrees(np.arctan2(dy, -dx))
    return tilt, psi


def filament_star_text(
    filaments: list[Filament],
    tomo_name: str,
    shape_zyx: tuple[int, ...],
    voxel_size_a: float,
) -> str:
    """Points along every filament of one class, one `rlnHelicalTubeID` (1-based) per filament."""
    zyx = np.concatenate([f.points_zyx for f in filaments]) if filaments else np.zeros((0, 3))
    dirs = np.concatenate([f.directions_zyx for f in filaments]) if filaments else np.zeros((0, 3))
    tube = np.concatenate([np.full(len(f), i, dtype=np.int64)
                           for i, f in enumerate(filaments, start=1)] or [np.zeros(0, np.int64)])
    track = np.concatenate([_track_length(f.points_zyx) for f in filaments] or [np.zeros(0)])
    columns = _coordinate_columns(zyx, tomo_name, shape_zyx, voxel_size_a)
    columns["rlnHelicalTubeID"] = [str(int(t)) for t in tube]
    columns["rlnHelicalTrackLengthAngst"] = _fmt(track * voxel_size_a, 2)
    tilt, psi = relion_tilt_psi_deg(dirs)
    columns["rlnAngleTilt"] = _fmt(tilt, 3)
    columns["rlnAnglePsi"] = _fmt(psi, 3)
    return star_text("particles", columns)


def _track_length(points_zyx: np.ndarray) -> np.ndarray:
    steps = np.linalg.norm(np.diff(points_zyx, axis=0), axis=1)
    return np.concatenate([[0.0], np.cumsum(steps)])


class StarError(ValueError):
    """A STAR file that is not one loop of tomolive's own form; the message names the file."""


def star_columns(text: str, source: str = "STAR text") -> tuple[str, dict[str, list[str]]]:
    """(block name, label -> values as text) of a single-loop STAR text as `star_text` writes
    it; a value in double quotes keeps its spaces. Raises StarError for anything else."""
    block, labels, rows = None, [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#") or line == "loop_":
            continue
        if line.startswith("data_"):
            if block is not None:
                raise StarError(f"{source}: line {number}: a second data block")
            block = line[len("data_"):]
        elif line.startswith("_"):
            if rows:
                raise StarError(f"{source}: line {number}: a label after the rows")
            labels.append(line[1:].split()[0])
        else:
            values = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', line)]
            if len(values) != len(labels):
                raise StarError(f"{source}: line {number}: {len(values)} values for "
                                f"{len(labels)} labels")
            rows.append(values)
    if block is None or not labels:
        raise StarError(f"{source}: not a STAR loop (no data block or no labels)")
    return block, {label: [row[i] for row in rows] for i, label in enumerate(labels)}


def combined_star_text(tables: list[tuple[str, dict[str, list[str]]]], source: str) -> str:
    """One STAR text holding the rows of every (block, columns) table, which must all have the
    same block and labels (tomolive's files of one kind and version). The one difference
    allowed is the context columns (CONTEXT_STAR_LABELS), which results from before them lack:
    the combined table then keeps them only if every table has them."""
    if not tables:
        raise StarError(f"{source}: nothing to combine")
    block, first = tables[0]
    context = set(CONTEXT_STAR_LABELS.values())
    shared = [label for label in first if all(label in columns for _, columns in tables)]
    core_labels = [label for label in first if label not in context]
    combined: dict[str, list[str]] = {label: [] for label in shared}
    for other_block, columns in tables:
        if other_block != block or [label for label in columns if label not in context] \
                != core_labels:
            raise StarError(f"{source}: tables differ in block or labels "
                            f"({other_block}: {', '.join(columns)})")
        for label in shared:
            combined[label] += [star_string(v) for v in columns[label]]
    return star_text(block, combined)


def read_particle_csv(path: str | os.PathLike) -> ParticleTables:
    """Read a `class,x,y,z[,score]` table (extra columns after z are ignored)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as error:
        raise ParticleCsvError(f"{path}: cannot read particle table: "
                               f"{error.strerror or error}") from error
    except (UnicodeDecodeError, csv.Error) as error:
        raise ParticleCsvError(f"{path}: not a CSV text file ({error})") from error
    if not rows:
        raise ParticleCsvError(f"{path}: empty file, expected a header 'class,x,y,z'")
    header = [h.strip().lower() for h in rows[0]]
    if header[:4] != ["class", "x", "y", "z"]:
        raise ParticleCsvError(f"{path}: header is {','.join(rows[0])!r}, expected it to start "
                               f"with 'class,x,y,z'")
    tables: dict[str, list[tuple[float, float, float]]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 4 or len(row) > len(header):
            raise ParticleCsvError(f"{path}: line {line_no} has {len(row)} columns, "
                                   f"expected {len(header)}")
        try:
            xyz = tuple(float(v) for v in row[1:4])
        except ValueError:
            raise ParticleCsvError(f"{path}: line {line_no}: x, y, z must be numbers, got "
                                   f"{','.join(row[1:4])!r}") from None
        if not all(math.isfinite(v) for v in xyz):
            raise ParticleCsvError(f"{path}: line {line_no}: coordinates are not finite")
        name = row[0].strip()
        if not name:
            raise ParticleCsvError(f"{path}: line {line_no}: empty class name")
        tables.setdefault(name, []).append(xyz)
    return {k: np.array(v, dtype=np.float64).reshape(-1, 3) for k, v in tables.items()}
