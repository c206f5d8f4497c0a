"""Fetch the bytes of one item: embedded bytes, a local file, or an http(s) URL.

One :class:`Fetcher` is shared by images and audio and called from many threads at once.
Per-item problems never raise: they come back as a :class:`Fetched` with ``status=FETCH_ERROR``
and a short, actionable message.
"""

from __future__ import annotations

import email.utils
import http
import logging
import os
import random
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Self
from urllib.parse import urlsplit

import requests

from batchcap import storage
from batchcap.items import FETCH_ERROR, Fetched, Item

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CHUNK = 64 * 1024
_RETRY_STATUSES = frozenset({408, 429})


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
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Fail(Exception):
    """A final (non-retryable) failure of one attempt."""

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        self.http_status = http_status


def _is_read_timeout(exc: BaseException) -> bool:
    # A read timeout while streaming the body surfaces as a requests.ConnectionError wrapping
    # urllib3's ReadTimeoutError ("Read timed out."), not as requests.ReadTimeout.
    return isinstance(exc, requests.exceptions.ReadTimeout) or "Read timed out" in str(exc)


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text or "ConnectionRefusedError" in text:
        return "connection refused"
    if "Name or service not known" in text or "NameResolutionError" in text or "getaddrinfo" in text:
        return "host not found"
    if "Connection reset" in text or "RemoteDisconnected" in text or "ProtocolError" in text:
        return "connection reset"
    return "connection failed"


class Fetcher:
    def __init__(self, config: FetchConfig | None = None):
        self.config = config or FetchConfig()
        # requests.Session is not documented as thread-safe, so each worker thread gets its own
        # (keep-alive per thread, no shared pool to size). All are tracked so close() can close them.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}

    # -- public ---------------------------------------------------------------------------------

    def fetch(self, item: Item) -> Fetched:
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

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for session in sessions:
            session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- local files ----------------------------------------------------------------------------

    def _fetch_local(self, path: str) -> Fetched:
        cfg = self.config
        if not cfg.allow_local:
            return _error("local paths are not allowed")
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                return _error(f"is a directory, not a file: {path}")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                return _error(f"not a regular file: {path}")
            if st.st_size > cfg.max_bytes:
                return _error(f"file larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes): {path}")
            with open(path, "rb") as fh:
                data = fh.read(cfg.max_bytes + 1)
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
            if left is not None and left <= 0:
                return _error(f"timed out: not finished within the {_fmt_seconds(deadline or 0)} deadline: {url}")
            try:
                return Fetched(data=storage.read_range(url, cfg.max_bytes, timeout=left))
            except storage.TooLarge:
                return _error(f"object larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes): {url}")
            except storage.StorageError as exc:
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
            session.max_redirects = self.config.max_redirects
            with self._lock:
                self._sessions.append(session)
                self._local.session = session
        return session

    def _slot(self, url: str) -> threading.BoundedSemaphore:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port or ''}"
        with self._lock:
            slot = self._host_slots.get(key)
            if slot is None:
                slot = self._host_slots[key] = threading.BoundedSemaphore(max(1, self.config.per_host))
            return slot

    def _fetch_http(self, url: str) -> Fetched:
        cfg = self.config
        attempts = max(0, cfg.retries) + 1
        try:
            slot = self._slot(url)
        except ValueError as exc:  # e.g. "Invalid IPv6 URL"
            return _error(f"invalid URL: {exc}")
        for attempt in range(attempts):
            retry_after: float | None = None
            http_status: int | None = None
            try:
                with slot:
                    http_status, data, retry_after = self._attempt(url)
                if data is not None:
                    return Fetched(data=data, http_status=http_status)
                reason = f"HTTP {http_status}"
            except _Fail as fail:
                return _error(fail.message, fail.http_status)
            except requests.exceptions.ConnectTimeout:
                reason = f"timed out (connect timeout {_fmt_seconds(cfg.connect_timeout)})"
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                if _is_read_timeout(exc):
                    reason = f"timed out (read timeout {_fmt_seconds(cfg.read_timeout)})"
                else:
                    reason = _connection_reason(exc)
            except requests.exceptions.ChunkedEncodingError:
                reason = "connection reset"
            if attempt + 1 >= attempts:
                if attempts > 1:
                    word, _, rest = reason.partition(" (")
                    reason = f"{word} after {attempts} attempts" + (f" ({rest}" if rest else "")
                elif http_status is not None:
                    reason = _http_reason(http_status)
                return _error(reason, http_status)
            delay = cfg.backoff * 2**attempt
            delay += random.uniform(0, delay * 0.1)
            if retry_after is not None:
                delay = min(retry_after, cfg.max_retry_after)
            log.debug("fetch %s: %s, retry %d/%d in %.2fs", url, reason, attempt + 1, cfg.retries, delay)
            if delay > 0:
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self, url: str) -> tuple[int, bytes | None, float | None]:
        """One GET. Returns (status, body, retry_after); body None means retryable HTTP status."""
        cfg = self.config
        try:
            resp = self._session().get(url, stream=True, timeout=(cfg.connect_timeout, cfg.read_timeout))
        except requests.exceptions.TooManyRedirects as exc:
            code = exc.response.status_code if exc.response is not None else None
            raise _Fail(f"too many redirects (>{cfg.max_redirects})", code) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise _Fail(f"invalid URL: {exc}") from None
        with resp:
            code = resp.status_code
            if code >= 500 or code in _RETRY_STATUSES:
                after = parse_retry_after(resp.headers.get("Retry-After")) if code in (429, 503) else None
                return code, None, after
            if not 200 <= code < 300:
                raise _Fail(_http_reason(code, resp.reason), code)
            cap_msg = f"response larger than {_fmt_size(cfg.max_bytes)} cap (--max-bytes)"
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cfg.max_bytes:
                raise _Fail(cap_msg, code)
            chunks: list[bytes] = []
            total = 0
            for chunk in resp.iter_content(_CHUNK):
                total += len(chunk)
                if total > cfg.max_bytes:
                    raise _Fail(cap_msg, code)
                chunks.append(chunk)
            return code, b"".join(chunks), None


def _http_reason(code: int, reason: str | None = None) -> str:
    if not reason:
        try:
            reason = http.HTTPStatus(code).phrase
        except ValueError:
            reason = ""
    return f"HTTP {code} {reason}".rstrip()


def _error(message: str, http_status: int | None = None) -> Fetched:
    return Fetched(data=None, http_status=http_status, error=message, status=FETCH_ERROR)
