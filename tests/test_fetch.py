"""Fetcher against a real loopback HTTP server and real local files."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

from batchcap.fetch import FetchConfig, Fetcher, address_allowed, parse_retry_after
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
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    assert 15 < (parse_retry_after(later) or 0) <= 20
    earlier = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=20), usegmt=True)
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


def test_a_local_file_is_read_without_allocating_the_whole_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 kB file under a 50 MB cap costs about 3 kB, not 50 MB per file (Python allocates what read(n) asks
    for before it reads); a file that grows between stat and read is still read up to the cap."""
    import os
    import tracemalloc

    small = tmp_path / "a.png"
    small.write_bytes(PNG * 20)
    with make(max_bytes=50 * 2**20) as f:
        tracemalloc.start()
        try:
            assert f.fetch(item(str(small))).data == PNG * 20
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 2**20, peak
    grows = tmp_path / "grows.bin"
    grows.write_bytes(b"x" * 100)
    real_stat = os.stat

    def stale_stat(path, *args, **kwargs):  # the file had 10 bytes when stat looked
        st = real_stat(path, *args, **kwargs)
        return os.stat_result((st.st_mode, *st[1:6], 10, *st[7:])) if str(path) == str(grows) else st
    monkeypatch.setattr(os, "stat", stale_stat)
    with make(max_bytes=50) as f:
        grown = f.fetch(item(str(grows)))
        assert grown.status == FETCH_ERROR and grown.error == f"file larger than 50 bytes cap (--max-bytes): {grows}"
    with make(max_bytes=200) as f:
        assert f.fetch(item(str(grows))).data == b"x" * 100


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


# -- hostile servers: deadlines, slots, headers, redirects, private addresses (issue #11) ----------


def test_drip_feeding_server_hits_the_deadline(server: LoopbackServer) -> None:
    # One byte every 0.25 s never trips a 5 s read timeout; only a deadline on the whole download ends it.
    with make(deadline=1.0, retries=2) as f:
        res = f.fetch(item(server.url("/drip?bytes=40&interval=0.25")))
    assert (res.status, res.http_status, res.data) == (FETCH_ERROR, 200, None)
    assert res.error is not None
    assert res.error.startswith("timed out: not finished within the 1s deadline (--fetch-deadline); ")
    assert res.error.endswith(" bytes received")
    assert server.hits["/drip"] == 1  # the deadline is for the whole item: no retry


def test_stalled_body_ends_at_the_deadline_not_the_read_timeout(server: LoopbackServer) -> None:
    with make(deadline=0.5, read_timeout=20.0, retries=0) as f:
        res = f.fetch(item(server.url("/slow?delay=3&stage=body")))
    assert (res.status, res.error) == (
        FETCH_ERROR, "timed out: not finished within the 0.5s deadline (--fetch-deadline); 4 bytes received")


def test_body_within_the_deadline_is_fetched(server: LoopbackServer) -> None:
    with make(deadline=30.0) as f:
        res = f.fetch(item(server.url("/drip?bytes=4&interval=0.05")))
    assert (res.status, res.data, res.size) == (OK, b"xxxx", 4)


def test_slot_wait_is_bounded(server: LoopbackServer) -> None:
    # per_host=1: while a dripping download holds the host's only slot, another item waits at most
    # slot_timeout for it, then fails with a row of its own instead of blocking its thread forever.
    with make(per_host=1, deadline=1.0, slot_timeout=0.2) as f, ThreadPoolExecutor(2) as pool:
        holder = pool.submit(f.fetch, item(server.url("/drip?bytes=100&interval=0.1")))
        while server.hits["/drip"] == 0:
            time.sleep(0.01)
        waiter = f.fetch(item(server.url("/img/1.png")))
        assert holder.result().status == FETCH_ERROR
    assert (waiter.status, waiter.error) == (
        FETCH_ERROR, "no free connection slot for 127.0.0.1 within 0.2s (--per-host 1)")
    assert server.hits["/img/1.png"] == 0


def test_cancel_ends_downloads_under_way_and_waits_for_slots(server: LoopbackServer) -> None:
    # an interrupted run must not wait for the slowest download: a body stalled in a read (deadline and
    # read timeout far away) and an item waiting for the host's only slot both end at once on cancel()
    from batchcap.fetch import CANCELLED

    with make(per_host=1, deadline=60.0, read_timeout=20.0, retries=3) as f, ThreadPoolExecutor(2) as pool:
        reading = pool.submit(f.fetch, item(server.url("/slow?delay=20&stage=body")))
        while server.hits["/slow"] == 0:
            time.sleep(0.01)
        waiting = pool.submit(f.fetch, item(server.url("/img/1.png")))
        time.sleep(0.3)
        assert not reading.done() and not waiting.done()
        f.cancel()
        first, second = reading.result(timeout=5), waiting.result(timeout=5)
        assert (first.status, first.error) == (FETCH_ERROR, CANCELLED)
        assert (second.status, second.error) == (FETCH_ERROR, CANCELLED)
        assert f.fetch(item(server.url("/img/1.png"))).error == CANCELLED
    assert server.hits["/img/1.png"] == 0 and server.hits["/slow"] == 1  # no retry of what was cancelled


def test_cancel_mid_body_without_length_is_not_a_short_success(server: LoopbackServer) -> None:
    # no Content-Length: the end of a shut-down socket reads like the end of the body
    from batchcap.fetch import CANCELLED

    with make(deadline=60.0, read_timeout=20.0) as f, ThreadPoolExecutor(1) as pool:
        reading = pool.submit(f.fetch, item(server.url("/drip?bytes=200&interval=0.1&length=0")))
        while server.hits["/drip"] == 0:
            time.sleep(0.01)
        time.sleep(0.5)
        f.cancel()
        res = reading.result(timeout=5)
    assert (res.status, res.error, res.data) == (FETCH_ERROR, CANCELLED, None)


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "1.5", "soon", "-1", "Sat, 99 Foo 2020 99:99:99 GMT"])
def test_odd_retry_after_means_normal_backoff(server: LoopbackServer, value: str) -> None:
    # "²" and "٣" pass str.isdigit() and then fail float(): the item used to fail with a ValueError.
    assert parse_retry_after(value) is None
    assert parse_retry_after(" 12 ") == 12.0
    with make() as f:
        res = f.fetch(item(server.url(f"/ratelimit/odd?body=/img/1.png&retry_after={value}")))
    assert (res.status, res.data) == (OK, PNG)
    assert server.hits["/ratelimit/odd"] == 2


@pytest.fixture
def more_servers() -> Iterator[list[LoopbackServer]]:
    servers = [LoopbackServer().start() for _ in range(4)]
    yield servers
    for s in servers:
        s.stop()


def test_per_host_cap_counts_the_redirect_target(more_servers: list[LoopbackServer]) -> None:
    # Three origins redirect to one target: the target's slots limit the requests it gets,
    # not the origins' (which used to let 3 requests at once reach a per_host=1 target).
    *origins, target = more_servers
    to = target.url("/slow?delay=0.2")
    urls = [o.url(f"/redirect?to={to}") for o in origins for _ in range(2)]
    with make(per_host=1) as f, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(f.fetch, map(item, urls)))
    assert [r.status for r in results] == [OK] * 6
    assert target.hits["/slow"] == 6
    assert target.max_in_flight == 1


def test_redirect_to_another_scheme_is_refused(server: LoopbackServer, fetcher: Fetcher) -> None:
    res = fetcher.fetch(item(server.url("/redirect?to=file:///etc/passwd")))
    assert (res.status, res.http_status, res.data) == (FETCH_ERROR, 302, None)
    assert res.error == "redirect to unsupported URL scheme 'file' (only http and https are fetched)"


@pytest.mark.parametrize(("address", "allowed"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.3.2.1", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False), ("fe80::1%eth0", False),
    ("fd00:ec2::254", False), ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False), ("64:ff9b::a00:1", False), ("192.0.2.1", False), ("not-an-ip", False),
])
def test_address_policy(address: str, allowed: bool) -> None:
    assert address_allowed(address) is allowed


def test_block_private_refuses_loopback(server: LoopbackServer) -> None:
    with make(block_private=True) as f:
        res = f.fetch(item(server.url("/img/1.png")))
        by_name = f.fetch(item(f"http://localhost:{server.port}/img/1.png"))
    refused = "refused: 127.0.0.1 resolves to a private address (--block-private-addresses)"
    assert (res.status, res.http_status, res.data, res.error) == (FETCH_ERROR, None, None, refused)
    assert by_name.error == "refused: localhost resolves to a private address (--block-private-addresses)"
    assert server.hits["/img/1.png"] == 0  # nothing was asked: nothing of the answer can show in the row


@pytest.fixture
def private_server() -> Iterator[LoopbackServer]:
    """A server on 127.0.0.2: a loopback address the tests' allowlist does not cover."""
    try:
        server = LoopbackServer("127.0.0.2").start()
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here")
    server.add("/secret", b"metadata credentials")
    yield server
    server.stop()


def test_block_private_checks_every_redirect_hop(server: LoopbackServer, private_server: LoopbackServer) -> None:
    hop = server.url(f"/redirect?to={private_server.url('/secret')}")
    with make() as f:  # without the guard the redirect reaches the private server
        assert f.fetch(item(hop)).data == b"metadata credentials"
    private_server.reset()
    with make(block_private=True, allow_networks=("127.0.0.1/32",)) as f:
        assert f.fetch(item(server.url("/img/1.png"))).data == PNG  # the allowlisted host still works
        res = f.fetch(item(hop))
    assert (res.status, res.data, res.http_status) == (FETCH_ERROR, None, None)
    assert res.error == "refused: 127.0.0.2 resolves to a private address (--block-private-addresses)"
    assert private_server.hits["/secret"] == 0


def test_block_private_connects_to_the_checked_address(server: LoopbackServer, private_server: LoopbackServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # DNS rebinding: the name answers an allowed address first, a private one after. The guard
    # checks what it connects to, so a second lookup can never swap the address under it.
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host: object, *args: object, **kwargs: object) -> object:
        if host == "rebind.test":
            answers.append("127.0.0.1" if not answers else "127.0.0.2")
            host = answers[-1]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    private_server.add("/img/1.png", b"from the private server")
    with make(block_private=True, allow_networks=("127.0.0.1/32",)) as f:
        res = f.fetch(item(f"http://rebind.test:{server.port}/img/1.png"))
    assert (res.status, res.data) == (OK, PNG)
    assert answers == ["127.0.0.1"] and private_server.hits["/img/1.png"] == 0


def test_root_confines_local_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "a.png"
    inside.write_bytes(PNG)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    (root / "link.png").symlink_to(outside)
    (root / "inner-link.png").symlink_to(inside)
    with make(root=str(root)) as f:
        assert f.fetch(item(str(inside))).data == PNG
        assert f.fetch(item(str(root / "inner-link.png"))).data == PNG
        assert f.fetch(item(str(root / "sub" / ".." / "sub" / "a.png"))).data == PNG
        for path in (str(outside), str(root / "link.png"), str(root / "sub" / ".." / ".." / "secret.png"),
                     "/etc/hostname", str(tmp_path / "root-sibling.png")):
            res = f.fetch(item(path))
            assert (res.status, res.error, res.data) == (FETCH_ERROR, f"outside --root {root}: {path}", None)
    with make() as f:  # without --root, the same paths are read
        assert f.fetch(item(str(root / "link.png"))).data == b"secret"


def test_item_error_becomes_a_fetch_error(fetcher: Fetcher) -> None:
    bad = Item(index=0, id="m.jsonl line 3", source="m.jsonl line 3", error="manifest line 3: not valid JSON")
    res = fetcher.fetch(bad)
    assert (res.status, res.error, res.data, res.size) == (FETCH_ERROR, "manifest line 3: not valid JSON", None, 0)


def test_gzip_body_is_decoded_and_capped_decoded(server: LoopbackServer) -> None:
    import gzip

    server.add("/img/z.png", gzip.compress(PNG), "image/png", {"Content-Encoding": "gzip"})
    server.add("/bomb", gzip.compress(bytes(3 * 2**20)), headers={"Content-Encoding": "gzip"})  # ~3 KiB on the wire
    with make(max_bytes=2**20) as f:
        assert f.fetch(item(server.url("/img/z.png"))).data == PNG
        bomb = f.fetch(item(server.url("/bomb")))
    assert (bomb.status, bomb.error) == (FETCH_ERROR, "response larger than 1 MiB cap (--max-bytes)")



def test_retry_after_beyond_the_deadline_gives_up(server: LoopbackServer) -> None:
    with make(deadline=2.0) as f:
        res = f.fetch(item(server.url("/ratelimit/late?body=/img/1.png&retry_after=30")))
    assert (res.status, res.http_status) == (FETCH_ERROR, 429)
    assert res.error == "HTTP 429 Too Many Requests (no time left for a retry within --fetch-deadline)"
    assert server.hits["/ratelimit/late"] == 1


def test_fault_messages_say_what_happened(server: LoopbackServer) -> None:
    """A body cut short said "connection reset"; a bad gzip body showed a Python tuple; an https URL to a
    plain-HTTP port said "connection failed after 4 attempts" (retried, though it cannot succeed)."""
    server.add("/badgzip", b"this is not gzip data", headers={"Content-Encoding": "gzip"})
    with make(retries=1, backoff=0.01) as f:
        short = f.fetch(item(server.url("/short")))
        gz = f.fetch(item(server.url("/badgzip")))
        tls = f.fetch(item(server.url("/html").replace("http://", "https://")))
    assert short.error == "incomplete body after 2 attempts (40 bytes read, 60 more expected)"
    assert gz.error == ("cannot decode the response body (Content-Encoding: gzip): "
                        "Error -3 while decompressing data: incorrect header check")
    assert tls.error == ("TLS handshake failed: the server does not speak TLS there (an https URL to a plain-HTTP "
                         "port?)")  # and not "after N attempts": the same handshake would fail again
