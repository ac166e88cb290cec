"""`tomolive status`: what the shared output folder says, plus what still waits in the watched
folders. Reads files only; it works while daemons run, from any host that mounts the folders."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..core.fingerprint import input_fingerprint
from ..core.result_folder import is_done, read_summary, summary_name
from .config import Config
from .failure_records import FailureRecords
from .leases import held_leases, lease_key
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


def summary_paths(output_dir: Path) -> list[Path]:
    """Every finished tomogram's summary under the output folder (hidden folders skipped)."""
    found = []
    for root, dirs, files in os.walk(output_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .tomolive, unfinished results
        marker = summary_name(os.path.basename(root))
        if marker in files:
            found.append(Path(root, marker))
    return found


def status_snapshot(output_dir: str | os.PathLike[str], newest: int = 10) -> dict[str, Any]:
    """What the output folder says: done, running (with host), failed, quarantined, newest."""
    output_dir = Path(output_dir)
    summaries = summary_paths(output_dir)
    summaries.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    newest_results = []
    for path in summaries[:newest]:
        summary = read_summary(path.parent) or {}
        model = summary.get("model") or {}
        newest_results.append({
            "folder": str(path.parent.relative_to(output_dir)),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
            "model": model.get("name"),
            "model_version": model.get("version"),
            "counts": summary.get("counts"),
        })
    running = held_leases(output_dir)
    failed, quarantined = read_failures(output_dir)
    return {
        "output_dir": str(output_dir),
        "counts": {"done": len(summaries), "running": len(running), "failed": len(failed),
                   "quarantined": len(quarantined)},
        "running": running,
        "failed": failed,
        "quarantined": quarantined,
        "newest": newest_results,
    }


def read_failures(output_dir: str | os.PathLike[str]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(failed, quarantined): the failure records as `tomolive status` and the session page
    show them, each with its one-line last error."""
    failed, quarantined = [], []
    for key, record in FailureRecords(Path(output_dir)).all().items():
        entry = {"key": key, "target": record.get("target"), "attempts": record.get("attempts"),
                 "faults": record.get("faults", 0),
                 "category": record.get("last_category", "input"),
                 "last_error": record.get("last_error"), "hosts": record.get("hosts"),
                 "updated": record.get("updated")}
        (quarantined if record.get("quarantined") else failed).append(entry)
    return failed, quarantined
