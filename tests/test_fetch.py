"""Fetcher against a real loopback HTTP server and real local files."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from batchcap.fetch import FetchConfig, Fetcher, parse_retry_after
from batchcap.items import FETCH_ERROR, OK, Item
from tests.httpserver import LoopbackServer, http_server  # noqa: F401 - fixture

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def item(source: str, data: bytes | None = None) -> Item:
    return Item(index=0, id=source, source=source, data=data)


def make(**kw: object) -> Fetcher:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("read_timeout", 5.0)
    return Fetcher(FetchConfig(**kw))  # type: ignore[arg-type]


@pytest.fixture
def fetcher() -> Iterator[Fetcher]:
    f = make()
    yield f
    f.close()


@pytest.fixture
def server(http_server: LoopbackServer) -> LoopbackServer:  # noqa: F811 - fixture injection
    http_server.add("/img/1.png", PNG, content_type="image/png")
    return http_server


def test_good_body_and_user_agent(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/img/1.png")))
    assert (res.status, res.http_status, res.error, res.data) == (OK, 200, None, PNG)
    assert server.hits["/img/1.png"] == 1
    assert server.headers["/img/1.png"]["User-Agent"].startswith("batchcap/")


def test_404_not_retried(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/status/404")))
    assert (res.status, res.http_status, res.error, res.data) == (FETCH_ERROR, 404, "HTTP 404 Not Found", None)
    assert server.hits["/status/404"] == 1


def test_500_retried_then_gives_up(server: LoopbackServer) -> None:
    with make(retries=3) as f:
        res = f.fetch(item(server.url("/status/500")))
    assert (res.status, res.http_status, res.error) == (FETCH_ERROR, 500, "HTTP 500 after 4 attempts")
    assert server.hits["/status/500"] == 4


def test_500_without_retries_names_the_status(server: LoopbackServer) -> None:
    with make(retries=0) as f:
        res = f.fetch(item(server.url("/status/503")))
    assert (res.http_status, res.error) == (503, "HTTP 503 Service Unavailable")
    assert server.hits["/status/503"] == 1


def test_flaky_500_then_200(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/flaky/a?body=/img/1.png")))
    assert (res.status, res.http_status, res.data) == (OK, 200, PNG)
    assert server.hits["/flaky/a"] == 2


def test_429_honours_retry_after(server: LoopbackServer, fetcher: Fetcher) -> None:
    start = time.monotonic()
    res = fetcher.fetch(item(server.url("/ratelimit/a?body=/img/1.png&retry_after=1")))
    elapsed = time.monotonic() - start
    assert (res.status, res.http_status, res.data) == (OK, 200, PNG)
    assert server.hits["/ratelimit/a"] == 2
    assert elapsed >= 0.9  # waited for Retry-After, not the 0.01 s backoff


def test_retry_after_capped(server: LoopbackServer) -> None:
    with make(max_retry_after=0.05) as f:
        start = time.monotonic()
        res = f.fetch(item(server.url("/ratelimit/b?body=/img/1.png&retry_after=30")))
    assert res.status == OK and time.monotonic() - start < 5


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    assert 15 < (parse_retry_after(later) or 0) <= 20
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=20), usegmt=True)
    assert parse_retry_after(earlier) == 0.0


def test_read_timeout_retried(server: LoopbackServer) -> None:
    with make(read_timeout=0.5, retries=1) as f:
        res = f.fetch(item(server.url("/slow?delay=2")))
    assert res.status == FETCH_ERROR and res.http_status is None
    assert res.error == "timed out after 2 attempts (read timeout 0.5s)"
    assert server.hits["/slow"] == 2


def test_read_timeout_while_streaming_body(server: LoopbackServer) -> None:
    with make(read_timeout=0.3, retries=0) as f:
        res = f.fetch(item(server.url("/slow?delay=1.5&stage=body")))
    assert (res.status, res.error) == (FETCH_ERROR, "timed out (read timeout 0.3s)")
    assert server.hits["/slow"] == 1


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with make(retries=1) as f:
        res = f.fetch(item(f"http://127.0.0.1:{port}/x"))
    assert (res.status, res.http_status, res.error) == (
        FETCH_ERROR,
        None,
        "connection refused after 2 attempts",
    )


@pytest.mark.parametrize("length", ["1", "0"], ids=["content-length", "streamed"])
def test_size_cap(server: LoopbackServer, length: str) -> None:
    with make(max_bytes=2**20) as f:
        res = f.fetch(item(server.url(f"/big?mb=3&length={length}")))
        assert (res.status, res.http_status, res.data) == (FETCH_ERROR, 200, None)
        assert res.error == "response larger than 1 MiB cap (--max-bytes)"
        assert server.hits["/big"] == 1  # not retried
        ok = f.fetch(item(server.url(f"/big?mb=0.5&length={length}")))
        assert ok.status == OK and ok.data is not None and len(ok.data) == 2**19


def test_redirect_loop(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/redirect-loop")))
    assert (res.status, res.error) == (FETCH_ERROR, "too many redirects (>5)")
    assert res.http_status == 302
    assert server.hits["/redirect-loop"] == 6


def test_working_redirect(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/redirect?to=/img/1.png")))
    assert (res.status, res.http_status, res.data) == (OK, 200, PNG)
    assert server.hits["/redirect"] == 1 and server.hits["/img/1.png"] == 1


def test_html_is_returned_as_bytes(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/html")))
    assert res.status == OK and res.data is not None and res.data.startswith(b"<!doctype html>")


@pytest.mark.parametrize(
    ("source", "scheme"),
    [
        ("file:///etc/passwd", "file"),
        ("ftp://example.com/a.png", "ftp"),
        ("sftp://host/a.wav", "sftp"),  # s3://, gs://, az://, hf:// are object stores (test_storage.py)
        ("FTP://example.com/a.png", "ftp"),
        ("data:image/png;base64,iVBORw0KGgo=", "data"),
    ],
)
def test_unsupported_schemes(fetcher: Fetcher, source: str, scheme: str) -> None:
    res = fetcher.fetch(item(source))
    assert res.status == FETCH_ERROR and res.data is None and res.http_status is None
    assert res.error == f"unsupported URL scheme '{scheme}' (http, https and object stores: s3, gs, az, hf)"


def test_local_file_ok_missing_dir_and_cap(tmp_path: Path) -> None:
    good = tmp_path / "a.png"
    good.write_bytes(PNG)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(4096))
    with make(max_bytes=2048) as f:
        assert f.fetch(item(str(good))).data == PNG
        missing = f.fetch(item(str(tmp_path / "nope.png")))
        assert (missing.status, missing.error) == (FETCH_ERROR, f"file not found: {tmp_path / 'nope.png'}")
        directory = f.fetch(item(str(tmp_path)))
        assert directory.status == FETCH_ERROR and "directory" in (directory.error or "")
        over = f.fetch(item(str(big)))
        assert over.status == FETCH_ERROR
        assert over.error == f"file larger than 2 KiB cap (--max-bytes): {big}"


def test_local_permission_denied(tmp_path: Path, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    secret.chmod(0)
    if os.name != "posix" or os.geteuid() == 0:  # root reads anything: simulate the refusal

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("batchcap.fetch.open", refuse, raising=False)
    try:
        res = fetcher.fetch(item(str(secret)))
    finally:
        secret.chmod(0o600)
    assert (res.status, res.error) == (FETCH_ERROR, f"permission denied: {secret}")


def test_not_a_regular_file_or_bad_url(fetcher: Fetcher) -> None:
    if os.path.exists("/dev/null"):
        assert fetcher.fetch(item("/dev/null")).error == "not a regular file: /dev/null"
    res = fetcher.fetch(item("http://[::1/x"))
    assert (res.status, res.error) == (FETCH_ERROR, "invalid URL: Invalid IPv6 URL")


def test_local_not_allowed(tmp_path: Path) -> None:
    good = tmp_path / "a.png"
    good.write_bytes(PNG)
    with make(allow_local=False) as f:
        res = f.fetch(item(str(good)))
    assert (res.status, res.error) == (FETCH_ERROR, "local paths are not allowed")


def test_embedded_bytes_are_not_fetched(fetcher: Fetcher) -> None:
    res = fetcher.fetch(item("http://127.0.0.1:9/never", data=b"abc"))
    assert (res.status, res.http_status, res.error, res.data) == (OK, None, None, b"abc")


def test_per_host_cap(server: LoopbackServer) -> None:
    with make(per_host=2) as f, ThreadPoolExecutor(20) as pool:
        results = list(pool.map(f.fetch, [item(server.url("/slow?delay=0.1"))] * 20))
    assert all(r.status == OK for r in results)
    assert server.hits["/slow"] == 20
    assert server.max_in_flight == 2


def test_thread_safety(server: LoopbackServer) -> None:
    bodies = {f"/file/{i}.bin": os.urandom(1000 + i) for i in range(100)}
    for path, body in bodies.items():
        server.add(path, body)
    items = [item(server.url(path)) for path in bodies]
    with make() as f, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(f.fetch, items))
    assert [r.data for r in results] == list(bodies.values())
    assert all(r.status == OK and r.http_status == 200 for r in results)
    assert sum(server.hits[p] for p in bodies) == 100
