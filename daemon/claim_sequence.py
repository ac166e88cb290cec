"""The one sequence by which a worker takes a tomogram: is it still needed (not gone, not done,
not quarantined)? claim its lease; is it still needed now that we hold it (another host may have
published between the check and the claim)? The daemon (service) and `tomolive segment --claim`
(batch) both take work this way, so a rule added here holds for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.fingerprint import input_fingerprint
from ..core.result_folder import is_done
from .failure_records import FailureRecords
from .leases import Lease, LeaseManager

log = logging.getLogger(__name__)

GONE, DONE, QUARANTINED = "gone", "done", "quarantined"  # no work needed
CHANGED, HELD = "changed", "held"  # not now: written to since judged complete / leased elsewhere


@dataclass(frozen=True)
class Work:
    """One input and where its result goes."""

    path: Path
    out_folder: Path  # OUT/<rel>/<STEM>
    key: str  # claims.lease_key(rel_output)
    rel_output: str  # <rel>/<STEM>, relative to the output folder


@dataclass(frozen=True)
class Claim:
    """What `claim` found: a lease when the work is ours (`status` None), else why not."""

    status: str | None
    fingerprint: str | None = None
    lease: Lease | None = None


def needed(work: Work, failures: FailureRecords,
           model_sha256: str | None = None) -> tuple[str | None, str | None]:
    """(why no work is needed: GONE, DONE or QUARANTINED, or None when it is; the input's
    fingerprint). A result of another model counts as done unless `model_sha256` names the
    model wanted. Raises OSError when the shared folder cannot be read."""
    try:
        fingerprint = input_fingerprint(work.path)
    except FileNotFoundError:
        return GONE, None
    if is_done(work.out_folder, model_sha256, fingerprint):
        return DONE, fingerprint
    if failures.is_quarantined(work.key, fingerprint):
        return QUARANTINED, fingerprint
    return None, fingerprint


def claim(work: Work, leases: LeaseManager, failures: FailureRecords,
          model_sha256: str | None = None,
          unchanged: Callable[[], bool] = lambda: True, device: str = "") -> Claim:
    """Claim `work` if it is needed. `unchanged` is asked after the first check and before the
    claim (the daemon: not written to since the watcher judged it complete); False gives
    CHANGED. HELD: another live worker holds the lease. The caller releases a returned lease.
    `device` (the worker's) is recorded in the lease for the session page."""
    status, fingerprint = needed(work, failures, model_sha256)
    if status is not None:
        return Claim(status, fingerprint)
    if not unchanged():
        return Claim(CHANGED, fingerprint)
    lease = leases.try_claim(work.key, work.rel_output, device)
    if lease is None:
        return Claim(HELD, fingerprint)
    try:
        status, fingerprint = needed(work, failures, model_sha256)  # published meanwhile?
    except BaseException:
        release_quietly(leases, lease)
        raise
    if status is not None:
        release_quietly(leases, lease)
        return Claim(status, fingerprint)
    return Claim(None, fingerprint, lease)


def release_quietly(leases: LeaseManager, lease: Lease) -> None:
    """Release `lease`; a shared folder that fails now is logged, not raised: an unrenewed
    lease expires after lease_seconds anyway."""
    try:
        leases.release(lease)
    except OSError as error:
        log.warning("lease %s not released (%s); it will expire", lease.key, error)
