"""The output folder's contract, in one place: what a tomogram's result folder is called while it
is being written, what marks it complete, how to read that marker, how to recover from a
publish that was interrupted, and what the files inside it are called.

    OUT_PARENT/STEM/STEM_summary.json    a complete result (the summary is written last)
    OUT_PARENT/.STEM.tmp-XXXXXXXX/       being written (core.export)
    OUT_PARENT/.STEM.old-XXXXXXXX/       a previous result set aside for the instant between
                                         the two renames that replace it

Readers (status, the watcher, naming, claims, the napari reader, the benches) rely on these names
as much as the writer does; a second spelling of any of them would let a rename here silently
break crash recovery elsewhere, so every caller uses the functions below. No numpy, torch or
scipy here: the daemon's main process (status, session pages, metrics) imports this module.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .classes import ClassSpec

SUMMARY_SUFFIX = "_summary.json"
TEMPORARY_INFIX = ".tmp-"
SET_ASIDE_INFIX = ".old-"
TOKEN_HEX_DIGITS = 8


def summary_name(stem: str) -> str:
    """The completion marker's file name inside the folder `stem`."""
    return f"{stem}{SUMMARY_SUFFIX}"


def summary_path(folder: str | os.PathLike[str]) -> Path:
    """The completion marker of the result folder `folder` (named after the folder)."""
    folder = Path(folder)
    return folder / summary_name(folder.name)


def stem_of_summary(path: str | os.PathLike[str]) -> str | None:
    """The stem a summary file's name belongs to, None when the name is not a summary's."""
    name = os.path.basename(path)
    return name[: -len(SUMMARY_SUFFIX)] if name.endswith(SUMMARY_SUFFIX) else None


def new_token() -> str:
    return uuid.uuid4().hex[:TOKEN_HEX_DIGITS]


def temporary_folder_name(stem: str, token: str) -> str:
    return f".{stem}{TEMPORARY_INFIX}{token}"


def set_aside_folder_name(stem: str, token: str) -> str:
    return f".{stem}{SET_ASIDE_INFIX}{token}"


def longest_folder_name(stem: str) -> str:
    """The longest folder name the contract makes for `stem` (for name-length checks)."""
    return temporary_folder_name(stem, "0" * TOKEN_HEX_DIGITS)


def is_unfinished_name(name: str) -> bool:
    """A temporary or set-aside folder's name: a publish in progress, or one a crash left."""
    return name.startswith(".") and (TEMPORARY_INFIX in name or SET_ASIDE_INFIX in name)


def read_summary(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed summary of the result folder `folder`; None when it is absent or not a JSON
    object (a torn or foreign file is not a completion marker). Other OSErrors (permission, I/O)
    propagate: they say nothing about whether the result is complete."""
    try:
        summary = json.loads(summary_path(folder).read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def summary_number(value: Any) -> float | None:
    """A value read from a summary as a finite float; None when it is absent, not a number,
    NaN or infinite (summaries are files anyone can write: readers never trust their types)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def recover_interrupted_publish(out_parent: str | os.PathLike[str], stem: str) -> None:
    """Undo what a writer killed mid-publish left for `stem` under `out_parent`.

    A set-aside previous result is put back when no new one took its place (the writer died
    between the two renames) and deleted otherwise; temporary folders are deleted. Call it only
    while no other writer can be publishing `stem` (the daemon holds the tomogram's lease).
    """
    out_parent = Path(out_parent)
    if not out_parent.is_dir():
        return
    final = out_parent / stem
    pattern = glob.escape(f".{stem}")
    for old in sorted(out_parent.glob(f"{pattern}{SET_ASIDE_INFIX}*")):
        if not final.exists():
            old.rename(final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in out_parent.glob(f"{pattern}{TEMPORARY_INFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def is_done(out_folder: str | os.PathLike[str], model_sha256: str | None,
            fingerprint: str) -> bool:
    """Done: the summary exists and names this input fingerprint (core.fingerprint) and,
    unless `model_sha256` is None, this model."""
    summary = read_summary(out_folder)
    if summary is None:
        return False
    if (summary.get("input") or {}).get("fingerprint") != fingerprint:
        return False
    return model_sha256 is None or (summary.get("model") or {}).get("sha256") == model_sha256


# ---- the files inside a result folder ---------------------------------------------------------

# Frames of the sweep through z (STEM_sweep.webp); which planes they are is `sweep_planes`.
SWEEP_FRAMES = 24


def output_file_names(stem: str, classes: list[ClassSpec],
                      probability_classes: tuple[str, ...] = (), specimen_mask: bool = False
                      ) -> dict[str, str]:
    """Output key -> file name, in writing order (the summary is always last)."""
    names = {"labels": f"{stem}_labels.mrc"}
    if specimen_mask:
        names["specimen_mask"] = f"{stem}_specimen_mask.mrc"
    for name in probability_classes:
        names[f"prob:{name}"] = probability_file_name(stem, name)
    for spec in classes:
        if spec.is_filament:
            names[f"mask:{spec.name}"] = f"{stem}_{spec.name}_mask.mrc"
    for spec in classes:
        if spec.is_particle:
            names[f"star:{spec.name}"] = f"{stem}_{spec.name}.star"
    names["particles_csv"] = f"{stem}_particles.csv"
    for spec in classes:
        if spec.is_filament:
            names[f"filaments:{spec.name}"] = f"{stem}_{spec.name}_filaments.star"
    for spec in classes:
        if spec.is_particle or spec.is_filament:
            names[f"imod:{spec.name}"] = f"{stem}_{spec.name}.mod"
    names["preview"] = f"{stem}_preview.png"
    names["sweep"] = f"{stem}_sweep.webp"
    names["sweep_planes"] = f"{stem}_sweep_planes.webp"
    names["sweep_labels"] = f"{stem}_sweep_labels.png"
    names["summary"] = summary_name(stem)
    return names


def probability_file_name(stem: str, class_name: str) -> str:
    """A class's probability map (core.probability_maps)."""
    return f"{stem}_{class_name}_prob.mrc"


def output_paths(out_parent: str | Path, stem: str, classes: list[ClassSpec],
                 probability_classes: tuple[str, ...] = (), specimen_mask: bool = False
                 ) -> dict[str, Path]:
    """Every file `core.export.write_outputs` writes for `stem`, keyed 'labels',
    'specimen_mask' (when the run masked the specimen), 'prob:<class>' (the
    `probability_classes` asked for), 'mask:<class>', 'star:<class>', 'particles_csv',
    'filaments:<class>', 'imod:<class>', 'preview', 'sweep', 'sweep_planes', 'sweep_labels',
    'summary'."""
    folder = Path(out_parent) / stem
    return {key: folder / name for key, name in
            output_file_names(stem, classes, probability_classes, specimen_mask).items()}


# The longest name a file system takes for one path component (ext4, XFS, NFS, Lustre, ...).
NAME_MAX_BYTES = 255


def check_output_names(input_path: str | Path, stem: str, classes: list[ClassSpec]) -> None:
    """Raise ValueError naming the input when an output name would be too long to create:
    found before reading the tomogram, not as `[Errno 36]` about a temporary file after it."""
    # The temporary and the set-aside folders are longer than the stem (above);
    # every class's probability map counts, whether asked for or not.
    all_maps = tuple(spec.name for spec in classes)
    names = [*output_file_names(stem, classes, all_maps, specimen_mask=True).values(),
             longest_folder_name(stem)]
    longest = max(names, key=lambda name: len(os.fsencode(name)))
    size = len(os.fsencode(longest))
    if size > NAME_MAX_BYTES:
        allowed = NAME_MAX_BYTES - (size - len(os.fsencode(stem)))
        raise ValueError(f"{input_path}: file name too long for its outputs: "
                         f"{len(os.fsencode(stem))}-byte stem, at most {allowed} bytes fit "
                         f"({size}-byte output names; the limit is {NAME_MAX_BYTES}); "
                         "rename the file")


def sweep_planes(nz: int, frames: int = SWEEP_FRAMES) -> list[int]:
    """The z planes a sweep shows: `frames` evenly spaced ones (every plane when fewer)."""
    if nz <= frames:
        return list(range(nz))
    # np.linspace's points, i * ((nz - 1) / (frames - 1)), in plain Python: the daemon's main
    # process (the session page) names the planes without numpy.
    step = (nz - 1) / (frames - 1)
    return sorted({int(round(i * step)) for i in range(frames)})
