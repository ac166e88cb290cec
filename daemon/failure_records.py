"""Failure records in the shared output folder: attempts per input, quarantine after
`max_attempts`, shared by every daemon (and `segment --claim`) on the folder."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import one_line
from .state_files import STATE_DIR, critical_section, read_json, write_json_atomic


@dataclass
class FailureRecords:
    """Failure counts shared by every daemon on the output folder; quarantine after max_attempts.

    A record belongs to one input fingerprint: a changed input file starts again from zero.
    """

    output_dir: Path
    max_attempts: int = 3
    host: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.folder = self.output_dir / STATE_DIR / "failures"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        record = read_json(self.path(key))
        return record if record and "attempts" in record else None

    def record_failure(self, key: str, fingerprint: str, error: str, target: str = "") -> int:
        """Count one failed attempt (atomically across hosts); return the attempts so far."""
        record = self._record(key, fingerprint, error, "input", target, counter="attempts")
        return int(record["attempts"])

    def record_fault(self, key: str, fingerprint: str, error: str, category: str,
                     target: str = "") -> int:
        """Record a failure that was not the tomogram's (daemon/faults.py: environment or
        internal): shown by `tomolive status`, never counted towards quarantine. Returns the
        number of such faults for this input."""
        return int(self._record(key, fingerprint, error, category, target, "faults")["faults"])

    def _record(self, key: str, fingerprint: str, error: str, category: str, target: str,
                counter: str) -> dict[str, Any]:
        """Add one to `counter` of the record of this input (a new record for a new
        fingerprint), atomically across hosts; returns the record written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with critical_section(self.folder / f".{key}.lock"):
            record = self.get(key)
            if record is None or record.get("fingerprint") != fingerprint:
                record = {"attempts": 0, "hosts": [], "fingerprint": fingerprint}
            record[counter] = int(record.get(counter, 0)) + 1
            record["last_error"] = one_line(error)
            record["last_category"] = category
            record["target"] = target or record.get("target", "")
            if self.host not in record["hosts"]:
                record["hosts"].append(self.host)
            record["quarantined"] = int(record["attempts"]) >= self.max_attempts
            record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(self.path(key), record)
        return record

    def is_quarantined(self, key: str, fingerprint: str) -> bool:
        """True while the record for this very input says quarantined."""
        record = self.get(key)
        return bool(
            record
            and record.get("fingerprint") == fingerprint
            and (record.get("quarantined") or record["attempts"] >= self.max_attempts)
        )

    def attempts(self, key: str, fingerprint: str) -> int:
        record = self.get(key)
        if record is None or record.get("fingerprint") != fingerprint:
            return 0
        return int(record["attempts"])

    def clear(self, key: str) -> bool:
        """Forget a record (after a success, or an operator's retry)."""
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def all(self) -> dict[str, dict[str, Any]]:
        if not self.folder.is_dir():
            return {}
        out = {}
        for path in sorted(self.folder.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out[path.stem] = record
        return out

    def retry(self, selector: str | None = None) -> int:
        """Clear records: all (None), or those whose key or stem is `selector`, or whose target
        path is or ends with it (`TS_01`, `session1/TS_01`, `/abs/outputs/session1/TS_01`)."""
        cleared = 0
        wanted = None if selector is None else selector.strip().rstrip("/")
        for key, record in self.all().items():
            target = str(record.get("target", "")).rstrip("/")
            if (wanted is None or wanted == key
                    or (target and (target == wanted or target.endswith("/" + wanted)))):
                cleared += self.clear(key)
        return cleared
