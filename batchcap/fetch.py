"""Fetch the bytes of one item: embedded bytes, a local file, or an http(s) URL.

One :class:`Fetcher` is shared by images and audio and called from many threads at once.
Per-item problems never raise: they come back as a :class:`Fetched` with ``status=FETCH_ERROR``
and a short, actionable message.
"""

from __future__ import annotations

import email.utils
import http
import ipaddress
import logging
import os
import random
import re
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from batchcap import storage
from batchcap.items import FETCH_ERROR, Fetched, Item

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CHUNK = 64 * 1024
_RETRY_STATUSES = frozenset({408, 429})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() also takes "²" and "٣"


def _version() -> str:
    try:
        import batchcap  # imported lazily: fetch is imported by batchcap/__init__ itself, if any

        version = getattr(batchcap, "__version__", None)
        if isinstance(version, str):
            return version
        return dist_version("batchcap")
    except (ImportError, PackageNotFoundError):  # not installed: fall back
        return "0.1.0"


def _default_user_agent() -> str:
    return f"batchcap/{_version()} (+https://pypi.org/project/batchcap/)"


@dataclass
class FetchConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3  # extra attempts after the first, on connection errors, timeouts, 5xx, 408 and 429
    backoff: float = 0.5  # backoff * 2**attempt (+ jitter); Retry-After on 429/503 wins, capped
    max_retry_after: float = 60.0
    max_bytes: int = 50 * 2**20  # bigger bodies / files -> fetch_error
    per_host: int = 32  # max concurrent requests per host
    max_redirects: int = 5
    user_agent: str = field(default_factory=_default_user_agent)
    allow_local: bool = True  # local paths allowed; schemes other than http(s) are always refused
    # Longest one URL may take, from its first request to its last body byte: redirects, retries and
    # backoff waits included (a server that drips a byte per read timeout never ends otherwise).
    # None: no limit. Images default to 120 s, audio to 600 s (see asr.AudioOptions).
    deadline: float | None = 120.0
    slot_timeout: float | None = None  # longest wait for a per-host slot; None: 10 x deadline (1 h without one)
    block_private: bool = False  # refuse hosts resolving to loopback/private/link-local/... addresses
    allow_networks: Sequence[str] = ()  # networks allowed despite block_private, e.g. ("10.1.2.0/24",)
    root: str | None = None  # local files must lie inside this folder (symlinks and .. resolved)


CANCELLED = "cancelled: the run was interrupted before this download finished"


def _fmt_size(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20} MiB"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10} KiB"
    return f"{n} bytes"


def _fmt_seconds(s: float) -> str:
    return f"{s:g}s"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    if not value.isascii() or not value[:1].isalpha():  # an HTTP date starts with the day's name
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _Fail(Exception):
    """A final (non-retryable) failure of one attempt."""

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class BlockedAddress(Exception):
    """A host that resolves to an address ``block_private`` refuses (raised where the socket would connect)."""

    def __init__(self, host: str):
        super().__init__(f"refused: {host} resolves to a private address (--block-private-addresses)")
        self.host = host


def _is_read_timeout(exc: BaseException) -> bool:
    # A read timeout while streaming the body surfaces as a requests.ConnectionError wrapping
    # urllib3's ReadTimeoutError ("Read timed out."), not as requests.ReadTimeout.
    return isinstance(exc, requests.exceptions.ReadTimeout) or "Read timed out" in str(exc)


def _tls_reason(exc: BaseException) -> str:
    """A failed TLS handshake in words; a plain-HTTP server on an https URL answers with bytes TLS reads as
    a "wrong version number"."""
    text = str(exc)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return "TLS handshake failed: the server does not speak TLS there (an https URL to a plain-HTTP port?)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS handshake failed: certificate verify failed"
    return "TLS handshake failed"


def _broken_reason(exc: BaseException) -> str:
    """A body that stopped early: "connection reset", or how much of the announced length came."""
    found = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", str(exc))
    if found:
        return f"incomplete body ({found.group(1)} bytes read, {found.group(2)} more expected)"
    return "connection reset"


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    if "IncompleteRead" in text:
        return _broken_reason(exc)
    if "Connection refused" in text or "ConnectionRefusedError" in text:
        return "connection refused"
    if "Name or service not known" in text or "NameResolutionError" in text or "getaddrinfo" in text:
        return "host not found"
    if "Connection reset" in text or "RemoteDisconnected" in text or "ProtocolError" in text:
        return "connection reset"
    return "connection failed"


# -- private-address guard ----------------------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_allowed(address: str, allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> bool:
    """Whether ``block_private`` lets a connection go to ``address`` (an IP literal).

    Only globally routable unicast addresses pass: loopback, private (RFC 1918, ULA fc00::/7), link-local
    (169.254/16 with the cloud metadata service 169.254.169.254, fe80::/10), shared (100.64/10),
    multicast, reserved, unspecified and documentation ranges are refused, also when wrapped in an
    IPv4-mapped, 6to4 or NAT64 IPv6 address (so fd00:ec2::254 and ::ffff:127.0.0.1 are refused too).
    ``allow`` lists networks let through anyway.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if any(ip in net for net in allow):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return address_allowed(str(inner), allow)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback)


class _Guard:
    """Resolves a connection's host, checks EVERY address, and connects to a checked one.

    It runs where urllib3 opens a socket, so the address checked is the address connected to: a DNS
    answer that changes between a check and the connect (DNS rebinding) cannot slip a private address
    through, and each redirect hop to a new host opens (and checks) its own connection.
    """

    def __init__(self, allow: Sequence[str]):
        self.allow = tuple(ipaddress.ip_network(a, strict=False) for a in allow)

    def connect(self, conn: Any) -> socket.socket:
        from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
        from urllib3.util.connection import create_connection

        host = getattr(conn, "_dns_host", None) or conn.host
        try:
            infos = socket.getaddrinfo(host, conn.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(conn.host, conn, exc) from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses or not all(address_allowed(a, self.allow) for a in addresses):
            raise BlockedAddress(conn.host)
        last: OSError | None = None
        for address in addresses:
            try:
                return create_connection((address, conn.port), conn.timeout, source_address=conn.source_address,
                                         socket_options=conn.socket_options)
            except TimeoutError as exc:
                raise ConnectTimeoutError(
                    conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})") from exc
            except OSError as exc:
                last = exc
        raise NewConnectionError(conn, f"Failed to establish a new connection: {last}")


def _guarded_adapter(guard: _Guard) -> HTTPAdapter:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Conn(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class TLSConn(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    return Adapter()


# -- time limits --------------------------------------------------------------------------------

class _Clock:
    """The download deadline of one item: it starts with its first request."""

    def __init__(self, config: FetchConfig):
        self.config = config
        self.ends: float | None = None

    def start(self) -> None:
        if self.ends is None and self.config.deadline is not None:
            self.ends = time.monotonic() + self.config.deadline

    def remaining(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def limit(self, timeout: float) -> float:
        """``timeout`` cut to what is left of the deadline (at least a moment, so a socket call can fail)."""
        left = self.remaining()
        return timeout if left is None else max(0.001, min(timeout, left))

    def slot_wait(self) -> float:
        cfg = self.config
        if self.ends is not None:  # later hops and retries: within the deadline
            return max(0.0, self.remaining() or 0.0)
        if cfg.slot_timeout is not None:
            return cfg.slot_timeout
        return 10 * cfg.deadline if cfg.deadline is not None else 3600.0

    def message(self, received: int | None = None) -> str:
        got = f"; {_fmt_size_any(received)} received" if received else ""
        return f"timed out: not finished within the {_fmt_seconds(self.config.deadline or 0)} deadline " \
               f"(--fetch-deadline){got}"


def _fmt_size_any(n: int) -> str:
    return f"{n} bytes" if n < 2**10 else f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


class Fetcher:
    def __init__(self, config: FetchConfig | None = None):
        self.config = config or FetchConfig()
        # requests.Session is not documented as thread-safe, so each worker thread gets its own
        # (keep-alive per thread, no shared pool to size). All are tracked so close() can close them.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._guard = _Guard(self.config.allow_networks) if self.config.block_private else None
        self._cancelled = threading.Event()
        self._reading: set[socket.socket] = set()  # sockets of bodies being read (cancel shuts them down)
        root = self.config.root
        self._root = os.path.realpath(os.path.expanduser(root)) if root else None

    # -- public ---------------------------------------------------------------------------------

    def fetch(self, item: Item) -> Fetched:
        if item.error:  # the item could not be formed (e.g. an unreadable manifest line)
            return _error(item.error)
        if self._cancelled.is_set():
            return _error(CANCELLED)
        if item.data is not None:
            return Fetched(data=item.data)
        source = item.source
        try:
            if source.lower().startswith(("http://", "https://")):
                return self._fetch_http(source)
            if storage.is_remote(source):  # s3://, gs://, az://, hf:// ... through fsspec
                return self._fetch_object(source)
            scheme = _SCHEME.match(source)
            if scheme or source.lower().startswith("data:"):
                name = scheme.group(1).lower() if scheme else "data"
                return _error(f"unsupported URL scheme '{name}' (http, https and object stores: s3, gs, az, hf)")
            return self._fetch_local(source)
        except Exception as exc:  # never raise for one item
            log.debug("unexpected error fetching %s", source, exc_info=True)
            return _error(f"{type(exc).__name__}: {exc}")

    def cancel(self) -> None:
        """End every download now (an interrupted run): bodies being read have their sockets shut down,
        retries and waits for a host's slot give up, later fetches return at once; each such item is a
        ``fetch_error`` "cancelled". Without this an interrupted run would wait at exit for its fetch
        threads, i.e. for the slowest download's deadline (minutes)."""
        self._cancelled.set()
        with self._lock:
            reading = list(self._reading)
        for sock in reading:
            _shut(sock)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for session in sessions:
            session.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- local files ----------------------------------------------------------------------------

    def _fetch_local(self, path: str) -> Fetched:
        cfg = self.config
        if not cfg.allow_local:
            return _error("local paths are not allowed")
        if self._root is not None:
            real = os.path.realpath(path)  # symlinks and .. resolved; the file read is this one
            if os.path.commonpath([real, self._root]) != self._root:
                return _error(f"outside --root {cfg.root}: {path}")
            path_to_read = real
        else:
            path_to_read = path
        try:
            st = os.stat(path_to_read)
            if stat.S_ISDIR(st.st_mode):
                return _error(f"is a directory, not a file: {path}")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                return _error(f"not a regular file: {path}")
            if st.st_size > cfg.max_bytes:
                return _error(f"file larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes): {path}")
            with open(path_to_read, "rb") as fh:
                # the size stat gave, plus one byte: read(max_bytes + 1) would allocate the whole cap per file
                data = fh.read(st.st_size + 1)
                if len(data) > st.st_size:  # grew since stat: read on, up to one byte past the cap
                    data += fh.read(cfg.max_bytes + 1 - len(data))
        except FileNotFoundError:
            return _error(f"file not found: {path}")
        except PermissionError:
            return _error(f"permission denied: {path}")
        except IsADirectoryError:
            return _error(f"is a directory, not a file: {path}")
        except OSError as exc:
            return _error(f"cannot read {path}: {exc.strerror or exc}")
        if len(data) > cfg.max_bytes:  # grew since stat, or a special file
            return _error(f"file larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes): {path}")
        return Fetched(data=data)

    # -- object stores (s3://, gs://, az://, hf://: batchcap/storage.py) -------------------------------

    def _fetch_object(self, url: str) -> Fetched:
        """One object through fsspec: the --max-bytes cap as one ranged read (the store sends nothing past
        it), retries with backoff on timeouts, throttling and connection errors, all within the fetch
        deadline where there is one; a missing object, a prefix or refused credentials are final."""
        cfg = self.config
        deadline: float | None = getattr(cfg, "deadline", None)
        ends = None if deadline is None else time.monotonic() + deadline
        attempts = max(0, cfg.retries) + 1
        for attempt in range(attempts):
            left = None if ends is None else ends - time.monotonic()
            late = f"timed out: not finished within the {_fmt_seconds(deadline or 0)} deadline (--fetch-deadline): " \
                   f"{url}"
            if left is not None and left <= 0:
                return _error(late)
            try:
                return Fetched(data=storage.read_range(url, cfg.max_bytes, timeout=left))
            except storage.TooLarge:
                return _error(f"object larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes): {url}")
            except storage.StorageError as exc:
                if exc.retryable and ends is not None and time.monotonic() >= ends:
                    return _error(late)
                if not exc.retryable or attempt + 1 >= attempts:
                    return _error(exc.message + (f" (after {attempts} attempts)" if exc.retryable and attempt else ""))
                reason = exc.message
            delay = cfg.backoff * 2**attempt
            delay += random.uniform(0, delay * 0.1)
            if ends is not None:
                delay = min(delay, max(0.0, ends - time.monotonic()))
            log.debug("fetch %s: %s, retry %d/%d in %.2fs", url, reason, attempt + 1, cfg.retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    # -- HTTP -----------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.config.user_agent
            if self._guard is not None:
                adapter = _guarded_adapter(self._guard)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                # A proxy would be the one connecting: the check must see the real destination.
                session.trust_env = False
            with self._lock:
                self._sessions.append(session)
                self._local.session = session
        return session

    def _slot(self, url: str) -> tuple[str, threading.BoundedSemaphore]:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        key = f"{parts.scheme}://{host}:{parts.port or ''}"
        with self._lock:
            slot = self._host_slots.get(key)
            if slot is None:
                slot = self._host_slots[key] = threading.BoundedSemaphore(max(1, self.config.per_host))
            return host, slot

    def _fetch_http(self, url: str) -> Fetched:
        cfg = self.config
        attempts = max(0, cfg.retries) + 1
        clock = _Clock(cfg)
        try:
            urlsplit(url).port  # noqa: B018 - raises on a bad port / IPv6 literal
        except ValueError as exc:  # e.g. "Invalid IPv6 URL"
            return _error(f"invalid URL: {exc}")
        for attempt in range(attempts):
            retry_after: float | None = None
            http_status: int | None = None
            if self._cancelled.is_set():
                return _error(CANCELLED)
            try:
                http_status, data, retry_after = self._attempt(url, clock)
                if data is not None:
                    return Fetched(data=data, http_status=http_status)
                reason = f"HTTP {http_status}"
            except _Fail as fail:
                return _error(fail.message, fail.http_status)
            except BlockedAddress as exc:
                return _error(str(exc))
            except requests.exceptions.SSLError as exc:  # the same handshake would fail again: not retried
                return _error(_tls_reason(exc))
            except (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError):
                if clock.expired():
                    return _error(clock.message())
                reason = f"timed out (connect timeout {_fmt_seconds(cfg.connect_timeout)})"
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    urllib3.exceptions.ReadTimeoutError) as exc:
                if clock.expired():
                    return _error(clock.message())
                if isinstance(exc, urllib3.exceptions.ReadTimeoutError) or _is_read_timeout(exc):
                    reason = f"timed out (read timeout {_fmt_seconds(cfg.read_timeout)})"
                else:
                    reason = _connection_reason(exc)
            except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError) as exc:
                reason = _broken_reason(exc)
            if self._cancelled.is_set():  # what failed was the cancel's doing
                return _error(CANCELLED)
            delay = cfg.backoff * 2**attempt
            delay += random.uniform(0, delay * 0.1)
            if retry_after is not None:
                delay = min(retry_after, cfg.max_retry_after)
            left = clock.remaining()
            out_of_time = left is not None and delay >= left
            if attempt + 1 >= attempts or out_of_time:
                if attempt > 0:
                    word, _, rest = reason.partition(" (")
                    reason = f"{word} after {attempt + 1} attempts" + (f" ({rest}" if rest else "")
                elif http_status is not None:
                    reason = _http_reason(http_status)
                if out_of_time and attempt + 1 < attempts:
                    reason += " (no time left for a retry within --fetch-deadline)"
                return _error(reason, http_status)
            log.debug("fetch %s: %s, retry %d/%d in %.2fs", url, reason, attempt + 1, cfg.retries, delay)
            if delay > 0:
                self._cancelled.wait(delay)
        raise AssertionError("unreachable")

    def _attempt(self, url: str, clock: _Clock) -> tuple[int, bytes | None, float | None]:
        """One GET, redirects followed hop by hop, each hop holding the slot of the host it asks.

        Returns (status, body, retry_after); body None means a retryable HTTP status.
        """
        cfg = self.config
        code: int | None = None
        for _hop in range(max(0, cfg.max_redirects) + 1):
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise _Fail(f"redirect to unsupported URL scheme '{scheme}' (only http and https are fetched)",
                            code)
            try:
                host, slot = self._slot(url)
            except ValueError as exc:
                raise _Fail(f"invalid URL: {exc}", code) from None
            wait = clock.slot_wait()
            if not self._acquire(slot, wait):
                if self._cancelled.is_set():
                    raise _Fail(CANCELLED)
                if clock.expired():
                    raise _Fail(clock.message())
                raise _Fail(f"no free connection slot for {host} within {_fmt_seconds(wait)} "
                            f"(--per-host {cfg.per_host})")
            try:
                clock.start()
                code, body, retry_after, location = self._get(url, clock)
            finally:
                slot.release()
            if location is None:
                return code, body, retry_after
            url = urljoin(url, location)
        raise _Fail(f"too many redirects (>{cfg.max_redirects})", code)

    def _acquire(self, slot: threading.BoundedSemaphore, wait: float) -> bool:
        """``slot.acquire(timeout=wait)``, given up when the fetcher is cancelled (checked every second)."""
        ends = time.monotonic() + wait
        while not self._cancelled.is_set():
            if slot.acquire(timeout=max(0.0, min(1.0, ends - time.monotonic()))):
                if not self._cancelled.is_set():
                    return True
                slot.release()  # freed by a cancelled download: nothing more is asked
                return False
            if time.monotonic() >= ends:
                return False
        return False

    def _get(self, url: str, clock: _Clock) -> tuple[int, bytes | None, float | None, str | None]:
        """(status, body, retry_after, redirect location) of one request, without following redirects."""
        cfg = self.config
        timeout = (clock.limit(cfg.connect_timeout), clock.limit(cfg.read_timeout))
        try:
            resp = self._session().get(url, stream=True, timeout=timeout, allow_redirects=False)
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise _Fail(f"invalid URL: {exc}") from None
        with resp:
            code = resp.status_code
            if code in _REDIRECT_STATUSES and resp.headers.get("Location"):
                return code, None, None, resp.headers["Location"]
            if code >= 500 or code in _RETRY_STATUSES:
                after = parse_retry_after(resp.headers.get("Retry-After")) if code in (429, 503) else None
                return code, None, after, None
            if not 200 <= code < 300:
                raise _Fail(_http_reason(code, resp.reason), code)
            return code, self._body(resp, clock), None, None

    def _body(self, resp: requests.Response, clock: _Clock) -> bytes:
        """The body, streamed: never more than ``max_bytes`` (+ one read) held, the deadline checked per read."""
        cfg = self.config
        code = resp.status_code
        cap_msg = f"response larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes)"
        length = resp.headers.get("Content-Length", "").strip()
        if _DIGITS.fullmatch(length) and int(length) > cfg.max_bytes:
            raise _Fail(cap_msg, code)
        sock = _socket_of(resp.raw)
        chunks: list[bytes] = []
        if sock is not None:
            with self._lock:
                self._reading.add(sock)
            if self._cancelled.is_set():  # cancelled before the socket was seen
                _shut(sock)
        try:
            self._read_body(resp, clock, sock, chunks)
        finally:
            if sock is not None:
                with self._lock:
                    self._reading.discard(sock)
            if sock is not None and clock.ends is not None:
                try:
                    sock.settimeout(cfg.read_timeout)  # a kept-alive connection starts its next request as usual
                except OSError:
                    pass
        return b"".join(chunks)

    def _read_body(self, resp: requests.Response, clock: _Clock, sock: socket.socket | None,
                   chunks: list[bytes]) -> None:
        cfg = self.config
        code = resp.status_code
        cap_msg = f"response larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes)"
        raw = resp.raw
        total = 0
        while True:
            if self._cancelled.is_set():
                raise _Fail(CANCELLED, code)
            if clock.expired():
                raise _Fail(clock.message(total), code)
            if sock is not None and clock.ends is not None:
                sock.settimeout(clock.limit(cfg.read_timeout))  # a stalled read ends at the deadline too
            try:
                chunk = raw.read1(_CHUNK, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError:
                if clock.expired():
                    raise _Fail(clock.message(total), code) from None
                raise
            except urllib3.exceptions.DecodeError as exc:
                encoding = resp.headers.get("Content-Encoding", "?")
                detail = exc.args[-1] if exc.args else exc  # urllib3's (message, zlib error): the zlib error
                raise _Fail(f"cannot decode the response body (Content-Encoding: {encoding}): {detail}", code) from None
            if not chunk:
                if self._cancelled.is_set():  # the end a shut-down socket reads: not the whole body
                    raise _Fail(CANCELLED, code)
                return
            total += len(chunk)
            if total > cfg.max_bytes:
                raise _Fail(cap_msg, code)
            chunks.append(chunk)


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked reading ``sock`` (its read returns or fails at once)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _socket_of(raw: Any) -> socket.socket | None:
    """The socket under a urllib3 response (to bound each read by the deadline), if it can be found."""
    conn = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _http_reason(code: int, reason: str | None = None) -> str:
    if not reason:
        try:
            reason = http.HTTPStatus(code).phrase
        except ValueError:
            reason = ""
    return f"HTTP {code} {reason}".rstrip()


def _error(message: str, http_status: int | None = None) -> Fetched:
    return Fetched(data=None, http_status=http_status, error=message, status=FETCH_ERROR)
