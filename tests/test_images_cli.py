"""batchcap images end to end: real photos, a loopback HTTP server, a tiny real VisionEncoderDecoder."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchcap import caption_images
from batchcap.metrics import caption_metrics
from tests.helpers import rows_of, run_cli  # noqa: F401


def photo_bytes(name: str, fmt: str = "JPEG") -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    (folder / "astronaut.jpg").write_bytes(photo_bytes("astronaut"))
    (folder / "coffee.png").write_bytes(photo_bytes("coffee", "PNG"))
    (folder / "more" / "chelsea.webp").write_bytes(photo_bytes("chelsea", "WEBP"))
    (folder / "readme.txt").write_text("not an image")
    return folder


def test_directory_of_photos(tiny_captioner, photos, tmp_path):
    out = tmp_path / "caps.parquet"
    code, output = run_cli("images", str(photos), "-o", str(out), "--model", tiny_captioner, "--batch-size", "2")
    assert code == 0, output
    rows = rows_of(out)
    assert [os.path.relpath(r["source"], photos) for r in rows] == ["astronaut.jpg", "coffee.png", "more/chelsea.webp"]
    assert all(r["status"] == "ok" and r["caption"] and r["error"] is None for r in rows)
    assert [(r["width"], r["height"]) for r in rows] == [(512, 512), (600, 400), (451, 300)]
    assert f"wrote 3 rows to {out} (3 ok)" in output
    assert "skipped 1 file of other types in the input folders" in output
    summary = json.loads((tmp_path / "caps.summary.json").read_text())
    assert summary["skipped_files"] == 1 and summary["images_this_run"] == 3


def test_an_output_inside_the_input_folder_is_not_an_input(tiny_captioner, photos):
    # the table, its CSV schema, summary and report written among the photos: the rerun neither reads
    # them as inputs nor counts them as files of other types (the readme still is one)
    out = photos / "caps.csv"
    for _ in range(2):
        code, output = run_cli("images", str(photos), "-o", str(out), "--model", tiny_captioner, "--batch-size", "2",
                               "--report")
        assert code == 0, output
        assert "skipped 1 file of other types in the input folders" in output
    assert {"caps.csv", "caps.schema.json", "caps.summary.json", "caps.report.html"} <= set(os.listdir(photos))
    assert len(rows_of(out)) == 3
    assert json.loads((photos / "caps.summary.json").read_text())["skipped_files"] == 1


def test_bad_files_in_a_directory(tiny_captioner, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(os.urandom(500))
    (folder / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    good = photo_bytes("astronaut")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")  # 144 MP, a few KB on disk
    (folder / "bomb.png").write_bytes(buf.getvalue())
    (folder / "good.jpg").write_bytes(good)
    out = tmp_path / "o.parquet"
    code, output = run_cli("images", str(folder), "-o", str(out), "--model", tiny_captioner,
                           "--max-pixels", "100000000")
    assert code == 3, output
    got = {os.path.basename(r["source"]): r for r in rows_of(out)}
    assert got["good.jpg"]["status"] == "ok"
    for name, words in {"empty.jpg": "empty", "corrupt.png": "not an image", "page.jpg": "HTML",
                        "truncated.jpg": "truncated", "bomb.png": "too large"}.items():
        assert got[name]["status"] == "decode_error", got[name]
        assert words in got[name]["error"], got[name]
    assert "5 decode_error" in output


def test_http_cases_end_with_the_right_status(tiny_captioner, tmp_path, http_server):
    good = photo_bytes("coffee")
    http_server.add("/img/good.jpg", good, content_type="image/jpeg")
    http_server.add("/img/truncated.jpg", good[:2000], content_type="image/jpeg")
    cases = {
        "/img/good.jpg": ("ok", None, 200),
        "/status/404": ("fetch_error", "HTTP 404", 404),
        "/flaky/a?body=/img/good.jpg": ("ok", None, 200),
        "/ratelimit/b?body=/img/good.jpg&retry_after=1": ("ok", None, 200),
        "/slow?delay=5&body=/img/good.jpg": ("fetch_error", "timed out", None),
        "/big?mb=3": ("fetch_error", "larger than", 200),
        "/redirect-loop": ("fetch_error", "too many redirects", 302),
        "/html": ("decode_error", "HTML", 200),
        "/img/truncated.jpg": ("decode_error", "truncated", 200),
    }
    manifest = tmp_path / "urls.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_url", "license"])
        for path in cases:
            w.writerow([http_server.url(path), "cc-by"])
    out = tmp_path / "o.csv"
    code, output = run_cli("images", str(manifest), "-o", str(out), "--model", tiny_captioner, "--timeout", "1",
                           "--retries", "1", "--max-bytes", str(2 * 2**20))
    assert code == 3, output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cases)
    for row, (path, (status, words, http_status)) in zip(rows, cases.items()):
        assert row["source"] == http_server.url(path)
        assert row["status"] == status, (path, row)
        assert (row["error"] == "") if words is None else (words in row["error"]), (path, row)
        assert row["http_status"] == ("" if http_status is None else str(http_status)), (path, row)
        assert row["license"] == "cc-by"
    assert http_server.hits["/flaky/a"] == 2 and http_server.hits["/ratelimit/b"] == 2
    ua = http_server.headers["/img/good.jpg"]["User-Agent"]
    assert ua.startswith("batchcap/")


def test_only_http_urls_are_fetched_from_manifests(tiny_captioner, tmp_path, photos):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"url": u}) + "\n" for u in
                                ["file:///etc/passwd", "ftp://example.com/a.jpg", str(photos / "coffee.png")]))
    result = caption_images(str(manifest), str(tmp_path / "o.parquet"), model=tiny_captioner, quiet=True)
    rows = rows_of(result.output)
    assert [r["status"] for r in rows] == ["fetch_error", "fetch_error", "ok"]
    assert "unsupported URL scheme 'file'" in rows[0]["error"]


def test_thousand_loopback_urls(tiny_captioner, tmp_path, http_server):
    for i in range(20):
        arr = np.full((24 + i, 40, 3), i * 12, np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        http_server.add(f"/img/{i}.png", buf.getvalue(), content_type="image/png")
    ids = [f"img-{n:04d}" for n in range(1000)]
    table = pa.table({"id": ids, "url": [http_server.url(f"/img/{n % 20}.png?n={n}") for n in range(1000)]})
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "o.parquet"
    code, output = run_cli("images", str(tmp_path / "m.parquet"), "-o", str(out), "--model", tiny_captioner,
                           "--batch-size", "64", "--max-new-tokens", "4", "--quiet")
    assert code == 0, output
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ids and {r["status"] for r in rows} == {"ok"}
    assert sum(http_server.hits.values()) == 1000


def test_downloads_do_not_wait_for_decode_threads(tiny_captioner, tmp_path, http_server):
    """With one decode thread, downloads still run --fetch-workers at a time, within --per-host."""
    http_server.add("/img/a.jpg", photo_bytes("coffee"), content_type="image/jpeg")
    http_server.latency = 0.2
    urls = [http_server.url(f"/img/a.jpg?n={n}") for n in range(24)]
    (tmp_path / "m.csv").write_text("url\n" + "\n".join(urls) + "\n")
    common = ["images", str(tmp_path / "m.csv"), "--model", tiny_captioner, "--max-new-tokens", "2", "--quiet",
              "--workers", "1"]
    code, output = run_cli(*common, "-o", str(tmp_path / "a.parquet"), "--fetch-workers", "8")
    assert code == 0, output
    assert [r["status"] for r in rows_of(tmp_path / "a.parquet")] == ["ok"] * 24
    assert http_server.max_in_flight >= 6  # not 1: the decode thread does not do the downloading
    http_server.reset()
    code, output = run_cli(*common, "-o", str(tmp_path / "b.parquet"), "--fetch-workers", "8", "--per-host", "2")
    assert code == 0, output
    assert http_server.max_in_flight == 2


def test_references_metrics_and_lvis_layout(tiny_captioner, tmp_path, photos):
    """A parquet like the LVIS GPT-4V captions (url + caption + short_caption): references scored."""
    table = pa.table({
        "url": [str(photos / "astronaut.jpg"), str(photos / "coffee.png"), str(photos / "more/chelsea.webp"),
                str(photos / "missing.jpg")],
        "caption": ["an astronaut in a space suit", "a cup of coffee on a plate", "a cat sitting on a table",
                    "nothing"],
        "short_caption": ["astronaut", "coffee", "cat", "none"],
    })
    pq.write_table(table, tmp_path / "lvis.parquet")
    out = tmp_path / "o.parquet"
    code, output = run_cli("images", str(tmp_path / "lvis.parquet"), "-o", str(out), "--model", tiny_captioner)
    assert code == 3, output
    rows = rows_of(out)
    assert [r["references"] for r in rows] == [[c] for c in table.column("caption").to_pylist()]
    assert [r["short_caption"] for r in rows] == ["astronaut", "coffee", "cat", "none"]
    ok = rows[:3]
    corpus, per_row = caption_metrics([r["caption"] for r in ok], [r["references"] for r in ok])
    for r, scores in zip(ok, per_row):
        for name in ("bleu_4", "rouge_l", "cider_d"):
            assert r[name] == pytest.approx(scores[name], abs=1e-6)
    assert rows[3]["status"] == "fetch_error" and rows[3]["cider_d"] is None
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["cider_d"] == pytest.approx(corpus["cider_d"], abs=1e-6) and summary["scored_rows"] == 3
    # several reference columns give several references per image
    out2 = tmp_path / "o2.parquet"
    code, output = run_cli("images", str(tmp_path / "lvis.parquet"), "-o", str(out2), "--model", tiny_captioner,
                           "--reference-column", "caption", "--reference-column", "short_caption")
    assert [len(r["references"]) for r in rows_of(out2)] == [2, 2, 2, 2]


def test_hf_datasets_image_layout(tiny_captioner, tmp_path):
    table = pa.table({"image": [{"bytes": photo_bytes("coffee"), "path": "coffee.jpg"},
                                {"bytes": b"junk", "path": "junk.jpg"}], "text": ["a cup", "junk"]})
    pq.write_table(table, tmp_path / "hf.parquet")
    result = caption_images(str(tmp_path / "hf.parquet"), str(tmp_path / "o.parquet"), model=tiny_captioner,
                            quiet=True)
    rows = rows_of(result.output)
    assert [(r["source"], r["status"]) for r in rows] == [("coffee.jpg", "ok"), ("junk.jpg", "decode_error")]
    assert rows[0]["references"] == ["a cup"]


def test_captions_where_auto_image_processor_wants_torchvision(tiny_captioner, photos, tmp_path, monkeypatch):
    """transformers 5.17's AutoImageProcessor raises ImportError without torchvision, even for processors
    with a PIL backend (every caption run failed at load there). The config's own class is loaded instead."""
    import transformers

    def wants_torchvision(*args, **kwargs):
        raise ImportError("AutoImageProcessor requires the Torchvision library but it was not found")

    try:
        monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", wants_torchvision)
    except ImportError:  # transformers 5.17 without torchvision: its AutoImageProcessor is such a placeholder
        pass
    out = tmp_path / "caps.parquet"
    code, output = run_cli("images", str(photos), "-o", str(out), "--model", tiny_captioner, "--batch-size", "2")
    assert code == 0, output
    assert [r["status"] for r in rows_of(out)] == ["ok"] * 3


def test_unparsable_exif_is_no_stderr_noise(tiny_captioner, tmp_path):
    """Pillow warns on stderr of EXIF it cannot parse ("Tag data larger than file", "Corrupt EXIF data");
    the pixels decode, the row is ok, and the CLI prints no library warning for it."""
    import subprocess
    import sys

    # one IFD entry (Make, ASCII) whose 64 bytes lie past the end of the EXIF block
    exif = (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01"
            b"\x01\x0f\x00\x02\x00\x00\x00\x40\x00\x00\x00\x1a\x00\x00\x00\x00")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "bad-exif.jpg", "JPEG", exif=exif)
    out = tmp_path / "caps.parquet"
    result = subprocess.run([sys.executable, "-m", "batchcap.cli", "images", str(folder), "-o", str(out),
                             "--model", tiny_captioner, "--device", "cpu"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONWARNINGS="default"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["status"] for r in rows_of(out)] == ["ok"]
    assert "Warning" not in result.stderr and "EXIF" not in result.stderr, result.stderr[-2000:]


def test_the_wrong_kind_of_model_is_one_clear_line(tiny_captioner, tiny_whisper, photos, tmp_path):
    # were: "AttributeError: 'dict' object has no attribute 'to_dict'" and a 5 KB list of model types
    from tests.conftest import write_audio

    code, output = run_cli("images", str(photos), "-o", str(tmp_path / "c.parquet"), "--model", tiny_whisper)
    assert code != 0 and "is a Whisper checkpoint: transcribe with batchcap audio" in output, output
    assert len(output.strip().splitlines()[-1]) < 300
    write_audio(tmp_path / "a.wav", 1.0)
    code, output = run_cli("audio", str(tmp_path / "a.wav"), "-o", str(tmp_path / "t.parquet"), "--model",
                           tiny_captioner)
    assert code != 0 and "is a vision-encoder-decoder checkpoint, not Whisper" in output, output
