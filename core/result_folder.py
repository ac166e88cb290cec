"""The output folder's contract, in one place: what a tomogram's result folder is called while it
is being written, what marks it complete, how to read that marker, and how to recover from a
publish that was interrupted.

    OUT_PARENT/STEM/STEM_summary.json    a complete result (the summary is written last)
    OUT_PARENT/.STEM.tmp-XXXXXXXX/       being written (core.export)
    OUT_PARENT/.STEM.old-XXXXXXXX/       a previous result set aside for the instant between
                                         the two renames that replace it

Readers (status, the watcher, naming, claims, the napari reader, the benches) rely on these names
as much as the writer does; a second spelling of any of them would let a rename here silently
break crash recovery elsewhere, so every caller uses the functions below.
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
