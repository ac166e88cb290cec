"""Which output folder belongs to which input file (`output_dir/REL/STEM/`, README "Output files").

A tomogram's outputs go to a folder named after its stem: `TS_01.mrc` -> `TS_01/`. Two inputs
in one folder may share a stem (`TS_01.mrc` beside `TS_01.rec`, as reconstruction and a
re-exported copy leave them); then each keeps its extension (`TS_01_mrc/`, `TS_01_rec/`) so
that neither overwrites the other's result, lease or failure record. A folder that already
holds this input's result keeps its name, so a sibling that arrives later never renames, and
so never re-segments, a finished tomogram; and a result that belongs to another input is never
taken over.

The folder name is also the lease and failure-record key (`leases.lease_key`), so the daemon,
`tomolive status`, batch jobs and `tomolive segment` all call `output_stem`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..core.result_folder import read_summary
from .config import DEFAULT_PATTERNS, patterns_regex


def output_stem(path: Path, out_parent: Path | None,
                patterns: Sequence[str] = DEFAULT_PATTERNS) -> str:
    """The name of `path`'s output folder under `out_parent` (None: no results known).
    `patterns`: the watched folder's file patterns, which say what counts as a sibling input."""
    bare = path.stem
    if not path.suffix:
        return bare
    qualified = f"{bare}_{path.suffix[1:]}"
    if out_parent is not None:
        if _result_owner(out_parent / qualified) == path.name:
            return qualified  # named while a sibling existed; the sibling may be gone now
        owner = _result_owner(out_parent / bare)
        if owner is not None:
            return bare if owner == path.name else qualified
    return qualified if _has_sibling_input(path, patterns) else bare


def _result_owner(folder: Path) -> str | None:
    """The file name of the input whose result `folder` holds, None when it holds none."""
    if not folder.is_dir():  # the common case, and one stat: no summary to open
        return None
    try:
        summary = read_summary(folder)
    except OSError:  # unreadable: claim nothing about it, and take no other input's name
        return None
    source = (summary.get("input") or {}).get("path") if summary is not None else None
    return os.path.basename(source) if isinstance(source, str) and source else None


def _has_sibling_input(path: Path, patterns: Sequence[str]) -> bool:
    """Another file beside `path`, with its stem, that the patterns would pick up. Probes the
    names `*.EXT` patterns imply (a few stats) rather than listing the folder, which on a
    backlog of thousands of files would cost a listing per file."""
    literal, wildcard = [], []
    for pattern in patterns:
        rest = pattern[2:] if pattern.startswith("*.") else None
        if rest and not any(ch in rest for ch in "*?["):
            literal.extend({rest, rest.lower(), rest.upper()})
        else:
            wildcard.append(pattern)
    names = {f"{path.stem}.{ext}" for ext in literal}
    if wildcard:
        matches = patterns_regex(tuple(wildcard)).match
        try:
            prefix = path.stem + "."
            names.update(n for n in os.listdir(path.parent)
                         if n.startswith(prefix) and matches(n))
        except OSError:
            pass
    names.discard(path.name)
    return any(_is_other_file(path, path.parent / name) for name in names
               if not name.startswith("."))


def _is_other_file(path: Path, other: Path) -> bool:
    try:  # samefile: on a case-insensitive filesystem TS_01.MRC may be TS_01.mrc itself
        return other.is_file() and not os.path.samefile(path, other)
    except OSError:
        return False
