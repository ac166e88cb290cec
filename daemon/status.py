"""`tomolive status`: what the shared output folder says, plus what still waits in the watched
folders. Reads files only; it works while daemons run, from any host that mounts the folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.fingerprint import input_fingerprint
from .claims import FailureRecords, is_done, lease_key, status_snapshot
from .config import Config
from .naming import output_stem
from .watcher import Scanner


def status_report(config: Config) -> dict[str, Any]:
    report = status_snapshot(config.output_dir)
    report["waiting"] = _count_waiting(config, {r["key"] for r in report["running"]})
    report["counts"]["waiting"] = report["waiting"]
    return report


def _count_waiting(config: Config, running_keys: set[str]) -> int:
    """Files in the watched folders that are neither done, running nor quarantined."""
    scanner = Scanner(config.watch, [config.output_dir, config.models_dir])
    failures = FailureRecords(config.output_dir, config.max_attempts)
    waiting = 0
    for path, (index, _stat) in scanner.scan().items():
        root = Path(scanner.roots[index])
        rel_parent = Path(os.path.relpath(Path(path).parent, root))
        out_parent = config.output_dir / rel_parent
        stem = output_stem(Path(path), out_parent, scanner.folders[index].patterns)
        key = lease_key((rel_parent / stem).as_posix())
        try:
            fingerprint = input_fingerprint(path)
        except OSError:
            continue
        out_folder = out_parent / stem
        if key in running_keys or is_done(out_folder, None, fingerprint) \
                or failures.is_quarantined(key, fingerprint):
            continue
        waiting += 1
    return waiting


def format_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"{report['output_dir']}: " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in ("done", "running", "waiting", "failed",
                                            "quarantined"))]
    for entry in report["running"]:
        age_s = entry.get("last_beat_age_s")
        age = f", last {age_s:.0f}s ago" if age_s is not None else ""
        lines.append(f"  running      {entry.get('target')} on {entry.get('host')} "
                     f"(pid {entry.get('pid')}, heartbeat {entry.get('heartbeat')}{age})")
    for entry in report["quarantined"]:
        lines.append(f"  quarantined  {entry.get('target')} after {entry.get('attempts')} "
                     f"attempts: {entry.get('last_error')}")
    for entry in report["failed"]:
        # Faults that were not the tomogram's (daemon/faults.py) are not attempts: say which.
        not_counted = (f", {entry.get('faults')} {entry.get('category')} faults not counted"
                       if entry.get("category") != "input" else "")
        lines.append(f"  failed       {entry.get('target')} ({entry.get('attempts')} attempts"
                     f"{not_counted}): {entry.get('last_error')}")
    for entry in report["newest"]:
        counts_text = ", ".join(f"{k}={v}" for group in (entry.get("counts") or {}).values()
                                for k, v in group.items())
        lines.append(f"  done         {entry['folder']} at {entry['finished']} with "
                     f"{entry.get('model')} v{entry.get('model_version')}: {counts_text}")
    return "\n".join(lines)
