"""Attack the real daemon as a facility's servers do (issue 15) and report what held.

Every case starts real daemons (`tomolive run` subprocesses, loopback metrics, their own
temporary folders, removed afterwards), does to them what production does (bad inputs, a
stopped worker, a full disk, crashes, bad models, hostile names, two hosts sharing a folder
with one killed) and checks the outcome. It prints one JSON line per case and a table:
case / expected / observed / verdict, then the lost and duplicated counts of the multi-daemon
cases. The exit status is 0 only when every case passes.

    python bench/attack.py                 # all cases, about 3 minutes on 2 cores
    python bench/attack.py --only disk     # cases whose name contains "disk"

Root is needed for the full-disk case (a small tmpfs) and the second hostname (a UTS
namespace through `unshare`); without it those cases report SKIP, never PASS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test harness drives the real daemon for us too

from tomolive.daemon.holds import HOLD_DIR_ENV  # noqa: E402
from tomolive.daemon.status import status_snapshot  # noqa: E402

from tests.daemon_harness import (  # noqa: E402
    Daemon,
    mount_tmpfs,
    partial_outputs,
    pid_alive,
    summary_counts,
    tomogram_bytes,
    wait_until,
    write_tiny_model,
)


@dataclass
class Outcome:
    expected: str
    observed: str
    verdict: str  # PASS, FAIL or SKIP (with the reason as observed)


def _failures(d: Daemon) -> list[dict]:
    folder = d.outputs / ".tomolive" / "failures"
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- the cases --------------------------------------------------------------------------------

def case_bad_inputs(root: Path) -> Outcome:
    d = Daemon(root)
    write_tiny_model(d.models / "tiny.safetensors")
    blob = tomogram_bytes(1)
    bad = {
        "truncated": blob[: len(blob) // 2], "text": b"not a tomogram\n" * 100,
        "empty": b"", "nan": tomogram_bytes(2, nan=True),
        "thin": tomogram_bytes(3, shape_zyx=(3, 64, 64)),
        "tiny_voxel": tomogram_bytes(4, voxel_size_a=0.013),
        "huge_voxel": tomogram_bytes(5, voxel_size_a=1000.0),
        "extra_bytes": blob + b"\0" * 4096,
    }
    for name, data in bad.items():
        (d.incoming / f"{name}.mrc").write_bytes(data)
    try:
        d.start()
        quarantined = wait_until(lambda: (lambda r: r if len(r) == len(bad) else None)(
            [f for f in _failures(d) if f.get("quarantined")]), 120, "every bad input")
        (d.incoming / "good.mrc").write_bytes(tomogram_bytes(6))
        d.wait_for_summary("good")
        one_line = all("\n" not in f["last_error"] and f["target"] in f["last_error"]
                       for f in quarantined)
        reasons = {f["target"]: f["last_error"].split(": ", 1)[1][:40] for f in quarantined}
        ok = one_line and not partial_outputs(d.outputs) and d.stop() == 0
        return Outcome(f"{len(bad)} kinds quarantined with a one-line reason naming the file; "
                       "a good file after them is done",
                       f"{len(quarantined)} quarantined, e.g. {reasons['thin']!r}; good done",
                       _verdict(ok))
    finally:
        d.kill()


def case_stopped_worker(root: Path) -> Outcome:
    d = Daemon(root, worker_stall_seconds=4.0)
    write_tiny_model(d.models / "tiny.safetensors")
    d.hold("stuck", "read")
    pid = None
    try:
        d.start()
        (d.incoming / "stuck.mrc").write_bytes(tomogram_bytes(7))
        pid = int(d.wait_held("stuck").split()[1])
        os.kill(pid, signal.SIGSTOP)
        d.release("stuck")
        d.wait_for_log(r"stuck\.mrc: worker .* made no progress", 60)
        d.wait_for_summary("stuck")
        killed = wait_until(lambda: not pid_alive(pid), 30, "the stopped worker to go")
        ok = killed and "attempt 1/" not in d.log and d.metric("tomolive_unkillable_workers") \
            == 0 and d.stop() == 0
        return Outcome("SIGSTOPped worker killed and replaced, tomogram done, not counted",
                       "killed after 4 s of silence, done by its replacement, 0 attempts",
                       _verdict(ok))
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        d.kill()


def case_device_error(root: Path) -> Outcome:
    # No GPU here: a failure drill (daemon/holds.py) raises the CUDA error a sick GPU gives,
    # inside the real worker, in place of one.
    d = Daemon(root, max_attempts=1)
    write_tiny_model(d.models / "tiny.safetensors")
    (d.hold_dir / "sick.drill").write_text("device")
    (d.incoming / "sick.mrc").write_bytes(tomogram_bytes(8))
    try:
        d.start()
        d.wait_for_log(r"device cpu w0 paused for \d+s after a device error")
        d.wait_for_summary("sick")
        pauses = d.metric("tomolive_device_pauses_total", device="cpu")
        ok = pauses == 1 and not _failures(d) and "quarantined" not in d.log and d.stop() == 0
        return Outcome("a CUDA error pauses that device and restarts its worker; the tomogram "
                       "is retried, not counted (max_attempts 1)",
                       f"device paused {pauses:g}x, worker restarted, tomogram done, "
                       f"{len(_failures(d))} failure records", _verdict(ok))
    finally:
        d.kill()


def case_full_disk(root: Path) -> Outcome:
    if os.geteuid() != 0:
        return Outcome("no quarantine; 'No space left on device'; resumes", "needs root", "SKIP")
    d = Daemon(root, max_attempts=2)
    write_tiny_model(d.models / "tiny.safetensors")
    mount_tmpfs(d.outputs, "4m")
    stems = [f"f{i}" for i in range(6)]
    try:
        for i, stem in enumerate(stems):
            (d.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(10 + i, (32, 128, 128)))
        d.start()
        d.wait_for_log(r"No space left on device")
        d.wait_for_log(r"no new tomograms start")
        done_while_full = sum(bool(d.summary(s)) for s in stems)
        mount_tmpfs(d.outputs, "64m", remount=True)
        wait_until(lambda: all(d.summary(s) for s in stems), 120, "every summary")
        ok = "quarantined" not in d.log and not partial_outputs(d.outputs) and d.stop() == 0
        return Outcome("6 tomograms on a 4 MB disk: none quarantined, the cause named, all "
                       "done once space is freed",
                       f"{done_while_full} done while full, paused with 'No space left on "
                       "device', 6/6 done after the remount, 0 quarantined", _verdict(ok))
    finally:
        d.kill()
        subprocess.run(["umount", "-l", str(d.outputs)], capture_output=True)


def case_umask(root: Path) -> Outcome:
    d = Daemon(root)
    write_tiny_model(d.models / "tiny.safetensors")
    try:
        d.start(env={})
        (d.incoming / "modes.mrc").write_bytes(tomogram_bytes(20))
        d.wait_for_summary("modes")
        folder = d.outputs / "modes"
        modes = {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        folder_mode = stat.S_IMODE(folder.stat().st_mode)
        ok = folder_mode == 0o755 and modes == {0o644} and d.stop() == 0
        return Outcome("umask 022: result folder 0755, files 0644",
                       f"folder {folder_mode:o}, files {sorted(f'{m:o}' for m in modes)}",
                       _verdict(ok))
    finally:
        d.kill()


def case_bad_models(root: Path) -> Outcome:
    d = Daemon(root, max_model_voxels=2_000_000, model_failure_limit=2)
    good = write_tiny_model(d.models / "a.safetensors", name="good")
    try:
        d.start()
        d.wait_for_log(r"serving model good v1")
        blob = bytearray(good.read_bytes())
        blob[-2000:-1000] = bytes(1000)  # weights flipped, header intact
        (d.models / "corrupt.safetensors").write_bytes(bytes(blob))
        (d.models / "garbage.safetensors").write_bytes(b"\x09" + bytes(7) + b"{not json")
        d.wait_for_log(r"corrupt\.safetensors rejected: .*weights")
        d.wait_for_log(r"garbage\.safetensors rejected")
        write_tiny_model(d.models / "absurd.safetensors", name="absurd", voxel_size_a=0.1)
        d.wait_for_log(r"absurd\.safetensors rejected: .*outside the plausible range")
        write_tiny_model(d.models / "fine.safetensors", name="fine-but-huge",
                         voxel_size_a=1.6)
        d.wait_for_log(r"serving model fine-but-huge v1")
        for name in ("m1", "m2"):
            (d.incoming / f"{name}.mrc").write_bytes(tomogram_bytes(21 + len(name)))
        d.wait_for_log(r"fine-but-huge v1 .* taken out of service")
        served = [d.wait_for_summary(n)["model"]["name"] for n in ("m1", "m2")]
        ok = served == ["good", "good"] and not any(f.get("quarantined") for f in _failures(d))
        ok = ok and d.stop() == 0
        return Outcome("corrupt weights, garbage and 0.1 Å bundles rejected; a valid bundle "
                       "that fails every tomogram taken out of service, its tomograms redone",
                       f"3 rejected; 1.6 Å bundle out after 2 failures; m1, m2 done by {served[0]}",
                       _verdict(ok))
    finally:
        d.kill()


def case_crash_input_gone(root: Path) -> Outcome:
    d = Daemon(root)
    write_tiny_model(d.models / "tiny.safetensors")
    d.hold("gone", "publish")
    leases = d.outputs / ".tomolive" / "leases"
    try:
        d.start()
        (d.incoming / "gone.mrc").write_bytes(tomogram_bytes(30))
        worker = int(d.wait_held("gone").split()[1])
        d.kill()
        wait_until(lambda: not pid_alive(worker), 30, "the worker to die with the daemon")
        (d.incoming / "gone.mrc").unlink()
        d.release("gone")
        d.start()
        d.wait_for_log(r"cleaned up after a crashed holder of gone")
        running = status_snapshot(d.outputs)["counts"]["running"]
        ok = not list(leases.iterdir()) and not partial_outputs(d.outputs) and running == 0
        ok = ok and d.stop() == 0
        return Outcome("SIGKILL mid-write, input deleted, restart: no lease, beat file or "
                       "temporary folder left; status shows nothing running",
                       f"leases folder empty, {len(partial_outputs(d.outputs))} temporary "
                       f"folders, {running} running", _verdict(ok))
    finally:
        d.kill()


def case_resumed_transfer(root: Path) -> Outcome:
    d = Daemon(root, truncated_after_seconds=8.0)  # pieces paused ~2 s are not "truncated"
    write_tiny_model(d.models / "tiny.safetensors")
    blob = tomogram_bytes(31)
    path = d.incoming / "resumed.mrc"
    path.write_bytes(blob[: len(blob) // 3])
    try:
        d.start()
        d.wait_for_log(r"resumed\.mrc: .*truncated.*quarantined")
        reads_before = d.log.count("resumed.mrc: file is")
        d.append_seen(path, blob[len(blob) // 3:], pieces=4, rescans=2)
        d.wait_for_summary("resumed")
        torn = d.log.count("resumed.mrc: file is") - reads_before
        ok = torn == 0 and d.stop() == 0
        return Outcome("a quarantined truncated file whose transfer resumes is read once, "
                       "when complete", f"{torn} reads mid-write, done when complete",
                       _verdict(ok))
    finally:
        d.kill()


def case_names(root: Path) -> Outcome:
    d = Daemon(root)
    write_tiny_model(d.models / "tiny.safetensors")
    forged = "x.mrc: ok\nfake.mrc: ok in 1.0s\x1b[2J"
    long_name = "L" * 240
    (d.incoming / f"{forged}.mrc").write_bytes(tomogram_bytes(40))
    (d.incoming / f"{long_name}.mrc").write_bytes(tomogram_bytes(41))
    try:
        d.start()
        d.wait_for_log(r"x\.mrc: ok\\nfake\.mrc: ok in 1\.0s\\x1b\[2J\.mrc: ok in ")
        d.wait_for_log(rf"{long_name}\.mrc: file name too long for its outputs")
        forged_lines = [line for line in d.log.splitlines() if line.startswith("fake.mrc")]
        star = next((d.outputs / forged).glob("*_ribosome.star")).read_text()
        star_forged = [line for line in star.splitlines() if line.startswith("fake.mrc")]
        ok = not forged_lines and not star_forged and "\x1b" not in d.log and d.stop() == 0
        return Outcome("a newline/ANSI name cannot forge log lines; a 240-char name is refused "
                       "naming the input",
                       f"{len(forged_lines)} forged lines, escapes shown as text; long name: "
                       "'file name too long for its outputs'", _verdict(ok))
    finally:
        d.kill()


def case_shared_stem(root: Path) -> Outcome:
    d = Daemon(root, watch=[{"path": str(root / "incoming"), "patterns": ["*.mrc", "*.rec"]}])
    write_tiny_model(d.models / "tiny.safetensors")
    (d.incoming / "TS_01.mrc").write_bytes(tomogram_bytes(45))
    try:
        d.start()
        d.wait_for_summary("TS_01")
        (d.incoming / "TS_01.rec").write_bytes(tomogram_bytes(46))  # a sibling, later
        (d.incoming / "TS_02.mrc").write_bytes(tomogram_bytes(47))  # two at once
        (d.incoming / "TS_02.rec").write_bytes(tomogram_bytes(48))
        owners = {folder: Path(d.wait_for_summary(folder)["input"]["path"]).name
                  for folder in ("TS_01", "TS_01_rec", "TS_02_mrc", "TS_02_rec")}
        expected = {"TS_01": "TS_01.mrc", "TS_01_rec": "TS_01.rec",
                    "TS_02_mrc": "TS_02.mrc", "TS_02_rec": "TS_02.rec"}
        ok = owners == expected and d.stop() == 0
        return Outcome("TS_01.mrc and TS_01.rec in one folder each get their own result "
                       "(extension kept); a finished result is not renamed",
                       ", ".join(f"{k}/ <- {v}" for k, v in owners.items()), _verdict(ok))
    finally:
        d.kill()


def case_slow_model_copy(root: Path) -> Outcome:
    d = Daemon(root, settle_seconds=0.3, truncated_after_seconds=30.0)
    write_tiny_model(d.models / "a.safetensors", name="a")
    staged = write_tiny_model(root / "b.staging", name="b", version=2, seed=1)
    try:
        d.start()
        d.wait_for_log(r"serving model a v1")
        blob = staged.read_bytes()
        with (d.models / "b.safetensors").open("wb") as handle:
            for start in range(0, len(blob), len(blob) // 4 + 1):
                handle.write(blob[start:start + len(blob) // 4 + 1])
                handle.flush()
                time.sleep(2.5)  # past the settle time and two model polls: looks settled
        d.wait_for_log(r"serving model b v2")
        rejections = d.metric("tomolive_model_bundles_rejected_total")
        ok = rejections == 0 and d.stop() == 0
        return Outcome("a model copied in four pauses longer than the settle time is served, "
                       "never counted as rejected",
                       f"served; {rejections:g} rejections; "
                       f"{d.log.count('incomplete')} 'incomplete, waiting' notes", _verdict(ok))
    finally:
        d.kill()


def case_missing_watch_folder(root: Path) -> Outcome:
    d = Daemon(root)
    write_tiny_model(d.models / "tiny.safetensors")
    shutil.rmtree(d.incoming)
    try:
        d.start()
        d.wait_for_log(r"watched folder .*incoming does not exist")
        d.wait_for_rescans(3)
        warnings = d.log.count("does not exist")
        d.incoming.mkdir()
        (d.incoming / "late.mrc").write_bytes(tomogram_bytes(50))
        d.wait_for_summary("late")
        ok = warnings == 1 and d.stop() == 0
        return Outcome("a missing watched folder is warned about once; files appear once it "
                       "exists", f"{warnings} warning over 3+ rescans; late file done",
                       _verdict(ok))
    finally:
        d.kill()


class OtherHostDaemon(Daemon):
    """A daemon in its own UTS namespace: another hostname, as a second server would have."""

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", HOLD_DIR_ENV: str(self.hold_dir),
                    **(env or {})}
        self._log = self.log_path.open("ab")
        command = (f"hostname attack-other-host && exec {sys.executable} -m tomolive run "
                   f"--config '{self.config_path}'")
        self.process = subprocess.Popen(["unshare", "--uts", "sh", "-c", command],
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        env=full_env, cwd=self.root)
        return self


def case_two_hosts(root: Path, totals: dict[str, int]) -> Outcome:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return Outcome("0 lost, 0 duplicated across two hostnames", "needs root and unshare",
                       "SKIP")
    shared = root / "site"
    a = Daemon(shared, name="a", lease_seconds=3.0)
    b = OtherHostDaemon(shared, name="b", lease_seconds=3.0)
    write_tiny_model(a.models / "tiny.safetensors")
    stems = [f"s{i:02d}" for i in range(12)]
    try:
        b.hold(stems[0], "inference")
        b.start()
        for i, stem in enumerate(stems):
            (a.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(60 + i))
        b.wait_held(stems[0])
        a.start()
        b.kill()  # the other host dies holding a lease: only its stopped heartbeat tells
        b.release(stems[0])
        wait_until(lambda: all(a.summary(s) for s in stems), 180, "every summary",
                   lambda: a.log[-2000:])
        counts = summary_counts(a.outputs)
        lost = sum(1 for s in stems if counts.get(s, 0) == 0)
        duplicated = sum(max(0, n - 1) for n in counts.values())
        totals["lost"] += lost
        totals["duplicated"] += duplicated
        ok = lost == 0 and duplicated == 0 and "was stale: reclaimed" in a.log
        ok = ok and not partial_outputs(a.outputs) and a.stop() == 0
        return Outcome("12 tomograms, two hostnames, the holder on one SIGKILLed: each done "
                       "exactly once, its lease reclaimed after lease_seconds",
                       f"{lost} lost, {duplicated} duplicated, stale lease reclaimed",
                       _verdict(ok))
    finally:
        a.kill()
        b.kill()


CASES: dict[str, Callable[..., Outcome]] = {
    "bad inputs": case_bad_inputs,
    "stopped worker": case_stopped_worker,
    "device error": case_device_error,
    "full disk": case_full_disk,
    "umask": case_umask,
    "bad models": case_bad_models,
    "crash, input gone": case_crash_input_gone,
    "resumed transfer": case_resumed_transfer,
    "hostile names": case_names,
    "shared stem": case_shared_stem,
    "slow model copy": case_slow_model_copy,
    "missing watch folder": case_missing_watch_folder,
    "two hosts": case_two_hosts,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    os.umask(0o022)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    totals = {"lost": 0, "duplicated": 0}
    rows = []
    for name, case in CASES.items():
        if args.only not in name:
            continue
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="tomolive-attack-") as tmp:
            try:
                extra = (totals,) if case is case_two_hosts else ()
                outcome = case(Path(tmp), *extra)
            except Exception as error:  # a case that crashes is a FAIL with its reason
                outcome = Outcome("(see the case)", " ".join(f"{type(error).__name__}: "
                                                            f"{error}".split())[:300], "FAIL")
                traceback.print_exc(file=sys.stderr)
        seconds = round(time.monotonic() - started, 1)
        rows.append((name, outcome, seconds))
        print(json.dumps({"case": name, "expected": outcome.expected,
                          "observed": outcome.observed, "verdict": outcome.verdict,
                          "seconds": seconds}), flush=True)
    print()
    print(f"{'case':<22} {'verdict':<7} {'s':>6}  expected -> observed")
    for name, outcome, seconds in rows:
        print(f"{name:<22} {outcome.verdict:<7} {seconds:>6.1f}  {outcome.expected} -> "
              f"{outcome.observed}")
    print(f"\n{totals['lost']} lost, {totals['duplicated']} duplicated")
    return 0 if all(outcome.verdict == "PASS" for _, outcome, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
