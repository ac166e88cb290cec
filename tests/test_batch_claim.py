"""`tomolive segment --claim` as real processes (issue 7): two batch jobs over the same files,
and a batch job beside a running daemon, share one output folder without double work."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tomolive.daemon.holds import HOLD_DIR_ENV

from .daemon_harness import (
    Daemon,
    partial_outputs,
    summary_counts,
    tomogram_bytes,
    write_tiny_model,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

LEASE_S = 4.0
SHAPE_ZYX = (32, 64, 64)


def _batch(out: Path, model: Path, paths: list[Path], log: Path,
           *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """One `tomolive segment --claim` process; stdout and stderr into `log`."""
    with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "tomolive", "segment", "--claim", "--out", str(out),
             "--model", str(model), "--device", "cpu", "--lease-seconds", str(LEASE_S),
             *extra, *map(str, paths)],
            stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _done_lines(text: str, stem: str) -> int:
    """Lines `STEM: done in ...` that the batch prints for each tomogram it published."""
    return len(re.findall(rf"^{re.escape(stem)}: done in ", text, re.MULTILINE))


def _leases(out: Path) -> list[Path]:
    return list((out / ".tomolive" / "leases").glob("*.lease"))


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, list[Path]]:
    model = write_tiny_model(tmp_path / "m.safetensors")
    folder = tmp_path / "incoming"
    folder.mkdir()
    paths = []
    for i in range(6):
        path = folder / f"b{i}.mrc"
        path.write_bytes(tomogram_bytes(500 + i, shape_zyx=SHAPE_ZYX))
        paths.append(path)
    return model, paths


def test_two_batch_jobs_over_the_same_files_do_each_once(inputs, tmp_path):
    model, paths = inputs
    out = tmp_path / "shared"
    # The jobs walk the list from opposite ends. Each job's first tomogram is parked after
    # its rescale (a stage hold) until both are parked: each job then provably claimed its
    # own first one, so both do some of the work, however fast either machine is.
    holds = tmp_path / "holds"
    holds.mkdir()
    firsts = (paths[0].stem, paths[-1].stem)
    for stem in firsts:
        (holds / f"{stem}.hold").write_text("rescale")
    env = {HOLD_DIR_ENV: str(holds)}
    jobs = [_batch(out, model, paths, tmp_path / "one.log", env=env),
            _batch(out, model, paths[::-1], tmp_path / "two.log", env=env)]
    deadline = time.monotonic() + 120
    while not all((holds / f"{stem}.held").exists() for stem in firsts):
        assert time.monotonic() < deadline and all(job.poll() is None for job in jobs), [
            (tmp_path / f"{n}.log").read_text() for n in ("one", "two")]
        time.sleep(0.05)
    for stem in firsts:
        (holds / f"{stem}.hold").unlink()
    codes = [job.wait(timeout=200) for job in jobs]
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("one", "two")]
    assert codes == [0, 0], logs
    stems = [p.stem for p in paths]
    for stem in stems:
        assert sum(_done_lines(text, stem) for text in logs) == 1, (stem, logs)
    split = [sum(_done_lines(text, s) for s in stems) for text in logs]
    print(f"\nbatch split {split}")
    assert split[0] > 0 and split[1] > 0, logs
    assert summary_counts(out) == dict.fromkeys(stems, 1)
    assert _leases(out) == []
    assert partial_outputs(out) == []
    assert not (out / ".tomolive" / "failures").exists() or \
        not list((out / ".tomolive" / "failures").glob("*.json"))
    # Both jobs added their results to the one dataset index (daemon/gallery.py), each once.
    assert sorted(_index_stems(out)) == sorted(stems)


def _index_stems(out: Path) -> list[str]:
    """The stems in OUT/index.csv (empty while it does not exist)."""
    try:
        with open(out / "index.csv", newline="") as handle:
            return [row["stem"] for row in csv.DictReader(handle)]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("session", [None, "session1"])
def test_batch_job_beside_a_running_daemon_no_tomogram_done_twice(inputs, tmp_path, session):
    """Files at the top of the watched folder, or in a session folder below it (then the
    batch job is told the daemons' watched root with --relative-to, and both key the lease
    and the output folder by `session1/STEM`)."""
    model, paths = inputs
    root = paths[0].parent
    extra: tuple[str, ...] = ()
    rel = "."
    if session:
        (root / session).mkdir()
        paths = [p.rename(root / session / p.name) for p in paths]
        extra, rel = ("--relative-to", str(root)), session
    d = Daemon(tmp_path / "daemon", watch=[{"path": str(root), "patterns": ["*.mrc"]}],
               lease_seconds=LEASE_S)
    d.incoming = root
    (d.models / "m.safetensors").write_bytes(model.read_bytes())
    try:
        d.start()
        job = _batch(d.outputs, model, paths[::-1], tmp_path / "batch.log", *extra)
        assert job.wait(timeout=200) == 0, (tmp_path / "batch.log").read_text()
        stems = [p.stem for p in paths]
        d.wait_for(lambda: all(d.summary(s, rel) for s in stems), 120, "all summaries")
        batch_log = (tmp_path / "batch.log").read_text()
        daemon_done = {s: len(re.findall(rf"\b{s}\.mrc: ok in ", d.log)) for s in stems}
        batch_done = {s: _done_lines(batch_log, s) for s in stems}
        print(f"\ndaemon {sum(daemon_done.values())}, batch {sum(batch_done.values())}")
        for stem in stems:
            assert daemon_done[stem] + batch_done[stem] == 1, (stem, d.log, batch_log)
        # Whoever published it, the summary names the very input file.
        for path in paths:
            summary = json.loads((d.outputs / rel / path.stem / f"{path.stem}_summary.json")
                                 .read_text())
            assert Path(summary["input"]["path"]).name == path.name
        assert summary_counts(d.outputs) == dict.fromkeys(stems, 1)
        d.wait_for(lambda: _leases(d.outputs) == [], 30, "leases released")
        assert partial_outputs(d.outputs) == []
        # Daemon and batch job wrote to one dataset index: every tomogram in it once.
        d.wait_for(lambda: sorted(_index_stems(d.outputs)) == sorted(stems), 30,
                   "every tomogram in index.csv")
        assert len(_index_stems(d.outputs)) == len(stems)
        assert d.stop() == 0
    finally:
        d.kill()
