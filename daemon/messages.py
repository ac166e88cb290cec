"""What the service and its worker processes say to each other: one home for the protocol.

Plain frozen dataclasses, pickled over each worker's own inbox (service -> worker) and report
pipe (worker -> service); both ends are our own processes, never a file from a drop folder.
Every report kind is handled by `Service._handle`; a new kind is added here first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.star import WARP_RECONSTRUCTION_NAME
from ..core.volume import DEFAULT_MAX_MODEL_VOXELS, DEFAULT_VOXEL_SIZE_BOUNDS_A


@dataclass(frozen=True)
class Job:
    """One tomogram for one worker."""

    job_id: int
    path: str
    out_parent: str
    stem: str  # the output folder's name under out_parent (daemon/naming.py)
    model_path: str
    model_sha256: str
    voxel_size_a: float | None = None
    inference: dict[str, Any] = field(default_factory=dict)
    # Plausibility bounds from the configuration.
    voxel_size_bounds_a: tuple[float, float] = DEFAULT_VOXEL_SIZE_BOUNDS_A
    max_model_voxels: int = DEFAULT_MAX_MODEL_VOXELS
    tilt_series_pattern: str | None = WARP_RECONSTRUCTION_NAME  # core.star.tilt_series_name
    save_probabilities: bool = False  # every class's STEM_<class>_prob.mrc (core.probability_maps)
    specimen_mask: bool = False  # mask the outputs to the specimen slab (core.specimen_mask)


# -- service -> worker --------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    job: Job


@dataclass(frozen=True)
class PublishReply:
    """The answer to `MayPublish`: allowed only while the service still holds the lease."""

    job_id: int
    allowed: bool


@dataclass(frozen=True)
class Stop:
    """Finish nothing more: exit when idle, refuse to publish when asked."""


# -- worker -> service --------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerReady:
    index: int
    pid: int


@dataclass(frozen=True)
class Progress:
    """A beat from inside the pipeline: the worker is alive and moving (worker_stall_seconds)."""

    job_id: int
    stage: str


@dataclass(frozen=True)
class MayPublish:
    """The result is written under its temporary name; may it be renamed into place?"""

    job_id: int


@dataclass(frozen=True)
class JobDone:
    job_id: int
    summary: dict[str, Any]
    device_memory_bytes: int | None


@dataclass(frozen=True)
class JobFailed:
    job_id: int
    error: str  # one line, starting with the input's path
    category: str  # daemon/faults.py: input, environment or internal
    device_fault: bool  # the device's own error: pause it (daemon/faults.is_device_error)


@dataclass(frozen=True)
class JobAbandoned:
    """Stopped without a result and without a fault (lease lost, or shutting down)."""

    job_id: int
    reason: str


WorkerReport = WorkerReady | Progress | MayPublish | JobDone | JobFailed | JobAbandoned
