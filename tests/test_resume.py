"""Kill a real run with SIGKILL mid-way, rerun the same command: every input exactly once."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from batchcap.output import read_table
from tests.conftest import write_audio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(kind: str, inputs: str, out: str, model: str) -> list[str]:
    return [sys.executable, "-m", "batchcap.cli", kind, inputs, "-o", out, "--model", model,
            "--batch-size", "2", "--flush-every", "2", "--workers", "2"]


def _kill_mid_run(cmd: list[str], out: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out + ".parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(parts) and len([p for p in os.listdir(parts) if p.endswith(".parquet")]) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not os.path.exists(out), "the final file must not exist after a killed run"
    assert os.path.exists(out + ".lock")  # left behind by the dead run; the next run must not be blocked by it


def _rerun(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["audio", "images"])
def test_resume_after_sigkill(kind, tmp_path, tiny_whisper, tiny_captioner):
    folder = tmp_path / "in"
    folder.mkdir()
    n = 80
    for i in range(n):
        if kind == "audio":
            write_audio(folder / f"{i:03d}.wav", 1.0 + (i % 5) * 0.2, freq=200 + 10 * i)
        else:
            buf = io.BytesIO()
            Image.new("RGB", (40 + i, 30), (i * 3 % 256, 90, 200)).save(buf, "PNG")
            (folder / f"{i:03d}.png").write_bytes(buf.getvalue())
    (folder / "broken.wav" if kind == "audio" else folder / "broken.png").write_bytes(b"\x00" * 50)
    out = str(tmp_path / "out.parquet")
    cmd = _command(kind, str(folder), out, tiny_whisper if kind == "audio" else tiny_captioner)
    _kill_mid_run(cmd, out)
    parts = sorted(p for p in os.listdir(out + ".parts") if p.endswith(".parquet"))
    done = len(read_table(out + ".parts/" + parts[0]))
    assert done >= 2
    saved = {r["source"] for p in parts for r in read_table(out + ".parts/" + p).to_pylist()}
    broken_done = any(os.path.basename(s).startswith("broken") for s in saved)

    result = _rerun(cmd)
    # exit 3 when this run wrote the broken file's failed row; 0 when the killed run already had
    assert result.returncode == (0 if broken_done else 3), result.stderr
    rows = read_table(out).to_pylist()
    assert len(rows) == n + 1 and len({r["id"] for r in rows}) == n + 1
    assert [os.path.basename(r["source"]) for r in rows] == sorted(os.listdir(folder))
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["skipped_already_done"] >= done and summary["processed_this_run"] == n + 1 - summary[
        "skipped_already_done"]
    assert summary["status_counts"] == {"decode_error": 1, "ok": n}
    assert not os.path.exists(out + ".parts") and not os.path.exists(out + ".lock")


def test_a_resumed_run_gives_the_rows_of_an_uninterrupted_one(tiny_whisper, tmp_path):
    """A clip's text depends on its batch partners (padding, precision). Windows are input positions, done
    items included, so a run that resumes where an earlier one stopped batches every clip with the same
    partners as an uninterrupted run: every text is the same (the SIGKILL soak found 1 of 24 differing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import rows_of, run_cli

    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(14):
        write_audio(folder / f"{i:02d}.wav", 0.3 + ((i * 7) % 11) * 0.17, freq=180 + 37 * i)
    common = ["--model", tiny_whisper, "--batch-size", "3", "--no-fallback", "--workers", "2"]
    whole = str(tmp_path / "whole.parquet")
    code, text = run_cli("audio", str(folder), "-o", whole, *common)
    assert code == 0, text
    reference = [(r["id"], r["status"], r["text"]) for r in rows_of(whole)]

    # what an interrupted run left: some rows done (whole batches and parts of batches), the rest not
    table = read_table(whole)
    keep = [0, 1, 4, 5, 9, 12]
    resumed = str(tmp_path / "resumed.parquet")
    pq.write_table(table.take(pa.array(keep)), resumed)
    code, text = run_cli("audio", str(folder), "-o", resumed, *common)
    assert code == 0, text
    summary = json.load(open(tmp_path / "resumed.summary.json"))
    assert summary["skipped_already_done"] == len(keep) and summary["processed_this_run"] == 14 - len(keep)
    assert [(r["id"], r["status"], r["text"]) for r in rows_of(resumed)] == reference
