"""Inputs against hostile folders and manifests: symlink loops, bad bytes, bad JSON lines (issue #11)."""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from batchcap.fetch import FetchConfig, Fetcher
from batchcap.inputs import Inputs, audio_spec, image_spec
from batchcap.items import FETCH_ERROR, OK
from tests.helpers import rows_of, run_cli
from tests.httpserver import LoopbackServer


def png(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, "PNG")
    return buf.getvalue()


def sources(inputs: Inputs, limit: int = 1000) -> list[str]:
    return [item.source for item in itertools.islice(inputs, limit)]


# -- directory walks --------------------------------------------------------------------------------


def test_symlink_loop_is_walked_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "a" / "parent").symlink_to(tmp_path, target_is_directory=True)  # a -> .. -> a -> ...
    inputs = Inputs([str(tmp_path)], image_spec())
    assert sources(inputs) == [str(tmp_path / "a" / "x.png")]  # once, not 41 times
    assert inputs.estimate() == 1


def test_two_symlink_loops_end(tmp_path: Path) -> None:
    # Two links back to the top double the tree at every level: the walk never ended.
    (tmp_path / "x.png").write_bytes(b"x")
    (tmp_path / "loop1").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "loop2").symlink_to(tmp_path, target_is_directory=True)
    inputs = Inputs([str(tmp_path)], image_spec())
    assert sources(inputs) == [str(tmp_path / "x.png")]
    assert inputs.estimate() == 1


def test_file_reached_through_links_is_one_item(tmp_path: Path) -> None:
    real = tmp_path / "data" / "real"
    real.mkdir(parents=True)
    (real / "a.png").write_bytes(b"a")
    (real / "b.png").write_bytes(b"b")
    (tmp_path / "data" / "view").symlink_to(real, target_is_directory=True)  # the same folder twice
    (real / "c.png").symlink_to(real / "a.png")  # the same file twice
    (real / "broken.png").symlink_to(tmp_path / "gone.png")  # kept: its row says the file is missing
    inputs = Inputs([str(tmp_path / "data"), str(real)], image_spec())
    assert sources(inputs) == [str(real / "a.png"), str(real / "b.png"), str(real / "broken.png")]
    assert inputs.estimate() == 3


# -- manifests ----------------------------------------------------------------------------------------


def test_csv_bad_byte_after_the_first_8_kib_is_one_row(tmp_path: Path) -> None:
    lines = [f"f{i:04d}.wav,reference number {i} {'x' * 60}\n".encode() for i in range(200)]
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("\ufeffpath,text\n".encode() + b"".join(lines[:150]) + b"caf\xe9.wav,bad\n"
                         + b"".join(lines[150:]) + 'b.wav,"two\nlines: \u00e9"\n'.encode())
    assert len(b"".join(lines[:150])) > 8192
    items = list(Inputs([str(manifest)], audio_spec()))
    assert len(items) == 202
    bad = items[150]
    assert (bad.id, bad.source, bad.extra) == ("m.csv line 152", "m.csv line 152", {})
    assert bad.error == ("manifest m.csv line 152: not valid UTF-8 (byte 0xE9 in column 'path'); "
                         "save the manifest as UTF-8")
    assert [i.error for i in items if i is not bad] == [None] * 201
    assert items[151].source == str(tmp_path / "f0150.wav")
    assert items[151].references[0].startswith("reference number 150 ")
    assert items[-1].references == ["two\nlines: \u00e9"]
    with Fetcher(FetchConfig()) as fetcher:
        res = fetcher.fetch(bad)
    assert (res.status, res.error) == (FETCH_ERROR, bad.error)


def test_jsonl_lines_that_are_not_objects_are_rows(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'[1, 2]\n{"path": "a.wav", "text": "hi", "speaker": "s1"}\nnot json\n\n"text"\n'
                         b'{"path": "b\xff.wav"}\n{"path": "c.wav", "text": "yo", "speaker": "s2"}\n')
    items = list(Inputs([str(manifest)], audio_spec()))
    assert [(i.id, i.error) for i in items] == [
        ("m.jsonl line 1", "manifest m.jsonl line 1: not a JSON object (a list)"),
        (str(tmp_path / "a.wav"), None),
        ("m.jsonl line 3", "manifest m.jsonl line 3: not valid JSON (Expecting value at column 1)"),
        ("m.jsonl line 5", "manifest m.jsonl line 5: not a JSON object (a str)"),
        ("m.jsonl line 6", "manifest m.jsonl line 6: not valid UTF-8 (byte 0xFF at column 12); "
                           "save the manifest as UTF-8"),
        (str(tmp_path / "c.wav"), None),
    ]
    assert items[0].extra == {"speaker": None} and items[5].extra == {"speaker": "s2"}
    assert Inputs([str(manifest)], audio_spec()).estimate() == 7


def test_csv_header_that_is_not_utf8_fails_the_run_in_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"p\xe4th\na.png\n")
    code, output = run_cli("images", str(manifest), "-o", str(tmp_path / "o.csv"), "--model", str(tmp_path))
    assert code == 1
    assert output.strip() == (f"Error: cannot read manifest {manifest}: its header line is not valid UTF-8 "
                              "(save the manifest as UTF-8)")


def test_hostile_manifest_end_to_end(tiny_captioner: str, tmp_path: Path) -> None:
    """--root, --block-private-addresses and bad manifest lines through the CLI: a row for every line."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png("blue"))
    with LoopbackServer() as server:
        url = server.add("/a.png", png("green"), "image/png")
        manifest = data / "m.jsonl"
        manifest.write_bytes(b"\n".join([
            json.dumps({"path": "ok.png", "note": "fine"}).encode(),
            json.dumps({"path": "../outside.png", "note": "climbs out"}).encode(),
            json.dumps({"path": str(tmp_path / "outside.png"), "note": "absolute"}).encode(),
            json.dumps({"path": url, "note": "loopback"}).encode(),
            b'{"path": "ok.png", "note": broken}',
            b"[]",
        ]) + b"\n")
        out = tmp_path / "o.parquet"
        code, output = run_cli("images", str(manifest), "-o", str(out), "--model", tiny_captioner,
                               "--max-new-tokens", "2", "--root", str(data), "--block-private-addresses",
                               "--fetch-deadline", "5", raise_errors=True)
        assert server.hits["/a.png"] == 0
    assert code == 3, output
    rows = {r["id"]: r for r in rows_of(out)}
    assert [(r["status"], r["error"], r["note"]) for r in rows.values()] == [
        (OK, None, "fine"),
        (FETCH_ERROR, f"outside --root {data}: {data / '..' / 'outside.png'}", "climbs out"),
        (FETCH_ERROR, f"outside --root {data}: {tmp_path / 'outside.png'}", "absolute"),
        (FETCH_ERROR, "refused: 127.0.0.1 resolves to a private address (--block-private-addresses)", "loopback"),
        (FETCH_ERROR, "manifest m.jsonl line 5: not valid JSON (Expecting value at column 28)", None),
        (FETCH_ERROR, "manifest m.jsonl line 6: not a JSON object (a list)", None),
    ]
    assert rows[url]["http_status"] is None
    # the library takes the same settings through FetchConfig
    from batchcap import caption_images

    lib_out = tmp_path / "lib.parquet"
    caption_images(str(manifest), str(lib_out), model=tiny_captioner, max_new_tokens=2, quiet=True,
                   fetch=FetchConfig(root=str(data), block_private=True, deadline=5.0))
    assert [(r["status"], r["error"]) for r in rows_of(lib_out)] == [
        (r["status"], r["error"]) for r in rows.values()]


@pytest.mark.parametrize(("name", "eol"), [("m.csv", "\n"), ("m.tsv", "\n"), ("m.csv", "\r\n"), ("m.csv", "\r")])
def test_csv_rows_as_before(tmp_path: Path, name: str, eol: str) -> None:
    sep = "\t" if name.endswith(".tsv") else ","
    manifest = tmp_path / name
    manifest.write_bytes((sep.join(["path", "text", "extra"]) + eol + sep.join(["a.wav", "hi", "1", "", " "])
                          + eol + eol + "b.wav" + eol + sep.join(["c.wav", "hi", "there", "1"]) + eol).encode())
    items = list(Inputs([str(manifest)], audio_spec()))
    assert [(i.source, i.references, i.extra, i.error) for i in items] == [
        (str(tmp_path / "a.wav"), ["hi"], {"extra": "1"}, None),  # empty cells past the header are nothing
        (str(tmp_path / "b.wav"), [], {"extra": None}, None),
        # a cell with an unquoted comma shifts the rest: its row says so, rather than score a cut reference
        (f"{name} line 5", [], {"extra": None},
         f"manifest {name} line 5: 4 fields where the header has 3 (a comma inside a cell that is not quoted?); "
         "quote such cells"),
    ]


def test_carried_columns_never_overwrite_each_other(tmp_path: Path) -> None:
    # `status` is an output column (carried as input_status), but the manifest has its own input_status;
    # and a repeated header name: every value must survive under a name of its own
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,status,input_status,a,a\nx,a.wav,S,IS,A1,A2\n", encoding="utf-8")
    spec = audio_spec()
    spec.reserved = ("status", "error", "text")
    (item,) = list(Inputs([str(manifest)], spec))
    assert item.extra == {"input_status_2": "S", "input_status": "IS", "a": "A1", "a_2": "A2"}


def test_repeated_columns_end_to_end(tiny_whisper: str, tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,status,a,a\na.wav,S,A1,A2\n", encoding="utf-8")
    code, output = run_cli("audio", manifest, "-o", tmp_path / "out.parquet", "--model", tiny_whisper)
    assert code == 0, output
    (row,) = rows_of(str(tmp_path / "out.parquet"))
    assert (row["input_status"], row["a"], row["a_2"]) == ("S", "A1", "A2")


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"not json\n[1]\n"])
def test_manifest_without_columns_is_one_clear_line(tmp_path: Path, content: bytes) -> None:
    from batchcap.items import FatalError

    manifest = tmp_path / ("m.jsonl" if content.startswith(b"not") else "m.csv")
    manifest.write_bytes(content)
    with pytest.raises(FatalError, match=r"m\.(csv|jsonl): no columns \(an empty file"):
        list(Inputs([str(manifest)], audio_spec()))


def test_repeated_ids_get_numbers_that_no_other_row_has(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nx,a.wav\nx,b.wav\nx#2,c.wav\nX,d.wav\nx,e.wav\n", encoding="utf-8")
    ids = [i.id for i in Inputs([str(manifest)], audio_spec())]
    assert ids == ["x", "x#2", "x#2#2", "X", "x#3"]  # ids are case-sensitive, unlike column names


def test_a_quote_never_closed_stops_the_run_instead_of_swallowing_rows(tmp_path: Path) -> None:
    # the csv module read everything after a stray quote as one field: 4 lines gave 2 rows, silently
    from batchcap.items import FatalError

    manifest = tmp_path / "m.csv"
    manifest.write_text('path,reference\na.wav,one\n"b.wav,two\nc.wav,three\nd.wav,four\n', encoding="utf-8")
    with pytest.raises(FatalError, match=r"m\.csv line 3: a quoted field is never closed"):
        list(Inputs([str(manifest)], audio_spec()))
    # quoted fields over several lines are still fine, and a quote inside an unquoted field is text
    manifest.write_text('path,reference\na.wav,"one\ntwo"\nb.wav,he said "hi"\n', encoding="utf-8")
    rows = [(i.source.rsplit("/", 1)[-1], i.references) for i in Inputs([str(manifest)], audio_spec())]
    assert rows == [("a.wav", ["one\ntwo"]), ("b.wav", ['he said "hi"'])]


def test_a_file_named_twice_or_also_inside_a_given_folder_is_one_item(tmp_path):
    folder = tmp_path / "calls"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        (folder / name).write_bytes(b"RIFF")
    a = str(folder / "a.wav")
    for sources in ([str(folder), a], [a, str(folder)], [a, a, str(tmp_path / "calls" / ".." / "calls" / "a.wav")]):
        items = list(Inputs(sources, audio_spec()))
        names = sorted(os.path.basename(item.source) for item in items)
        assert names == (["a.wav"] if len(sources) == 3 else ["a.wav", "b.wav"]), sources
        assert all("#" not in item.id for item in items)
    # a missing file is still its own row (fetch says it is missing), however often it is named
    missing = str(tmp_path / "gone.wav")
    assert len(list(Inputs([missing, missing], audio_spec()))) == 2
