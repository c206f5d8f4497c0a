"""Data where it lives: manifests, items and results in object storage.

The S3 tests talk HTTP to a real S3 API on loopback: moto's standalone server, started once for the
module on a free port, with ``AWS_ENDPOINT_URL`` pointing at it (botocore, and so s3fs, read it). The
fast cases use fsspec's in-process ``memory://`` store.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from batchcap import storage
from batchcap.fetch import FetchConfig, Fetcher
from batchcap.inputs import Inputs, image_spec
from batchcap.items import FatalError, Item
from batchcap.output import RemoteResultStore
from tests.helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "wJalrXUtnFEMI-not-a-real-secret-0123456789"


def png(i: int, size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[0] + i, size[1]), (i * 37 % 256, 90, 200 - i * 9 % 200)).save(buf, "PNG")
    return buf.getvalue()


# --- fixtures ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Any:
    """moto's S3 server on a free loopback port, for the whole module."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'batchcap[dev]')")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'batchcap[dev]')")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(endpoint + "/moto-api/", timeout=1)
            break
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _set_auth(endpoint: str, value: str) -> None:
    """moto checks credentials from now on ("0") or never ("inf")."""
    requests.post(endpoint + "/moto-api/reset-auth", data=value.encode(), headers={"Content-Type": "text/plain"},
                  timeout=10).raise_for_status()


class Bucket:
    def __init__(self, name: str):
        import fsspec

        self.name = name
        self.fs = fsspec.filesystem("s3", skip_instance_cache=True)
        self.fs.mkdir(name)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    def put(self, key: str, data: bytes | str) -> str:
        self.fs.pipe_file(f"{self.name}/{key}", data.encode() if isinstance(data, str) else data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        self.fs.invalidate_cache()
        return self.fs.cat_file(f"{self.name}/{key}")

    def keys(self, prefix: str = "") -> list[str]:
        self.fs.invalidate_cache()
        found = self.fs.find(f"{self.name}/{prefix}".rstrip("/"), detail=False)
        return sorted(k[len(self.name) + 1:] for k in found)

    def rows(self, key: str) -> list[dict[str, Any]]:
        return pq.read_table(io.BytesIO(self.get(key))).to_pylist()


def _aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, key: str = "testing", secret: str = "testing") -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookups on a dev machine
    storage.reset()


@pytest.fixture()
def s3(moto_endpoint, monkeypatch, tmp_path) -> Any:
    """A fresh bucket on the moto server; credentials and endpoint in the environment (subprocesses inherit)."""
    _aws_env(monkeypatch, moto_endpoint)
    monkeypatch.setenv("BATCHCAP_CACHE", str(tmp_path / "cache"))
    bucket = Bucket(f"bc-{uuid.uuid4().hex[:12]}")
    yield bucket
    storage.reset()


@pytest.fixture()
def memory(monkeypatch, tmp_path) -> Any:
    import fsspec

    monkeypatch.setenv("BATCHCAP_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/t-{uuid.uuid4().hex[:10]}"
    yield fs, root
    fs.rm(root, recursive=True)


# --- the storage layer, on memory:// --------------------------------------------------------------

def test_which_urls_are_object_storage():
    assert all(storage.is_remote(u) for u in ("s3://b/k.jpg", "gs://b/k", "az://c/k", "hf://datasets/x/y.parquet",
                                              "memory://x", "S3://b/k"))
    assert not any(storage.is_remote(u) for u in ("https://x/y.jpg", "file:///etc/passwd", "/data/a.jpg",
                                                  "zip://a::s3://b/k.zip", "sftp://host/x", "data:,x"))
    assert storage.join("s3://b/out.parquet.parts", "p.parquet") == "s3://b/out.parquet.parts/p.parquet"
    assert storage.parent("s3://b/dir/m.csv") == "s3://b/dir" and storage.basename("s3://b/dir/m.csv") == "m.csv"


def test_relative_paths_of_a_remote_manifest_stay_in_its_bucket():
    """``..`` stops at the bucket as at ``/``: ``../../other/x.png`` from s3://b/in/ read bucket ``other``'s
    ``x.png``, while one more ``..`` was kept as a literal key."""
    assert storage.resolve("s3://b/in", "x.png") == "s3://b/in/x.png"
    assert storage.resolve("s3://b/in/sub/", "../x.png") == "s3://b/in/x.png"
    assert storage.resolve("s3://b/in", "../../other/x.png") == "s3://b/other/x.png"
    assert storage.resolve("s3://b/in", "../../../other/x.png") == "s3://b/other/x.png"
    assert storage.resolve("s3://b/in", "/top/x.png") == "s3://b/top/x.png"
    assert storage.resolve("gs://b", "./x.png") == "gs://b/x.png"


def test_scrub_blanks_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = storage.scrub(f"failed with {SECRET} at https://x.blob.core.windows.net/c/k?sv=2022&sig=abcDEF123%2B&se=1")
    assert SECRET not in text and "abcDEF123" not in text and "sig=***" in text


def test_fetch_objects_with_cap_and_row_errors(memory):
    fs, root = memory
    fs.pipe_file(f"{root}/a.png", png(1))
    fs.pipe_file(f"{root}/big.bin", b"x" * 5000)
    fs.pipe_file(f"{root}/empty.png", b"")
    fs.pipe_file(f"{root}/folder/x.png", png(2))
    url = f"memory:/{root}"
    with Fetcher(FetchConfig(max_bytes=4096, retries=0)) as fetcher:
        got = {name: fetcher.fetch(Item(0, name, f"{url}/{name}"))
               for name in ("a.png", "big.bin", "empty.png", "nope.png", "folder")}
    assert got["a.png"].status == "ok" and got["a.png"].data == png(1)
    assert got["empty.png"].status == "ok" and got["empty.png"].data == b""
    assert got["big.bin"].error == f"object larger than 4 KiB cap (--max-bytes): {url}/big.bin"
    assert got["nope.png"].error == f"object not found: {url}/nope.png"
    assert got["folder"].status == "fetch_error"


def test_prefix_walk_and_manifest_in_memory_store(memory):
    fs, root = memory
    for name in ("b.png", "a.jpg", "sub/c.webp", ".hidden.png", "sub/.cache/d.png", "notes.txt"):
        fs.pipe_file(f"{root}/imgs/{name}", png(1))
    fs.pipe_file(f"{root}/m.jsonl", "".join(json.dumps(r) + "\n" for r in (
        {"path": "imgs/a.jpg", "caption": "x"}, {"path": "s3://elsewhere/k.png"}, {"path": "/abs/local.png"})).encode())
    url = f"memory:/{root}"
    inputs = Inputs([f"{url}/imgs", f"{url}/m.jsonl"], image_spec())
    inputs.check()
    assert inputs.estimate() == 6
    items = list(inputs)
    assert [i.source for i in items] == [f"{url}/imgs/a.jpg", f"{url}/imgs/b.png", f"{url}/imgs/sub/c.webp",
                                         f"{url}/imgs/a.jpg", "s3://elsewhere/k.png", "/abs/local.png"]
    assert items[3].references == ["x"] and inputs.stats.skipped_files == 1 and inputs.stats.manifests == 1
    with pytest.raises(FatalError, match=f"input not found: {url}/nothing"):
        Inputs([f"{url}/nothing"], image_spec()).check()
    fs.pipe_file(f"{root}/bad.csv", b"where,caption\nx.png,y\n")
    with pytest.raises(FatalError, match=rf"{url}/bad.csv: cannot tell which column"):
        Inputs([f"{url}/bad.csv"], image_spec(path_column=None)).check()


def test_files_written_through_fsutil_go_to_the_store(memory):
    """Subtitles, reports and summaries are written with fsutil: a URL target becomes one object."""
    from batchcap.fsutil import atomic_path, atomic_write

    fs, root = memory
    url = f"memory:/{root}/subs/a.srt"
    assert atomic_write(url, "1\n00:00:00,000 --> 00:00:01,000\nhello\n") == url
    assert fs.cat_file(f"{root}/subs/a.srt").startswith(b"1\n00:00:00,000")
    with pytest.raises(RuntimeError), atomic_path(f"memory:/{root}/t.parquet") as tmp:
        pq.write_table(pa.table({"a": [1]}), tmp)
        raise RuntimeError("a writer that fails uploads nothing")
    assert not fs.exists(f"{root}/t.parquet")
    with atomic_path(f"memory:/{root}/t.parquet") as tmp:
        pq.write_table(pa.table({"a": [1]}), tmp)
    assert pq.read_table(io.BytesIO(fs.cat_file(f"{root}/t.parquet"))).num_rows == 1
    assert not os.path.exists(tmp)


def test_remote_store_resumes_from_the_store_not_the_cache(memory, tmp_path):
    fs, root = memory
    url = f"memory:/{root}/out/res.parquet"
    first = RemoteResultStore(url, flush_rows=2, cache=str(tmp_path / "machine-a"))
    with first:
        for i in range(5):
            first.add({"id": f"i{i}", "status": "ok", "_order": i})
    assert fs.exists(f"{root}/out/res.parquet.lock") is False  # released
    assert len([k for k in fs.find(f"{root}/out/res.parquet.parts") if k.endswith(".parquet")]) == 3
    # another machine (another cache) resumes from the parts in the store
    second = RemoteResultStore(url, flush_rows=2, cache=str(tmp_path / "machine-b"))
    with second:
        assert second.done == {f"i{i}" for i in range(5)}
        second.add({"id": "i5", "status": "ok", "_order": 5})
        table = second.finalize({f"i{i}": i for i in range(6)})
    assert table.column("id").to_pylist() == [f"i{i}" for i in range(6)]
    assert pq.read_table(io.BytesIO(fs.cat_file(f"{root}/out/res.parquet"))).column("id").to_pylist() == \
        [f"i{i}" for i in range(6)]
    assert not fs.exists(f"{root}/out/res.parquet.parts")
    # machine a's working copy still has its old parts: they must not come back (the store is the truth)
    third = RemoteResultStore(url, overwrite=True, cache=str(tmp_path / "machine-a"))
    with third:
        assert third.done == set()
        third.finalize({})
    assert pq.read_table(io.BytesIO(fs.cat_file(f"{root}/out/res.parquet"))).num_rows == 0


def test_remote_csv_output_keeps_its_schema_beside_it(memory, tmp_path):
    fs, root = memory
    url = f"memory:/{root}/out.csv"
    with RemoteResultStore(url, cache=str(tmp_path / "a")) as store:
        store.add({"id": "007", "status": "ok", "references": ["a", "b"], "_order": 0})
        store.finalize({"007": 0})
    assert fs.exists(f"{root}/out.schema.json") and fs.cat_file(f"{root}/out.csv").startswith(b'"id"')
    with RemoteResultStore(url, cache=str(tmp_path / "b")) as store:  # another machine
        assert store.done == {"007"}
        store.add({"id": "8", "status": "ok", "references": ["c"], "_order": 1})
        table = store.finalize({"007": 0, "8": 1})
    assert table.column("id").to_pylist() == ["007", "8"]
    assert table.column("references").to_pylist() == [["a", "b"], ["c"]]


def test_subtitles_in_a_store_make_no_local_folder_and_are_kept(memory, tmp_path, monkeypatch):
    """``--write srt`` with an output in a bucket made a local folder tree "s3:/bucket/..." in the working
    directory, and a rerun uploaded every file again (the kept check looked on the local disk)."""
    from batchcap.subtitles import SubtitleWriter

    fs, root = memory
    monkeypatch.chdir(tmp_path)
    folder = f"memory:/{root}/out.subtitles"
    seg = [{"start": 0.0, "end": 1.0, "text": "Hello."}]
    first = SubtitleWriter(folder, ["srt"], overwrite=False)
    assert len(first.write("calls/a.wav", "Hello.", seg)) == 1
    assert os.listdir(tmp_path) == []
    assert [p.rsplit("/", 1)[1] for p in fs.find(root)] == [first.paths("calls/a.wav")["srt"].rsplit("/", 1)[1]]
    again = SubtitleWriter(folder, ["srt"], overwrite=False)
    assert again.write("calls/a.wav", "Other.", seg) == [] and again.kept == 1


def test_lock_object_refuses_a_live_run_and_takes_over_a_dead_one(memory, tmp_path, caplog):
    fs, root = memory
    url = f"memory:/{root}/res.parquet"
    live = {"host": "gpu-node-7", "pid": 4242, "run": "x", "refreshed": time.time()}
    fs.pipe_file(f"{root}/res.parquet.lock", json.dumps(live).encode())
    with pytest.raises(FatalError, match=r"another batchcap run \(gpu-node-7, pid 4242, .*is writing "
                                         rf"{url}; wait for it to finish\. If it is dead, remove {url}\.lock"):
        RemoteResultStore(url, cache=str(tmp_path / "c")).open()
    dead = dict(live, refreshed=time.time() - 3600)  # not refreshed for an hour: its run is gone
    fs.pipe_file(f"{root}/res.parquet.lock", json.dumps(dead).encode())
    with RemoteResultStore(url, cache=str(tmp_path / "c")) as store:
        holder = json.loads(fs.cat_file(f"{root}/res.parquet.lock"))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FatalError, match="another batchcap run"):  # a second writer, here and now
            RemoteResultStore(url, cache=str(tmp_path / "d")).open()
        store.finalize({})
    assert "taking over the lock" in caplog.text
    assert not fs.exists(f"{root}/res.parquet.lock")


def test_a_lock_s_pid_is_looked_up_only_within_its_pid_namespace(memory, tmp_path):
    """Two containers with one host name (``--network host``) number their processes apart: a live run's pid
    was looked up in the other's namespace, found missing, and its lock taken over while it wrote."""
    import subprocess
    import sys

    fs, root = memory
    url = f"memory:/{root}/res.parquet"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process here has
    here = {"host": socket.gethostname(), "pid": gone.pid, "run": "x", "refreshed": time.time()}
    elsewhere = dict(here, pid_namespace="pid:[1]")
    fs.pipe_file(f"{root}/res.parquet.lock", json.dumps(elsewhere).encode())
    with pytest.raises(FatalError, match="another batchcap run"):
        RemoteResultStore(url, cache=str(tmp_path / "c")).open()
    same = dict(here, pid_namespace=os.readlink("/proc/self/ns/pid"))  # this machine's run, dead: taken over
    fs.pipe_file(f"{root}/res.parquet.lock", json.dumps(same).encode())
    with RemoteResultStore(url, cache=str(tmp_path / "c")) as store:
        assert json.loads(fs.cat_file(f"{root}/res.parquet.lock"))["pid"] == os.getpid()
        store.finalize({})


def test_a_lock_taken_over_is_never_overwritten_and_stops_the_run(memory, tmp_path, monkeypatch):
    """The heartbeat rewrote the lock object whatever it held: a run whose refreshes had failed past the
    stale age, and whose lock another host had then taken over, overwrote the new holder's lock and went on
    uploading parts beside it. It now leaves the other's lock alone and stops at its next upload."""
    from batchcap import output

    fs, root = memory
    url = f"memory:/{root}/res.parquet"
    monkeypatch.setattr(output, "LOCK_REFRESH_S", 0.05)
    store = RemoteResultStore(url, cache=str(tmp_path / "c"), flush_rows=1)
    store.open()
    other = {"host": "gpu-node-9", "pid": 77, "run": "theirs", "refreshed": time.time()}
    fs.pipe_file(f"{root}/res.parquet.lock", json.dumps(other).encode())
    deadline = time.monotonic() + 10
    while not store._lost and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # a few refresh periods more: nothing rewrites the lock
    assert json.loads(fs.cat_file(f"{root}/res.parquet.lock")) == other
    with pytest.raises(FatalError, match=r"another run \(gpu-node-9, pid 77\) took over the lock"):
        store.add({"id": "a", "status": "ok"})
    assert not fs.exists(f"{root}/res.parquet.parts")
    store.close()
    assert json.loads(fs.cat_file(f"{root}/res.parquet.lock")) == other  # closing does not remove theirs


# --- S3 over HTTP (moto server) ---------------------------------------------------------------------

def _cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def test_object_reads_are_bounded_by_the_fetch_deadline(s3):
    url = s3.put("big.bin", os.urandom(2 * 2**20))
    with Fetcher(FetchConfig(deadline=0.001, retries=2)) as fetcher:
        late = fetcher.fetch(Item(0, "big", url))
    assert late.error == f"timed out: not finished within the 0.001s deadline (--fetch-deadline): {url}"
    with Fetcher(FetchConfig(deadline=30, max_bytes=2**20)) as fetcher:
        assert fetcher.fetch(Item(0, "big", url)).error == f"object larger than 1 MiB cap (--max-bytes): {url}"


def test_a_row_naming_a_prefix_says_it_is_a_folder(s3):
    """S3 answers a GET of a prefix with "no such key": the row said "object not found" for a folder that is
    there. One listing on that failure tells them apart."""
    s3.put("pre/a.png", png(1))
    with Fetcher(FetchConfig(deadline=30, retries=0)) as fetcher:
        folder = fetcher.fetch(Item(0, "pre", s3.url("pre")))
        missing = fetcher.fetch(Item(0, "nope", s3.url("nope.png")))
    assert folder.error == f"is a folder (prefix), not an object: {s3.url('pre')}"
    assert missing.error == f"object not found: {s3.url('nope.png')}"


def test_parquet_manifest_items_and_output_in_the_bucket(s3, tiny_captioner):
    for i in range(4):
        s3.put(f"imgs/{i}.png", png(i))
    rows = [{"path": "imgs/0.png", "caption": "a"}, {"path": s3.url("imgs/1.png"), "caption": "b"},
            {"path": "imgs/2.png", "caption": None}, {"path": "imgs/missing.png", "caption": "c"}]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    manifest = s3.put("in/manifest.parquet", buf.getvalue())
    s3.put("in/imgs/0.png", png(0))
    s3.put("in/imgs/2.png", png(2))
    out = s3.url("results/caps.parquet")
    code, output = run_cli("images", manifest, s3.url("imgs/3.png"), "-o", out, "--model", tiny_captioner,
                           "--batch-size", "2", "--flush-every", "2", "--report")
    assert code == 3, output  # the missing object: its row is written, the run reports it
    got = s3.rows("results/caps.parquet")
    assert [r["source"] for r in got] == [s3.url("in/imgs/0.png"), s3.url("imgs/1.png"), s3.url("in/imgs/2.png"),
                                          s3.url("in/imgs/missing.png"), s3.url("imgs/3.png")]
    assert [r["status"] for r in got] == ["ok", "ok", "ok", "fetch_error", "ok"]
    assert got[3]["error"] == f"object not found: {s3.url('in/imgs/missing.png')}"
    assert all(r["width"] for r in got if r["status"] == "ok")
    summary = json.loads(s3.get("results/caps.summary.json"))
    assert summary["output"] == out and summary["rows"] == 5
    assert f"wrote 5 rows to {out}" in output
    assert summary["report"] == s3.url("results/caps.report.html") and b"<html" in s3.get("results/caps.report.html")
    assert s3.keys("results") == ["results/caps.parquet", "results/caps.report.html",
                                  "results/caps.summary.json"]  # no parts, no lock


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_and_report_read_results_in_the_bucket(s3, tmp_path, fmt):
    """A result in object storage (as `-o s3://...` writes it) was "no such file" to export and report. They
    read a copy now (with its summary and CSV schema); their default outputs go beside it in the bucket."""
    from batchcap.output import write_table

    rows = [{"id": "calls/a.wav", "source": "s3://x/calls/a.wav", "text": "Hello there.", "status": "ok",
             "error": None, "duration_s": 2.0, "language": "en", "reference": "hello there", "wer": 0.0,
             "segments": [{"start": 0.0, "end": 1.5, "text": "Hello there."}]}]
    local = tmp_path / f"r.{fmt}"
    write_table(pa.Table.from_pylist(rows), str(local), fmt)
    s3.put(f"out/r.{fmt}", local.read_bytes())
    for beside in tmp_path.glob("r.schema.json"):  # a CSV's schema, where the writer keeps one
        s3.put("out/r.schema.json", beside.read_bytes())
    s3.put("out/r.summary.json", json.dumps({"rows": 1, "command": "batchcap audio calls -o s3://x/out/r"}))
    result = s3.url(f"out/r.{fmt}")
    code, output = run_cli("export", result, "--format", "srt,txt")
    assert code == 0 and "1 of 1 rows exported" in output, output
    assert len(s3.keys("out/r.subtitles")) == 2
    srt = next(k for k in s3.keys("out/r.subtitles") if k.endswith(".srt"))
    assert s3.get(srt).decode() == "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n"
    code, output = run_cli("report", result)
    assert code == 0 and f"report: {s3.url('out/r.report.html')}" in output, output
    page = s3.get("out/r.report.html").decode()
    assert "batchcap report: r." in page and "Hello there." in page and "batchcap audio calls" in page
    code, output = run_cli("report", s3.url("out/missing.parquet"), "-o", tmp_path / "m.html")
    assert code == 1 and "no result file at s3://" in output


def test_csv_manifest_and_prefix_in_the_bucket_to_a_local_csv(s3, tiny_captioner, tmp_path):
    for name in ("a.png", "b.png", "deep/c.png", ".hidden.png", "readme.txt"):
        s3.put(f"photos/{name}", png(len(name)) if name.endswith(".png") else "text")
    manifest = s3.put("lists/m.csv", "id,url,caption\nx1,../photos/a.png,a cat\nx2,"
                                     f"{s3.url('photos/deep/c.png')},a dog\n")
    out = tmp_path / "caps.csv"
    code, output = run_cli("images", s3.url("photos"), manifest, "-o", str(out), "--model", tiny_captioner,
                           "--batch-size", "4")
    assert code == 0, output
    rows = list(csv.DictReader(open(out, newline="")))
    assert [(r["id"], r["source"], r["status"]) for r in rows] == [
        (s3.url(f"photos/{n}"), s3.url(f"photos/{n}"), "ok") for n in ("a.png", "b.png", "deep/c.png")] + [
        ("x1", s3.url("photos/a.png"), "ok"), ("x2", s3.url("photos/deep/c.png"), "ok")]  # ".." as in paths
    assert json.loads((tmp_path / "caps.summary.json").read_text())["skipped_files"] == 1


def test_kill_mid_run_then_resume_against_the_bucket(s3, tiny_captioner):
    n = 20
    for i in range(n):
        s3.put(f"in/{i:03d}.png", png(i, (24, 16)))
    out = s3.url("out/res.parquet")
    cmd = [sys.executable, "-m", "batchcap.cli", "images", s3.url("in"), "-o", out, "--model", tiny_captioner,
           "--batch-size", "2", "--flush-every", "2", "--workers", "2"]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len([k for k in s3.keys("out") if k.endswith(".parquet") and ".parts/" in k]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    keys = s3.keys("out")
    assert "out/res.parquet" not in keys and "out/res.parquet.lock" in keys  # the dead run's lock is still there
    parts = [k for k in keys if ".parts/" in k]

    rerun = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = s3.rows("out/res.parquet")
    assert [r["source"] for r in rows] == [s3.url(f"in/{i:03d}.png") for i in range(n)]  # exactly one row each
    summary = json.loads(s3.get("out/res.summary.json"))
    assert summary["skipped_already_done"] >= len(parts) >= 2
    assert summary["processed_this_run"] == n - summary["skipped_already_done"]
    assert "taking over the lock" in rerun.stderr
    assert s3.keys("out") == ["out/res.parquet", "out/res.summary.json"]


def test_bad_credentials_are_one_line_without_the_key(s3, moto_endpoint, monkeypatch, tiny_captioner):
    manifest = s3.put("m.csv", "path\na.png\n")
    s3.put("a.png", png(1))
    _aws_env(monkeypatch, moto_endpoint, key="AKIANOTAREALKEY12345", secret=SECRET)
    _set_auth(moto_endpoint, "0")
    try:
        result = subprocess.run([sys.executable, "-m", "batchcap.cli", "images", manifest, "-o", s3.url("o.parquet"),
                                 "--model", tiny_captioner], env=_cli_env(), capture_output=True, text=True,
                                timeout=120)
    finally:
        _set_auth(moto_endpoint, "inf")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1].startswith("Error: cannot read input: access denied") and "Traceback" not in result.stderr
    assert f"for {manifest} (check AWS_ACCESS_KEY_ID" in lines[-1]
    assert SECRET not in result.stderr + result.stdout and "AKIANOTAREALKEY12345" not in result.stderr + result.stdout


def test_bad_outputs_in_the_bucket_stop_before_the_model_loads(s3, tmp_path):
    """What stops a local -o before the model loads stops a bucket's too (the model is a folder that does not
    exist: an error about the output means it came first). Before, the input manifest given as -o and a table
    that is not a result were rewritten (rows lost, then a TypeError), an images result took audio rows, and a
    missing bucket, a lock held or an unreachable store showed only after the model had loaded."""
    manifest = s3.put("m.csv", "path,reference\na.wav,Activated.\n")
    other = s3.put("other.csv", "name,age\nann,3\n")
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a.png"], "status": ["ok"], "caption": ["a cat"]}), buf)
    captions = s3.put("caps.parquet", buf.getvalue())
    s3.put("held.parquet.lock", json.dumps({"host": "other-node", "pid": 17, "run": "r", "refreshed": time.time()}))
    nomodel = str(tmp_path / "no-model")
    cases = [(manifest, manifest, "is both an input and the run's output"),
             (manifest, other, "exists and is not a batchcap result table"),
             (manifest, captions, "holds the results of `batchcap images`"),
             (manifest, "s3://no-such-bucket-batchcap/o.parquet", "bucket s3://no-such-bucket-batchcap does not exist"),
             (manifest, s3.url("held.parquet"), "another batchcap run (other-node, pid 17"),
             (manifest, s3.url("folder.parquet"), "is a folder (a prefix of objects) in the store, not a table")]
    s3.put("folder.parquet/inside.txt", "x")  # said "resuming from ...", then "object not found"
    for source, out, message in cases:
        code, output = run_cli("audio", source, "-o", out, "--model", nomodel)
        assert code == 1 and message in output and "Traceback" not in output, (out, output)
    assert s3.get("m.csv") == b"path,reference\na.wav,Activated.\n" and s3.get("other.csv") == b"name,age\nann,3\n"
    assert s3.rows("caps.parquet") == [{"id": "a.png", "status": "ok", "caption": "a cat"}]


def test_lock_in_the_bucket_stops_a_second_writer(s3, tiny_captioner):
    s3.put("in/a.png", png(1))
    s3.put("out.parquet.lock", json.dumps({"host": "other-node", "pid": 17, "run": "r",
                                           "refreshed": time.time()}))
    code, output = run_cli("images", s3.url("in"), "-o", s3.url("out.parquet"), "--model", tiny_captioner)
    assert code == 1 and "Error: another batchcap run (other-node, pid 17" in output
    assert "out.parquet" not in s3.keys()


def test_ray_workers_read_items_from_the_bucket(s3, tiny_captioner, moto_endpoint):
    ray = pytest.importorskip("ray")
    for i in range(5):
        s3.put(f"in/{i}.png", png(i))
    s3.put("in/broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    if ray.is_initialized():
        ray.shutdown()
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
    ray.init(num_cpus=2, object_store_memory=128 * 2**20, logging_level="WARNING",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, **env}})
    try:
        code, output = run_cli("images", s3.url("in"), "-o", s3.url("out.parquet"), "--model", tiny_captioner,
                               "--engine", "ray", "--batch-size", "2")
    finally:
        ray.shutdown()
    assert code == 3, output
    rows = s3.rows("out.parquet")
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["decode_error"]
    assert [r["source"] for r in rows] == [s3.url(f"in/{i}.png") for i in range(5)] + [s3.url("in/broken.png")]
