"""``batchcap export RESULT --format srt -o DIR`` from a finished result table."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from batchcap.output import write_table
from batchcap.subtitles import safe_name
from tests.helpers import run_cli
from tests.test_subtitles import parse_srt, parse_vtt

ROWS = [
    {"id": "calls/a.wav", "text": "Hello there. Bye.", "status": "ok", "error": None, "duration_s": 6.0,
     "language": "en", "segments": [{"start": 0.5, "end": 2.0, "text": "Hello there."},
                                    {"start": 3.0, "end": 4.0, "text": "Bye."}]},
    {"id": "../../x", "text": "Evil.", "status": "ok", "error": None, "duration_s": 1.0, "language": "en",
     "segments": [{"start": 0.0, "end": 1.0, "text": "Evil."}]},
    {"id": "broken.wav", "text": None, "status": "decode_error", "error": "bad", "duration_s": None,
     "language": None, "segments": None},
]


def write_result(path, rows=ROWS, fmt="parquet") -> str:
    table = pa.Table.from_pylist(rows)
    write_table(table, str(path), fmt)
    return str(path)


def test_export_srt_vtt_from_parquet(tmp_path):
    result = write_result(tmp_path / "out.parquet")
    code, out = run_cli("export", result, "--format", "srt,vtt,json", "-o", tmp_path / "subs", raise_errors=True)
    assert code == 0, out
    assert "2 of 3 rows exported" in out and "1 rows skipped" in out
    names = sorted(os.listdir(tmp_path / "subs"))
    assert len(names) == 6 and not any(n.startswith(".") for n in names)
    srt = (tmp_path / "subs" / f"{safe_name('calls/a.wav')}.srt").read_text()
    assert parse_srt(srt) == [(1, 0.5, 2.0, "Hello there."), (2, 3.0, 4.0, "Bye.")]
    vtt = (tmp_path / "subs" / f"{safe_name('calls/a.wav')}.vtt").read_text()
    assert parse_vtt(vtt)[1] == (3.0, 4.0, "Bye.")
    data = json.loads((tmp_path / "subs" / f"{safe_name('../../x')}.json").read_text())
    assert data["text"] == "Evil." and data["segments"][0]["end"] == 1.0
    assert not (tmp_path / "x.srt").exists() and not (tmp_path.parent / "x.srt").exists()


def test_export_default_folder_csv_and_keep_or_overwrite(tmp_path):
    result = write_result(tmp_path / "out.csv", fmt="csv")  # segments as JSON text in CSV
    code, out = run_cli("export", result, "--format", "txt")
    assert code == 0, out
    txt = tmp_path / "out.subtitles" / f"{safe_name('calls/a.wav')}.txt"
    assert txt.read_text() == "Hello there.\nBye.\n"
    txt.write_text("edited by hand\n")
    code, out = run_cli("export", result, "--format", "txt")
    assert "0 files written, 2 kept" in out and txt.read_text() == "edited by hand\n"
    code, out = run_cli("export", result, "--format", "txt", "--overwrite")
    assert "2 files written" in out and txt.read_text() == "Hello there.\nBye.\n"


def test_export_table_without_segments_uses_whole_text(tmp_path):
    rows = [{"id": "old", "text": "An older table.", "status": "ok", "duration_s": 3.25}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "old.parquet")
    code, out = run_cli("export", tmp_path / "old.parquet", "--format", "srt", "-o", tmp_path / "s")
    assert code == 0, out
    assert parse_srt((tmp_path / "s" / "old.srt").read_text()) == [(1, 0.0, 3.25, "An older table.")]


def test_export_errors_are_one_line(tmp_path):
    code, out = run_cli("export", tmp_path / "missing.parquet")
    assert code == 1 and out.strip().startswith("Error:") and "no such file" in out
    result = write_result(tmp_path / "out.parquet")
    code, out = run_cli("export", result, "--format", "doc")
    assert code == 1 and "unknown subtitle format 'doc'" in out and "Traceback" not in out


def test_export_makes_text_safe_for_each_format(tmp_path):
    """VTT cue text is markup ("1 < 2" opened a tag in a player, "&" an entity); a carriage return split a TSV
    line and a newline a TXT line; an ok row whose segments list is empty wrote empty srt/vtt/txt files."""
    rows = [{"id": "m", "text": "1 < 2 & 3 > 2\rok\nnext", "status": "ok", "duration_s": 2.0, "language": "en",
             "segments": [{"start": 0.0, "end": 1.0, "text": "1 < 2 & 3 > 2\rok\nnext"}]},
            {"id": "e", "text": "Kept whole.", "status": "ok", "duration_s": 1.5, "language": "en", "segments": []}]
    result = write_result(tmp_path / "out.parquet", rows)
    code, out = run_cli("export", result, "--format", "vtt,tsv,txt,srt", "-o", tmp_path / "s")
    assert code == 0, out
    s = tmp_path / "s"
    assert parse_vtt((s / "m.vtt").read_text()) == [(0.0, 1.0, "1 &lt; 2 &amp; 3 &gt; 2 ok next")]
    assert (s / "m.tsv").read_text().splitlines() == ["start\tend\ttext", "0\t1000\t1 < 2 & 3 > 2 ok next"]
    assert (s / "m.txt").read_text() == "1 < 2 & 3 > 2 ok next\n"
    assert parse_srt((s / "e.srt").read_text()) == [(1, 0.0, 1.5, "Kept whole.")]


def test_export_of_an_images_result_says_what_it_is(tmp_path):
    """An images result was "0 of 2 rows exported: 2 rows skipped (not ok)", exit 0, an empty folder."""
    rows = [{"id": "a.png", "caption": "a cat", "status": "ok"}, {"id": "b.png", "caption": "a dog", "status": "ok"}]
    result = write_result(tmp_path / "captions.parquet", rows)
    code, out = run_cli("export", result, "-o", tmp_path / "s")
    assert code == 1 and "an images result (captions)" in out and "Traceback" not in out, out
    assert not (tmp_path / "s").exists()
