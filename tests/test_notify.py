"""daemon.notify.SystemdNotifier against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import os
import socket

import pytest
from tomolive.daemon.notify import SystemdNotifier


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(10.0)
    yield sock, address
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_and_stopping_reach_the_socket(listener):
    sock, address = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    notifier.ready("watching 2 folders")
    assert _received(sock) == ["READY=1", "STATUS=watching 2 folders"]
    notifier.status("3 queued")
    notifier.status("3 queued")  # unchanged: not sent again
    notifier.status("2 queued")
    assert _received(sock) == ["STATUS=3 queued"]
    assert _received(sock) == ["STATUS=2 queued"]
    notifier.stopping()
    assert _received(sock) == ["STOPPING=1", "STATUS=stopping"]


def test_watchdog_pings_at_most_every_half_interval(listener):
    sock, address = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000000",
                                "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == 600.0
    notifier.watchdog()
    notifier.watchdog()  # within 300 s of the first: held back
    notifier.status("marker")
    assert _received(sock) == ["WATCHDOG=1"]
    assert _received(sock) == ["STATUS=marker"]


def test_a_watchdog_meant_for_another_process_is_ignored(listener):
    _, address = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000",
                                "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval_s is None


def test_an_abstract_socket_name_is_used_as_systemd_means_it():
    name = f"tomolive-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10.0)
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
        assert _received(sock) == ["READY=1", "STATUS=ok"]


def test_outside_systemd_and_with_systemd_gone_every_call_is_harmless(tmp_path):
    outside = SystemdNotifier({})
    assert not outside.enabled
    outside.ready("x")
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "no-such.sock")})
    gone.ready("x")  # connection refused: logged at debug, never raised
    gone.watchdog()
