"""The one line per finished tomogram that users (the terminal) and operators (journald) read.

`tomolive segment` prints `STEM: done in ...`; the daemon logs `FILE: ok in ... on DEVICE`.
Both say the stage times and the particle and filament counts the same way (formatted here
once); scripts and tests count tomograms by those two prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import printable


def _stages(timings_s: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.1f}s" for k, v in timings_s.items() if k != "total")


def _counts(particles: Mapping[str, int], filaments: Mapping[str, int]) -> str:
    parts = [f"{name}={n}" for name, n in particles.items()]
    parts += [f"{name}_filaments={n}" for name, n in filaments.items()]
    return " ".join(parts)


def done_line(stem: str, timings_s: Mapping[str, float], particles: Mapping[str, int],
              filaments: Mapping[str, int], out_dir: Path | str) -> str:
    """`tomolive segment`'s line: counts per class, then where the outputs are."""
    total = sum(v for k, v in timings_s.items() if k != "total")
    return printable(f"{stem}: done in {total:.1f}s ({_stages(timings_s)}) "
                     f"{_counts(particles, filaments)} -> {out_dir}")


def tomogram_done_line(seg: Any, out_dir: Path | str) -> str:
    """`done_line` for a core.segmentation.Segmentation just published to `out_dir`."""
    return done_line(seg.stem, seg.timings_s,
                     {name: len(table.zyx) for name, table in seg.particles.items()},
                     {name: len(found) for name, found in seg.filaments.items()}, out_dir)


def served_line(summary: Mapping[str, Any], input_name: str, device: str,
                resegmented: bool = False) -> str:
    """The daemon's line, from the published summary: device, confidence and model too."""
    timings = summary.get("timings_s", {})
    counts = summary.get("counts", {})
    model = summary.get("model", {})
    return (f"{input_name}: ok in {float(timings.get('total', 0)):.1f}s on {device} "
            f"({_stages(timings)}) "
            f"{_counts(counts.get('particles') or {}, counts.get('filaments') or {})} "
            f"confidence={summary.get('confidence', 0):.2f} "
            f"model={model.get('name')} v{model.get('version')}"
            f"{' (re-segmented)' if resegmented else ''}")
