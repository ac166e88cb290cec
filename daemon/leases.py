"""Leases in the shared output folder: who works on which tomogram (docs/leases.md).

A lease is created atomically (write a private temp file, then `os.link` it to the lease name:
link fails if the name exists, on local filesystems and NFSv3+ alike, and the lease appears with
its whole content). A lease is stale only after this process has watched its (heartbeat, token)
stand still for `lease_s` on its own monotonic clock: hosts' clocks differ, so no timestamp in
the file is ever compared with ours.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from ..core.atomic import atomic_write_text
from .state_files import STATE_DIR, critical_section, read_json


class LeaseLost(RuntimeError):
    """Our lease was broken or replaced by another daemon: stop and do not publish."""


def lease_key(rel_output: str | os.PathLike[str]) -> str:
    """A filesystem-safe id for a tomogram's relative output path: `session1__TS_01-1a2b3c4d`.

    The readable part is for people; the hash keeps distinct paths distinct after sanitising.
    """
    text = Path(rel_output).as_posix().strip("/")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__")).lstrip(".")[:80]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{readable or 'tomogram'}-{digest}"


def boot_id() -> str:
    """This machine's boot id (Linux); empty where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _beat_path(lease_dir: Path, key: str, token: str) -> Path:
    return lease_dir / f".{key}.{token}.beat"


def _last_beat_age_s(lease_dir: Path, key: str, record: dict[str, Any]) -> float | None:
    """Seconds since the holder last renewed (its beat file's mtime; the lease file's before
    the first renewal). A holder whose worker stalled stops renewing, so this keeps growing
    while the tomogram still shows as running: `tomolive status` prints it for that reason."""
    token = record.get("token")
    if not token:
        return None
    for path in (_beat_path(lease_dir, key, str(token)), lease_dir / f"{key}.lease"):
        try:
            return max(0.0, time.time() - path.stat().st_mtime)
        except FileNotFoundError:
            continue
    return None


def _heartbeat(lease_dir: Path, key: str, record: dict[str, Any]) -> int | None:
    """The holder's heartbeat: its beat file's counter, or the lease's initial 0 before the
    first renewal. None for a lease without a token (torn or foreign)."""
    token = record.get("token")
    if not token:
        return None
    try:
        return int(_beat_path(lease_dir, key, str(token)).read_text().strip())
    except FileNotFoundError:
        return int(record.get("heartbeat", 0))
    except ValueError:  # a beat file being replaced is never torn; a foreign one might be
        return None


@dataclass
class Lease:
    """A lease this process holds."""

    key: str
    path: Path
    token: str
    record: dict[str, Any]

    @property
    def heartbeat(self) -> int:
        return int(self.record["heartbeat"])


@dataclass
class _Observation:
    state: tuple[Any, ...]
    since_s: float  # our monotonic clock when this state was first seen


@dataclass
class LeaseManager:
    """Claims, renews, releases and (when stale) breaks leases in `output_dir`.

    `host`, `pid` and `boot` default to this process; tests set them to simulate other hosts.
    `clock` is a monotonic clock (injectable for tests). `on_reclaim(key, old_record)` is called
    after a stale lease was broken and re-claimed (metrics count it).
    """

    output_dir: Path
    lease_s: float
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    boot: str = field(default_factory=boot_id)
    clock: Callable[[], float] = time.monotonic
    on_reclaim: Callable[[str, dict[str, Any]], None] | None = None
    reclaims: int = 0
    _seen: dict[str, _Observation] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.lease_dir = self.output_dir / STATE_DIR / "leases"

    def lease_path(self, key: str) -> Path:
        return self.lease_dir / f"{key}.lease"

    # -- claiming ---------------------------------------------------------------------------
    def try_claim(self, key: str, target: str = "", device: str = "") -> Lease | None:
        """Claim `key` (a `lease_key`); None while another live daemon holds it.

        Call it again later for a held key: that is how staleness is observed. `target` (the
        relative output path) and `device` (the worker's, e.g. "cuda:0") are stored for
        `tomolive status` and the session page.
        """
        self.lease_dir.mkdir(parents=True, exist_ok=True)
        lease = self._create(key, target, device)
        if lease is not None:
            self._seen.pop(key, None)
            return lease
        holder = read_json(self.lease_path(key))
        if holder is None:  # released meanwhile: try once more
            return self._create(key, target, device)
        if not self._is_stale(key, holder):
            return None
        return self._break_and_claim(key, target, holder, device)

    def holder(self, key: str) -> dict[str, Any] | None:
        """The lease record of whoever holds `key` now, or None."""
        return read_json(self.lease_path(key))

    def _new_record(self, target: str, device: str = "") -> dict[str, Any]:
        record = {
            "host": self.host,
            "pid": self.pid,
            "boot_id": self.boot,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),  # for humans only
            "heartbeat": 0,
            "token": uuid.uuid4().hex,
            "target": target,
            "lease_seconds": self.lease_s,
        }
        if device:  # optional: readers of older leases see no device
            record["device"] = device
        return record

    def _create(self, key: str, target: str, device: str = "") -> Lease | None:
        """Atomic exclusive create: temp file + link (fails if the lease exists)."""
        record = self._new_record(target, device)
        path = self.lease_path(key)
        tmp = self.lease_dir / f".{key}.{record['token']}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
            won = True
        except FileExistsError:
            # NFS may retransmit a LINK whose reply was lost and answer EEXIST for our own
            # success: then the temp file has two links (open(2), O_EXCL notes).
            won = os.stat(tmp).st_nlink == 2
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            won = self._create_exclusive(path, record)  # a filesystem without hard links
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return Lease(key, path, record["token"], record) if won else None

    @staticmethod
    def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
        return True

    # -- staleness --------------------------------------------------------------------------
    def _is_stale(self, key: str, holder: dict[str, Any]) -> bool:
        if self._dead_on_this_host(holder):
            return True
        state = (holder.get("token"), self.heartbeat_of(key, holder), holder.get("_raw_sha256"))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or seen.state != state:
            self._seen[key] = _Observation(state, now)
            return False
        return now - seen.since_s >= self.lease_s

    def _dead_on_this_host(self, holder: dict[str, Any]) -> bool:
        """Same host, same boot, pid gone: the holder crashed; no need to wait."""
        pid = holder.get("pid")
        return (
            bool(self.boot)
            and holder.get("host") == self.host
            and holder.get("boot_id") == self.boot
            and isinstance(pid, int)
            and pid != self.pid
            and not _pid_alive(pid)
        )

    def _break_and_claim(self, key: str, target: str, stale: dict[str, Any],
                         device: str = "") -> Lease | None:
        """Move the stale lease aside and claim; one breaker at a time, across hosts."""
        path = self.lease_path(key)
        try:
            with critical_section(self.lease_dir / f".{key}.break.lock"):
                # Re-read inside the section: another breaker may have won and claimed already.
                current = read_json(path)
                if current is not None:
                    if current != stale:
                        self._seen.pop(key, None)
                        return None
                    aside = path.with_name(f".{key}.stale-{uuid.uuid4().hex}")
                    try:
                        os.rename(path, aside)
                    except FileNotFoundError:
                        return None
                    with contextlib.suppress(FileNotFoundError):
                        aside.unlink()
                    with contextlib.suppress(FileNotFoundError):
                        self.beat_path(key, str(stale.get("token"))).unlink()
                    # Counted by whoever broke it, even if a plain claimer (not in this
                    # section) takes the free name first: each stale lease counts once.
                    self.reclaims += 1
                    if self.on_reclaim is not None:
                        self.on_reclaim(key, stale)
                lease = self._create(key, target, device)
        except Timeout:
            return None
        self._seen.pop(key, None)
        return lease

    def sweep_stale(self, keep: set[str]) -> list[Lease]:
        """Break every stale lease (a holder dead on this host, or one whose heartbeat stood
        still for `lease_s` across sweeps) and claim it; the caller cleans up after the dead
        holder and releases. Without this, the lease of a tomogram whose input vanished after
        its holder crashed would stay forever (nobody claims a file that is gone). `keep`:
        keys this process is working on."""
        if not self.lease_dir.is_dir():
            return []
        claimed = []
        for path in sorted(self.lease_dir.glob("*.lease")):
            key = path.stem
            holder = read_json(path)
            if key in keep or holder is None or not self._is_stale(key, holder):
                continue
            lease = self._break_and_claim(key, str(holder.get("target") or ""), holder)
            if lease is not None:
                claimed.append(lease)
        return claimed

    # -- holding ----------------------------------------------------------------------------
    def check(self, lease: Lease) -> None:
        """Raise LeaseLost unless the lease file is still ours (call before publishing)."""
        current = read_json(lease.path)
        if current is None:
            raise LeaseLost(f"{lease.path}: lease vanished (broken as stale by another daemon)")
        if current.get("token") != lease.token:
            raise LeaseLost(
                f"{lease.path}: lease now held by {current.get('host')} pid {current.get('pid')}"
            )

    def renew(self, lease: Lease) -> None:
        """Advance the heartbeat; raise LeaseLost if the lease is no longer ours.

        The counter lives in a beat file of its own (`.KEY.TOKEN.beat`), never in the lease
        file: a renewal paused between its check and its write (a stalled host) must not
        rewrite a lease that was broken meanwhile, which would resurrect it under our token.
        """
        self.check(lease)
        beat = lease.heartbeat + 1
        atomic_write_text(self.beat_path(lease.key, lease.token), f"{beat}\n")
        lease.record = dict(lease.record, heartbeat=beat)

    def beat_path(self, key: str, token: str) -> Path:
        return _beat_path(self.lease_dir, key, token)

    def heartbeat_of(self, key: str, holder: dict[str, Any]) -> int | None:
        """The heartbeat counter of whoever holds `key` (as `holder`, its lease record)."""
        return _heartbeat(self.lease_dir, key, holder)

    def release(self, lease: Lease) -> bool:
        """Delete the lease if it is still ours; False if someone else holds it now."""
        try:
            self.check(lease)
        except LeaseLost:
            return False
        with contextlib.suppress(FileNotFoundError):
            lease.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.beat_path(lease.key, lease.token).unlink()
        return True


def held_leases(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every lease in the output folder, as `tomolive status` and the session page show it:
    key, target, host, device (where the holder recorded it), pid, started, heartbeat and the
    seconds since the holder last renewed."""
    lease_dir = Path(output_dir) / STATE_DIR / "leases"
    held = []
    for path in sorted(lease_dir.glob("*.lease")) if lease_dir.is_dir() else []:
        record = read_json(path) or {}
        held.append({
            "key": path.stem,
            "target": record.get("target"),
            "host": record.get("host"),
            "device": record.get("device"),
            "pid": record.get("pid"),
            "started": record.get("started"),
            "heartbeat": _heartbeat(lease_dir, path.stem, record),
            "last_beat_age_s": _last_beat_age_s(lease_dir, path.stem, record),
        })
    return held
