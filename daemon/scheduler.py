"""The one dynamic queue all devices pull from.

Order: tomograms never segmented come first (newest first by default: the tomogram just
collected matters most to the person at the microscope; the backlog after), re-segmentations
for a new model after them. An item whose `not_before_monotonic_s` lies in the future (a
failed attempt waiting to be retried) is held back until then.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class QueueItem:
    path: Path
    out_parent: Path  # the tomogram's outputs go to out_parent / stem
    stem: str  # its output folder's name (daemon/naming.py)
    key: str  # lease and failure-record key
    rel_output: str  # the output folder relative to output_dir: `session1/TS_01`
    mtime_ns: int
    voxel_size_a: float | None = None
    resegment: bool = False
    enqueued_monotonic_s: float = field(default_factory=time.monotonic)
    not_before_monotonic_s: float = 0.0


class WorkQueue:
    def __init__(self, order: str = "newest_first") -> None:
        self.order = order
        self._items: dict[Path, QueueItem] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: Path) -> bool:
        return path in self._items

    def add(self, item: QueueItem) -> bool:
        """Queue `item`; an item already queued for the same path keeps its place.
        Returns True when the path was not queued before."""
        existing = self._items.get(item.path)
        if existing is not None:
            existing.mtime_ns = item.mtime_ns
            existing.resegment = existing.resegment and item.resegment
            return False
        self._items[item.path] = item
        return True

    def remove(self, path: Path) -> None:
        self._items.pop(path, None)

    def defer(self, path: Path, delay_s: float) -> None:
        item = self._items.get(path)
        if item is not None:
            item.not_before_monotonic_s = time.monotonic() + delay_s

    def ready(self, now_s: float | None = None) -> Iterator[QueueItem]:
        """Items that may start now, best first."""
        now_s = time.monotonic() if now_s is None else now_s
        newest_first = self.order == "newest_first"
        candidates = [i for i in self._items.values() if i.not_before_monotonic_s <= now_s]
        candidates.sort(key=lambda i: (i.resegment, -i.mtime_ns if newest_first else i.mtime_ns))
        yield from candidates

    def oldest_enqueued_s(self) -> float | None:
        return min((i.enqueued_monotonic_s for i in self._items.values()), default=None)
