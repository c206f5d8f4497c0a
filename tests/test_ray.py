"""``--engine ray`` on a local Ray instance (2 CPUs, no GPU): same rows as ``--engine local``, replicas
that die mid-run, and a driver killed with SIGKILL then resumed. One Ray instance for the module."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

ray = pytest.importorskip("ray")

from batchcap.audio import decode_audio  # noqa: E402
from batchcap.engines import ray as ray_engine  # noqa: E402
from batchcap.items import OK, FatalError, Item, ItemError  # noqa: E402
from batchcap.job import Job, JobOptions  # noqa: E402
from batchcap.output import read_table  # noqa: E402
from batchcap.runner import run_job  # noqa: E402
from tests.conftest import write_audio  # noqa: E402
from tests.helpers import rows_of, run_cli  # noqa: E402,F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("id", "source", "status", "error", "duration_s", "text", "language", "reference", "speaker")


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Any:
    """One local Ray for every test here; workers find batchcap (and this module, pickled by value)."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, logging_level="WARNING",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()




def comparable(rows: list[dict[str, Any]], columns: tuple[str, ...] = COMPARED) -> list[dict[str, Any]]:
    """Rows without what differs between any two runs (object addresses in decoder messages)."""
    out = []
    for row in rows:
        kept = {c: row.get(c) for c in columns}
        if kept.get("error"):
            kept["error"] = re.sub(r"0x[0-9a-f]+", "0x?", kept["error"])
        out.append(kept)
    return out


@pytest.fixture()
def audio_manifest(tmp_path, http_server) -> str:
    """Clips of several lengths plus every kind of bad input, with references and a carried column."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = []
    for i in range(9):
        names.append(write_audio(folder / f"clip{i}.wav", 0.4 + 0.35 * i, freq=250 + 60 * i))
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00not-audio" * 40)
    sf.write(str(folder / "silence.wav"), np.zeros(16000, np.float32), 16000)
    write_audio(folder / "short.wav", 0.01)
    http_server.add("/remote.wav", open(names[2], "rb").read(), content_type="audio/wav")
    sources = names + [str(folder / n) for n in ("corrupt.wav", "silence.wav", "short.wav", "missing.wav")] + [
        http_server.url("/remote.wav"), http_server.url("/status/404")]
    manifest = tmp_path / "manifest.csv"
    lines = ["path,reference,speaker"] + [f"{s},hello world {n},spk{n % 3}" for n, s in enumerate(sources)]
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest)


def test_audio_ray_matches_local(tiny_whisper, audio_manifest, tmp_path):
    common = ["--model", tiny_whisper, "--batch-size", "3", "--retries", "0", "--workers", "2"]
    code_local, out_local = run_cli("audio", audio_manifest, "-o", str(tmp_path / "local.parquet"), *common)
    code_ray, out_ray = run_cli("audio", audio_manifest, "-o", str(tmp_path / "ray.parquet"), *common,
                                "--engine", "ray", "--concurrency", "1")
    assert code_local == code_ray == 3, out_ray  # some items failed, their rows are written
    local, remote = read_table(str(tmp_path / "local.parquet")), read_table(str(tmp_path / "ray.parquet"))
    assert remote.column_names == local.column_names
    assert comparable(remote.to_pylist()) == comparable(local.to_pylist())  # same rows, same (input) order
    statuses = [r["status"] for r in local.to_pylist()]
    assert statuses.count(OK) == 10 and statuses.count("fetch_error") == 2 and statuses.count("empty") == 2
    assert statuses.count("decode_error") == 1
    summary = json.loads((tmp_path / "ray.summary.json").read_text())
    assert summary["rows"] == 15 and summary["processed_this_run"] == 15


def test_images_ray_matches_local(tiny_captioner, tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(7):
        buf = io.BytesIO()
        Image.new("RGB", (30 + 9 * i, 20 + 5 * i), (i * 37 % 256, 200 - i * 20, 60)).save(buf, "PNG")
        (folder / f"im{i}.png").write_bytes(buf.getvalue())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "page.jpg").write_text("<html>not found</html>")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(p), "caption": ["a red circle", "a cat"], "k": n}) + "\n"
                                for n, p in enumerate(sorted(folder.iterdir()))))
    common = ["--model", tiny_captioner, "--batch-size", "2", "--workers", "2"]
    assert run_cli("images", str(manifest), "-o", str(tmp_path / "local.parquet"), *common)[0] == 3
    code, output = run_cli("images", str(manifest), "-o", str(tmp_path / "ray.parquet"), *common, "--engine", "ray")
    assert code == 3, output
    columns = ("id", "source", "caption", "status", "error", "width", "height", "references", "bleu_4", "cider_d",
               "k")
    local = read_table(str(tmp_path / "local.parquet")).to_pylist()
    remote = read_table(str(tmp_path / "ray.parquet")).to_pylist()
    assert comparable(remote, columns) == comparable(local, columns)
    assert [r["status"] for r in remote].count(OK) == 7 and all(r["caption"] for r in remote if r["status"] == OK)


# --- replicas that die, drivers that are killed -------------------------------------------------

class EchoPreprocessor:
    """Decodes for real, loads no model."""

    def setup(self) -> None:
        pass

    def load(self, item: Item, data: bytes) -> dict[str, float]:
        return {"duration_s": len(decode_audio(data)) / 16000}

    def size(self, loaded: dict[str, float]) -> float:
        return loaded["duration_s"]


class EchoPredictor:
    """A fast stand-in model whose text names its input (so a row given to the wrong item shows).

    With ``marker`` set, the replica's process dies (os._exit) on its ``kill_on``-th predict call,
    once: the marker file records that it happened.
    """

    def __init__(self, marker: str | None = None, kill_on: int = 2):
        self.marker = marker
        self.kill_on = kill_on
        self.calls = 0

    def predict(self, batch: list[dict[str, float]]) -> list[str]:
        self.calls += 1
        if self.marker and self.calls == self.kill_on and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)  # the replica's process dies mid-batch
        return [f"{p['duration_s']:.2f}s" for p in batch]


class EchoScorer:
    kind = "audio"
    reserved_columns = ("id", "source", "text", "duration_s", "status", "error")

    def row(self, item: Item, loaded: Any, prediction: str | None, error: ItemError | None) -> dict[str, Any]:
        return {"id": item.id, "source": item.source, "text": prediction,
                "duration_s": round(loaded["duration_s"], 2) if loaded else None,
                "status": OK if error is None else error.status, "error": error.message if error else None}

    def observe(self, row: dict[str, Any]) -> None:
        pass

    def finalize_table(self, table: Any) -> Any:
        return table

    def summarize(self, table: Any, wall_time_s: float) -> dict[str, Any]:
        return {}


class EchoLoader:
    def __init__(self, marker: str | None = None, kill_on: int = 2):
        self.marker = marker
        self.kill_on = kill_on

    def __call__(self) -> EchoPredictor:
        return EchoPredictor(self.marker, self.kill_on)


def echo_job(marker: str | None = None, kill_on: int = 2, loader: Any = None) -> Job:
    return Job(EchoPreprocessor(), EchoScorer(), loader or EchoLoader(marker, kill_on), group=2)


RAY_OPTIONS = dict(engine="ray", batch_size=2, workers=2, quiet=True)


class NamingPreprocessor(EchoPreprocessor):
    def load(self, item: Item, data: bytes) -> dict[str, Any]:
        return {**super().load(item, data), "id": item.id}


class BatchEchoPredictor:
    """Each text names the whole batch it was predicted in: rows show how items were batched."""

    def predict(self, batch: list[dict[str, Any]]) -> list[str]:
        names = ",".join(p["id"] for p in batch)
        return [f"{p['duration_s']:.2f}s in [{names}]" for p in batch]


def test_ray_batches_items_as_the_local_engine_does(tmp_path):
    """Windows of batch x group items in input order, sorted by size inside: the same batches, so the
    same rows, on both engines, across many windows and with failed items among them."""
    items = []
    for i in range(25):
        path = write_audio(tmp_path / f"c{i:02d}.wav", 0.2 + 0.05 * ((i * 7) % 11))
        items.append(Item(i, f"c{i:02d}", path))
    items.insert(9, Item(25, "gone", str(tmp_path / "missing.wav")))
    job = Job(NamingPreprocessor(), EchoScorer(), BatchEchoPredictor, group=2)
    options = JobOptions(**{**RAY_OPTIONS, "batch_size": 3})  # windows of 6 items
    remote = run_job(items, job, str(tmp_path / "ray.parquet"), options).output
    local = run_job(items, job, str(tmp_path / "local.parquet"), JobOptions(batch_size=3, workers=2, quiet=True)).output
    remote_rows, local_rows = read_table(remote).to_pylist(), read_table(local).to_pylist()
    assert remote_rows == local_rows and len(local_rows) == 26
    assert len({r["text"].split(" in ")[1] for r in local_rows if r["text"]}) == 9  # windows of 6, 6, 6, 6, 2


class NumberedBatchEchoPredictor(BatchEchoPredictor):
    """... and the number of the predict call it came from (per replica)."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, batch: list[dict[str, Any]]) -> list[str]:
        self.calls += 1
        return [f"{text} #{self.calls}" for text in super().predict(batch)]


def test_longest_first_runs_a_windows_batches_from_its_largest_items_on_both_engines(tmp_path):
    items = [Item(i, f"c{i:02d}", write_audio(tmp_path / f"c{i:02d}.wav", 0.2 + 0.05 * ((i * 7) % 11)))
             for i in range(12)]

    def batches(engine: dict[str, Any], longest_first: bool) -> list[list[tuple[float, str, int]]]:
        """Per window of 6 items: its batches as (largest size, names, call number), in call order."""
        job = Job(NamingPreprocessor(), EchoScorer(), NumberedBatchEchoPredictor, group=2,
                  longest_first=longest_first)
        out = run_job(items, job, str(tmp_path / f"{engine['engine']}{longest_first}.parquet"),
                      JobOptions(**{**engine, "batch_size": 3})).output
        windows: dict[int, set] = {}
        for row in read_table(out).to_pylist():
            names, call = row["text"].split(" in ")[1].split(" #")
            windows.setdefault(int(row["id"][1:]) // 6, set()).add((names, int(call)))
        sizes = {row["id"]: row["duration_s"] for row in read_table(out).to_pylist()}
        return [sorted(((max(sizes[n] for n in names[1:-1].split(",")), names, call) for names, call in w),
                       key=lambda b: b[2]) for _, w in sorted(windows.items())]

    for engine in (RAY_OPTIONS, dict(engine="local", workers=2, quiet=True)):
        first = batches(engine, True)
        plain = batches(engine, False)
        # the same batches, run from the largest to the smallest
        assert [[b[1] for b in w] for w in first] == [[b[1] for b in reversed(w)] for w in plain]
        assert all([b[0] for b in w] == sorted((b[0] for b in w), reverse=True) for w in first)
        assert all(len(w) == 2 for w in first)


def test_killed_replica_loses_and_duplicates_nothing(tmp_path):
    items = []
    for i in range(24):
        path = write_audio(tmp_path / f"c{i:02d}.wav", 0.2 + 0.05 * i)
        items.append(Item(i, path, path))
    items.append(Item(24, "nope", str(tmp_path / "missing.wav")))
    marker = str(tmp_path / "killed")
    options = JobOptions(**RAY_OPTIONS)
    yielded: list[dict[str, Any]] = []
    order: dict[str, int] = {}
    for row in ray_engine.stream_rows(items, echo_job(marker, kill_on=3), options, set(), order):
        assert row is not None
        yielded.append(row)
    assert os.path.exists(marker), "the replica was never killed"
    assert sorted(r["id"] for r in yielded) == sorted(item.id for item in items)  # each item once
    by_id = {r["id"]: r for r in yielded}
    for i in range(24):
        assert by_id[items[i].id]["text"] == f"{0.2 + 0.05 * i:.2f}s", by_id[items[i].id]
    assert by_id["nope"]["status"] == "fetch_error" and by_id["nope"]["_order"] == 24
    assert order == {item.id: item.index for item in items}

    # the same through run_job: the final file has one row per item, in input order
    result = run_job(items, echo_job(str(tmp_path / "killed2"), kill_on=2), str(tmp_path / "out.parquet"), options)
    rows = read_table(result.output).to_pylist()
    assert [r["id"] for r in rows] == [item.id for item in items]
    assert os.path.exists(tmp_path / "killed2")


def test_each_replica_loads_the_model_once_for_the_whole_run(tmp_path, caplog):
    """20 items in windows of 4 (batch 2 x group 2): five windows, one model load."""
    items = []
    for i in range(20):
        path = write_audio(tmp_path / f"c{i:02d}.wav", 0.2 + 0.01 * i)
        items.append(Item(i, path, path))
    import logging

    with caplog.at_level(logging.INFO, logger="batchcap"):
        rows = list(ray_engine.stream_rows(items, echo_job(), JobOptions(**RAY_OPTIONS), set(), {}))
    assert sorted(r["id"] for r in rows) == sorted(item.id for item in items)
    assert "ray engine: 1 model load(s) in 1 replica(s) for the whole run" in caplog.text


def test_done_items_are_skipped_and_ray_missing_is_one_line(tmp_path, monkeypatch):
    items = [Item(i, f"id{i}", str(tmp_path / f"x{i}.wav")) for i in range(3)]
    order: dict[str, int] = {}
    rows = list(ray_engine.stream_rows(items, echo_job(), JobOptions(engine="ray"), {"id0", "id1", "id2"}, order))
    assert rows == [None, None, None] and order == {"id0": 0, "id1": 1, "id2": 2}

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(FatalError, match=r"^the ray engine needs Ray: pip install 'batchcap\[ray\]'$"):
        list(ray_engine.stream_rows(items, echo_job(), JobOptions(), set(), {}))


class BrokenLoader:
    def __call__(self) -> EchoPredictor:
        raise FatalError("model directory not found: /models/nope")


def test_model_that_will_not_load_is_one_line(tmp_path):
    path = write_audio(tmp_path / "a.wav", 0.5)
    with pytest.raises(FatalError) as err:
        list(ray_engine.stream_rows([Item(0, path, path)], echo_job(loader=BrokenLoader()), JobOptions(**RAY_OPTIONS),
                                    set(), {}))
    assert str(err.value) == "model directory not found: /models/nope"


class FakeRay:
    """Stands in for Ray in the driver's bookkeeping: every result is ready at once."""

    def __init__(self, results: list[list[tuple[tuple[int, str], dict[str, Any]]]]):
        self.results = results

    def wait(self, refs: list[Any], num_returns: int) -> tuple[list[Any], list[Any]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: Any) -> dict[str, Any]:
        return {"rows": self.results.pop(0), "replica": (1, 1)}


def test_driver_drops_duplicate_rows_and_resends_lost_items(monkeypatch):
    """The guard behind Ray's own retries: a row seen twice is yielded once, an item without a row is redone."""
    items = [Item(i, f"id{i}", f"s{i}") for i in range(5)]
    window = ray_engine._Window(items)
    rows, missing = ray_engine.accept_rows(window, [((i.index, i.id), {"id": i.id}) for i in items[:4] * 2])
    assert [r["id"] for r in rows] == ["id0", "id1", "id2", "id3"] and missing == [items[4]]

    sent: list[list[str]] = []
    replicas = ray_engine._Replicas.__new__(ray_engine._Replicas)
    replicas.actors, replicas.in_flight, replicas.retry, replicas.loads = [None], {}, ray_engine.deque(), set()
    replicas.busy = {0: 0}

    def fake_send(self: Any, window: Any) -> None:
        sent.append([item.id for item in window.items])
        self.in_flight[len(sent)] = (window, 0)

    monkeypatch.setattr(ray_engine._Replicas, "_send", fake_send)
    first = [((i.index, i.id), {"id": i.id}) for i in items[:4] for _ in range(2)]  # loses id4, doubles the rest
    replicas.ray = FakeRay([first, [((4, "id4"), {"id": "id4"})]])
    out = list(replicas.submit(window)) + list(replicas.drain())
    assert [r["id"] for r in out] == ["id0", "id1", "id2", "id3", "id4"]
    assert sent == [["id0", "id1", "id2", "id3", "id4"], ["id4"]]

    sent.clear()
    replicas.ray = FakeRay([[], []])  # nothing comes back, twice
    with pytest.raises(FatalError, match="5 item"):
        list(replicas.submit(window)) + list(replicas.drain())
    assert sent == [["id0", "id1", "id2", "id3", "id4"]] * 2


def _ray_run_with_parts(tiny_whisper: str, tmp_path: Any, ray_instance: str, n: int = 40) -> tuple[Any, ...]:
    """A CLI run of ``n`` clips on the module's Ray instance, in a subprocess, once it has written a part:
    (its command, environment, process, output, parts folder)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(n):
        write_audio(folder / f"{i:03d}.wav", 0.5 + (i % 4) * 0.25, freq=200 + 15 * i)
    out = str(tmp_path / "out.parquet")
    cmd = [sys.executable, "-m", "batchcap.cli", "audio", str(folder), "-o", out, "--model", tiny_whisper,
           "--engine", "ray", "--ray-address", ray_instance, "--flush-every", "4", "--batch-size", "1",
           "--no-fallback"]  # the tiny random model loops on every clip: no retries, this is about stopping
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out + ".parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(parts) and any(p.endswith(".parquet") for p in os.listdir(parts)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it was stopped: {proc.stderr.read().decode()[-3000:]}"
    return cmd, env, proc, out, parts


def test_resume_after_driver_killed(tiny_whisper, tmp_path, ray_instance):
    n = 40
    cmd, env, proc, out, parts = _ray_run_with_parts(tiny_whisper, tmp_path, ray_instance, n)
    folder = tmp_path / "in"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not os.path.exists(out)

    rerun = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = read_table(out).to_pylist()
    assert [os.path.basename(r["source"]) for r in rows] == sorted(os.listdir(folder))  # once each, input order
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped_already_done"] >= 4
    assert summary["processed_this_run"] + summary["skipped_already_done"] == n
    assert not os.path.exists(parts)


class _Resources:
    def __init__(self, **resources: float):
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_cpu_replicas_leave_a_cpu_for_the_tasks(caplog):
    """--concurrency 2 on a 2-CPU local instance without GPUs waited forever without a word: each CPU replica
    holds a CPU, and the tasks that read and decode items never got one."""
    options = JobOptions(**dict(RAY_OPTIONS, concurrency=2))
    with pytest.raises(FatalError, match=r"--concurrency 2 CPU replicas take all 2 CPU\(s\).*use --concurrency 1"):
        ray_engine._check_gpus(_Resources(CPU=2), options, local=True)
    ray_engine._check_gpus(_Resources(CPU=3), options, local=True)  # one left over: fine
    ray_engine._check_gpus(_Resources(CPU=2), options, local=False)  # a cluster may grow: a warning
    assert "leaving none for the tasks" in caplog.text
    ray_engine._check_gpus(_Resources(CPU=2, GPU=2), JobOptions(**dict(RAY_OPTIONS, concurrency=2,
                                                                        num_gpus_per_replica=1)), local=True)


def test_sigterm_stops_a_ray_run_with_143_and_keeps_its_rows(tiny_whisper, tmp_path, ray_instance):
    """ray.init installs its own SIGTERM handling in the driver: a scheduler's SIGTERM gave a Ray dump and
    SIGABRT (134) instead of batchcap's one line and 143. Rows written so far are kept either way."""
    _, _, proc, _, parts = _ray_run_with_parts(tiny_whisper, tmp_path, ray_instance)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 143, err[-3000:]
    assert "Error: terminated (SIGTERM)" in err and "SIGTERM received" not in err
    assert any(p.endswith(".parquet") for p in os.listdir(parts))
