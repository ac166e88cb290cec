"""`tomolive batch`: drain a backlog with a Slurm job array, beside the running services.

`submit` writes a job folder `OUTPUT/.tomolive/batch/<timestamp>/` (the array job script from
the template shipped in `templates/`, the file list, one ordered list per task, `job.json`) and
submits the script with `sbatch --parsable`. Every task runs `tomolive segment --claim` (see
daemon/batch.py) over all the files, its own share first, so the leases in the shared output
folder keep tasks, services and re-submissions from doing a tomogram twice, and the files of a
killed task are taken over by whoever comes next once its lease goes stale. `status` reads the
shared output folder (and squeue/sacct where they answer) for the files of one job.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .. import __version__
from ..core.atomic import atomic_write_text
from ..core.fingerprint import input_fingerprint
from ..core.result_folder import is_done
from .batch import MAX_ATTEMPTS, relative_output
from .failure_records import FailureRecords
from .leases import lease_key
from .state_files import STATE_DIR

T = TypeVar("T")

BATCH_DIR = "batch"
TEMPLATE = "slurm-array.sbatch"
DEFAULT_ARRAY_SIZE = 8
SLURM_TIMEOUT_S = 30.0
# Values that go into `#SBATCH` lines, which sbatch parses with its own (not the shell's)
# quoting rules: only plain tokens are allowed there; everything else goes on sbatch's argv.
_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+$")


class SlurmError(RuntimeError):
    """sbatch, squeue or the job folder said no: one line for the user."""


class _ScriptTemplate(string.Template):
    # `$` is bash's; `@@name` never occurs in bash (arrays use a single `@`).
    delimiter = "@@"


@dataclass
class SubmitRequest:
    """What `tomolive batch submit` was asked for (paths as given; made absolute here)."""

    tomograms: list[Path]
    out_dir: Path
    relative_to: Path
    gpus_per_task: int = 1
    partition: str | None = None
    array_size: int | None = None
    sbatch_args: list[str] = field(default_factory=list)
    model: Path | None = None
    lease_seconds: float = 120.0
    # The command the tasks run: this very interpreter, so a task uses the tomolive that
    # submitted it (a venv on a shared filesystem), not whatever `tomolive` its PATH finds.
    tomolive_argv: list[str] = field(default_factory=lambda: [sys.executable, "-m", "tomolive"])


@dataclass
class PreparedJob:
    job_dir: Path
    script: Path
    sbatch_argv: list[str]
    tasks: int


# -- shares ------------------------------------------------------------------------------------

def array_size_for(n_files: int, requested: int | None) -> int:
    """Tasks in the array: as requested (default DEFAULT_ARRAY_SIZE), never more than files."""
    if n_files < 1:
        raise ValueError("no tomograms given")
    size = DEFAULT_ARRAY_SIZE if requested is None else requested
    if size < 1:
        raise ValueError(f"--array-size {size}: must be at least 1")
    return min(size, n_files)


def task_order(items: Sequence[T], task: int, tasks: int) -> list[T]:
    """Every item, in the order task `task` of `tasks` visits them: its own share first
    (items task, task+tasks, ...), then the next tasks' shares in turn. Tasks start on
    disjoint files; what a dead task leaves is reached by the others at the end."""
    order: list[T] = []
    for step in range(tasks):
        order.extend(items[(task + step) % tasks::tasks])
    return order


# -- the job folder ----------------------------------------------------------------------------

def _nul_list(paths: Sequence[Path]) -> str:
    return "".join(f"{path}\0" for path in paths)


def _validate(request: SubmitRequest) -> list[Path]:
    paths = [path.absolute() for path in request.tomograms]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path}: tomogram not found")
        # Raises naming the file if it is not under ROOT.
        relative_output(path, request.out_dir, request.relative_to)
    if request.model is not None and not request.model.is_file():
        raise ValueError(f"{request.model}: model file not found")
    if request.gpus_per_task < 0:
        raise ValueError(f"--gpus-per-task {request.gpus_per_task}: must be 0 or more")
    if request.lease_seconds <= 0:
        raise ValueError(f"--lease-seconds {request.lease_seconds:g}: must be positive")
    if request.partition is not None and not _PARTITION.match(request.partition):
        raise ValueError(f"--partition {request.partition!r}: not a Slurm partition name")
    return paths


def _directives(request: SubmitRequest) -> str:
    lines = []
    if request.gpus_per_task:
        lines.append(f"#SBATCH --gres=gpu:{request.gpus_per_task}".ljust(37)
                     + "# Slurm sets CUDA_VISIBLE_DEVICES")
    if request.partition:
        lines.append(f"#SBATCH --partition={request.partition}")
    return "\n".join(lines)


def render_script(request: SubmitRequest, job_dir: Path, tasks: int, n_files: int,
                  submitted_at: str) -> str:
    """The array job script: the shipped template with every value shell-quoted."""
    template = resources.files("tomolive.daemon").joinpath("templates", TEMPLATE).read_text()
    model_args = ["--model", str(request.model.absolute())] if request.model else []
    return _ScriptTemplate(template).substitute(
        version=__version__,
        submitted_at=submitted_at,
        tasks=tasks,
        files=n_files,
        last_task=tasks - 1,
        directives=_directives(request),
        job_dir=shlex.quote(str(job_dir)),
        out_dir=shlex.quote(str(request.out_dir.absolute())),
        relative_to=shlex.quote(str(request.relative_to.absolute())),
        lease_seconds=shlex.quote(f"{request.lease_seconds:g}"),
        tomolive=shlex.join(request.tomolive_argv),
        model_args=shlex.join(model_args),
    )


def _slurm_filename(path: Path) -> str:
    """`path` for sbatch --output, whose `%` starts a pattern (`%%` is a literal one)."""
    return str(path).replace("%", "%%")


def sbatch_command(job_dir: Path, script: Path, sbatch_args: Sequence[str]) -> list[str]:
    """sbatch's argv: ours first, then the user's --sbatch-arg values, which override ours and
    the script's lines. An argv list, never a shell line, so no value is ever re-parsed."""
    return ["sbatch", "--parsable", f"--chdir={job_dir}",
            f"--output={_slurm_filename(job_dir)}/task-%a.log", *sbatch_args, str(script)]


def _new_job_dir(out_dir: Path) -> tuple[Path, str]:
    parent = out_dir.absolute() / STATE_DIR / BATCH_DIR
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in range(1000):  # two submissions in one second get distinct folders
        job_dir = parent / (stamp if suffix == 0 else f"{stamp}-{suffix}")
        try:
            job_dir.mkdir()
        except FileExistsError:
            continue
        return job_dir, time.strftime("%Y-%m-%dT%H:%M:%S%z")
    raise SlurmError(f"{parent}: cannot create a job folder")


def prepare_job(request: SubmitRequest) -> PreparedJob:
    """Write the job folder (script, file lists, job.json without a job id); submit nothing."""
    paths = _validate(request)
    tasks = array_size_for(len(paths), request.array_size)
    job_dir, submitted_at = _new_job_dir(request.out_dir)
    (job_dir / "tasks").mkdir()
    (job_dir / "files.list").write_text(_nul_list(paths))
    for task in range(tasks):
        (job_dir / "tasks" / f"{task}.list").write_text(_nul_list(task_order(paths, task, tasks)))
    script = job_dir / TEMPLATE
    script.write_text(render_script(request, job_dir, tasks, len(paths), submitted_at))
    script.chmod(0o755)
    argv = sbatch_command(job_dir, script, request.sbatch_args)
    _write_job_record(job_dir, {
        "job_id": None, "submitted": submitted_at, "out_dir": str(request.out_dir.absolute()),
        "relative_to": str(request.relative_to.absolute()), "tasks": tasks, "files": len(paths),
        "lease_seconds": request.lease_seconds, "sbatch": argv,
        "model": str(request.model.absolute()) if request.model else None})
    return PreparedJob(job_dir, script, argv, tasks)


def _write_job_record(job_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(job_dir / "job.json", json.dumps(record, indent=1) + "\n")


def _read_job_record(job_dir: Path) -> dict[str, Any]:
    path = job_dir / "job.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SlurmError(f"{path}: unreadable job record ({error})") from None


# -- sbatch, squeue, sacct ---------------------------------------------------------------------

def _run_slurm(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]}: command not found (is this a Slurm submit host?)")
    try:
        return subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=SLURM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]}: no answer within {SLURM_TIMEOUT_S:g}s") from None


def submit(request: SubmitRequest) -> tuple[str, PreparedJob]:
    """Write the job folder and submit it; returns (job id, the job)."""
    if shutil.which("sbatch") is None:  # before writing a job folder that cannot run
        raise SlurmError("sbatch: command not found (is this a Slurm submit host?)")
    job = prepare_job(request)
    result = _run_slurm(job.sbatch_argv)
    job_id = result.stdout.strip().split(";", 1)[0]  # --parsable: "ID" or "ID;CLUSTER"
    if result.returncode != 0 or not job_id.isdigit():
        detail = " ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}"
        raise SlurmError(f"{job.script}: sbatch failed: {detail}")
    record = _read_job_record(job.job_dir)
    _write_job_record(job.job_dir, {**record, "job_id": job_id})
    return job_id, job


def slurm_task_states(job_id: str) -> list[dict[str, str]]:
    """The array's tasks as squeue (pending and running) and sacct (finished, where accounting
    is on) see them; [] where neither answers. Informational: the output folder is the truth."""
    states: dict[str, dict[str, str]] = {}
    if shutil.which("sacct"):
        result = _run_slurm(["sacct", "-n", "-X", "-P", "-j", job_id,
                             "-o", "JobID,State,NodeList,ExitCode"])
        for line in result.stdout.splitlines() if result.returncode == 0 else []:
            fields = line.split("|")
            if len(fields) == 4:
                states[fields[0]] = {"task": fields[0], "state": fields[1], "where": fields[2],
                                     "exit": fields[3]}
    if shutil.which("squeue"):
        result = _run_slurm(["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T|%R"])
        for line in result.stdout.splitlines() if result.returncode == 0 else []:
            fields = line.split("|")
            if len(fields) == 3:
                states[fields[0]] = {"task": fields[0], "state": fields[1], "where": fields[2]}
    if not states:  # no accounting: slurmctld still knows finished tasks for MinJobAge
        states = {entry["task"]: entry for entry in _scontrol_tasks(job_id)}
    return sorted(states.values(), key=lambda entry: entry["task"])


def _scontrol_fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", line))


def _scontrol_tasks(job_id: str) -> list[dict[str, str]]:
    if shutil.which("scontrol") is None:
        return []
    result = _run_slurm(["scontrol", "-o", "show", "job", job_id])
    tasks = []
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        fields = _scontrol_fields(line)
        if "ArrayTaskId" in fields:
            tasks.append({"task": f"{fields.get('ArrayJobId')}_{fields['ArrayTaskId']}",
                          "state": fields.get("JobState", "?"),
                          "where": fields.get("NodeList", "")})
    return tasks


def _scontrol_workdir(job_id: str) -> Path | None:
    """The job's working directory (submit sets it to the job folder), while slurmctld still
    knows the job (MinJobAge after its end)."""
    if shutil.which("scontrol") is None:
        return None
    result = _run_slurm(["scontrol", "-o", "show", "job", job_id])
    match = re.search(r"\bWorkDir=(.*?)(?= \w+=|$)", result.stdout) \
        if result.returncode == 0 else None
    return Path(match.group(1)) if match else None


def find_job_dir(job_id: str, out_dir: Path | None) -> Path:
    """The job folder of `job_id`: searched in OUTPUT/.tomolive/batch, else asked of Slurm."""
    if not job_id.isdigit():
        raise ValueError(f"{job_id!r}: not a Slurm job id")
    if out_dir is not None:
        for record in sorted((out_dir / STATE_DIR / BATCH_DIR).glob("*/job.json")):
            try:
                if _read_job_record(record.parent).get("job_id") == job_id:
                    return record.parent
            except SlurmError:
                continue  # another job's torn record must not hide this one
        raise SlurmError(f"{out_dir / STATE_DIR / BATCH_DIR}: no job folder for job {job_id}")
    workdir = _scontrol_workdir(job_id)
    if workdir is not None and (workdir / "job.json").is_file() \
            and _read_job_record(workdir).get("job_id") == job_id:
        return workdir
    raise SlurmError(f"job {job_id}: Slurm does not know its folder (any more); "
                     "give --out OUTPUT")


# -- status ------------------------------------------------------------------------------------

STATES = ("done", "running", "failed", "quarantined", "waiting", "missing")


def _file_state(path: Path, out_dir: Path, relative_to: Path,
                failures: FailureRecords) -> dict[str, Any]:
    rel_output = relative_output(path, out_dir, relative_to)
    key = lease_key(rel_output)
    entry: dict[str, Any] = {"file": str(path), "output": rel_output}
    try:
        fingerprint = input_fingerprint(path)
    except OSError:
        return {**entry, "state": "missing"}
    lease = _read_lease(out_dir / STATE_DIR / "leases" / f"{key}.lease")
    record = failures.get(key)
    if is_done(out_dir / rel_output, None, fingerprint):
        return {**entry, "state": "done"}
    if lease is not None:
        return {**entry, "state": "running", "host": lease.get("host"), "pid": lease.get("pid")}
    if failures.is_quarantined(key, fingerprint):
        return {**entry, "state": "quarantined", "error": record.get("last_error")}
    if record and record.get("fingerprint") == fingerprint:
        return {**entry, "state": "failed", "attempts": record.get("attempts"),
                "error": record.get("last_error")}
    return {**entry, "state": "waiting"}


def _read_lease(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # torn or foreign: still someone's lease
    return record if isinstance(record, dict) else {}


def job_status(job_id: str, out_dir: Path | None = None) -> dict[str, Any]:
    """Per-file state of job `job_id`'s tomograms, from the shared output folder."""
    job_dir = find_job_dir(job_id, out_dir)
    record = _read_job_record(job_dir)
    job_out = Path(record["out_dir"])
    paths = [Path(p) for p in (job_dir / "files.list").read_text().split("\0") if p]
    failures = FailureRecords(job_out, MAX_ATTEMPTS)
    files = [_file_state(path, job_out, Path(record["relative_to"]), failures)
             for path in paths]
    counts = {state: sum(f["state"] == state for f in files) for state in STATES}
    return {"job_id": job_id, "job_dir": str(job_dir), "out_dir": str(job_out),
            "counts": counts, "files": files, "slurm": slurm_task_states(job_id)}


def format_job_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"job {report['job_id']} ({report['job_dir']}): {len(report['files'])} files: "
             + ", ".join(f"{counts[state]} {state}" for state in STATES if
                         counts[state] or state in ("done", "running", "waiting"))]
    for entry in report["files"]:
        if entry["state"] == "running":
            lines.append(f"  running      {entry['output']} on {entry.get('host')} "
                         f"(pid {entry.get('pid')})")
        elif entry["state"] in ("failed", "quarantined"):
            lines.append(f"  {entry['state']:<12} {entry['output']}: {entry.get('error')}")
        elif entry["state"] == "missing":
            lines.append(f"  missing      {entry['file']}")
    for task in report["slurm"]:
        where = f" on {task['where']}" if task.get("where") else ""
        lines.append(f"  slurm        {task['task']} {task['state']}{where}")
    return "\n".join(lines)
