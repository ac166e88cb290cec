"""`tomolive segment --claim`: drain a backlog beside running daemons, without double work.

The same leases and failure records as the daemon (daemon/leases.py,
daemon/failure_records.py), taken through daemon/claim_sequence.py: a tomogram is skipped when
it is done, quarantined or leased by someone alive; a lease whose heartbeat stands still
for the lease duration is broken and the work taken over. A side thread advances our heartbeat
while the pipeline runs, and the result is published only if the lease is still ours.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..core.errors import one_line
from ..core.pipeline import segment_file
from . import claim_sequence
from .failure_records import FailureRecords
from .faults import INPUT, classify_error
from .gallery import Gallery
from .holds import stage_hold, with_progress, with_publish_hook
from .leases import Lease, LeaseLost, LeaseManager, lease_key
from .naming import output_stem
from .result_lines import tomogram_done_line

log = logging.getLogger("tomolive.batch")

MAX_ATTEMPTS = 3


def relative_output(path: Path, out_dir: Path, relative_to: Path | None) -> str:
    """The output folder of `path` relative to the shared output folder `out_dir`:
    `session1/TS_01` when `relative_to` is the daemons' watched root (so batch jobs and
    daemons agree on the lease), else just the folder name (daemon/naming.py)."""
    parent = Path(".")
    if relative_to is not None:
        try:
            parent = path.absolute().parent.relative_to(relative_to.absolute())
        except ValueError:
            raise ValueError(f"{path}: not under --relative-to {relative_to}") from None
    return (parent / output_stem(path, out_dir / parent)).as_posix()


def segment_with_claims(paths: list[Path], out_dir: Path, bundle: Any, network: Any,
                        options: Any, lease_seconds: float,
                        relative_to: Path | None = None) -> int:
    """Segment every path not done elsewhere; returns the exit status (1 if any failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rel_outputs = {path: relative_output(path, out_dir, relative_to) for path in paths}
    leases = LeaseManager(out_dir, lease_seconds)
    failures = FailureRecords(out_dir, MAX_ATTEMPTS)
    gallery = Gallery(out_dir)  # the index and static gallery, shared with the daemons
    pending = list(paths)
    failed = 0
    deadline_per_wait_s = lease_seconds * 2 + 5
    waiting_since: dict[Path, float] = {}
    while pending:
        progressed = False
        for path in list(pending):
            rel_output = rel_outputs[path]
            work = claim_sequence.Work(path, out_dir / rel_output, lease_key(rel_output),
                                       rel_output)
            claim = claim_sequence.claim(work, leases, failures)
            if claim.status == claim_sequence.HELD:
                waiting_since.setdefault(path, time.monotonic())
                if time.monotonic() - waiting_since[path] > deadline_per_wait_s:
                    print(f"{path}: leased by another live worker; left to it", file=sys.stderr)
                    pending.remove(path)
                continue
            pending.remove(path)
            progressed = True
            if claim.status == claim_sequence.GONE:
                print(f"tomolive: error: {path}: no such file (removed while queued)",
                      file=sys.stderr)
                failed += 1
            if claim.lease is None:  # gone, done or quarantined
                continue
            failed += not _segment_leased(path, work.out_folder.parent, bundle, network, options,
                                          leases, claim.lease, failures, claim.fingerprint,
                                          rel_output, gallery)
        if pending and not progressed:
            time.sleep(min(2.0, lease_seconds / 4))  # watch the other leases' heartbeats
    return 1 if failed else 0


def _segment_leased(path: Path, out_parent: Path, bundle: Any, network: Any, options: Any,
                    leases: LeaseManager, lease: Lease, failures: FailureRecords,
                    fingerprint: str, rel_output: str, gallery: Gallery | None = None) -> bool:
    stop = threading.Event()
    lost = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(leases, lease, stop, lost), daemon=True)
    beat.start()

    def check_lease() -> None:
        if lost.is_set():
            raise LeaseLost(f"{path}: lease lost, result not published")
        leases.renew(lease)

    hold = stage_hold(path.stem)  # None unless a test switched holds on
    try:
        seg, folder = segment_file(path, out_parent, bundle, options, network=network,
                                   stem=Path(rel_output).name,
                                   progress=with_progress(hold, None),
                                   before_publish=with_publish_hook(hold, check_lease))
    except LeaseLost as error:
        print(f"tomolive: {error}", file=sys.stderr)
        return True  # someone else owns it now: not our failure
    except (ValueError, OSError, RuntimeError, MemoryError) as error:
        message = one_line(error)
        category = classify_error(error)
        if category == INPUT:
            failures.record_failure(lease.key, fingerprint, message, rel_output)
        else:  # not the tomogram's fault (daemon/faults.py): shown, never quarantines it
            failures.record_fault(lease.key, fingerprint, message, category, rel_output)
        print(f"tomolive: error: {message} ({category} fault)", file=sys.stderr)
        return False
    finally:
        stop.set()
        beat.join()
        if not lost.is_set():
            leases.release(lease)
    print(tomogram_done_line(seg, folder))
    if gallery is not None:
        try:
            gallery.add(folder)
        except Exception as error:  # noqa: BLE001 (a side product: the result is published)
            print(f"tomolive: {folder}: gallery and index not updated: {error}", file=sys.stderr)
    return True


def _heartbeat(leases: LeaseManager, lease: Lease, stop: threading.Event,
               lost: threading.Event) -> None:
    interval_s = leases.lease_s / 4
    while not stop.wait(interval_s):
        try:
            leases.renew(lease)
        except LeaseLost:
            lost.set()
            return
        except OSError as error:
            log.warning("lease renewal for %s failed: %s", lease.key, error)
