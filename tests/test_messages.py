"""The service/worker protocol (daemon/messages.py): every report kind is handled, and all of
them cross a real pipe between processes intact."""

from __future__ import annotations

import logging
import multiprocessing as mp
import types
import typing

from tomolive.daemon import messages
from tomolive.daemon.service import Service

JOB = messages.Job(job_id=7, path="/in/TS_01.mrc", out_parent="/out", stem="TS_01",
                   model_path="/m/a.safetensors", model_sha256="ab", inference={"tta_flips": 1})
REPORTS = [
    messages.WorkerReady(index=0, pid=123),
    messages.Progress(job_id=7, stage="inference"),
    messages.MayPublish(job_id=7),
    messages.JobDone(job_id=7, summary={"stem": "TS_01"}, device_memory_bytes=None),
    messages.JobFailed(job_id=7, error="/in/TS_01.mrc: CUDA error", category="environment",
                       device_fault=True),
    messages.JobAbandoned(job_id=7, reason="lease lost"),
]


def test_the_report_list_covers_every_kind():
    assert {type(r) for r in REPORTS} == set(typing.get_args(messages.WorkerReport))


def _echo(connection) -> None:
    """Send back every message received, until the other end closes the pipe."""
    while True:
        try:
            connection.send(connection.recv())
        except EOFError:
            return


def test_messages_cross_a_real_pipe_intact():
    # One spawned process (as the worker pool starts its workers) echoes them all: a process
    # per message cost 2-3 s each, mostly the child importing tomolive and torch.
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_echo, args=(theirs,))
    process.start()
    theirs.close()  # the child's copy: closing ours below is then the end of its input
    try:
        for message in [messages.RunJob(JOB), messages.PublishReply(7, True), messages.Stop(),
                        *REPORTS]:
            ours.send(message)
            echoed = ours.recv()
            assert echoed == message and type(echoed) is type(message)
    finally:
        ours.close()
        process.join(timeout=30)
    assert process.exitcode == 0


def test_every_report_reaches_its_handler_and_an_unknown_one_is_logged(caplog):
    calls = []
    fake = types.SimpleNamespace(
        pool=types.SimpleNamespace(beat=lambda *a: calls.append(("beat", *a)),
                                   reply_publish=lambda *a: calls.append(("reply", *a))),
        _may_publish=lambda job_id: True,
        _job_done=lambda *a: calls.append(("done", *a)),
        _job_failed=lambda *a, **k: calls.append(("failed", *a, k)),
        _abandon_job=lambda *a: calls.append(("abandoned", *a)),
    )
    with caplog.at_level(logging.DEBUG, logger="tomolive.service"):
        for report in REPORTS:
            Service._handle(fake, report)
        Service._handle(fake, ("progress", 7, "read"))  # an old-style tuple: not silently lost
    assert calls == [
        ("beat", 7, "inference"),
        ("reply", 7, True),
        ("done", 7, {"stem": "TS_01"}, None),
        ("failed", 7, "/in/TS_01.mrc: CUDA error", "environment", {"device_fault": True}),
        ("abandoned", 7, "lease lost"),
    ]
    assert "worker w0 ready (pid 123)" in caplog.text
    assert "unhandled worker message ('progress', 7, 'read')" in caplog.text
