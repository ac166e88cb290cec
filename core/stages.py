"""The pipeline's stage names, in order: one list for the pipeline that runs them, the progress
it reports, the timings in each summary and the per-stage metrics.

Its own module (no torch, no numpy) so that the daemon's main process, which never imports
torch, can name the stages without importing the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

STAGES = ("read", "rescale", "specimen", "preprocess", "inference", "cleanup", "particles",
          "filaments", "write")

# Progress callback: (stage name, fraction of that stage done in 0..1).
Progress = Callable[[str, float], None]
