"""The local engine's budget of decoded bytes in flight (--max-inflight-bytes): it bounds what waits for
the model, an item larger than the budget still runs, and the rows are the same whatever the budget."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest

from batchcap.asr import AudioOptions, AudioPreprocessor
from batchcap.cli_options import parse_size
from batchcap.items import DECODE_ERROR, Item, ItemError
from batchcap.memory import decoded_nbytes
from tests.conftest import write_audio
from tests.helpers import rows_of, run_cli

BATCH = 2  # the audio job's windows are 256 items: one window here


def _clips(folder, durations: list[float]) -> list[str]:
    folder.mkdir()
    return [write_audio(folder / f"{i:02d}.wav", seconds, freq=170 + 41 * i) for i, seconds in enumerate(durations)]


def _sizes(model: str, paths: list[str]) -> list[int]:
    """Each clip's decoded size, measured on what the job's own preprocessor makes of it."""
    pre = AudioPreprocessor(AudioOptions(model=model))
    return [decoded_nbytes(pre.load(Item(i, p, p), open(p, "rb").read())) for i, p in enumerate(paths)]


def _run(folder, out: str, model: str, budget: str, *more: str) -> tuple[list[tuple], dict]:
    code, text = run_cli("audio", str(folder), "-o", out, "--model", model, "--batch-size", str(BATCH),
                         "--max-inflight-bytes", budget, "--workers", "3", "--no-fallback", *more, raise_errors=True)
    assert code == 0, text
    with open(os.path.splitext(out)[0] + ".summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    rows = [(r["id"], r["status"], r["text"], r["language"], r["duration_s"]) for r in rows_of(out)]
    return rows, summary["decoded_bytes_in_flight"]


def test_budget_bounds_decoded_bytes_in_flight_and_rows_stay_the_same(tiny_whisper, tmp_path):
    """20 real clips of different lengths: with a budget of about three clips, the engine never holds more
    than the budget plus one clip, where without one it holds a whole window (here all 20 clips) at once;
    every row, text included, is the same (batches do not depend on the budget)."""
    durations = [0.4 + ((i * 7) % 11) * 0.23 for i in range(20)]
    paths = _clips(tmp_path / "clips", durations)
    sizes = _sizes(tiny_whisper, paths)
    budget = 3 * max(sizes)

    free_rows, free = _run(tmp_path / "clips", str(tmp_path / "free.parquet"), tiny_whisper, "none")
    capped_rows, capped = _run(tmp_path / "clips", str(tmp_path / "capped.parquet"), tiny_whisper, str(budget))

    assert free["budget_bytes"] is None and capped["budget_bytes"] == budget
    assert free["peak_bytes"] >= sum(sizes) > budget + max(sizes)  # the window (all 20) waits at once
    assert capped["peak_bytes"] <= budget + max(sizes)
    assert capped["peak_bytes"] <= budget  # batches of two clips fit: not even one over
    assert capped["dropped"] > 0 and capped["redecoded"] == capped["dropped"]
    assert free["dropped"] == 0
    assert [r[1] for r in capped_rows] == ["ok"] * 20
    assert capped_rows == free_rows


def test_items_larger_than_the_budget_still_get_their_rows(tiny_whisper, tmp_path):
    """A budget of one byte (every clip is larger) and a budget between a short clip and the long one:
    every clip gets its ok row, the same as without a budget, and nothing deadlocks."""
    durations = [0.5, 0.7, 12.0, 0.6, 0.9, 0.5, 1.1, 0.8, 0.6, 0.7]
    paths = _clips(tmp_path / "clips", durations)
    sizes = _sizes(tiny_whisper, paths)
    assert sizes[2] > 3 * max(sizes[:2] + sizes[3:])

    free_rows, _ = _run(tmp_path / "clips", str(tmp_path / "free.parquet"), tiny_whisper, "0")
    between = (sizes[2] + max(sizes[:2] + sizes[3:])) // 2
    for name, budget in (("one-byte", "1"), ("between", str(between))):
        rows, stats = _run(tmp_path / "clips", str(tmp_path / f"{name}.parquet"), tiny_whisper, budget)
        assert [r[1] for r in rows] == ["ok"] * len(durations), name
        assert rows == free_rows, name
        # what runs over the budget is one batch alone: the long clip and its partner, or two clips
        assert stats["peak_bytes"] <= max(int(budget), sizes[2] + max(sizes)), name
    assert stats["peak_bytes"] > between  # the long clip's batch ran although it does not fit


@dataclass
class _Decoded:
    id: str
    samples: np.ndarray


class _SizedPreprocessor:
    """Decodes an item's bytes (a size as text) into that many bytes of samples."""

    def setup(self) -> None:
        pass

    def load(self, item: Item, data: bytes) -> _Decoded:
        if data == b"bad":
            raise ItemError(DECODE_ERROR, "not a size")
        return _Decoded(item.id, np.zeros(int(data), np.uint8))

    def size(self, value: _Decoded) -> float:
        return float(value.samples.nbytes)


class _RecordingPredictor:
    def __init__(self) -> None:
        self.batches: list[tuple[str, ...]] = []

    def predict(self, batch: list[_Decoded]) -> list[str]:
        self.batches.append(tuple(v.id for v in batch))
        return [f"text of {v.id}" for v in batch]


class _Scorer:
    kind = "test"
    reserved_columns = ("id", "status", "text")

    def row(self, item, loaded, prediction, error):
        return {"id": item.id, "status": error.status if error else "ok", "text": prediction}


def _engine(sizes: list[int], budget: int | None, done: set[str] = frozenset(), batch_size: int = 3,
            group: int = 2, workers: int = 3):
    """Run the local engine itself on items of known decoded sizes: (rows, batches, stats)."""
    from batchcap.engines.local import InflightStats, stream_rows
    from batchcap.job import Job, JobOptions

    items = [Item(i, f"i{i:02d}", f"i{i:02d}", data=b"bad" if n < 0 else str(n).encode())
             for i, n in enumerate(sizes)]
    predictor = _RecordingPredictor()
    job = Job(_SizedPreprocessor(), _Scorer(), lambda: predictor, group=group)
    options = JobOptions(batch_size=batch_size, workers=workers, fetch_workers=2, max_inflight_bytes=budget)
    stats = InflightStats()
    rows = [r for r in stream_rows(items, job, predictor, options, set(done), {}, stats=stats) if r is not None]
    return rows, predictor.batches, stats


@pytest.mark.parametrize("budget", [None, 1, 2500, 6000, 10**9])
def test_engine_budget_keeps_batches_and_bounds_bytes(budget):
    """The engine on its own, with every budget from one byte to none: the same batches (recorded by the
    predictor), one row per item, and never more decoded bytes held than the budget or one batch."""
    sizes = [700, 1500, 300, 2200, 900, 1100, -1, 400, 1800, 600, 1000, 250, 3000, 500, 800, 1200, 350]
    rows, batches, stats = _engine(sizes, budget)
    _, reference, _ = _engine(sizes, None)
    assert batches == reference
    assert sorted(r["id"] for r in rows) == [f"i{i:02d}" for i in range(len(sizes))]
    assert [r["status"] for r in rows].count("decode_error") == 1
    by_id = dict(zip((f"i{i:02d}" for i in range(len(sizes))), sizes))
    largest_batch = max(sum(by_id[i] for i in batch) for batch in batches)
    assert stats.peak_bytes <= max(budget or 0, largest_batch) if budget else stats.peak_bytes > 6000
    if budget and budget < 6000:
        assert stats.dropped > 0 and stats.redecoded == stats.dropped


def test_engine_resume_batches_done_items_as_partners():
    """Items done by an earlier run are loaded with their window and batched as then; only the rows of
    the others come out, and the batches the model sees are those of a run from scratch that hold one."""
    sizes = [700, 1500, 300, 2200, 900, 1100, 400, 1800, 600, 1000, 250, 3000, 500, 800]
    _, reference, _ = _engine(sizes, None)
    done = {"i00", "i02", "i03", "i09", "i12", "i13"}
    for budget in (None, 2000):
        rows, batches, _ = _engine(sizes, budget, done=done)
        assert sorted(r["id"] for r in rows) == sorted({f"i{i:02d}" for i in range(len(sizes))} - done)
        assert batches == [b for b in reference if set(b) - done]


def test_decoded_nbytes_counts_each_buffer_once():
    samples = np.zeros(16_000, np.float32)
    view = samples[100:200]
    assert decoded_nbytes(samples) == 64_000
    assert decoded_nbytes({"a": samples, "b": view, "c": [samples, (view,)]}) == 64_000
    assert decoded_nbytes([b"abc", "a path", 3, None]) == 3
    torch = pytest.importorskip("torch")
    tensor = torch.zeros(3, 4, dtype=torch.float32)
    assert decoded_nbytes([tensor, tensor[1]]) == 48


def test_sizes_on_the_command_line(tiny_whisper, tmp_path):
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5k") == 1500
    assert parse_size("none") is None and parse_size("0") is None
    for bad in ("GiB", "-1", "2 parsecs", "1.2.3"):
        with pytest.raises(ValueError):
            parse_size(bad)
    code, text = run_cli("audio", str(tmp_path), "-o", str(tmp_path / "o.parquet"), "--model", tiny_whisper,
                         "--max-inflight-bytes", "lots")
    assert code == 2 and "not a size" in text
