"""One worker process per device; a worker runs the whole pipeline for one tomogram at a time.

Processes (not threads) so that a crash, a CUDA error or a memory kill in one worker cannot
take the service down: the main process sees the worker's death, records the failure and
starts a new one. Workers take jobs from their own inbox and report through their own pipe
(not one shared queue: a worker killed while writing to a shared queue holds its lock forever,
and every other worker's reports wedge behind it); before publishing a result they ask the
main process, which holds the lease, for permission.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import one_line
from ..core.result_folder import read_summary
from .logs import configure_logging
from .messages import (
    Job,
    JobAbandoned,
    JobDone,
    JobFailed,
    MayPublish,
    Progress,
    PublishReply,
    RunJob,
    Stop,
    WorkerReady,
    WorkerReport,
)

log = logging.getLogger("tomolive.workers")

# How long a worker waits for the main process to answer "may I publish?" before giving up.
PUBLISH_REPLY_TIMEOUT_S = 120.0
# Progress beats go to the main process at most this often (and at every new stage): enough
# to prove the pipeline moves, cheap next to the work.
PROGRESS_BEAT_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerHandle:
    device: str
    index: int
    process: Any = None
    inbox: Any = None
    reports: Any = None  # the read end of this worker's report pipe
    job: Job | None = None
    job_started_monotonic: float = 0.0
    # The worker's last sign of progress on its job (submission, then its progress beats).
    last_beat_monotonic: float = 0.0
    stage: str = "queued"
    restarts: int = 0
    # After a device error the worker takes no job until then (see WorkerPool.pause).
    paused_until_monotonic: float = 0.0

    @property
    def paused(self) -> bool:
        return time.monotonic() < self.paused_until_monotonic

    @property
    def idle(self) -> bool:
        return (self.job is None and not self.paused and self.process is not None
                and self.process.is_alive())


class WorkerPool:
    """Starts, feeds and restarts one worker process per device."""

    def __init__(self, devices: list[str], threads_per_cpu_worker: int | None = None) -> None:
        self._context = mp.get_context("spawn")  # fork is unsafe with CUDA and with threads
        self.workers = [WorkerHandle(device=d, index=i) for i, d in enumerate(devices)]
        self.threads_per_cpu_worker = threads_per_cpu_worker
        self._unkillable: list[Any] = []

    def start(self) -> None:
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: WorkerHandle) -> None:
        worker.inbox = self._context.Queue()
        if worker.reports is not None:
            worker.reports.close()  # the old worker's pipe: whatever it left unsaid is moot
        worker.reports, sender = self._context.Pipe(duplex=False)
        worker.process = self._context.Process(
            target=worker_main,
            args=(worker.device, worker.index, worker.inbox, sender,
                  self.threads_per_cpu_worker),
            name=f"tomolive-worker-{worker.index}", daemon=True,
        )
        worker.process.start()
        sender.close()  # only the worker writes: its death then reads as end-of-file here
        worker.job = None

    def idle_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.idle]

    def busy_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.job is not None]

    def submit(self, worker: WorkerHandle, job: Job) -> None:
        worker.job = job
        worker.job_started_monotonic = worker.last_beat_monotonic = time.monotonic()
        worker.stage = "queued"
        worker.inbox.put(RunJob(job))

    def beat(self, job_id: int, stage: str) -> None:
        """A progress beat from inside the pipeline of `job_id`."""
        worker = self.worker_of(job_id)
        if worker is not None:
            worker.last_beat_monotonic = time.monotonic()
            worker.stage = stage

    def worker_of(self, job_id: int) -> WorkerHandle | None:
        return next((w for w in self.workers if w.job is not None and w.job.job_id == job_id),
                    None)

    def stalled(self, stall_s: float) -> list[WorkerHandle]:
        """Busy workers whose last progress beat is older than `stall_s`."""
        now = time.monotonic()
        return [w for w in self.workers
                if w.job is not None and now - w.last_beat_monotonic > stall_s]

    def kill_stalled(self, worker: WorkerHandle) -> Job | None:
        """SIGKILL a stalled worker (it works on a stopped process too, where SIGTERM waits)
        and start its replacement at once; returns the job it held."""
        job, worker.job = worker.job, None
        self._restart(worker)
        return job

    def pause(self, worker: WorkerHandle, seconds: float) -> None:
        """Give `worker` no job for `seconds` after a device error, and restart its process
        now: a CUDA context that met a sticky error (an illegal access, a device-side
        assert) stays unusable until its process exits."""
        worker.paused_until_monotonic = time.monotonic() + seconds
        if worker.job is None:
            self._restart(worker)

    def paused_counts(self) -> dict[str, int]:
        """Paused workers per device (every device present, 0 when none is paused)."""
        counts = {w.device: 0 for w in self.workers}
        for worker in self.workers:
            counts[worker.device] += worker.paused
        return counts

    def _restart(self, worker: WorkerHandle) -> None:
        # SIGKILL: it works on a stopped process too, where SIGTERM waits.
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            self._unkillable.append(worker.process)
        worker.restarts += 1
        self._spawn(worker)

    def unkillable(self) -> int:
        """Killed stalled workers not dead yet: a process in uninterruptible sleep on a hung
        mount dies only when its system call returns (a replacement already runs)."""
        self._unkillable = [p for p in self._unkillable if p.is_alive()]
        return len(self._unkillable)

    def reply_publish(self, job_id: int, allowed: bool) -> None:
        worker = self.worker_of(job_id)
        if worker is not None:
            worker.inbox.put(PublishReply(job_id, allowed))

    def finish(self, job_id: int) -> tuple[WorkerHandle, Job, float] | None:
        """Mark the worker running `job_id` idle; returns it, the job and busy seconds."""
        worker = self.worker_of(job_id)
        if worker is None:
            return None
        job, worker.job = worker.job, None
        return worker, job, time.monotonic() - worker.job_started_monotonic

    def messages(self, timeout_s: float) -> list[WorkerReport]:
        """Everything the workers said, waiting at most `timeout_s` for the first message."""
        readers = {w.reports: w for w in self.workers if w.reports is not None}
        found: list[WorkerReport] = []
        for reader in mp_connection.wait(list(readers), timeout_s):
            worker = readers[reader]
            try:
                while reader.poll():
                    found.append(reader.recv())
            except (EOFError, OSError):  # the worker died (reap_dead restarts it)
                reader.close()
                worker.reports = None
        return found

    def reap_dead(self) -> list[tuple[WorkerHandle, Job | None, int | None]]:
        """Workers that died: restart each; return (worker, the job it held, exit code)."""
        dead = []
        for worker in self.workers:
            if worker.process is not None and not worker.process.is_alive():
                job, exitcode = worker.job, worker.process.exitcode
                worker.process.join(timeout=1)
                worker.restarts += 1
                self._spawn(worker)
                dead.append((worker, job, exitcode))
        return dead

    def abandon(self, worker: WorkerHandle) -> Job | None:
        """Kill a worker in the middle of a job (shutdown past the grace period)."""
        job = worker.job
        _stop_process(worker.process)
        worker.job = None
        return job

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                with contextlib.suppress(Exception):
                    worker.inbox.put(Stop())
        for worker in self.workers:
            if worker.process is not None:
                worker.process.join(timeout=10)
                _stop_process(worker.process)
            if worker.reports is not None:
                worker.reports.close()
                worker.reports = None


def _stop_process(process: Any) -> None:
    if process is None or not process.is_alive():
        return
    process.terminate()
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)


# --- inside the worker process ----------------------------------------------------------------

class _Reports:
    """The worker's end of its report pipe, with the queue-like `put` the runner uses."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def put(self, message: WorkerReport) -> None:
        self.connection.send(message)


def worker_main(device: str, index: int, inbox: Any, report_pipe: Any,
                threads: int | None) -> None:
    """The worker process: take a job, run the pipeline, report; forever."""
    _die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; the main process decides what
    # happens to running work, so workers ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging()  # a spawned process starts without the daemon's logging set-up
    import torch

    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    outbox = _Reports(report_pipe)
    runner = _JobRunner(device, inbox, outbox)
    outbox.put(WorkerReady(index, os.getpid()))
    while True:
        message = inbox.get()
        if isinstance(message, Stop):
            return
        if isinstance(message, RunJob):
            runner.run(message.job)
        # A PublishReply here answers a job already given up on (its wait timed out): moot.


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the daemon dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class PublishRefused(RuntimeError):
    """The main process did not allow publishing (lease lost or shutdown)."""


class _JobRunner:
    """Runs jobs in the worker process, keeping the prepared network of the last model."""

    def __init__(self, device: str, inbox: Any, outbox: Any) -> None:
        self.device = device
        self.inbox = inbox
        self.outbox = outbox
        self._model: tuple[str, Any, Any] | None = None  # (sha256, bundle, network)

    def run(self, job: Job) -> None:
        from .faults import INTERNAL, classify_error, is_device_error

        try:
            summary = self._segment(job)
        except PublishRefused as refused:
            self.outbox.put(JobAbandoned(job.job_id, str(refused)))
        except Exception as error:  # recorded with its category; the worker goes on
            category = classify_error(error)
            message = one_line(error)
            if category == INTERNAL or isinstance(error, MemoryError):
                log.error("%s: unexpected error in the worker", job.path, exc_info=True)
                message = f"{job.path}: {type(error).__name__}: {message}"
            elif job.path not in message:  # an OSError from the output side names its file
                message = f"{job.path}: {message}"
            self.outbox.put(JobFailed(job.job_id, message, category, is_device_error(error)))
        else:
            self.outbox.put(JobDone(job.job_id, summary, _device_memory_bytes(self.device)))

    def _segment(self, job: Job) -> dict[str, Any]:
        from ..core.infer import InferenceOptions
        from ..core.pipeline import SegmentOptions, segment_file
        from .holds import stage_hold, with_progress, with_publish_hook

        bundle, network = self._load_model(job)
        self._beat(job.job_id, "read")
        hold = stage_hold(Path(job.path).stem)  # None unless a test switched holds on
        options = SegmentOptions(
            inference=InferenceOptions(device=self.device, **job.inference),
            voxel_size_a=job.voxel_size_a,
            voxel_size_bounds_a=tuple(job.voxel_size_bounds_a),
            max_model_voxels=job.max_model_voxels,
            tilt_series_pattern=job.tilt_series_pattern,
            save_probabilities=job.save_probabilities,
            specimen_mask=job.specimen_mask,
        )
        seg, out_dir = segment_file(
            job.path, job.out_parent, bundle, options, network=network, stem=job.stem,
            progress=with_progress(hold, self._progress_beats(job.job_id)),
            before_publish=with_publish_hook(hold, lambda: self._ask_to_publish(job)))
        summary = read_summary(out_dir)
        if summary is None:  # segment_file published it an instant ago: only a bug gets here
            raise RuntimeError(f"{job.path}: published result {out_dir} has no readable summary")
        return summary

    def _beat(self, job_id: int, stage: str) -> None:
        self.outbox.put(Progress(job_id, stage))

    def _progress_beats(self, job_id: int) -> Callable[[str, float], None]:
        """A pipeline progress callback that proves progress to the main process: at every
        new stage and at most once per PROGRESS_BEAT_INTERVAL_S within one."""
        last: dict[str, Any] = {"stage": None, "at": 0.0}

        def beat(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if stage != last["stage"] or now - last["at"] >= PROGRESS_BEAT_INTERVAL_S:
                last.update(stage=stage, at=now)
                self._beat(job_id, stage)

        return beat

    def _load_model(self, job: Job) -> tuple[Any, Any]:
        from ..core.infer import prepare_network
        from ..core.model import load_bundle

        if self._model is None or self._model[0] != job.model_sha256:
            self._model = None  # free the old network before loading the new one
            bundle = load_bundle(job.model_path, tuple(job.voxel_size_bounds_a))
            if bundle.sha256 != job.model_sha256:
                raise RuntimeError(f"{job.model_path}: model file changed after validation")
            self._model = (bundle.sha256, bundle, prepare_network(bundle, self.device))
        return self._model[1], self._model[2]

    def _ask_to_publish(self, job: Job) -> None:
        self.outbox.put(MayPublish(job.job_id))
        deadline = time.monotonic() + PUBLISH_REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                message = self.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if isinstance(message, PublishReply) and message.job_id == job.job_id:
                if not message.allowed:
                    raise PublishRefused(f"{job.path}: lease lost, result not published")
                return
            if isinstance(message, Stop):
                raise PublishRefused(f"{job.path}: stopping, result not published")
        raise PublishRefused(f"{job.path}: no answer from the daemon, result not published")


def _device_memory_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(torch.device(device)))


