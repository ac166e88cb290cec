"""One STAR file per class for a whole session: `tomolive star-combine DIR` gathers the rows
of every finished tomogram's particle and filament STAR files below DIR (an output folder, or
one session's folder in it) into `DIR/<class>_particles.star` and `DIR/<class>_filaments.star`,
which RELION 5 and WarpTools import in one go. Rows keep their `rlnTomoName`, so every row still
says which tomogram it is from; filament tube ids are per tomogram, as RELION reads them.

Built on demand from the per-tomogram files (the truth), not kept up to date by the daemon:
reading thousands of files takes seconds, which a command may take and a publish may not.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..core.atomic import atomic_write_text
from ..core.classes import ClassSpec
from ..core.result_folder import output_paths, read_summary
from ..core.star import StarError, combined_star_text, star_columns
from .status import summary_paths


def combine_session_stars(folder: Path) -> dict[Path, int]:
    """Write the combined STAR files of `folder`; returns {file written: rows}. A result
    whose STAR file is missing or unreadable raises StarError naming it: a combined file that
    silently lacked a tomogram would be worse than none."""
    tables: dict[str, list] = defaultdict(list)
    for marker in sorted(summary_paths(folder)):
        result = marker.parent
        summary = read_summary(result)
        if summary is None:
            continue  # being replaced right now: its new summary will say what it holds
        classes = [ClassSpec.from_json(spec) for spec in summary.get("classes", [])]
        for key, path in output_paths(result.parent, result.name, classes).items():
            kind, _, name = key.partition(":")
            if kind not in ("star", "filaments"):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as error:
                raise StarError(f"{path}: cannot read ({error.strerror or error})") from None
            out_name = f"{name}_particles.star" if kind == "star" else f"{name}_filaments.star"
            tables[out_name].append(star_columns(text, str(path)))
    written = {}
    for out_name, found in sorted(tables.items()):
        target = folder / out_name
        atomic_write_text(target, combined_star_text(found, str(target)))
        written[target] = sum(len(next(iter(columns.values()), [])) for _, columns in found)
    return written
