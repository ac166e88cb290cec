"""The systemd notify protocol, without dependencies: datagrams to $NOTIFY_SOCKET.

READY=1 when serving, STATUS=... for `systemctl status`, WATCHDOG=1 from the main loop (never
from a side thread, which would keep pinging a stuck loop), STOPPING=1 on shutdown. Outside
systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("tomolive.notify")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address or None
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        watchdog_for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval_s = (int(watchdog_usec) / 1e6 if watchdog_usec.isdigit()
                                    and watchdog_for_us else None)
        self._last_watchdog_s = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as error:  # systemd gone or a wrong socket: never fatal
            log.debug("notify failed: %s", error)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Ping at most every half watchdog interval (or every second without one)."""
        now = time.monotonic()
        interval_s = self.watchdog_interval_s / 2 if self.watchdog_interval_s else 1.0
        if now - self._last_watchdog_s >= interval_s:
            self._last_watchdog_s = now
            self.send("WATCHDOG=1")
