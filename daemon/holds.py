"""Stage holds: park a tomogram's processing at a named point until someone releases it.

A test (or an operator rehearsing a failure) needs a worker that is provably in the middle
of a tomogram when a signal arrives, whatever the speed of the machine: a tomogram that is
"big enough to take a while" finishes early on a faster CPU and the test then asserts on
the wrong state. A hold makes the order explicit instead of relying on time.

It is off unless the environment variable `TOMOLIVE_HOLD_DIR` names a folder (the daemon's
workers inherit the environment; `tomolive segment` reads it too). For a tomogram `STEM`:

  DIR/STEM.hold   written by the test: its text is the point to stop at, one of the pipeline
                  stages (`read`, `rescale`, ..., `filaments`: stop once that stage is done)
                  or `publish` (the output folder is written under its temporary name and
                  is about to be renamed into place)
  DIR/STEM.held   written here once parked (text: the point and the process id)
  DIR/STEM.drill  written by the test: `device` makes the attempt under way fail, once the
                  `read` stage is done, with the error a sick GPU gives (the file is consumed,
                  so the retry runs normally): rehearses a device fault where no GPU exists

The processing stays parked while `STEM.hold` exists; deleting it releases it. Nothing is held
when the folder or the request file is absent, so a production daemon never waits here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

HOLD_DIR_ENV = "TOMOLIVE_HOLD_DIR"
PUBLISH_POINT = "publish"
DEVICE_DRILL = "device"
DRILL_STAGE = "read"
# A held process checks for its release this often: short enough that tests stay quick,
# long enough to cost nothing (holds exist only under an explicit test setting).
_RELEASE_POLL_S = 0.02


def hold_folder() -> Path | None:
    """The folder named by TOMOLIVE_HOLD_DIR, or None when holds are off."""
    folder = os.environ.get(HOLD_DIR_ENV)
    return Path(folder) if folder else None


class StageHold:
    """Progress callback and publish hook for one tomogram that park it where requested."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.request = folder / f"{stem}.hold"
        self.marker = folder / f"{stem}.held"
        self.drill = folder / f"{stem}.drill"

    def wanted_point(self) -> str | None:
        try:
            return self.request.read_text().strip() or None
        except FileNotFoundError:
            return None

    def reached(self, point: str) -> None:
        """Park here if this is the requested point, until the request file is deleted."""
        if self.wanted_point() != point:
            return
        self.marker.write_text(f"{point} {os.getpid()}\n")
        while self.request.exists():
            time.sleep(_RELEASE_POLL_S)

    def progress(self, stage: str, fraction: float) -> None:
        if fraction >= 1.0:
            self.reached(stage)
            if stage == DRILL_STAGE:
                self._run_drill()

    def _run_drill(self) -> None:
        try:
            wanted = self.drill.read_text().strip()
            self.drill.unlink()
        except FileNotFoundError:
            return
        if wanted == DEVICE_DRILL:
            raise DrillDeviceError(f"CUDA error: an illegal memory access was encountered "
                                   f"(failure drill {self.drill.name})")


class DrillDeviceError(RuntimeError):
    """What a failure drill raises in place of a real device fault (see the module's text)."""


def stage_hold(stem: str) -> StageHold | None:
    """The hold for `stem` when holds are switched on, else None."""
    folder = hold_folder()
    return None if folder is None else StageHold(folder, stem)


def with_progress(hold: StageHold | None,
                  progress: Callable[[str, float], None] | None
                  ) -> Callable[[str, float], None] | None:
    """One pipeline progress callback that reports to `progress` and honours `hold`."""
    if hold is None:
        return progress
    if progress is None:
        return hold.progress

    def both(stage: str, fraction: float) -> None:
        progress(stage, fraction)
        hold.progress(stage, fraction)

    return both


def with_publish_hook(hold: StageHold | None,
                      before_publish: Callable[[], None] | None
                      ) -> Callable[[], None] | None:
    """One `before_publish` hook that parks at `publish` first when `hold` asks for it."""
    if hold is None:
        return before_publish

    def hooked() -> None:
        hold.reached(PUBLISH_POINT)
        if before_publish is not None:
            before_publish()

    return hooked
