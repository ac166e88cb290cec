"""daemon.workers.WorkerPool with real spawned worker processes: start, report, death and
restart, pause, stop."""

from __future__ import annotations

import os
import signal

import pytest
from tomolive.daemon.messages import WorkerReady
from tomolive.daemon.workers import WorkerPool

from .daemon_harness import wait_until


def _ready_pids(pool: WorkerPool, wanted: int, timeout_s: float = 120.0) -> set[int]:
    """The pids of the next `wanted` WorkerReady reports (spawning imports torch: slow)."""
    pids: set[int] = set()

    def collect() -> bool:
        pids.update(m.pid for m in pool.messages(timeout_s=1.0) if isinstance(m, WorkerReady))
        return len(pids) >= wanted

    wait_until(collect, timeout_s, f"{wanted} worker(s) ready")
    return pids


# Each worker process imports torch when it starts (seconds): these tests run with the slow set.
pytestmark = pytest.mark.slow


@pytest.fixture
def pool():
    pool = WorkerPool(["cpu", "cpu"], threads_per_cpu_worker=1)
    pool.start()
    yield pool
    pool.stop()


def test_workers_report_ready_and_are_idle(pool):
    pids = _ready_pids(pool, 2)
    assert pids == {w.process.pid for w in pool.workers}
    assert pool.idle_workers() == pool.workers and pool.busy_workers() == []
    assert pool.paused_counts() == {"cpu": 0}


def test_a_worker_killed_from_outside_is_reaped_and_replaced(pool):
    _ready_pids(pool, 2)
    victim = pool.workers[0]
    old_pid = victim.process.pid
    os.kill(old_pid, signal.SIGKILL)
    victim.process.join(timeout=30)
    ((worker, job, exitcode),) = pool.reap_dead()
    assert (worker, job, exitcode) == (victim, None, -signal.SIGKILL)
    assert victim.restarts == 1 and victim.process.pid != old_pid
    assert _ready_pids(pool, 1) == {victim.process.pid}
    assert pool.reap_dead() == []


def test_a_paused_worker_is_restarted_and_given_no_work_until_its_pause_ends(pool):
    _ready_pids(pool, 2)
    worker = pool.workers[1]
    old_pid = worker.process.pid
    pool.pause(worker, 3600.0)
    assert worker.paused and worker not in pool.idle_workers()
    assert worker.process.pid != old_pid and worker.restarts == 1  # a fresh CUDA context
    assert pool.paused_counts() == {"cpu": 1}
    assert _ready_pids(pool, 1) == {worker.process.pid}


def test_stop_ends_every_worker(pool):
    _ready_pids(pool, 2)
    processes = [w.process for w in pool.workers]
    pool.stop()
    assert all(not p.is_alive() for p in processes)
    assert all(p.exitcode == 0 for p in processes)  # they took the Stop message and returned
