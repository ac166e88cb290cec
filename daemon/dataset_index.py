"""The dataset index: `OUT/index.csv` and `OUT/index.star`, one row per finished tomogram (stem,
input path, voxel size, model, counts per class, quality, confidence, seconds), for RELION, Warp
or a spreadsheet. The STAR text is core.star's."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable
from typing import Any

from ..core.star import star_string, star_text

log = logging.getLogger(__name__)

# ---- the dataset index (index.csv, index.star) ------------------------------------------------

def _class_names(rows: Iterable[dict[str, Any]], group: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        for name in row.get(group) or {}:
            names.setdefault(name, None)
    return list(names)


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, ...], ...]:
    """The class names of each per-class column group, in order of first appearance."""
    return (tuple(_class_names(rows, "particles")), tuple(_class_names(rows, "filaments")),
            tuple(_class_names(rows, "filament_length_nm")))


def _header(columns: tuple[tuple[str, ...], ...]) -> list[str]:
    particles, filaments, lengths = columns
    return (["stem", "folder", "input_path", "voxel_size_a", "model", "model_version",
             "model_sha256"]
            + [f"particles_{c}" for c in particles] + [f"filaments_{c}" for c in filaments]
            + [f"filament_length_nm_{c}" for c in lengths]
            + ["confidence", "uncertain_fraction", "snr_estimate", "specimen_thickness_nm",
               "seconds", "finished_utc"])


def _cells(row: dict[str, Any], columns: tuple[tuple[str, ...], ...]) -> list[str]:
    particles, filaments, lengths = columns
    return ([row["stem"], row["rel"], str(row.get("input_path") or ""),
             _fmt(row.get("voxel_size_a"), 3), str(row.get("model") or ""),
             str(row.get("model_version") or ""), str(row.get("model_sha256") or "")]
            + [str((row.get("particles") or {}).get(c, "")) for c in particles]
            + [str((row.get("filaments") or {}).get(c, "")) for c in filaments]
            + [_fmt((row.get("filament_length_nm") or {}).get(c), 1) for c in lengths]
            + [_fmt(row.get("confidence"), 4), _fmt(row.get("uncertain_fraction"), 4),
               _fmt(row.get("snr_estimate"), 3), _fmt(row.get("specimen_thickness_nm"), 1),
               _fmt(row.get("seconds"), 2),
               str(row.get("finished_utc") or "")])


def _star_label(column: str) -> str:
    """A STAR label for an index column: RELION's for the tomogram name, `tomolive...` for
    the rest (camel case; class names keep their spelling)."""
    if column == "stem":
        return "rlnTomoName"
    return "tomolive" + "".join(part[:1].upper() + part[1:] for part in column.split("_"))


class IndexTables:
    """index.csv and index.star text for a list of rows. Each row is formatted once and kept
    (for as long as the row object and the set of class columns stay the same): with 5,000
    tomograms an update formats one row and joins the others' text, instead of quoting
    80,000 values again."""

    def __init__(self) -> None:
        # rel -> (the row formatted, its columns, its CSV line, its STAR values)
        self._formatted: dict[str, tuple[dict[str, Any], tuple, str, list[str]]] = {}

    def _row(self, row: dict[str, Any], columns: tuple) -> tuple[str, list[str]]:
        cached = self._formatted.get(row["rel"])
        if cached is not None and cached[0] is row and cached[1] == columns:
            return cached[2], cached[3]
        cells = _cells(row, columns)
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(cells)
        # Empty in the CSV; in STAR a value cannot be empty: `-`.
        star = [star_string(v) if v else "-" for v in cells]
        self._formatted[row["rel"]] = (row, columns, line.getvalue(), star)
        return line.getvalue(), star

    def texts(self, rows: list[dict[str, Any]]) -> tuple[str, str]:
        """(index.csv, index.star) text, one line per row in the order given."""
        columns = _columns(rows)
        header = _header(columns)
        formatted = [self._row(row, columns) for row in rows]
        head = io.StringIO()
        csv.writer(head, lineterminator="\n").writerow(header)
        csv_text = head.getvalue() + "".join(line for line, _ in formatted)
        # core.export's STAR writer takes columns: the cached values, transposed.
        star_columns = {_star_label(name): list(values) for name, values in
                        zip(header, zip(*(star for _, star in formatted), strict=True)
                            if formatted else [()] * len(header), strict=True)}
        return csv_text, star_text("tomograms", star_columns)


def index_csv_text(rows: list[dict[str, Any]]) -> str:
    """The dataset index as CSV (no cache: for one-off use and tests)."""
    return IndexTables().texts(rows)[0]


def index_star_text(rows: list[dict[str, Any]]) -> str:
    """The dataset index as a STAR table (block `tomograms`), through core.export's writer."""
    return IndexTables().texts(rows)[1]


