"""The daemon's HTTP endpoint: `/metrics` (the registry of daemon/metrics.py), `/healthz`, and
the read-only session page of daemon/gallery.py. One port, localhost by default; nothing served
changes state, and no file outside the output folder can be served (daemon/served_files.py
`result_file`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder

from .config import DEFAULT_METRICS_PORT
from .gallery import SessionPages
from .metrics import Metrics
from .served_files import result_file

log = logging.getLogger(__name__)


class LoopHealth:
    """A `health` callable for `HttpServer`: healthy while the main loop beats regularly.

    The main loop calls `beat()` once per iteration (from the loop itself, never from a side
    thread, which would keep reporting a stuck loop as alive) and `stopping()` on shutdown.
    """

    def __init__(self, max_silence_s: float = 60.0) -> None:
        self.max_silence_s = max_silence_s
        self._last_beat_s = time.monotonic()
        self._stopping = False

    def beat(self) -> None:
        self._last_beat_s = time.monotonic()

    def stopping(self) -> None:
        self._stopping = True

    def silence_s(self) -> float:
        """Seconds since the last beat."""
        return time.monotonic() - self._last_beat_s

    def __call__(self) -> bool:
        return not self._stopping and self.silence_s() <= self.max_silence_s


# Content types of the files in a result folder (anything else is served as bytes).
_FILE_TYPES = {".png": "image/png", ".webp": "image/webp", ".json": "application/json",
               ".csv": "text/csv; charset=utf-8", ".star": "text/plain; charset=utf-8"}
_PAGE_TYPE = "text/html; charset=utf-8"
_COPY_CHUNK_BYTES = 1 << 20


def _page_number(query: str) -> int:
    values = parse_qs(query).get("page") or ["1"]
    try:
        return max(1, int(values[0]))
    except ValueError:
        return 1


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics (Prometheus text or OpenMetrics, by Accept header), GET /healthz and, when
    the server has session pages (daemon/gallery.py), the read-only session page: `/`,
    `/api/session.json`, `/t/REL`, `/thumb/REL` and `/files/REL/NAME`. Nothing here changes
    state."""

    server: _Server
    # HTTP/1.0 (the default): one request per connection, so stop() leaves no handler serving.

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path, _, query = self.path.partition("?")
        pages = self.server.pages
        try:
            if pages is not None and self._session_route(pages, path, query):
                return
        except (BrokenPipeError, ConnectionResetError):  # the browser went away: fine
            return
        except Exception:  # a page that cannot be built must not take the server with it
            log.exception("session page %s", path)
            self._reply(500, b"session page failed; see the daemon's log\n",
                        "text/plain; charset=utf-8")
            return
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.server.metrics.registry), content_type)
        elif path == "/healthz":
            healthy = self.server.healthy()
            self._reply(200 if healthy else 503, b"ok\n" if healthy else b"unhealthy\n",
                        "text/plain; charset=utf-8")
        elif path == "/":
            self._reply(200, b'tomolive: see <a href="/metrics">/metrics</a>, '
                             b'<a href="/healthz">/healthz</a>\n', "text/html; charset=utf-8")
        else:
            self._not_found()

    def _session_route(self, pages: SessionPages, path: str, query: str) -> bool:
        """Serve one of the session page's routes; False when `path` is none of them."""
        if path == "/":
            self._reply(200, pages.session_html(_page_number(query)).encode(), _PAGE_TYPE)
        elif path == "/api/session.json":
            body = json.dumps(pages.session_json(_page_number(query)), default=str)
            self._reply(200, body.encode(), "application/json")
        elif path.startswith("/t/"):
            html = pages.tomogram_html(path[len("/t/"):])
            if html is None:
                self._not_found()
            else:
                self._reply(200, html.encode(), _PAGE_TYPE)
        elif path.startswith("/files/"):
            self._send_file(result_file(pages.output_dir, path[len("/files/"):]))
        elif path.startswith("/thumb/"):
            self._send_file(pages.thumbnail(path[len("/thumb/"):]))
        else:
            return False
        return True

    def _send_file(self, path: Path | None) -> None:
        """Stream a result file (a labels volume may be gigabytes); 404 for None."""
        if path is None:
            self._not_found()
            return
        try:
            handle = open(path, "rb")
        except OSError:
            self._not_found()
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type",
                             _FILE_TYPES.get(path.suffix.lower(), "application/octet-stream"))
            self.send_header("Content-Length", str(size))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            shutil.copyfileobj(handle, self.wfile, _COPY_CHUNK_BYTES)

    def _not_found(self) -> None:
        self._reply(404, b"not found\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if content_type == _PAGE_TYPE:
            # Inline script and style only, nothing from elsewhere, no framing by other sites.
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; script-src 'unsafe-inline' 'self'; "
                             "style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # Scrapes every few seconds would flood the journal; keep them at debug level.
        log.debug("metrics http: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not block shutdown

    def __init__(self, address: tuple[str, int], metrics: Metrics,
                 health: Callable[[], bool], pages: SessionPages | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        self.pages = pages
        self._health = health
        super().__init__(address, _Handler)

    def healthy(self) -> bool:
        try:
            return bool(self._health())
        except Exception:  # a broken health check means unhealthy, not a crashed server
            log.exception("metrics: health check raised")
            return False


class HttpServer:
    """Serves `/metrics` and `/healthz` on a daemon thread; starts listening on construction.

    `health()` is called per `/healthz` request: 200 "ok" while it returns True, 503 otherwise.
    `pages` (daemon/gallery.py) adds the read-only session page at `/`.
    `port=0` picks a free port (tests); the bound one is `self.port`.
    """

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = DEFAULT_METRICS_PORT,
                 health: Callable[[], bool] = lambda: True,
                 pages: SessionPages | None = None) -> None:
        try:
            self._server = _Server((host, port), metrics, health, pages)
        except OSError as exc:
            raise OSError(exc.errno,
                          f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="tomolive-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
