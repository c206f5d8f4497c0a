"""A loopback HTTP server for tests: static routes plus built-in misbehaviours.

Use the ``http_server`` fixture (a fresh server per test) or ``LoopbackServer`` directly::

    server.add("/img/1.png", png_bytes, content_type="image/png")
    fetch(server.url("/img/1.png")); assert server.hits["/img/1.png"] == 1

Built-in routes (hits are counted per path, query string excluded):

- ``/status/<code>``                       answers with that status
- ``/flaky/<name>?body=/img/1.png&fails=1`` 500 for the first ``fails`` requests, then the registered body
- ``/ratelimit/<name>?body=...&retry_after=1`` 429 + Retry-After the first time, then the body
- ``/slow?delay=3&body=...``                sleeps (at most 30 s) before answering
- ``/slow?delay=3&stage=body``              sends headers and half the body, then sleeps
- ``/big?mb=60&length=1``                   streams ``mb`` MiB of zeros; ``length=0`` omits Content-Length
- ``/drip?bytes=20&interval=0.25``          sends the body one byte per ``interval`` seconds (at most 30 s);
                                             ``&length=0``: without Content-Length (ends at close)
- ``/short``                                Content-Length 100, 40 bytes, then the connection closes
- ``/redirect-loop``                        302 to itself
- ``/redirect?to=/img/1.png``               302 to ``to``
- ``/html``                                 a text/html page

``server.latency`` adds a delay to every request; ``server.max_in_flight`` is the peak number of
requests being answered at once; ``server.headers[path]`` the last request headers seen for a path.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

log = logging.getLogger(__name__)

MAX_DELAY = 30.0
HTML = b"<!doctype html><html><head><title>Not an image</title></head><body>hello</body></html>"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    owner: LoopbackServer

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("loopback server: error while answering %s: %r", client_address, sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so clients' connection pools get exercised
    server: _Server
    _answered = False

    def log_message(self, format: str, *args: object) -> None:
        log.debug("loopback server: " + format, *args)

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        count = owner._enter(path, self.headers)
        self._answered = False
        try:
            if owner.latency > 0:
                time.sleep(owner.latency)
            self._route(owner, path, query, count)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (size cap, timeout): fine
        finally:
            self._leave()

    def _leave(self) -> None:
        # Leave "in flight" before the first byte goes out, so a client that got its answer and
        # starts the next request can never be counted together with this one.
        if not self._answered:
            self._answered = True
            self.server.owner._leave()

    def _route(self, owner: LoopbackServer, path: str, query: dict[str, str], count: int) -> None:
        if path in owner.routes:
            body, ctype, headers = owner.routes[path]
            self._send(200, body, ctype, headers)
        elif path.startswith("/status/") and path[8:].isdigit() and 200 <= int(path[8:]) <= 599:
            code = int(path[8:])
            bodyless = code in (204, 304)
            self._send(code, b"" if bodyless else f"status {code}\n".encode(), "text/plain")
        elif path.startswith("/flaky/"):
            if count <= int(query.get("fails", "1")):
                self._send(500, b"flaky failure\n", "text/plain")
            else:
                self._send_body(owner, query)
        elif path.startswith("/ratelimit/"):
            if count == 1:
                retry = query.get("retry_after", "1")
                self._send(429, b"slow down\n", "text/plain", {"Retry-After": retry})
            else:
                self._send_body(owner, query)
        elif path == "/slow" and query.get("stage") == "body":
            self._leave()
            self.send_response(200)
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(b"slow")
            self.wfile.flush()
            time.sleep(min(float(query.get("delay", "1")), MAX_DELAY))
            self.wfile.write(b"body")
        elif path == "/slow":
            time.sleep(min(float(query.get("delay", "1")), MAX_DELAY))
            self._send_body(owner, query, default=b"slow")
        elif path == "/drip":
            self._drip(int(query.get("bytes", "20")), float(query.get("interval", "0.25")),
                       with_length=query.get("length", "1") != "0")
        elif path == "/big":
            self._send_big(float(query.get("mb", "1")), query.get("length", "1") != "0")
        elif path == "/short":  # announces more than it sends, then closes
            self._leave()
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 40)
            self.wfile.flush()
            self.close_connection = True
        elif path == "/redirect-loop":
            self._send(302, b"", "text/plain", {"Location": "/redirect-loop"})
        elif path == "/redirect":
            self._send(302, b"", "text/plain", {"Location": query.get("to", "/html")})
        elif path == "/html":
            self._send(200, HTML, "text/html; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send_body(self, owner: LoopbackServer, query: dict[str, str], default: bytes = b"ok") -> None:
        ref = query.get("body")
        if ref is None:
            self._send(200, default, "text/plain")
        elif ref in owner.routes:
            body, ctype, headers = owner.routes[ref]
            self._send(200, body, ctype, headers)
        else:
            self._send(404, f"no registered body {ref}\n".encode(), "text/plain")

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self._leave()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, size: int, interval: float, with_length: bool = True) -> None:
        self._leave()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if with_length:
            self.send_header("Content-Length", str(size))
        else:  # the body ends when the connection closes
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        started = time.monotonic()
        for _ in range(size):
            if time.monotonic() - started > MAX_DELAY:
                break
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(interval)

    def _send_big(self, mb: float, with_length: bool) -> None:
        total = int(mb * 2**20)
        self._leave()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if with_length:
            self.send_header("Content-Length", str(total))
        else:
            self.send_header("Connection", "close")  # body ends when the connection does
            self.close_connection = True
        self.end_headers()
        chunk = bytes(64 * 1024)
        sent = 0
        while sent < total:
            part = chunk[: total - sent]
            self.wfile.write(part)
            sent += len(part)


class LoopbackServer:
    """ThreadingHTTPServer on 127.0.0.1 (or another loopback address: ``host``; free port) in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self.hits: Counter[str] = Counter()
        self.headers: dict[str, Message] = {}
        self.latency = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def add(
        self,
        path: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> str:
        """Register a static body; returns its URL."""
        self.routes[path] = (body, content_type, dict(headers or {}))
        return self.url(path)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def reset(self) -> None:
        """Forget hits and concurrency peaks (routes stay)."""
        with self._lock:
            self.hits.clear()
            self.headers.clear()
            self.max_in_flight = self.in_flight

    def start(self) -> LoopbackServer:
        httpd = _Server((self.host, 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _enter(self, path: str, headers: Message) -> int:
        with self._lock:
            self.hits[path] += 1
            self.headers[path] = headers
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.hits[path]

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    """A fresh loopback server per test (starting one takes milliseconds)."""
    with LoopbackServer() as server:
        yield server
