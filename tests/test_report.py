"""batchcap report: HTML pages built from real result tables, parsed back and checked against the tables."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random

import html5lib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchcap.output import write_table
from batchcap.report import build_report, default_report_path, write_training_report
from tests.conftest import write_audio
from tests.helpers import run_cli

HOSTILE = "<script>alert('x')</script>"


# --- helpers -----------------------------------------------------------------------------------------


def parse(path) -> object:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # html5lib follows the HTML5 parsing algorithm, as a browser does
    return html5lib.parse(text, treebuilder="etree", namespaceHTMLElements=False)


def text_of(el) -> str:
    return " ".join("".join(el.itertext()).split())


def has_class(el, name: str) -> bool:
    return name in (el.get("class") or "").split()


def find_class(root, name: str, tag: str = "*") -> list:
    return [el for el in root.iter(tag) if has_class(el, name)]


def figure(root, key: str) -> float:
    """The exact value of a headline figure (``data-value`` of the first header card)."""
    found = [el for el in root.iter("div") if el.get("data-key") == key]
    assert found, f"no figure {key}"
    return float(found[0].get("data-value"))


def detail_row(root, row_id: str):
    for el in find_class(root, "row", "div"):
        ids = find_class(el, "id", "span")
        if ids and text_of(ids[0]) == row_id:
            return el
    raise AssertionError(f"row {row_id} not shown")


def alignment_marks(row) -> dict[str, list]:
    align = find_class(row, "align", "div")[0]
    subs = [(text_of(s.find("del")), text_of(s.find("ins"))) for s in find_class(align, "sub", "span")]
    return {"sub": subs, "del": [text_of(d) for d in find_class(align, "del", "del")],
            "ins": [text_of(i) for i in find_class(align, "ins", "ins")],
            "eq": [text_of(e) for e in find_class(align, "eq", "span")]}


def svg(root, name: str) -> list:
    """SVG elements (html5lib puts them in the SVG namespace)."""
    return [el for el in root.iter() if isinstance(el.tag, str) and el.tag.endswith("}" + name)]


def scripts(root) -> list:
    return list(root.iter("script"))


def audio_row(row_id, reference, text, *, status="ok", error=None, language="en", duration=3.0, source=None,
              **extra) -> dict:
    return {"id": row_id, "source": source or f"/data/calls/{row_id}.wav", "text": text, "language": language,
            "duration_s": duration, "status": status, "error": error, "model": "openai/whisper-tiny.en",
            "reference": reference, "wer": None, "cer": None, **extra}


def write_rows(path, rows: list[dict]) -> str:
    from batchcap.output import rows_to_table

    write_table(rows_to_table(rows), str(path), "csv" if str(path).endswith(".csv") else "parquet")
    return str(path)


# --- audio: hand-made rows -----------------------------------------------------------------------------


HAND_ROWS = [
    # 1 substitution (cat -> bat), 1 deletion (on), 1 insertion (now) over 6 words
    audio_row("cat", "The cat sat on the mat.", "The bat sat the mat now.", speaker="ann", duration=1.5),
    # exact
    audio_row("exact", "Hello world.", "hello, world", speaker="bob", duration=7.0),
    # 2 of 4 words wrong: two substitutions
    audio_row("half", "turn left at the lights", "turn right at the nights", speaker="bob", duration=12.0,
              source="/data/other/half.wav"),
    # an empty transcript: every reference word deleted
    audio_row("silent-ish", "good morning", "", speaker="ann", duration=2.5),
    # Italian row: the basic normalizer (lowercase, punctuation dropped)
    audio_row("it", "Buongiorno a tutti.", "buongiorno tutti", language="it", speaker="ann", duration=4.0),
    # failures of every status
    audio_row("missing-1", "x", None, status="fetch_error", error="no such file: /data/calls/missing-1.wav",
              language=None, duration=None),
    audio_row("missing-2", "x", None, status="fetch_error", error="no such file: /data/calls/missing-2.wav",
              language=None, duration=None),
    audio_row("http", None, None, status="fetch_error", error="HTTP 404 Not Found", language=None, duration=None,
              source="http://example.invalid/a.wav"),
    audio_row("corrupt", None, None, status="decode_error", error="not an audio file (sndfile: unknown format)",
              language=None, duration=None),
    audio_row("quiet", "y", None, status="empty", error="silent: peak -80 dBFS below -60 dBFS", duration=5.0),
    audio_row("oom", None, None, status="model_error", error="CUDA out of memory", language=None, duration=40.0),
    audio_row("boom", None, None, status="crashed", error="worker died (signal 9)", language=None, duration=None),
]
# corpus WER by hand: errors 3 + 0 + 2 + 2 + 1 over words 6 + 2 + 5 + 2 + 3
HAND_WER = (3 + 0 + 2 + 2 + 1) / (6 + 2 + 5 + 2 + 3)


@pytest.fixture(scope="module")
def hand_audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    result = write_rows(root / "hand.parquet", HAND_ROWS)
    out = build_report(result, str(root / "hand.html"), group_by=["speaker"])
    return {"root": root, "result": result, "html": out, "doc": parse(out)}


def test_alignment_marks_substitutions_deletions_insertions(hand_audio):
    doc = hand_audio["doc"]
    marks = alignment_marks(detail_row(doc, "cat"))
    assert marks["sub"] == [("cat", "bat")]
    assert marks["del"] == ["on"]
    assert marks["ins"] == ["now"]
    assert marks["eq"] == ["the", "sat", "the", "mat"]
    half = alignment_marks(detail_row(doc, "half"))
    assert half["sub"] == [("left", "right"), ("lights", "nights")] and not half["del"] and not half["ins"]
    empty = alignment_marks(detail_row(doc, "silent-ish"))
    assert empty["del"] == ["good", "morning"] and not empty["sub"]
    # the Italian row is aligned on the basic normalizer's text: only "a" is missing
    assert alignment_marks(detail_row(doc, "it"))["del"] == ["a"]


def test_corpus_and_group_figures_come_from_the_table(hand_audio):
    doc = hand_audio["doc"]
    assert figure(doc, "wer") == pytest.approx(HAND_WER)
    assert figure(doc, "scored_rows") == 5
    text = text_of(doc)
    assert f"{100 * HAND_WER:.2f}%" in text
    # worst rows first: the empty transcript (100%) before cat (50%) and half (40%)
    ids = [text_of(find_class(r, "id", "span")[0]) for r in find_class(doc, "row", "div")]
    assert ids[:3] == ["silent-ish", "cat", "half"]
    # WER by the --group-by column: ann = (3 + 2 + 1) / (6 + 2 + 3), bob = 2 / 7
    tables = {text_of(h): h for h in doc.iter("h3")}
    assert "by speaker" in tables and "by duration" in tables and "by language" in tables and "by folder" in tables
    speaker_rows = _group_table(doc, "by speaker")
    assert speaker_rows["ann"][4] == f"{100 * 6 / 11:.2f}%"
    assert speaker_rows["bob"][4] == f"{100 * 2 / 7:.2f}%"
    # substitution pairs over all rows (sclite's confusion list)
    assert ("cat", "bat", "1") in _confusions(doc)


def _group_table(doc, title: str) -> dict[str, list[str]]:
    for div in doc.iter("div"):
        h3 = div.find("h3")
        if h3 is not None and text_of(h3) == title:
            rows = div.find("table").findall(".//tr")[1:]
            return {text_of(r[0]): [text_of(c) for c in r[1:]] for r in rows}
    raise AssertionError(title)


def _confusions(doc) -> list[tuple[str, ...]]:
    for div in doc.iter("div"):
        h3 = div.find("h3")
        if h3 is not None and text_of(h3).startswith("substitutions"):
            return [tuple(text_of(c) for c in r) for r in div.find("table").findall(".//tr")[1:]]
    raise AssertionError("no substitution table")


def test_failures_grouped_by_status_and_message(hand_audio):
    doc = hand_audio["doc"]
    section = [h for h in doc.iter("h2") if h.get("id") == "failures"][0]
    table = _next_table(doc, section)
    rows = [[text_of(c) for c in r] for r in table.findall(".//tr")[1:]]
    by_status: dict[str, int] = {}
    for status, count, _message, _examples in rows:
        by_status[status] = by_status.get(status, 0) + int(count)
    assert by_status == {"fetch_error": 3, "decode_error": 1, "empty": 1, "model_error": 1, "crashed": 1}
    # the two missing files are one message, with both as examples
    missing = [r for r in rows if r[2] == "no such file: <source>"]
    assert missing and missing[0][1] == "2"
    assert "/data/calls/missing-1.wav" in missing[0][3] and "/data/calls/missing-2.wav" in missing[0][3]


def _next_table(doc, heading):
    seen = False
    for el in doc.iter():
        if el is heading:
            seen = True
        elif seen and el.tag == "table":
            return el
    raise AssertionError("no table after heading")


def test_page_is_self_contained(hand_audio):
    doc = hand_audio["doc"]
    for el in doc.iter():
        for attr in ("src", "href"):
            value = el.get(attr) or ""
            assert not value.startswith(("http://", "https://", "//")) or el.tag == "a", (el.tag, value)
    assert not list(doc.iter("link"))  # no stylesheet to fetch
    assert len(scripts(doc)) == 1 and not scripts(doc)[0].get("src")
    assert svg(doc, "svg")  # charts inline
    assert oct(os.stat(hand_audio["html"]).st_mode & 0o044) == oct(0o044)  # readable like any file written


def test_folder_labels():
    from batchcap.report.data import folders_of

    deep = "/srv/corpus/speech-{}/root/usr/share/asterisk/sounds/{}/{}.wav"
    labels = folders_of([deep.format("en", "en_US", "a"), deep.format("it", "it_IT", "b"), "/srv/corpus/c.wav"])
    assert labels == ["speech-en/…/sounds/en_US", "speech-it/…/sounds/it_IT", "corpus"]
    # shortening that would merge two folders is not done
    clash = folders_of(["/x/a/a-very-long-folder-name-number-one/same/leaf/1.wav",
                        "/x/a/a-very-long-folder-name-number-two/same/leaf/2.wav", "/x/b/3.wav"])
    assert clash == ["a/a-very-long-folder-name-number-one/same/leaf", "a/a-very-long-folder-name-number-two/same/leaf",
                     "b"]
    assert folders_of(["/x/a/a-very-long-folder-name-number-one/same/leaf/1.wav", "/x/b/3.wav"])[0] == "a/…/same/leaf"
    assert folders_of(["http://host/a/b.jpg", None]) == ["host/a", "(none)"]


def test_decode_column_and_carried_columns_are_shown(tmp_path):
    rows = [audio_row("a", "one two three", "one two tree", decode="temperature fallback 0.4", speaker="zoe"),
            audio_row("b", "four", "four", decode="greedy", speaker="yan")]
    doc = parse(build_report(write_rows(tmp_path / "d.parquet", rows), str(tmp_path / "d.html")))
    meta = text_of(find_class(detail_row(doc, "a"), "meta", "div")[0])
    assert "decode: temperature fallback 0.4" in meta and "speaker: zoe" in meta


def test_hostile_text_is_escaped(tmp_path):
    rows = [audio_row(HOSTILE, f"say {HOSTILE} now", f"say <b>bold</b> {HOSTILE}", source=f"/x/{HOSTILE}.wav",
                      speaker=HOSTILE),
            audio_row("f", None, None, status="fetch_error", error=f"bad {HOSTILE}", duration=None)]
    out = build_report(write_rows(tmp_path / "evil.parquet", rows), str(tmp_path / "evil.html"), group_by=["speaker"])
    doc = parse(out)
    assert len(scripts(doc)) == 1 and "alert" not in text_of(scripts(doc)[0])
    assert not list(doc.iter("b"))
    assert HOSTILE in text_of(doc)  # shown as text


# --- audio: a real run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_audio(tmp_path_factory, tiny_whisper_en):
    """A real transcription run (tiny random Whisper) over clips in two folders, with failures."""
    from batchcap.asr import transcribe

    root = tmp_path_factory.mktemp("calls")
    for folder in ("north", "south"):
        os.makedirs(root / folder)
    rows = []
    for n, (folder, seconds) in enumerate([("north", 1.0), ("north", 2.5), ("south", 1.5), ("south", 6.0)]):
        path = write_audio(root / folder / f"clip{n}.wav", seconds, freq=300 + 150 * n)
        rows.append({"path": path, "reference": f"please hold the line number {n}", "agent": "ann" if n % 2 else "bo"})
    (root / "south" / "broken.wav").write_bytes(b"RIFF....not audio")
    rows.append({"path": str(root / "south" / "broken.wav"), "reference": "x", "agent": "bo"})
    rows.append({"path": str(root / "north" / "gone.wav"), "reference": "y", "agent": "ann"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "reference", "agent"])
        writer.writeheader()
        writer.writerows(rows)
    out = root / "out.parquet"
    result = transcribe(str(manifest), str(out), model=tiny_whisper_en, quiet=True, device="cpu", batch_size=4)
    return {"root": root, "out": str(out), "summary": result.summary, "manifest": str(manifest)}


def test_real_audio_report_matches_the_summary(real_audio, tmp_path):
    out = build_report(real_audio["out"], str(tmp_path / "r.html"), group_by=["agent"])
    doc = parse(out)
    summary = real_audio["summary"]
    assert figure(doc, "wer") == pytest.approx(summary["wer"], abs=1e-5)
    assert figure(doc, "cer") == pytest.approx(summary["cer"], abs=1e-5)
    assert figure(doc, "scored_rows") == summary["scored_rows"] == 4
    text = text_of(doc)
    assert "fetch_error" in text and "decode_error" in text
    # an audio player per shown row, linking the local file relatively
    players = [s.get("src") for s in doc.iter("source")]
    assert len(players) == 4
    for src in players:
        assert not os.path.isabs(src)
        assert os.path.isfile(os.path.join(tmp_path, src.replace("%20", " ")))
    folders = _group_table(doc, "by folder")
    assert set(folders) == {"north", "south"}
    assert folders["south"][:2] == ["3", "1"]  # rows, failed (the broken file)


def test_real_audio_report_without_summary_and_from_csv(real_audio, tmp_path):
    """The table alone (no summary JSON beside it), as CSV: the same corpus WER."""
    from batchcap.output import read_table

    csv_path = tmp_path / "copy.csv"
    write_table(read_table(real_audio["out"]), str(csv_path), "csv")
    out = build_report(str(csv_path), str(tmp_path / "c.html"))
    doc = parse(out)
    assert figure(doc, "wer") == pytest.approx(real_audio["summary"]["wer"], abs=1e-5)
    assert "No summary JSON" in text_of(doc)


def test_compare_real_audio_results_with_players(real_audio, tmp_path):
    from batchcap.output import read_table

    rows = read_table(real_audio["out"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    ok[0]["text"] = "please hold the line number 0"  # B gets the first clip right
    b = write_rows(tmp_path / "b.parquet", rows)
    doc = parse(build_report(real_audio["out"], str(tmp_path / "cmp.html"), compare=b))
    (row,) = find_class(doc, "row", "div")
    assert text_of(find_class(row, "id", "span")[0]) == ok[0]["id"]
    (source,) = list(row.iter("source"))
    assert source.get("type") == "audio/wav" and not os.path.isabs(source.get("src"))
    assert os.path.isfile(os.path.join(tmp_path, source.get("src")))


def test_summary_command_and_options_are_shown(real_audio, tmp_path):
    summary = dict(real_audio["summary"], command=["batchcap", "audio", "calls.csv", "-o", "out.parquet",
                                                   "--note", HOSTILE],
                   options={"batch_size": 4, "language": None})
    out = build_report(real_audio["out"], str(tmp_path / "s.html"), summary=summary)
    doc = parse(out)
    cmd = find_class(doc, "cmd", "div")[0]
    assert text_of(cmd).startswith("batchcap audio calls.csv -o out.parquet --note")
    assert len(scripts(doc)) == 1
    assert "batch_size" in text_of(doc)


def test_compare_two_audio_results(tmp_path):
    a = write_rows(tmp_path / "before.parquet", HAND_ROWS)
    rows_b = [dict(r) for r in HAND_ROWS if r["id"] != "exact"]  # a row only in A
    for r in rows_b:
        if r["id"] == "cat":
            r["text"] = "The cat sat on the mat."  # fixed in B
        if r["id"] == "half":
            r["text"] = "turn left at the nights"  # one error left
    rows_b.append(audio_row("new", "only in b", "only in b"))
    random.Random(0).shuffle(rows_b)  # matched by id, not by position
    b = write_rows(tmp_path / "after.parquet", rows_b)
    out = build_report(a, str(tmp_path / "cmp.html"), compare=b)
    doc = parse(out)
    wer_a, wer_b = [float(el.get("data-value")) for el in doc.iter("div") if el.get("data-key") == "wer"]
    assert wer_a == pytest.approx(HAND_WER)  # A's header comes first
    assert wer_b == pytest.approx((0 + 1 + 2 + 1 + 0) / (6 + 5 + 2 + 3 + 3))
    differing = [text_of(find_class(r, "id", "span")[0]) for r in find_class(doc, "row", "div")]
    assert differing == ["cat", "half"]  # largest change in word errors first
    cat = detail_row(doc, "cat")
    aligns = find_class(cat, "align", "div")
    assert len(aligns) == 2  # A's and B's alignment against the reference
    assert [text_of(d) for d in find_class(aligns[0], "del", "del")] == ["on"]
    assert not find_class(aligns[1], "sub", "span") and not find_class(aligns[1], "del", "del")
    text = text_of(doc)
    assert "1 only in A, 1 only in B" in text


# --- images ---------------------------------------------------------------------------------------------


def make_photos(root, n: int = 5) -> str:
    """``n`` 640x480 photos (scikit-image's sample pictures, resized) with two references each, a broken file
    and a missing one, as a manifest."""
    from skimage import data

    pictures = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    rows = []
    for i in range(n):
        name = f"photo{i}.jpg"
        Image.fromarray(pictures[i % len(pictures)]).convert("RGB").resize((640, 480)).save(root / name, quality=90)
        rows.append({"path": name, "caption": json.dumps([f"a photo number {i}", "a cat on a table"])})
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows += [{"path": "broken.jpg", "caption": "[]"}, {"path": "gone.jpg", "caption": "[]"}]
    manifest = root / "images.parquet"
    table = pa.table({"path": [r["path"] for r in rows],
                      "caption": [json.loads(r["caption"]) for r in rows]})
    pq.write_table(table, manifest)
    return str(manifest)


@pytest.fixture(scope="module")
def real_images(tmp_path_factory, tiny_captioner):
    from batchcap.captioning import caption_images

    root = tmp_path_factory.mktemp("photos")
    manifest = make_photos(root)
    out = root / "captions.parquet"
    result = caption_images(manifest, str(out), model=tiny_captioner, quiet=True, device="cpu", batch_size=4,
                            max_new_tokens=8)
    return {"root": root, "out": str(out), "summary": result.summary}


def test_images_report_figures_thumbnails_grid(real_images, tmp_path):
    out = build_report(real_images["out"], str(tmp_path / "img.html"))
    doc = parse(out)
    summary = real_images["summary"]
    for key in ("bleu_4", "rouge_l", "cider_d"):
        assert figure(doc, key) == pytest.approx(summary[key], abs=1e-5), key
    cards = [el for el in doc.iter("div") if has_class(el, "thumb") and el.get("data-status")]
    assert sorted(c.get("data-status") for c in cards) == ["decode_error", "fetch_error"] + ["ok"] * 5
    thumbs = [img.get("src") for img in doc.iter("img")]
    assert len(thumbs) == 5
    for src in thumbs:
        assert src.startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(image.size) <= 160 and image.size[0] == 160  # 640x480 downscaled
    ok_cards = [c for c in cards if c.get("data-status") == "ok"]
    scores = [float(c.get("data-cider_d")) for c in ok_cards]
    assert scores == sorted(scores)  # the lowest CIDEr-D first
    # failures carry their error; the grid has filter buttons per status and a sort control
    broken = [c for c in cards if c.get("data-status") == "decode_error"][0]
    assert find_class(broken, "err")
    assert {b.get("data-filter") for b in doc.iter("button")} == {"all", "ok", "decode_error", "fetch_error"}
    assert doc.find(".//select").get("id") == "sort"


def test_images_report_from_csv_without_summary(real_images, tmp_path):
    """CSV (references as JSON text), no summary: BLEU-4 is recomputed from the table and agrees."""
    from batchcap.output import read_table

    csv_path = tmp_path / "captions.csv"
    write_table(read_table(real_images["out"]), str(csv_path), "csv")
    for name in os.listdir(real_images["root"]):
        if name.endswith(".jpg"):
            os.symlink(real_images["root"] / name, tmp_path / name)
    doc = parse(build_report(str(csv_path), str(tmp_path / "c.html")))
    assert figure(doc, "bleu_4") == pytest.approx(real_images["summary"]["bleu_4"], abs=1e-6)
    assert figure(doc, "cider_d") == pytest.approx(real_images["summary"]["cider_d"], abs=1e-5)
    refs = [text_of(li) for li in doc.iter("li")]
    assert "a photo number 0" in refs and "a cat on a table" in refs


def test_images_hostile_text_and_urls_not_fetched(tmp_path):
    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"id": HOSTILE, "source": str(tmp_path / "red.png"), "caption": f"a {HOSTILE} caption", "status": "ok",
             "error": None, "http_status": None, "width": 300, "height": 200, "model": "m",
             "references": [f"ref {HOSTILE}"], "bleu_4": 0.1, "rouge_l": 0.2, "cider_d": 0.3},
            {"id": "url", "source": "http://127.0.0.1:9/never.jpg", "caption": "x", "status": "ok", "error": None,
             "http_status": 200, "width": 10, "height": 10, "model": "m", "references": ["y"], "bleu_4": 0.0,
             "rouge_l": 0.0, "cider_d": 0.0}]
    out = build_report(write_rows(tmp_path / "evil.parquet", rows), str(tmp_path / "evil.html"))
    doc = parse(out)
    assert len(scripts(doc)) == 1 and "alert" not in text_of(scripts(doc)[0])
    page = text_of(doc)
    assert f"a {HOSTILE} caption" in page and f"ref {HOSTILE}" in page and HOSTILE in page
    assert len(list(doc.iter("img"))) == 1  # the URL is linked, not fetched
    assert any(a.get("href") == "http://127.0.0.1:9/never.jpg" for a in doc.iter("a"))


def test_embedded_image_bytes_get_thumbnails(tmp_path, tiny_captioner):
    """A Hugging Face datasets layout manifest ({"bytes", "path"} structs): thumbnails from the manifest."""
    from batchcap.captioning import caption_images

    blobs = []
    for colour in ((250, 0, 0), (0, 0, 250)):
        buf = io.BytesIO()
        Image.new("RGB", (400, 400), colour).save(buf, "PNG")
        blobs.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"image": blobs, "caption": ["red", "blue"]}), tmp_path / "ds.parquet")
    caption_images(str(tmp_path / "ds.parquet"), str(tmp_path / "out.parquet"), model=tiny_captioner, quiet=True,
                   device="cpu", max_new_tokens=4)
    doc = parse(build_report(str(tmp_path / "out.parquet"), str(tmp_path / "r.html")))
    srcs = [img.get("src") for img in doc.iter("img")]
    assert len(srcs) == 2
    colours = {Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).convert("RGB").getpixel((5, 5))
               for s in srcs}
    assert any(c[0] > 200 for c in colours) and any(c[2] > 200 for c in colours)


def test_compare_two_image_results(real_images, tmp_path):
    from batchcap.output import read_table

    table = read_table(real_images["out"])
    rows = table.to_pylist()
    rows[0]["caption"] = "a completely different caption"
    rows[0]["cider_d"] = 3.5
    b = write_rows(tmp_path / "b.parquet", rows[::-1])
    doc = parse(build_report(real_images["out"], str(tmp_path / "cmp.html"), compare=b))
    differing = [text_of(find_class(r, "id", "span")[0]) for r in find_class(doc, "row", "div")]
    assert differing == [rows[0]["id"]]
    assert "a completely different caption" in text_of(doc)
    assert len(list(doc.iter("img"))) == 1
    assert not [r for r in comparison_rows(doc) if "both scored" in r[0]]  # the same rows: nothing to add


def comparison_rows(doc) -> list[list[str]]:
    """The cells of the comparison's figures table (label, A, B, change)."""
    tables = [t for t in doc.iter("table") if [text_of(th) for th in t.iter("th")] == ["", "A", "B", "change"]]
    assert len(tables) == 1
    return [[text_of(td) for td in tr.iter("td")] for tr in tables[0].iter("tr") if tr.find("td") is not None]


def test_compare_image_results_over_the_rows_both_scored(real_images, tmp_path):
    """B failed an image A scored best: its corpus figures cover fewer images than A's, so the comparison adds
    the figures over the rows both scored, where the same captions score the same."""
    from batchcap.output import read_table

    rows = read_table(real_images["out"]).to_pylist()
    scored = [r["id"] for r in rows if r["status"] == "ok" and r["references"]]
    assert len(scored) >= 3
    a_rows, b_rows = [dict(r) for r in rows], [dict(r) for r in rows]
    for a_row, b_row in zip(a_rows, b_rows):
        if a_row["id"] == scored[0]:
            a_row.update(cider_d=5.0, rouge_l=1.0)
            b_row.update(status="model_error", error="out of memory", caption=None, cider_d=None, rouge_l=None)
    a = write_rows(tmp_path / "a.parquet", a_rows)
    b = write_rows(tmp_path / "b.parquet", b_rows)
    doc = parse(build_report(a, str(tmp_path / "cmp.html"), compare=b))
    figures = {r[0]: r[1:] for r in comparison_rows(doc)}
    n = len(scored) - 1
    assert figures["CIDEr-D"][0] != figures["CIDEr-D"][1]
    both = {k: v for k, v in figures.items() if "both scored" in k}
    assert set(both) == {f"{label} on the {n:,} rows both scored" for label in ("BLEU-4", "ROUGE-L", "CIDEr-D")}, both
    for values in both.values():
        assert values[0] == values[1] and values[2] == "+0.0000", values


# --- size and the CLI -------------------------------------------------------------------------------------


def test_hundred_thousand_rows_make_a_small_page(tmp_path):
    n = 100_000
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat road red blue big small".split()
    statuses = ["ok"] * 97 + ["fetch_error", "decode_error", "empty"]
    refs, texts, status = [], [], []
    for _ in range(n):
        ref = [rng.choice(words) for _ in range(rng.randint(3, 12))]
        hyp = [w if rng.random() > 0.15 else rng.choice(words) for w in ref]
        refs.append(" ".join(ref))
        texts.append(" ".join(hyp))
        status.append(rng.choice(statuses))
    table = pa.table({
        "id": [f"clip-{i:06d}" for i in range(n)],
        "source": [f"/corpus/part{i % 40}/clip-{i:06d}.flac" for i in range(n)],
        "text": texts, "language": ["en"] * n,
        "duration_s": [rng.uniform(0.5, 40) for _ in range(n)], "status": status,
        "error": [None if s == "ok" else f"{s} on this clip" for s in status],
        "model": ["m"] * n, "reference": refs, "wer": [None] * n, "cer": [None] * n,
    })
    pq.write_table(table, tmp_path / "big.parquet")
    out = build_report(str(tmp_path / "big.parquet"), str(tmp_path / "big.html"), rows=50, normalize="none")
    size = os.path.getsize(out)
    assert size < 2_000_000, size
    doc = parse(out)
    assert len(find_class(doc, "row", "div")) == 50
    assert figure(doc, "scored_rows") == status.count("ok")


def test_cli(real_audio, tmp_path):
    code, output = run_cli("report", real_audio["out"], "-o", tmp_path / "x.html", "--rows", "2", "--group-by", "agent")
    assert code == 0, output
    assert output.startswith(f"report: {tmp_path / 'x.html'} (") and output.strip().endswith("kB)")
    assert len(find_class(parse(tmp_path / "x.html"), "row", "div")) == 2
    # default name beside the result
    code, output = run_cli("report", real_audio["out"])
    assert code == 0 and os.path.isfile(default_report_path(real_audio["out"]))


def test_cli_errors(real_audio, real_images, tmp_path):
    code, output = run_cli("report", tmp_path / "nope.parquet")
    assert code == 1 and output.startswith("Error: no result file")
    code, output = run_cli("report", real_audio["out"], "--group-by", "speaker", "-o", tmp_path / "x.html")
    assert code == 1 and "no column speaker" in output and "Traceback" not in output
    code, output = run_cli("report", real_audio["out"], real_images["out"], "-o", tmp_path / "x.html")
    assert code == 1 and "cannot compare" in output
    (tmp_path / "junk.csv").write_text("a,b\n1,2\n")
    code, output = run_cli("report", tmp_path / "junk.csv", "-o", tmp_path / "x.html")
    assert code == 1 and "not a batchcap result table" in output
    code, output = run_cli("report", real_audio["out"], "-o", tmp_path / "no" / "dir" / "x.html")
    assert code == 1 and "report folder does not exist" in output


def test_the_page_never_replaces_a_table(real_audio, tmp_path):
    """``-o`` naming the result itself, the result compared, or another file that is not a page: the report
    wrote its HTML over the table (the run's data gone). It stops with one line, the files as they were."""
    table = tmp_path / "out.parquet"
    table.write_bytes(open(real_audio["out"], "rb").read())
    other = tmp_path / "b.parquet"
    other.write_bytes(table.read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    before = {p: p.read_bytes() for p in (table, other, notes)}
    for args in ((table, "-o", table), (table, other, "-o", other), (table, "-o", notes)):
        code, output = run_cli("report", *args)
        assert code == 1 and "another file" in output and "Traceback" not in output, output
    assert {p: p.read_bytes() for p in before} == before
    page = tmp_path / "r.html"
    for _ in range(2):  # an earlier page is replaced
        code, output = run_cli("report", table, "-o", page)
        assert code == 0, output


# --- training -------------------------------------------------------------------------------------------


def test_training_report_from_history(tmp_path):
    history = [{"epoch": e, "steps": 10 * e, "train_loss": 2.0 / e, "val_loss": 2.5 / e, "cider_d": 0.5 * e,
                "bleu_4": 0.1 * e, "rouge_l": 0.2 * e, "exact": 0.05 * e, "example": f"'{HOSTILE}' (ref 'x')",
                "seconds": 1.5, "best": e == 3} for e in (1, 2, 3)]
    image = Image.new("RGB", (500, 300), (10, 200, 10))
    samples = [{"id": "v1", "prediction": f"a green {HOSTILE}", "references": ["a green square", "green"],
                "image": image}]
    path = write_training_report(str(tmp_path), history, samples, title="batchcap train images: t")
    doc = parse(path)
    assert path == str(tmp_path / "report.html")
    assert len(scripts(doc)) == 1 and "alert" not in text_of(scripts(doc)[0])
    # loss (2 curves), CIDEr-D, and the 0-1 scores (BLEU-4, ROUGE-L, exact)
    assert len(svg(doc, "polyline")) == 2 + 1 + 3
    table = doc.find(".//table")
    assert len(table.findall(".//tr")) == 1 + 3
    assert f"a green {HOSTILE}" in text_of(doc)
    (img,) = list(doc.iter("img"))
    assert max(Image.open(io.BytesIO(base64.b64decode(img.get("src").split(",", 1)[1]))).size) == 160
    # audio-style samples: the normalized pair is aligned
    audio = write_training_report(str(tmp_path), [{"epoch": 1.0, "train_loss": 1.0, "val_loss": 1.2, "wer": 0.5}],
                                  [{"reference": "The cat sat.", "prediction": "The bat sat.",
                                    "normalized": ("the cat sat", "the bat sat")}], filename="audio.html")
    marks = alignment_marks(parse(audio))
    assert marks["sub"] == [("cat", "bat")]


def test_training_report_does_not_fail_training(tmp_path):
    assert write_training_report(str(tmp_path / "missing"), [{"epoch": 1}], strict=False) is None
    with pytest.raises(OSError):
        write_training_report(str(tmp_path / "missing"), [{"epoch": 1}])


def test_train_images_writes_its_report(tmp_path):
    import torch

    from tests.test_train_images import make_pair, make_shapes

    torch.set_num_threads(1)
    manifest = make_shapes(tmp_path / "shapes", 24, seed=0)
    enc, dec = make_pair(tmp_path / "pair")
    out = tmp_path / "model"
    code, output = run_cli("train", "images", manifest, "-o", out, "--encoder", enc, "--decoder", dec, "--epochs", "2",
                           "--batch-size", "8", "--val-fraction", "0.25", "--device", "cpu", "-q")
    assert code == 0, output
    doc = parse(out / "report.html")
    cards = find_class(doc, "thumb", "div")
    assert len(cards) == 6  # every validation image's prediction, with its picture
    assert len(list(doc.iter("img"))) == 6
    assert all(find_class(c, "caption") and c.find(".//li") is not None for c in cards)
    assert len(doc.find(".//table").findall(".//tr")) == 1 + 2


def test_report_option_writes_the_page_beside_the_output_also_on_resume(real_audio, tmp_path, tiny_whisper_en):
    out = tmp_path / "run.parquet"
    code, text = run_cli("audio", real_audio["manifest"], "-o", str(out), "--model", tiny_whisper_en, "--report")
    assert code == 3, text
    page = tmp_path / "run.report.html"
    assert f"report: {page}" in text
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["report"] == str(page) and summary["command"][:2] == ["batchcap", "audio"]
    assert figure(parse(page), "wer") == pytest.approx(summary["wer"], abs=1e-5)
    page.unlink()
    code, text = run_cli("audio", real_audio["manifest"], "-o", str(out), "--model", tiny_whisper_en, "--report")
    assert code == 0 and "0 processed" in text  # a resumed run with nothing left to do ...
    assert figure(parse(page), "wer") == pytest.approx(summary["wer"], abs=1e-5)  # ... writes the page again


def test_compare_by_folder_labels_both_results_alike(tmp_path):
    """A spans two folders, B one of them: B's rows were in no row of the folder table (each result labelled its
    folders from its own common folder, and B, of one folder, had no folder table at all)."""
    a = write_rows(tmp_path / "a.parquet", [
        audio_row("x", "one two", "one two", source="/data/calls/x.wav"),
        audio_row("y", "one two", "one", source="/data/calls/y.wav"),
        audio_row("z", "three", "three", source="/data/calls/late/z.wav")])
    b = write_rows(tmp_path / "b.parquet", [
        audio_row("x", "one two", "one two", source="/data/calls/x.wav"),
        audio_row("y", "one two", "one two", source="/data/calls/y.wav")])
    doc = parse(build_report(a, str(tmp_path / "cmp.html"), compare=b))
    table = next(t for t in doc.iter("table") if [text_of(th) for th in t.iter("th")][:1] == ["folder"])
    cells = {text_of(tr[0]): text_of(tr[1]) for tr in table.iter("tr") if tr[0].tag == "td"}
    assert cells == {"calls": "2 / 2", "late": "1 / 0"}
    # the other way round: a folder only B has was left out of the table, though its rows count in B's figures
    doc = parse(build_report(b, str(tmp_path / "cmp2.html"), compare=a))
    table = next(t for t in doc.iter("table") if [text_of(th) for th in t.iter("th")][:1] == ["folder"])
    cells = {text_of(tr[0]): text_of(tr[1]) for tr in table.iter("tr") if tr[0].tag == "td"}
    assert cells == {"calls": "2 / 2", "late": "0 / 1"}


def test_nan_and_infinite_values_are_no_values(tmp_path):
    """A NaN or infinite score or duration (a table edited by hand, a float CSV cell "inf") made the report
    die with a traceback (histogram buckets of NaN, a duration bucket of infinity). They count as missing."""
    nan, inf = float("nan"), float("inf")
    images = tmp_path / "images.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "status": ["ok"] * 3, "caption": ["x", "y", "z"],
                             "references": [["x"], ["y"], ["z"]], "cider_d": [nan, inf, 1.0]}), images)
    audio = tmp_path / "audio.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "status": ["ok", "ok"], "text": ["x", "y"], "reference": ["x", "y"],
                             "duration_s": [inf, 2.0], "wer": [nan, 0.0]}), audio)
    for table in (images, audio):
        page = build_report(str(table), str(tmp_path / f"{table.stem}.html"))
        assert "<svg" in open(page, encoding="utf-8").read()


def test_no_thumbnail_of_a_picture_the_run_refused_as_a_bomb(tmp_path):
    """An image over the run's default --max-pixels is a decode_error row; its failure card decoded it in full
    for a thumbnail anyway (a 169 MP PNG took the report to 1.4 GB). Its size is read from the header now."""
    from batchcap.images import DEFAULT_MAX_PIXELS
    from batchcap.report.images import Thumbnails

    side = int(DEFAULT_MAX_PIXELS ** 0.5) + 1
    Image.new("L", (side, side)).save(tmp_path / "bomb.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    thumbs = Thumbnails(str(tmp_path))
    assert thumbs.of(str(tmp_path / "ok.png"), "ok").startswith("data:image/jpeg")
    assert thumbs.of(str(tmp_path / "bomb.png"), "bomb") is None


def test_a_long_unbroken_word_is_clipped_in_the_confusion_tables(tmp_path):
    """A looping "hahaha…" (1,200 characters, one word) filled the substitutions table's cell and pushed the
    other tables aside; the tables show its first characters (the whole word in the cell's title)."""
    out = write_rows(tmp_path / "out.parquet", [audio_row("loop", "thank you", "ha" * 600),
                                                audio_row("ok", "press two", "press one")])
    doc = parse(build_report(out, str(tmp_path / "r.html")))
    heads = ["reference", "transcript"]
    table = next(t for t in doc.iter("table") if [text_of(th) for th in t.iter("th")][:2] == heads)
    cells = [tr[1] for tr in table.iter("tr") if tr[0].tag == "td"]
    assert {text_of(c)[:4] for c in cells} == {"haha", "one"}
    loop = next(c for c in cells if text_of(c).startswith("haha"))
    assert len(text_of(loop)) == 48 and text_of(loop).endswith("…") and loop.get("title") == "ha" * 600


def test_failure_messages_keep_words_that_are_also_file_names(tmp_path):
    """A file named ``image`` (as CDN URLs often are) made "image too large" read "<source> too large": only a
    file name (with an extension, as a whole token) or the whole source is replaced in a message."""
    from batchcap.report.data import failure_groups, load_result

    out = write_rows(tmp_path / "out.parquet", [
        audio_row("a", "x", None, status="decode_error", error="image too large: 100 MP", source="/pics/image"),
        audio_row("b", "x", None, status="fetch_error", error="no such file: b.wav", source="/calls/b.wav"),
        audio_row("c", "x", None, status="fetch_error", error="no such file: c.wav", source="/calls/c.wav"),
        audio_row("d", "x", None, status="fetch_error", error="in /calls/xc.wav.bak", source="/calls/c.wav")])
    messages = {g.message: g.count for g in failure_groups(load_result(out))[0]}
    assert messages == {"image too large: 100 MP": 1, "no such file: <source>": 2, "in /calls/xc.wav.bak": 1}


def test_compare_alignment_sets_like_against_like(tmp_path):
    """A without references, B with: the A → B alignment set A's text as written against B's normalized text,
    so "Hello," against "hello" was drawn as a substitution. One form on both sides: only the real change."""
    from batchcap.report.audio import score_result
    from batchcap.report.compare import compare_audio
    from batchcap.report.data import load_result

    a = load_result(write_rows(tmp_path / "a.parquet", [audio_row("r1", None, "Hello, World. Press one now!")]))
    b = load_result(write_rows(tmp_path / "b.parquet", [
        audio_row("r1", "Hello world, press one now.", "Hello, World. Press two now!")]))
    detail = compare_audio(a, score_result(a, None), b, score_result(b, None), rows=5, report_dir=str(tmp_path))
    tokens = detail["detail"][0]["ab_tokens"]
    assert [(t.kind, t.ref, t.hyp) for t in tokens if t.kind != "eq"] == [("sub", "one", "two")], tokens


def test_thumbnails_show_the_picture_the_model_saw(tmp_path):
    """The report converted pictures itself: a logo on a transparent background came out a black square (the
    model saw it on white), a 16-bit scan all white, a float TIFF all black."""
    from batchcap.images import decode_image
    from batchcap.report.images import Thumbnails

    logo = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    logo.paste((0, 0, 0, 255), (60, 60, 140, 140))
    logo.save(tmp_path / "logo.png")
    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (200, 1))
    Image.fromarray(ramp).save(tmp_path / "scan16.png")
    thumbs = Thumbnails(str(tmp_path))
    for name in ("logo.png", "scan16.png"):
        src = thumbs.of(str(tmp_path / name), name)
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L"), float)
        seen = np.asarray(decode_image((tmp_path / name).read_bytes()).convert("L").resize(shown.shape[::-1]), float)
        assert abs(shown.mean() - seen.mean()) < 4, (name, shown.mean(), seen.mean())


def test_thumbnails_keep_to_the_run_s_max_pixels(tmp_path):
    """A run with --max-pixels 1 MP refused a 2 MP picture; the report decoded it anyway for its card
    (only its own default limit applied)."""
    from batchcap.report.data import load_result
    from batchcap.report.images import Thumbnails, run_max_pixels

    Image.new("RGB", (2000, 1000), "red").save(tmp_path / "big.png")
    rows = [{"id": "big.png", "source": str(tmp_path / "big.png"), "caption": None, "status": "decode_error",
             "error": "image too large", "model": "m", "references": None}]
    result = write_rows(tmp_path / "r.parquet", rows)
    (tmp_path / "r.summary.json").write_text(json.dumps({"options": {"max_pixels": 1_000_000}}))
    loaded = load_result(result)
    assert run_max_pixels(loaded) == 1_000_000
    assert Thumbnails(str(tmp_path), max_pixels=run_max_pixels(loaded)).of(str(tmp_path / "big.png"), "big.png") is None
    assert Thumbnails(str(tmp_path)).of(str(tmp_path / "big.png"), "big.png") is not None  # under the default
