"""`tomolive batch` (issue 23): the array job script it generates, and a real one-node Slurm
cluster (slurmctld, slurmd, munged started by the test on loopback) running a 4-task array
beside a daemon on one output folder, with one task cancelled mid-tomogram.

The cluster test needs root and Debian's slurmctld, slurmd, slurm-client and munge
(`scripts/install-slurm.sh`); without them it is skipped with the reason, except under
TOMOLIVE_REQUIRE_SLURM=1 (set by .ci/run), where it fails instead: CI must not pass by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tomolive.daemon import cli
from tomolive.daemon.holds import HOLD_DIR_ENV
from tomolive.daemon.slurm import SubmitRequest, array_size_for, prepare_job, task_order

from .daemon_harness import (
    Daemon,
    partial_outputs,
    pid_alive,
    summary_counts,
    tomogram_bytes,
    wait_until,
    write_tiny_model,
)

REQUIRE_ENV = "TOMOLIVE_REQUIRE_SLURM"
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol",
               "munged")
HOSTILE_NAMES = ("a b.mrc", "it's.mrc", "$(touch PWNED).mrc", '"dq" `touch PWNED`.mrc',
                 "new\nline.mrc", "semi;colon & amp.mrc", "per%cent %a.mrc")
LEASE_S = 4.0
SHAPE_ZYX = (16, 64, 64)
N_TOMOGRAMS = 12
N_TASKS = 4


# -- script generation (no Slurm needed) -------------------------------------------------------

def test_task_order_starts_on_disjoint_shares_and_covers_everything():
    items = list(range(12))
    orders = [task_order(items, task, 4) for task in range(4)]
    assert orders[1][:3] == [1, 5, 9]
    assert orders[1] == [1, 5, 9, 2, 6, 10, 3, 7, 11, 0, 4, 8]
    firsts = [set(order[:3]) for order in orders]
    assert set().union(*firsts) == set(items) and sum(map(len, firsts)) == 12  # disjoint
    assert all(sorted(order) == items for order in orders)
    assert task_order(items[:5], 3, 4) == [3, 0, 4, 1, 2]  # uneven shares


def test_array_size_defaults_and_never_exceeds_the_files():
    assert array_size_for(12, 4) == 4
    assert array_size_for(3, 4) == 3
    assert array_size_for(100, None) == 8
    with pytest.raises(ValueError, match="--array-size 0"):
        array_size_for(5, 0)
    with pytest.raises(ValueError, match="no tomograms"):
        array_size_for(0, None)


def _stub(path: Path, record: Path, stdout: str = "") -> Path:
    """An executable that records its argv, NUL-separated, and prints `stdout`."""
    path.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{record}'\nprintf '{stdout}'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def hostile(tmp_path) -> dict[str, Any]:
    """Tomograms, root, output folder and model whose names a shell would misread."""
    root = tmp_path / "root it's $(touch PWNED)"
    session = root / 'session "one"'
    session.mkdir(parents=True)
    paths = []
    for name in HOSTILE_NAMES:
        path = session / name
        path.write_bytes(b"not read here")
        paths.append(path)
    model = tmp_path / "model $HOME's.safetensors"
    model.write_bytes(b"not read here")
    return {"root": root, "paths": paths, "out": tmp_path / "out 'x' `id` 50%", "model": model}


def _run_task(script: Path, task: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task)})


def test_generated_script_passes_hostile_names_through_verbatim(hostile, tmp_path):
    record = tmp_path / "argv.bin"
    stub = _stub(tmp_path / "fake tomolive", record)
    request = SubmitRequest(tomograms=hostile["paths"], out_dir=hostile["out"],
                            relative_to=hostile["root"], array_size=3,
                            model=hostile["model"], lease_seconds=LEASE_S,
                            tomolive_argv=[str(stub), "first arg's"])
    job = prepare_job(request)
    text = job.script.read_text()
    assert "#SBATCH --array=0-2\n" in text and "#SBATCH --gres=gpu:1" in text
    assert subprocess.run(["bash", "-n", str(job.script)]).returncode == 0
    for task in range(3):
        result = _run_task(job.script, task, tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"task {task} of 3" in result.stdout
        argv = record.read_bytes().split(b"\0")[:-1]
        assert [a.decode() for a in argv] == [
            "first arg's", "segment", "--claim", "--out", str(hostile["out"]),
            "--relative-to", str(hostile["root"]), "--lease-seconds", "4",
            "--model", str(hostile["model"]),
            *map(str, task_order(hostile["paths"], task, 3))]
    assert not list(tmp_path.rglob("PWNED")), "a file name was executed"


def test_gpus_and_partition_lines(hostile):
    base = {"tomograms": hostile["paths"][:2], "out_dir": hostile["out"],
            "relative_to": hostile["root"]}
    cpu = prepare_job(SubmitRequest(**base, gpus_per_task=0, partition="gpu-a100.long"))
    text = cpu.script.read_text()
    assert "--gres" not in text and "#SBATCH --partition=gpu-a100.long\n" in text
    assert "#SBATCH --array=0-1\n" in text  # array size clamped to the 2 files
    with pytest.raises(ValueError, match="--partition 'a b'"):
        prepare_job(SubmitRequest(**base, partition="a b"))


def test_submit_passes_sbatch_args_verbatim_and_records_the_job(hostile, tmp_path, monkeypatch,
                                                                 capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch-argv.bin"
    _stub(bin_dir / "sbatch", record, stdout="4242;cluster\\n")
    monkeypatch.setenv("PATH", str(bin_dir))  # only the stub: no real squeue, sacct, scontrol
    hostile_arg = "--comment=$(touch PWNED) it's \"quoted\""
    code = cli.main(["batch", "submit", *map(str, hostile["paths"]), "--out",
                     str(hostile["out"]), "--relative-to", str(hostile["root"]),
                     "--gpus-per-task", "2", "--array-size", "4",
                     "--sbatch-arg=--time=01:00:00", "--sbatch-arg", hostile_arg])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "4242\n"
    argv = [a.decode() for a in record.read_bytes().split(b"\0")[:-1]]
    job_dir = Path(argv[1].removeprefix("--chdir="))
    assert job_dir.parent == hostile["out"] / ".tomolive" / "batch"
    assert argv == ["--parsable", f"--chdir={job_dir}",
                    f"--output={str(job_dir).replace('%', '%%')}/task-%a.log",
                    "--time=01:00:00", hostile_arg, str(job_dir / "slurm-array.sbatch")]
    job = json.loads((job_dir / "job.json").read_text())
    assert job["job_id"] == "4242" and job["tasks"] == 4 and job["files"] == len(HOSTILE_NAMES)
    assert "#SBATCH --gres=gpu:2" in (job_dir / "slurm-array.sbatch").read_text()
    assert cli.main(["batch", "status", "4242", "--out", str(hostile["out"])]) == 0
    status = capsys.readouterr().out
    assert f"{len(HOSTILE_NAMES)} files: 0 done, 0 running, {len(HOSTILE_NAMES)} waiting" \
        in status, status
    assert cli.main(["batch", "status", "4243", "--out", str(hostile["out"])]) == 1
    assert "no job folder for job 4243" in capsys.readouterr().err
    assert not list(tmp_path.rglob("PWNED"))


def test_failed_sbatch_is_one_line_naming_the_script(hostile, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission "
                                    "failed:' >&2\necho ' Invalid partition name' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    code = cli.main(["batch", "submit", str(hostile["paths"][0]), "--out", str(hostile["out"]),
                     "--relative-to", str(hostile["root"])])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "slurm-array.sbatch: sbatch failed: sbatch: error: Batch job submission failed: " \
           "Invalid partition name" in err


# -- a real one-node cluster -------------------------------------------------------------------

def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the one-node Slurm cluster needs root (slurmd runs jobs as their user)"
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run scripts/install-slurm.sh as root"
    return None


def _free_loopback_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):  # all held open at once, so the ports differ
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _real_memory_mb(margin_mb: int = 1024) -> int:
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE).group(1))
    return max(256, total_kb // 1024 - margin_mb)


class OneNodeCluster:
    """munged, slurmctld and slurmd of our own: key, sockets, ports, state and logs in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        # munged wants every folder above its socket searchable by all, which pytest's 0700
        # temporary folders are not: its own folder in the system temporary folder.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="tomolive-test-munge-"))
        self.munge_dir.chmod(0o711)
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> OneNodeCluster:
        self._start_munge()
        self._write_conf()
        for name in ("slurmctld", "slurmd"):
            self._spawn(name, [name, "-D", "-f", str(self.conf)])
        wait_until(lambda: self.node_state() == "idle" or any(map(self._exited, self.processes)),
              90, "the node to be idle in sinfo", self.logs)
        exited = [name for name in self.processes if self._exited(name)]
        assert not exited, f"{', '.join(exited)} exited\n{self.logs()}"
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.root / f"{name}.out").open("wb") as out:
            self.processes[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                    env=self.env, start_new_session=True)

    def _start_munge(self) -> None:
        folder = self.munge_dir
        key = folder / "munge.key"
        if shutil.which("mungekey"):
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        else:
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
                               f"--log-file={folder / 'munged.log'}",
                               f"--seed-file={folder / 'munged.seed'}"])
        wait_until(lambda: self.munge_socket.exists() or self._exited("munged"), 30,
              "the munge socket", self.logs)
        assert not self._exited("munged"), f"munged exited\n{self.logs()}"

    def _exited(self, name: str) -> bool:
        return self.processes[name].poll() is not None

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_loopback_ports(2)
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir()
        spool.mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=tomolive-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=5",
            "MinJobAge=600",  # `batch status JOBID` asks scontrol for finished jobs' folders
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={_real_memory_mb()} "
            "State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def slurm(self, *argv: str, check: bool = True) -> str:
        result = subprocess.run(list(argv), capture_output=True, text=True, env=self.env,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr}")
        return result.stdout

    def node_state(self) -> str:
        return self.slurm("sinfo", "-h", "-o", "%T", check=False).strip()

    def queued(self) -> list[str]:
        return self.slurm("squeue", "-h", "-o", "%A", check=False).split()

    def logs(self) -> str:
        parts = []
        names = ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out")
        for path in [*(self.root / name for name in names), self.munge_dir / "munged.log"]:
            log = path.name
            if path.exists():
                parts.append(f"--- {log}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, wait for it to go, then stop the daemons (nothing left over)."""
        try:
            if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
                jobs = self.queued()
                if jobs:
                    self.slurm("scancel", *jobs, check=False)
                    wait_until(lambda: not self.queued(), 60, "cancelled jobs to leave", self.logs)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                process = self.processes.get(name)
                if process is None or process.poll() is not None:
                    continue
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            shutil.rmtree(self.munge_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path_factory, monkeypatch) -> Iterator[OneNodeCluster]:
    reason = _unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but the Slurm test cannot run: {reason}")
        print(f"\nskipped: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    one = OneNodeCluster(root)
    try:
        one.start()
        monkeypatch.setenv("SLURM_CONF", str(one.conf))  # for sbatch run by `tomolive batch`
        yield one
    finally:
        one.stop()


def _tomolive(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tomolive", *argv], capture_output=True,
                          text=True, timeout=120)


def _held_pid(marker: Path) -> int | None:
    """The pid in a hold's `.held` marker (`POINT PID`), once it is written whole."""
    try:
        fields = marker.read_text().split()
    except FileNotFoundError:
        return None
    return int(fields[1]) if len(fields) == 2 else None


def _task_of_pid(job_dir: Path, pid: int) -> str | None:
    """The array task id (as text: task "0" must count as found) whose log names `pid`."""
    for log in job_dir.glob("task-*.log"):
        match = re.search(rf"task (\d+) of \d+ on \S+ \(pid {pid}\)", log.read_text())
        if match:
            return match.group(1)
    return None


def _done_lines(text: str, stem: str) -> int:
    return len(re.findall(rf"^{re.escape(stem)}: done in ", text, re.MULTILINE))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_array_beside_a_daemon_with_a_cancelled_task_does_each_tomogram_once(
        cluster, tmp_path, monkeypatch):
    started = time.monotonic()
    d = Daemon(tmp_path / "site", lease_seconds=LEASE_S)
    model = write_tiny_model(d.models / "tiny.safetensors")
    stems = [f"ts{i:02d}" for i in range(N_TOMOGRAMS)]
    for i, stem in enumerate(stems):
        (d.incoming / f"{stem}.mrc").write_bytes(tomogram_bytes(900 + i, shape_zyx=SHAPE_ZYX))
    task_holds = tmp_path / "task-holds"
    task_holds.mkdir()
    # The array tasks inherit the submitting environment (sbatch's default --export=ALL).
    monkeypatch.setenv(HOLD_DIR_ENV, str(task_holds))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 cores: tasks and daemon share them
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")

    # The daemon parks on the first tomogram it reads, so that it provably works beside the
    # array (it holds that one) and cannot take the others before the tasks start.
    for stem in stems:
        d.hold(stem, "read")
    try:
        d.start()
        daemon_stem = d.wait_for(lambda: next((p.stem for p in d.hold_dir.glob("*.held")),
                                              None), 120, "the daemon to park")
        # Task 1 of 4 starts on the second file of the list, task 0 comes to it after its own
        # share: whichever claims it first parks in inference there.
        victim = next(s for s in stems if s != daemon_stem)
        order = [s for s in stems if s not in (victim, daemon_stem)]
        order = [order[0], victim, *order[1:], daemon_stem]
        (task_holds / f"{victim}.hold").write_text("inference")
        submit = _tomolive("batch", "submit", *(str(d.incoming / f"{s}.mrc") for s in order),
                           "--out", str(d.outputs), "--relative-to", str(d.incoming),
                           "--gpus-per-task", "0", "--array-size", str(N_TASKS),
                           "--model", str(model), "--lease-seconds", str(LEASE_S),
                           "--sbatch-arg=--cpus-per-task=1")
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip()
        job_dir = next(p.parent for p in (d.outputs / ".tomolive" / "batch").glob("*/job.json")
                       if json.loads(p.read_text())["job_id"] == job_id)

        def task_logs() -> str:
            return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}"
                             for p in sorted(job_dir.glob("task-*.log")))

        def diagnose() -> str:
            return (f"{task_logs()[-4000:]}\n--- squeue\n{cluster.slurm('squeue', check=False)}"
                    f"\n--- daemon\n{d.log[-2000:]}\n{cluster.logs()}")

        marker = task_holds / f"{victim}.held"
        pid = wait_until(lambda: _held_pid(marker), 240, f"a task to park on {victim}", diagnose)
        task = wait_until(lambda: _task_of_pid(job_dir, pid), 30, f"the task of pid {pid}",
                          diagnose)
        for stem in stems:
            d.release(stem)  # the daemon goes on beside the tasks
        cluster.slurm("scancel", f"{job_id}_{task}")
        wait_until(lambda: not pid_alive(pid), 60, f"cancelled task {task} (pid {pid}) to die",
              diagnose)
        # Nothing to release: the parked process is gone. The request goes so that whoever
        # takes the tomogram over (a task or the daemon, once the lease is seen dead) runs on.
        (task_holds / f"{victim}.hold").unlink()

        wait_until(lambda: all(d.summary(s) for s in stems), 300, "every summary", diagnose)
        wait_until(lambda: job_id not in cluster.queued(), 120, "the array to finish",
              diagnose)
        logs = task_logs()
        killed_log = (job_dir / f"task-{task}.log").read_text()
        for stem in stems:
            by_daemon = len(re.findall(rf"\b{stem}\.mrc: ok in ", d.log))
            assert by_daemon + _done_lines(logs, stem) == 1, (stem, logs, d.log)
        assert _done_lines(killed_log, victim) == 0
        assert re.search(rf"\b{daemon_stem}\.mrc: ok in ", d.log), d.log
        assert summary_counts(d.outputs) == dict.fromkeys(stems, 1)
        assert partial_outputs(d.outputs) == []
        leases = d.outputs / ".tomolive" / "leases"
        d.wait_for(lambda: not list(leases.glob("*.lease")), 30, "leases released")
        assert not list(leases.glob(".*.beat"))
        assert not list((d.outputs / ".tomolive").glob("failures/*.json"))

        status = _tomolive("batch", "status", job_id)  # the job folder found through Slurm
        assert status.returncode == 0, status.stderr
        assert f"{N_TOMOGRAMS} files: {N_TOMOGRAMS} done, 0 running, 0 waiting" in status.stdout
        assert re.search(rf"slurm +{job_id}_{task} CANCELLED", status.stdout), status.stdout
        print(f"\n{status.stdout}\ncancelled task {task} on {victim}; daemon did "
              f"{len(re.findall(r': ok in ', d.log))}; "
              f"{time.monotonic() - started:.0f}s in all")
        assert d.stop() == 0
    finally:
        d.kill()
