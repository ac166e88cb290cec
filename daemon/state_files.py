"""The shared output folder's own records (`OUT/.tomolive/`): their folder, and how they are
read and written so that several daemons on several hosts can share them (docs/leases.md).

    OUT/.tomolive/leases/<key>.lease      running: who works on a tomogram (daemon/leases.py)
    OUT/.tomolive/leases/.<key>.<token>.beat  its heartbeat counter, advanced by the holder
    OUT/.tomolive/failures/<key>.json     failed: attempts, last error, hosts, input fingerprint
                                          (daemon/failure_records.py)
    OUT/<rel>/<STEM>/<STEM>_summary.json  done: names the model and the input's fingerprint
                                          (core/result_folder.py)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from filelock import SoftFileLease

from ..core.atomic import atomic_write_text

STATE_DIR = ".tomolive"
# Short critical sections (breaking a stale lease, updating a failure record) are guarded by
# filelock's SoftFileLease: an O_EXCL marker file, so it separates hosts on NFS (flock-based
# FileLock does not), and it expires after this long without a refresh on the contender's own
# monotonic clock, so a host that crashes inside the section cannot wedge everyone else.
# All contenders must agree on the duration: it is a protocol constant.
CRITICAL_SECTION_LEASE_S = 30.0
CRITICAL_SECTION_TIMEOUT_S = 10.0


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None if missing; {} if unreadable (torn or foreign)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return {"_raw_sha256": hashlib.sha256(raw).hexdigest()}
    return data if isinstance(data, dict) else {"_raw_sha256": hashlib.sha256(raw).hexdigest()}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old record or the whole new one (temp beside, then rename)."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def critical_section(lock_path: Path) -> SoftFileLease:
    return SoftFileLease(
        lock_path,
        lease_duration=CRITICAL_SECTION_LEASE_S,
        timeout=CRITICAL_SECTION_TIMEOUT_S,
        thread_local=False,
    )
