"""Whose fault a failed tomogram is, and what follows from it.

Three categories, with different consequences in the service:

  input        the file itself is bad (garbage, truncated, absurd header, a reader's error):
               counts as an attempt; after `max_attempts` the tomogram is quarantined.
  environment  the machine is (a full or read-only output disk, permissions, out of memory,
               an I/O error, a device error such as a CUDA fault or the device's memory
               running out): reported with the real cause, never counted against the
               tomogram, retried with a growing delay; a full disk pauses new work, a device
               error pauses that device (its worker restarted, for a fresh device context).
  internal     tomolive is (a bug, a worker that stopped making progress and was killed):
               never counted, retried with a growing delay.

A sick GPU or a full disk must never quarantine good data: that was the failure this module
exists for (issue 15).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

INPUT = "input"
ENVIRONMENT = "environment"
INTERNAL = "internal"
CATEGORIES = (INPUT, ENVIRONMENT, INTERNAL)

# OSErrors that describe the machine, not the file being read.
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOMEM,
    errno.EMFILE, errno.ENFILE, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
})
# A write that failed for want of space leaves (until its temporary folder is removed) less
# than this free: the diagnosis of a SIGBUS. New work resumes when more than this (or the
# size of the input that failed, if larger) is free again.
FULL_DISK_FREE_BYTES = 1024 * 1024
# Retry delays after faults that are not the tomogram's: doubling from the rescan interval.
MAX_FAULT_BACKOFF_S = 300.0


# What PyTorch's device errors say when they arrive as a plain RuntimeError (older builds,
# cuDNN/cuBLAS and the caching allocator raise those).
DEVICE_ERROR_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS",
                        "cuDNN error", "device-side assert", "HIP error", "NCCL error")


def is_device_error(error: BaseException) -> bool:
    """An error of the accelerator (a CUDA fault, its memory exhausted), not of the input:
    the device is paused and the tomogram retried, on another device if there is one."""
    torch = sys.modules.get("torch")  # no torch loaded: no device error either
    if torch is not None:
        device_errors = tuple(c for c in (getattr(torch, "OutOfMemoryError", None),
                                          getattr(torch, "AcceleratorError", None)) if c)
        if device_errors and isinstance(error, device_errors):
            return True
    return isinstance(error, RuntimeError) and any(m in str(error)
                                                   for m in DEVICE_ERROR_MARKERS)


def classify_error(error: BaseException) -> str:
    """The category of an exception raised while segmenting one tomogram."""
    from ..core.model import BundleError
    from ..core.volume import VolumeError

    if isinstance(error, MemoryError) or is_device_error(error):
        return ENVIRONMENT
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        return ENVIRONMENT
    if isinstance(error, (VolumeError, BundleError, ValueError, OSError)):
        return INPUT
    return INTERNAL


def disk_is_full(folder: str | os.PathLike[str], need_bytes: int = FULL_DISK_FREE_BYTES
                 ) -> tuple[bool, int]:
    """(whether the file system holding `folder` has less than `need_bytes` free, its free
    bytes as an unprivileged writer sees them)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:  # the output folder may not exist yet
        path = path.parent
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    return free < need_bytes, free


@dataclass(frozen=True)
class WorkerDeath:
    """Why a worker process died mid-tomogram, as far as the main process can tell."""

    category: str
    message: str
    disk_full: bool = False


def explain_death(exitcode: int | None, input_path: str, out_parent: str,
                  input_changed: bool) -> WorkerDeath:
    """Turn a worker's exit code into a category and a message with the real cause.

    SIGBUS is what a memory-mapped file does on an I/O error: writing the label volume to a
    full disk, or reading an input that was overwritten in place (shortened under the map).
    """
    base = f"{input_path}: worker process died (exit code {exitcode}"
    if exitcode == -signal.SIGBUS:
        full, free = disk_is_full(out_parent)
        if full:
            return WorkerDeath(ENVIRONMENT, f"{base}: No space left on device, {free} bytes "
                                            f"free under {out_parent})", disk_full=True)
        if input_changed:
            return WorkerDeath(ENVIRONMENT, f"{base}: the input was overwritten while it was "
                                            "being read)")
        return WorkerDeath(INPUT, f"{base}: SIGBUS, an I/O error on a memory-mapped file)")
    if exitcode == -signal.SIGKILL:
        return WorkerDeath(ENVIRONMENT, f"{base}: SIGKILL, from outside tomolive; the kernel's "
                                        "out-of-memory killer does this)")
    return WorkerDeath(INPUT, f"{base})")


def fault_backoff_s(faults_so_far: int, base_s: float) -> float:
    """The delay before retrying after the n-th fault in a row that was not the tomogram's."""
    return min(MAX_FAULT_BACKOFF_S, max(base_s, 0.5) * 2.0 ** max(faults_so_far - 1, 0))
