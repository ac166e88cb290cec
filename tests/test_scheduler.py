"""daemon.scheduler.WorkQueue: the one queue every device pulls from."""

from __future__ import annotations

from pathlib import Path

from tomolive.daemon.scheduler import QueueItem, WorkQueue


def _item(name: str, mtime_ns: int, resegment: bool = False) -> QueueItem:
    path = Path("/data") / f"{name}.mrc"
    return QueueItem(path=path, out_parent=Path("/out"), stem=name, key=name, rel_output=name,
                     mtime_ns=mtime_ns, resegment=resegment)


def _order(queue: WorkQueue, now_s: float | None = None) -> list[str]:
    return [item.stem for item in queue.ready(now_s)]


def test_new_tomograms_come_newest_first_and_resegmentations_after_them():
    queue = WorkQueue()
    for item in (_item("old", 1), _item("again", 9, resegment=True), _item("new", 5)):
        queue.add(item)
    assert _order(queue) == ["new", "old", "again"]
    queue.order = "oldest_first"
    assert _order(queue) == ["old", "new", "again"]


def test_adding_a_queued_path_keeps_its_place_and_takes_the_newer_version():
    queue = WorkQueue()
    assert queue.add(_item("a", 1, resegment=True))
    assert not queue.add(_item("a", 7))  # the file was rewritten: now new work, not a re-run
    assert len(queue) == 1
    (item,) = queue.ready()
    assert (item.mtime_ns, item.resegment) == (7, False)


def test_a_deferred_item_waits_until_its_time_then_comes_back():
    queue = WorkQueue()
    b = _item("b", 2)
    queue.add(_item("a", 1))
    queue.add(b)  # the queue holds this very item
    queue.defer(b.path, 30.0)
    assert _order(queue, b.not_before_monotonic_s - 0.001) == ["a"]
    assert _order(queue, b.not_before_monotonic_s) == ["b", "a"]
    queue.defer(Path("/data/never-queued.mrc"), 30.0)  # no error, nothing added
    assert len(queue) == 2


def test_remove_and_the_oldest_enqueued_time():
    queue = WorkQueue()
    assert queue.oldest_enqueued_s() is None
    first, second = _item("a", 1), _item("b", 2)
    queue.add(first)
    queue.add(second)
    assert queue.oldest_enqueued_s() == min(first.enqueued_monotonic_s,
                                            second.enqueued_monotonic_s)
    queue.remove(first.path)
    queue.remove(Path("/data/unknown.mrc"))
    assert Path("/data/a.mrc") not in queue and second.path in queue
    assert queue.oldest_enqueued_s() == second.enqueued_monotonic_s
