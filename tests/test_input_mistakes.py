"""Mistakes users make with what they give batchcap, found by trying them: an output that is not a result
(or is the input itself), a result saved back with a byte-order mark, JSONL rows with different keys,
repeated ids, misaligned CSV rows, media cells in other shapes, a WAV cut short, options given wrong
through the Python API. Each either works or stops with one line naming the problem, and never costs a
file the user had."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from batchcap.inputs import Inputs, audio_spec
from batchcap.items import DECODE_ERROR, FETCH_ERROR, OK, FatalError, ItemError
from tests.conftest import tone, write_audio
from tests.helpers import rows_of, run_cli


def _wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --- the output ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["notes.csv", "notes.parquet"])
def test_a_file_that_is_not_a_result_is_not_taken_for_one(tiny_whisper_en, tmp_path, name):
    """``-o`` naming some other table: the run stops before the model loads and the file keeps every row
    (it was rewritten as a "resumed" result, losing rows, and every later run died on its None statuses)."""
    clip = write_audio(tmp_path / "a.wav", 1.0)
    notes = tmp_path / name
    table = pa.table({"name": ["alice", "bob"], "phone": ["123", "456"]})
    if name.endswith(".csv"):
        notes.write_text("name,phone\nalice,123\nbob,456\n")
    else:
        pq.write_table(table, notes)
    before = notes.read_bytes()
    for _ in range(2):
        code, output = run_cli("audio", clip, "-o", notes, "--model", tiny_whisper_en, "--quiet")
        assert code == 1
        assert f"{notes} exists and is not a batchcap result table (no id / status columns)" in output
        assert notes.read_bytes() == before
    assert not (tmp_path / f"{name}.parts").exists()


def test_the_input_manifest_is_never_its_own_output(tiny_whisper_en, tmp_path):
    write_audio(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,reference\na.wav,a tone\n")
    before = manifest.read_bytes()
    for extra in ([], ["--overwrite"]):
        code, output = run_cli("audio", manifest, "-o", manifest, "--model", tiny_whisper_en, "--quiet", *extra)
        assert code == 1
        assert "is both an input and the run's output" in output
        assert manifest.read_bytes() == before


def test_transcripts_do_not_go_into_an_images_result(tiny_whisper_en, tiny_captioner, tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img" / "red.png")
    out = tmp_path / "mixed.parquet"
    code, output = run_cli("images", tmp_path / "img", "-o", out, "--model", tiny_captioner, "--max-new-tokens", "2",
                           "--quiet")
    assert code == 0, output
    before = rows_of(out)
    code, output = run_cli("audio", write_audio(tmp_path / "a.wav", 1.0), "-o", out, "--model", tiny_whisper_en,
                           "--quiet")
    assert code == 1
    assert "holds the results of `batchcap images`" in output
    assert rows_of(out) == before


@pytest.mark.parametrize("first, second", [("out.csv", "out.parquet"), ("out.parquet", "out.CSV")])
def test_a_result_of_the_other_format_with_the_same_name_is_refused(tiny_whisper_en, tmp_path, first, second):
    """``-o out.csv`` then ``-o out.parquet`` beside it: the second run overwrote the first's summary and report,
    and kept the first's subtitle files for ids both have. It stops before the model loads now."""
    clip = write_audio(tmp_path / "a.wav", 1.0)
    code, output = run_cli("audio", clip, "-o", tmp_path / first, "--model", tiny_whisper_en, "--write", "txt",
                           "--quiet")
    assert code == 0, output
    summary = (tmp_path / "out.summary.json").read_bytes()
    code, output = run_cli("audio", clip, "-o", tmp_path / second, "--model", tiny_whisper_en, "--write", "txt",
                           "--quiet")
    assert code == 1
    assert f"{tmp_path / first} is another result with the name of {second}: the two would share out.summary.json" \
        in output
    assert not (tmp_path / second).exists() and not (tmp_path / f"{second}.parts").exists()
    assert (tmp_path / "out.summary.json").read_bytes() == summary


def test_the_input_manifest_beside_its_output_is_no_twin(tiny_whisper_en, tmp_path):
    """``batchcap audio calls.csv -o calls.parquet``: the manifest has the output's name and is not a result;
    the twin check took it for one and refused the most natural command."""
    write_audio(tmp_path / "a.wav", 1.0)
    (tmp_path / "calls.csv").write_text("path,reference\na.wav,a tone\n")
    code, output = run_cli("audio", tmp_path / "calls.csv", "-o", tmp_path / "calls.parquet", "--model",
                           tiny_whisper_en, "--max-new-tokens", "2")
    assert code == 0, output
    assert len(rows_of(tmp_path / "calls.parquet")) == 1


def test_a_csv_result_saved_with_a_byte_order_mark_resumes_and_exports(tiny_whisper_en, tmp_path):
    """Excel's "CSV UTF-8" puts a BOM before the header: the header's first name was read as '\\ufeffid'."""
    first = write_audio(tmp_path / "a.wav", 1.0)
    out = tmp_path / "out.csv"
    code, output = run_cli("audio", first, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "4", "--quiet")
    assert code == 0, output
    out.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    second = write_audio(tmp_path / "b.wav", 1.2, freq=300.0)
    code, output = run_cli("audio", first, second, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "4")
    assert code == 0, output
    assert "resuming: 1 items already done" in output
    assert sorted(r["id"] for r in rows_of(out)) == sorted([first, second])
    out.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    code, output = run_cli("export", out, "--format", "txt", "-o", tmp_path / "subs", "--quiet")
    assert code == 0, output


# --- manifests ----------------------------------------------------------------------------------------

def test_jsonl_columns_are_every_line_s_keys(tmp_path):
    """A JSONL line may leave out keys: the id, reference and carried fields of later lines count too."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.wav"}\n'
                        '{"path": "b.wav", "id": "call-42", "reference": "hello", "speaker": "bob"}\n')
    items = list(Inputs([str(manifest)], audio_spec()))
    assert [(i.id, i.references, i.extra) for i in items] == [
        (str(tmp_path / "a.wav"), [], {"speaker": None}),
        ("call-42", ["hello"], {"speaker": "bob"}),
    ]
    # named explicitly, a key that only a later line has is no longer "no column"
    spec = audio_spec(id_column="id", reference_columns=("reference",))
    assert [i.id for i in Inputs([str(manifest)], spec)] == [str(tmp_path / "a.wav"), "call-42"]


def test_repeated_ids_are_numbered_with_a_warning_and_counted(tiny_whisper_en, tmp_path, caplog):
    for name in ("a.wav", "b.wav", "c.wav"):
        write_audio(tmp_path / name, 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nr1,a.wav\nr1,b.wav\nr1,c.wav\n")
    inputs = Inputs([str(manifest)], audio_spec())
    with caplog.at_level(logging.WARNING, logger="batchcap.inputs"):
        assert [i.id for i in inputs] == ["r1", "r1#2", "r1#3"]
    assert inputs.stats.repeated_ids == 2
    assert sum("id 'r1' is repeated: read as 'r1#2'" in r.getMessage() for r in caplog.records) == 1
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "2")
    assert code == 0, output
    assert "is repeated" in output
    assert json.loads((tmp_path / "out.summary.json").read_text())["repeated_ids"] == 2


def test_a_resumed_run_stops_where_a_repeated_id_names_another_file(tiny_whisper_en, tmp_path):
    """A row added above repeated ids renumbers them: the resumed run took the new file for done and did an
    old one twice (the new recording lost, one row per input broken). It now stops with one line and the
    result keeps its rows; the same inputs in the same order still resume."""
    for name in ("a.wav", "b.wav", "c.wav"):
        write_audio(tmp_path / name, 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nr1,a.wav\nr1,b.wav\nr0,other.wav\n")
    out = tmp_path / "out.parquet"
    args = ("-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "2")
    code, output = run_cli("audio", manifest, *args)
    assert code == 3, output  # other.wav is missing: a fetch_error row
    before = {r["id"]: r["source"] for r in rows_of(out)}
    assert before["r1"].endswith("a.wav") and before["r1#2"].endswith("b.wav")

    code, output = run_cli("audio", manifest, *args)  # the same inputs: nothing to redo, nothing refused
    assert code == 0 and "already done" in output, output

    manifest.write_text("id,path\nr1,c.wav\nr1,a.wav\nr1,b.wav\nr0,other.wav\n")
    code, output = run_cli("audio", manifest, *args)
    assert code == 1, output
    assert "'r1' is " in output and "order changed" in output and "Traceback" not in output
    assert {r["id"]: r["source"] for r in rows_of(out)} == before

def test_media_cells_in_other_shapes(tmp_path):
    """A binary column of file bytes is read as the file; decoded samples and empty structs say what they are
    (the bytes were turned into a 'path' four times their size; the others said "file not found: m.parquet:0")."""
    data = _wav_bytes(0.5)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"audio": pa.array([data, None], pa.binary())}), manifest)
    items = list(Inputs([str(manifest)], audio_spec()))
    assert [(i.id, i.source, i.data, i.error) for i in items] == [
        ("m.parquet:0", "m.parquet:0", data, None), ("m.parquet:1", "", None, None)]

    decoded = tmp_path / "decoded.parquet"
    pq.write_table(pa.table({"audio": [{"array": [0.0, 0.1], "sampling_rate": 16000}]}), decoded)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"audio": [{"bytes": None, "path": None}]}), nulls)
    [item] = Inputs([str(decoded)], audio_spec())
    assert item.error == ("manifest decoded.parquet:0: the cell holds decoded samples ({array, sampling_rate}); "
                          "batchcap reads encoded media: give the file's bytes or its path")
    [item] = Inputs([str(nulls)], audio_spec())
    assert (item.source, item.data, item.error) == ("", None, None)  # the fetch stage: "no path or URL"


def test_a_row_without_a_path_reads_its_url_and_the_other_way_round(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("url,path\n,a.wav\nhttp://example.com/b.wav,\nhttp://example.com/c.wav,c.wav\n")
    # audio looks for a path column first: it is read where a row has one, the URL where it has not
    assert [i.source for i in Inputs([str(manifest)], audio_spec())] == [
        str(tmp_path / "a.wav"), "http://example.com/b.wav", str(tmp_path / "c.wav")]
    # a column named with --path-column is the only one read
    assert [i.source for i in Inputs([str(manifest)], audio_spec(path_column="url"))] == [
        "", "http://example.com/b.wav", "http://example.com/c.wav"]


# --- audio cut short ----------------------------------------------------------------------------------

def test_a_wav_cut_short_is_a_decode_error_not_a_partial_transcript():
    from batchcap.audio import decode_audio

    whole = _wav_bytes(5.0)
    with pytest.raises(ItemError) as caught:
        decode_audio(whole[: len(whole) * 3 // 10])
    assert caught.value.status == DECODE_ERROR
    assert str(caught.value).startswith("truncated audio: the file holds 1.5 s of the 5.0 s its header announces")
    # a little missing (the last block of a copy) is read, as FFmpeg's path reads slightly damaged audio
    assert len(decode_audio(whole[: len(whole) * 96 // 100])) == pytest.approx(0.96 * 5 * 16000, rel=0.01)
    # a streaming writer's header cannot know the length (0xFFFFFFFF): what is there is the recording
    data_at = whole.find(b"data")
    streamed = whole[:4] + struct.pack("<I", 0xFFFFFFFF) + whole[8:data_at + 4] + struct.pack("<I", 0xFFFFFFFF)
    streamed += whole[data_at + 8:]
    cut = streamed[: len(streamed) // 2]
    assert len(decode_audio(cut)) == pytest.approx(2.5 * 16000, rel=0.01)


# --- the Python API -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("option", "value", "message"), [
    ("num_beams", 0, "num_beams must be a whole number of at least 1, not 0"),
    ("batch_size", 2.5, "batch_size must be a whole number of at least 1, not 2.5"),
    ("task", "translat", "task must be one of transcribe, translate, not 'translat'"),
    ("max_duration_s", "90m", "max_duration_s must be a number (or None), not '90m'"),
    ("max_new_tokens", -1, "max_new_tokens must be a number (or None), not -1"),
    ("normalize", "foo", "normalize must be one of auto, whisper, language, basic, none, not 'foo'"),
    # read from a config file as text, or the CLI's spelling: every row failed, or a raw TypeError after the load
    ("silence_dbfs", "-50", "silence_dbfs must be a number, not '-50'"),
    ("compression_ratio_threshold", "2.4", "compression_ratio_threshold must be a number from 0 (or None), not '2.4'"),
    ("max_inflight_bytes", "512MB", "max_inflight_bytes must be a number (or None), not '512MB'"),
    ("min_duration", -1, "min_duration must be a number from 0, not -1"),
    ("no_speech_threshold", 1.5, "no_speech_threshold must be a number from 0 to 1 (or None), not 1.5"),
    ("window_margin_s", 0, "window_margin_s must be a number from 0.1 to 30, not 0"),
    ("fetch_workers", 0, "fetch_workers must be a whole number of at least 1 (or None), not 0"),
])
def test_the_python_api_refuses_what_the_cli_would(tmp_path, option, value, message):
    """Checked before anything loads (the model path does not even exist): not an error in every row."""
    from batchcap import transcribe

    with pytest.raises(FatalError, match=message.replace("(", r"\(").replace(")", r"\)")):
        transcribe(write_audio(tmp_path / "a.wav", 0.5), str(tmp_path / "o.parquet"),
                   model=str(tmp_path / "no-model"), quiet=True, **{option: value})
    assert not (tmp_path / "o.parquet").exists()


def test_the_python_api_takes_paths_and_one_reference_column(tiny_whisper_en, tmp_path):
    from batchcap import transcribe

    write_audio(tmp_path / "a.wav", 1.0)
    (tmp_path / "m.csv").write_text("path,heard\na.wav,a tone\n")
    result = transcribe(tmp_path / "m.csv", tmp_path / "o.parquet", model=tiny_whisper_en, quiet=True,
                        max_new_tokens=2, reference_columns="heard")
    [row] = rows_of(result.output)
    assert (row["status"], row["reference"]) == (OK, "a tone")
    assert row["wer"] is not None


def test_a_misaligned_csv_row_is_an_error_row_through_the_cli(tiny_whisper_en, tmp_path):
    write_audio(tmp_path / "a.wav", 1.0)
    write_audio(tmp_path / "b.wav", 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,reference\na.wav,one, two\nb.wav,\"one, two\"\n")
    out = tmp_path / "o.parquet"
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "2",
                           "--quiet")
    assert code == 3, output  # some rows failed
    rows = rows_of(out)
    assert [(r["status"], r["reference"]) for r in rows] == [(FETCH_ERROR, None), (OK, "one, two")]
    assert "3 fields where the header has 2" in rows[0]["error"]
    assert np.isfinite(rows[1]["wer"])


# --- messages that point the right way ----------------------------------------------------------------

def test_messages_name_the_problem(tiny_whisper_en, tmp_path):
    from batchcap.audio import decode_audio
    from batchcap.images import decode_image

    flat = io.BytesIO()
    sf.write(flat, np.full(16000, 0.5, np.float32), 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(ItemError, match=r"audio is a constant value \(\+0\.5: a DC offset, no sound\)"):
        decode_audio(flat.getvalue())  # it said "silent (peak -inf dBFS)" of a -6 dBFS signal

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    damaged = bytearray(png.getvalue())
    damaged[16:24] = struct.pack(">II", 9, 9)  # the header's size changed under its checksum
    with pytest.raises(ItemError, match=r"not a readable image \(a damaged PNG file\)"):
        decode_image(bytes(damaged))  # it said "unrecognized format, starts with 89 50 4e 47" (PNG's signature)

    with pytest.raises(ItemError, match=r"not a readable audio file \(.*\); FFmpeg: \w"):
        decode_audio(b"\x00\x00\x00\x20ftypM4A " + bytes(range(256)) * 8)  # FFmpeg's own reason is kept

    code, output = run_cli("audio", write_audio(tmp_path / "a.wav", 1.0), "-o", tmp_path / "o.parquet",
                           "--model", tiny_whisper_en, "--max-new-tokens", "2", "--quiet")
    assert code == 0, output
    (tmp_path / "afile").write_text("")
    code, output = run_cli("export", tmp_path / "o.parquet", "-o", tmp_path / "afile")
    assert code != 0
    assert f"{tmp_path / 'afile'} is a file, not a folder for subtitle files" in output


def test_a_semicolon_separated_manifest_is_read(tmp_path):
    """What a spreadsheet writes where the comma is the decimal mark: it was one column named 'path;reference'."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("path;reference;score\na.wav;hello, there;0,5\n")
    [item] = Inputs([str(manifest)], audio_spec())
    assert (item.source, item.references, item.extra) == (str(tmp_path / "a.wav"), ["hello, there"], {"score": "0,5"})


def test_an_empty_night_s_result_is_still_a_result(tiny_whisper_en, tmp_path):
    """A manifest with no rows (a nightly job with nothing new) wrote a table of only an id column, which
    ``batchcap report`` refused as "not a batchcap result table (no id / status columns)"."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,reference\n")
    out = tmp_path / "o.parquet"
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper_en, "--quiet")
    assert code == 0, output
    assert {"id", "status"} <= set(pq.read_schema(out).names)
    code, output = run_cli("report", out, "-o", tmp_path / "r.html")
    assert code == 0, output
    assert (tmp_path / "r.html").stat().st_size > 0
    # and the next night's rows go into it
    write_audio(tmp_path / "a.wav", 1.0)
    manifest.write_text("id,path,reference\nn1,a.wav,a tone\n")
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "2",
                           "--quiet")
    assert code == 0, output
    assert [r["id"] for r in rows_of(out)] == ["n1"]


# --- text that is not valid Unicode -------------------------------------------------------------------

def test_file_names_that_are_not_utf8_and_lone_surrogates_are_rows(tiny_whisper_en, tmp_path):
    """A file whose name is not UTF-8 (Python reads its bytes as lone surrogates) and a JSONL line with a
    cut emoji (``"\\ud83d"``, valid JSON): Arrow refused their text, so the whole run died, every rerun too.
    Each is its row now, with the text escaped, and a rerun finds them done."""
    folder = tmp_path / "calls"
    folder.mkdir()
    write_audio(folder / "ok.wav", 1.0)
    shutil.copy(folder / "ok.wav", os.fsencode(str(folder)) + b"/caf\xe9.wav")
    manifest = tmp_path / "m.jsonl"
    write_audio(tmp_path / "m.wav", 1.0)
    manifest.write_text('{"path": "m.wav", "reference": "a cut \\ud83d emoji", "note": "x \\ud83d"}\n')
    for out in (tmp_path / "out.parquet", tmp_path / "out2.csv"):
        args = (folder, manifest, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "2")
        code, output = run_cli("audio", *args)
        assert code == 0, output
        rows = rows_of(out)
        assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows
        assert sorted(r["id"].rsplit("/", 1)[-1] for r in rows[:2]) == ["caf\\xe9.wav", "ok.wav"]
        assert rows[2]["reference"] == "a cut \\ud83d emoji" and rows[2]["note"] == "x \\ud83d"
        code, output = run_cli("audio", *args)
        assert code == 0 and "3 already done" in output, output
        assert len(rows_of(out)) == 3


def test_an_output_name_that_is_not_utf8_stops_before_the_model_loads(tiny_whisper_en, tmp_path):
    """``-o caf\xe9.parquet`` (a byte that is not UTF-8): Arrow cannot open such a path, so every run died at
    its first flush with a UnicodeEncodeError. One line now, before anything is written."""
    clip = write_audio(tmp_path / "a.wav", 1.0)
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.parquet")
    code, output = run_cli("audio", clip, "-o", out, "--model", tiny_whisper_en, "--quiet")
    assert code == 1
    assert "caf\\xe9.parquet' is not valid UTF-8, which Arrow cannot write" in output, output
    assert os.listdir(tmp_path) == ["a.wav"]


def test_folders_that_cannot_be_read_are_said_and_fail_the_exit_code(tiny_whisper_en, tmp_path, monkeypatch):
    """A night's subfolder another user made with mode 700, or the input folder itself on a mount that refuses
    the service user: os.walk skipped them without a word, and the run said "nothing to do", exit 0."""
    calls = tmp_path / "calls"
    for night in ("01", "02"):
        (calls / night).mkdir(parents=True)
        write_audio(calls / night / "a.wav", 1.0)
    real_scandir = os.scandir
    refused = {str(calls / "02")}

    def scandir(path="."):  # what a folder without read permission gives (root reads every folder)
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, output = run_cli("audio", calls, "-o", tmp_path / "out.parquet", "--model", tiny_whisper_en)
    assert code == 3, output
    assert f"cannot read the folder {calls / '02'} (Permission denied): its files get no rows" in output
    assert f"could not read 1 input folder (their files have no rows): {calls / '02'}" in output
    assert [r["id"] for r in rows_of(tmp_path / "out.parquet")] == [str(calls / "01" / "a.wav")]
    assert json.loads((tmp_path / "out.summary.json").read_text())["unreadable_folders"] == [str(calls / "02")]
    refused.add(str(calls))
    code, output = run_cli("audio", calls, "-o", tmp_path / "out2.parquet", "--model", tiny_whisper_en)
    assert code == 1 and output.strip().splitlines() == [
        f"Error: cannot read the input folder {calls}: Permission denied"], output
    assert not (tmp_path / "out2.parquet").exists()


def test_reference_records_give_their_text_field(tmp_path):
    """COCO-style references (``sentences: [{raw, tokens}]``, as Hugging Face's COCO has them) were scored
    against Python's repr of each record; their text field is taken now, and records without one stop the run."""
    from batchcap.inputs import image_spec

    table = pa.table({"path": ["a.png"], "sentences": [[{"raw": "an astronaut in a suit", "tokens": ["an"]},
                                                         {"raw": "a woman smiling", "tokens": ["a"]}]]})
    pq.write_table(table, tmp_path / "m.parquet")
    spec = image_spec(reference_columns=("sentences",))
    assert [i.references for i in Inputs([str(tmp_path / "m.parquet")], spec)] == [
        ["an astronaut in a suit", "a woman smiling"]]
    pq.write_table(pa.table({"path": ["a.png"], "sentences": [[{"tokens": ["an"]}]]}), tmp_path / "n.parquet")
    with pytest.raises(FatalError, match="reference column 'sentences' holds records \\(tokens\\) without a text"):
        list(Inputs([str(tmp_path / "n.parquet")], spec))


def test_an_http_manifest_is_refused_not_fetched_as_an_image(tiny_captioner, tmp_path):
    code, output = run_cli("images", "http://127.0.0.1:9/set/m.csv?x=1", "-o", tmp_path / "o.parquet",
                           "--model", tiny_captioner)
    assert code == 1 and output.strip().splitlines() == [
        "Error: http://127.0.0.1:9/set/m.csv?x=1 looks like a manifest: manifests are read from local files and "
        "object stores (s3://, gs://, az://, hf://); download it first"], output
    assert not (tmp_path / "o.parquet").exists()


def test_a_folder_walk_takes_what_pillow_reads_and_names_what_it_skips(tiny_captioner, tmp_path):
    """A phone's folder: AVIF and JFIF pictures were skipped as "other types" without saying which; HEIC
    files now get rows that say what would read them."""
    from PIL import Image, features

    photos = tmp_path / "phone"
    photos.mkdir()
    Image.new("RGB", (32, 32), "red").save(photos / "IMG_0001.JPG", "JPEG")
    Image.new("RGB", (32, 32), "blue").save(photos / "IMG_0002.jfif", "JPEG")
    (photos / "IMG_0003.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    (photos / "notes.txt").write_text("x")
    (photos / "clip.mov").write_bytes(b"\x00" * 16)
    (photos / "more.txt").write_text("y")
    if features.check("avif"):
        Image.new("RGB", (32, 32), "green").save(photos / "IMG_0004.avif", "AVIF")
    code, output = run_cli("images", photos, "-o", tmp_path / "o.parquet", "--model", tiny_captioner,
                           "--max-new-tokens", "2")
    assert code == 3, output
    rows = {os.path.basename(r["id"]): r for r in rows_of(tmp_path / "o.parquet")}
    assert {"IMG_0001.JPG", "IMG_0002.jfif", "IMG_0003.HEIC"} <= set(rows)
    assert rows["IMG_0002.jfif"]["status"] == "ok"
    if features.check("avif"):  # Pillow 13 here
        assert rows["IMG_0004.avif"]["status"] == "ok"
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        assert rows["IMG_0003.HEIC"]["error"] == ("HEIC/HEIF image, which Pillow reads only with a plug-in "
                                                  "(pip install pillow-heif)")
    assert "skipped 3 files of other types in the input folders (2 .txt, 1 .mov)" in output


def test_an_api_call_leaves_the_caller_s_options_as_they_were(tiny_whisper_en, tmp_path):
    """A service passes one options object to every call: a one-off ``overwrite=True`` was written into it,
    and the next nightly call with it started the table over (every done row redone)."""
    from batchcap.asr import AudioOptions, transcribe

    base = AudioOptions(model=tiny_whisper_en, quiet=True, max_new_tokens=2)
    before = repr(base)
    write_audio(tmp_path / "a.wav", 1.0)
    transcribe([str(tmp_path / "a.wav")], tmp_path / "scratch.parquet", options=base, overwrite=True, write="srt")
    assert repr(base) == before
    transcribe([str(tmp_path / "a.wav")], tmp_path / "nightly.parquet", options=base)
    write_audio(tmp_path / "b.wav", 1.5)
    result = transcribe([str(tmp_path / "a.wav"), str(tmp_path / "b.wav")], tmp_path / "nightly.parquet",
                        options=base)
    assert result.skipped == 1 and sum(result.counts.values()) == 1


def test_a_loaded_transcriber_s_options_are_the_run_s(tiny_whisper, tmp_path):
    """``transcribe(..., transcriber=t, language="de")`` with ``t`` loaded for detection: every row was
    detected, and the summary said "de". A call asking for what the transcriber was not loaded with stops;
    the options it leaves out are the transcriber's, in the summary too."""
    from batchcap.asr import AudioOptions, load_transcriber, transcribe

    t = load_transcriber(AudioOptions(model=tiny_whisper, language="fr", num_beams=2))
    clip = write_audio(tmp_path / "a.wav", 1.0)
    with pytest.raises(FatalError, match=r"the transcriber given was loaded with language='fr', num_beams=2; "
                                         r"this call asks for language='de', num_beams=3"):
        transcribe([str(clip)], tmp_path / "x.parquet", transcriber=t, language="de", num_beams=3)
    result = transcribe([str(clip)], tmp_path / "y.parquet", transcriber=t, quiet=True, language="fr")
    assert result.summary["options"]["language"] == "fr" and result.summary["options"]["num_beams"] == 2
    assert rows_of(tmp_path / "y.parquet")[0]["language"] == "fr"


def test_two_threads_transcribe_at_once(tiny_whisper_en, tmp_path):
    """A service's two requests at once: both from_pretrained calls ran together and usually both failed with
    transformers' "Cannot copy out of meta tensor" (transformers#41782); batchcap loads one model at a time."""
    import threading

    from batchcap.asr import transcribe

    clip = str(write_audio(tmp_path / "a.wav", 1.0))

    def run(out: str, outcomes: dict[int, str], i: int) -> None:
        try:
            transcribe([clip], out, model=tiny_whisper_en, quiet=True, max_new_tokens=2)
            outcomes[i] = "ok"
        except BaseException as exc:  # noqa: BLE001 - the test reports what each thread met
            outcomes[i] = f"{type(exc).__name__}: {exc}"

    for attempt in range(2):
        outcomes: dict[int, str] = {}
        threads = [threading.Thread(target=run, args=(str(tmp_path / f"o{attempt}-{i}.parquet"), outcomes, i))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes == {0: "ok", 1: "ok"}, outcomes


def test_an_output_that_is_a_folder_is_never_offered_for_replacement(tiny_whisper_en, tmp_path):
    """A dataset folder named ``ds.parquet``: the message suggested --overwrite, which then failed with "Is a
    directory". Both say what it is now, and the folder is left as it was."""
    clip = write_audio(tmp_path / "a.wav", 1.0)
    (tmp_path / "ds.parquet").mkdir()
    (tmp_path / "ds.parquet" / "part-0.parquet").write_bytes(b"x")
    for extra in ((), ("--overwrite",)):
        code, output = run_cli("audio", clip, "-o", tmp_path / "ds.parquet", "--model", tiny_whisper_en, *extra)
        assert code == 1 and output.strip().splitlines() == [
            f"Error: {tmp_path / 'ds.parquet'} is a folder, not a table file: name a file such as "
            f"{tmp_path / 'ds.parquet' / 'results.parquet'}, or another name beside it"], output
    assert os.listdir(tmp_path / "ds.parquet") == ["part-0.parquet"]


def test_a_rerun_with_another_model_says_the_done_rows_are_the_other_s(tiny_whisper_en, tiny_whisper, tmp_path):
    """``-o`` kept, ``--model`` changed ("now the fine-tuned one"): the done rows stayed the old model's, the
    summary named the new one, and nothing said the table's figures mixed the two."""
    first = write_audio(tmp_path / "a.wav", 1.0)
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", first, "-o", out, "--model", tiny_whisper_en, "--max-new-tokens", "2")
    assert code == 0 and "another model" not in output, output
    second = write_audio(tmp_path / "b.wav", 1.5)
    code, output = run_cli("audio", first, second, "-o", out, "--model", tiny_whisper, "--max-new-tokens", "2")
    assert code == 0, output
    assert (f"rows already done were made by another model than {tiny_whisper} (1 by {tiny_whisper_en}): they are "
            f"kept") in output
    # the same model spelled another way (a relative path) is the same model
    code, output = run_cli("audio", first, second, "-o", out, "--model", os.path.relpath(tiny_whisper),
                           "--max-new-tokens", "2")
    assert code == 0 and f"1 by {tiny_whisper_en}" in output and f"1 by {tiny_whisper}" not in output, output
    # ... and a relative path given from another folder, which does not resolve here (its folder's name matches)
    import pyarrow.compute as pc

    table = pq.read_table(out)
    moved = pc.if_else(pc.equal(table["model"], tiny_whisper), "../elsewhere/" + os.path.basename(tiny_whisper),
                       table["model"])
    pq.write_table(table.set_column(table.schema.get_field_index("model"), "model", moved), out)
    code, output = run_cli("audio", first, second, "-o", out, "--model", tiny_whisper, "--max-new-tokens", "2")
    assert code == 0 and f"1 by {tiny_whisper_en}" in output and "elsewhere" not in output, output


def test_a_loaded_transcriber_s_languages_are_the_same_however_spelled(tiny_whisper, tmp_path):
    """A transcriber loaded with ``language=["en", "es"]`` refused a call asking for "en,es" (the same
    candidates), and the summary recorded a list where CLI runs record "en,es"."""
    from batchcap.asr import AudioOptions, load_transcriber, transcribe

    t = load_transcriber(AudioOptions(model=tiny_whisper, language=["en", "es"]))
    clip = str(write_audio(tmp_path / "a.wav", 1.0))
    for i, spelled in enumerate(("en,es", ["es", "en"], "English, es", None)):
        result = transcribe([clip], tmp_path / f"o{i}.parquet", transcriber=t, quiet=True, language=spelled)
        assert result.summary["options"]["language"] == "en,es"


def test_the_report_never_replaces_a_device_a_pipe_or_a_folder(tiny_whisper_en, tmp_path):
    """The page is written beside its target and renamed over it: ``-o /dev/null`` (as root) swapped the
    device node for a regular file holding the page, a FIFO hung, a folder gave a traceback. Each is now
    refused with one line, and left as it was."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,reference\n")
    out = tmp_path / "o.parquet"
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper_en, "--quiet")
    assert code == 0, output
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    folder = tmp_path / "pages"
    folder.mkdir()
    for target in (fifo, folder, f"{tmp_path / 'new'}/"):
        code, output = run_cli("report", out, "-o", target)
        assert code == 1, output
        assert "cannot write" in output and "Traceback" not in output, output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.isdir(folder) and not os.listdir(folder)
