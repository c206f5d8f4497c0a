"""The local engine's budget of decoded bytes in flight (--max-inflight-bytes): it bounds what waits for
the model, an item larger than the budget still runs, and the rows are the same whatever the budget."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from batchcap.asr import AudioOptions, AudioPreprocessor
from batchcap.cli_options import parse_size
from batchcap.items import Item
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
