"""SRT / VTT / TXT / TSV / JSON writers, safe names, timestamp tokens -> segments, stitching."""

from __future__ import annotations

import json
import os
import re

import pytest

from batchcap.models.whisper_timestamps import Segment, WindowResult, parse_timestamped, stitch
from batchcap.subtitles import SubtitleOptions, SubtitleWriter, cues, format_timestamp, parse_formats, render, safe_name

SEGMENTS = [
    {"start": 0.0, "end": 2.4, "text": "Hello there."},
    {"start": 2.4, "end": 5.0, "text": "General --> Kenobi."},
    {"start": 3661.5, "end": 3663.25, "text": "An hour later."},
]

SRT_CUE = re.compile(r"^(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+)$", re.S)


def parse_srt(text: str) -> list[tuple[int, float, float, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        m = SRT_CUE.match(block)
        assert m, block
        g = m.groups()
        start = int(g[1]) * 3600 + int(g[2]) * 60 + int(g[3]) + int(g[4]) / 1000
        end = int(g[5]) * 3600 + int(g[6]) * 60 + int(g[7]) + int(g[8]) / 1000
        out.append((int(g[0]), start, end, g[9]))
    return out


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    assert text.startswith("WEBVTT\n\n")
    out = []
    for block in text[len("WEBVTT\n\n"):].strip().split("\n\n"):
        times, body = block.split("\n", 1)
        a, b = times.split(" --> ")

        def secs(t: str) -> float:
            parts = t.split(":")
            assert re.fullmatch(r"\d\d\.\d\d\d", parts[-1])
            return sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))
        out.append((secs(a), secs(b), body))
    return out


def test_timestamps_like_openai_whisper():
    assert format_timestamp(0) == "00:00.000"
    assert format_timestamp(3661.5, True, ",") == "01:01:01,500"
    assert format_timestamp(59.9996) == "01:00.000"  # rounds to the millisecond
    assert format_timestamp(7322.04) == "02:02:02.040"  # VTT shows hours once there are any


def test_srt_parses_back_numbered_monotonic():
    text = render("srt", "", SEGMENTS)
    cues_ = parse_srt(text)
    assert [c[0] for c in cues_] == [1, 2, 3]
    assert [(c[1], c[2]) for c in cues_] == [(0.0, 2.4), (2.4, 5.0), (3661.5, 3663.25)]
    assert cues_[1][3] == "General -> Kenobi."  # an arrow in the text cannot break the cue
    assert text.startswith("1\n00:00:00,000 --> 00:00:02,400\nHello there.\n\n2\n")
    starts = [c[1] for c in cues_]
    assert starts == sorted(starts) and all(c[1] <= c[2] for c in cues_)


def test_vtt_parses_back():
    text = render("vtt", "", SEGMENTS)
    parsed = parse_vtt(text)
    assert parsed[0] == (0.0, 2.4, "Hello there.")
    assert parsed[2][:2] == (3661.5, 3663.25)
    assert "\n00:00.000 --> 00:02.400\n" in text and "\n01:01:01.500 --> 01:01:03.250\n" in text


def test_txt_tsv_json():
    assert render("txt", "", SEGMENTS) == "Hello there.\nGeneral --> Kenobi.\nAn hour later.\n"
    assert render("tsv", "", SEGMENTS).splitlines()[:2] == ["start\tend\ttext", "0\t2400\tHello there."]
    data = json.loads(render("json", "Hello there. General", SEGMENTS, language="en"))
    assert data["text"] == "Hello there. General" and data["language"] == "en" and data["segments"][2]["end"] == 3663.25


def test_line_width_and_count_split_cues():
    seg = [{"start": 10.0, "end": 20.0, "text": "one two three four five six seven eight nine ten"}]
    out = list(cues(seg, SubtitleOptions(max_line_width=14, max_line_count=2)))
    assert all(len(line) <= 14 for _, _, t in out for line in t.split("\n"))
    assert all(t.count("\n") <= 1 for _, _, t in out)
    assert " ".join(t.replace("\n", " ") for _, _, t in out) == seg[0]["text"]
    assert out[0][0] == 10.0 and out[-1][1] == pytest.approx(20.0)
    assert all(a[1] <= b[0] + 1e-9 for a, b in zip(out, out[1:]))
    # with word times, a new cue starts at its first word
    words = [{"start": 10.0 + i, "end": 10.5 + i, "word": w} for i, w in enumerate(seg[0]["text"].split())]
    out = list(cues([dict(seg[0], words=words)], SubtitleOptions(max_line_width=14, max_line_count=1)))
    assert out[0][2] == "one two three" and out[1][0] == 13.0  # "four" (the 4th word) starts the next cue
    # only a width: lines wrapped, one cue per segment
    out = list(cues(seg, SubtitleOptions(max_line_width=20)))
    assert len(out) == 1 and out[0][2].count("\n") == 2


def test_split_cues_follow_words_that_are_not_the_text_s_space_separated_words():
    """Whisper writes "inter-astroisk" and "28.8" as two words each (" inter" + "-astroisk"): the word count no
    longer matched the text's, so a split cue was timed by its share of characters and ended at 31.677, before
    its last word ("connection", 31.68-32.24) was said. Words are matched to the text by their characters."""
    words = [(" you", 25.26, 25.34), (" can", 25.34, 25.62), (" dial", 25.62, 25.92), (" 502", 25.92, 27.54),
             (" to", 27.54, 27.64), (" attempt", 27.64, 28.04), (" an", 28.04, 28.42), (" inter", 28.42, 28.8),
             ("-astroisk", 28.8, 29.44), (" exchange", 29.44, 30.14), (" or", 30.14, 30.86), (" IAX", 30.86, 31.68),
             (" connection", 31.68, 32.24), (" to", 32.24, 32.76), (" a", 32.76, 33.22),
             (" demonstration", 33.22, 33.62), (" server", 33.62, 34.14), (" at", 34.14, 34.36),
             (" 28", 34.36, 34.6), (".8.", 34.6, 34.84)]
    seg = {"start": 25.26, "end": 34.84, "text": "".join(w for w, _, _ in words).strip(),
           "words": [{"word": w, "start": a, "end": b} for w, a, b in words]}
    out = list(cues([seg], SubtitleOptions(max_line_width=42, max_line_count=2)))
    assert [(a, b) for a, b, _ in out] == [(25.26, 32.24), (32.24, 34.84)]
    assert out[0][2].endswith("connection") and out[1][2] == "to a demonstration server at 28.8."


@pytest.mark.parametrize("hostile", ["../../x", "/etc/passwd", "..", ".", "a/../../b", "C:\\Windows\\x.wav",
                                     "con", "x\x00y", "", "a" * 400, ".hidden", "name."])
def test_safe_names_never_leave_the_folder(tmp_path, hostile):
    name = safe_name(hostile)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".") and len(name.encode()) <= 200
    writer = SubtitleWriter(str(tmp_path / "subs"), ["srt"])
    (path,) = writer.write(hostile, "hi", [{"start": 0, "end": 1, "text": "hi"}])
    assert os.path.dirname(os.path.realpath(path)) == os.path.realpath(tmp_path / "subs")
    assert os.listdir(tmp_path) == ["subs"]


def test_safe_names_are_unique_and_readable():
    ids = ["a/1.wav", "b/1.wav", "1.wav", "1", "1~", "a_1", "a/1", "calls/é t.mp3", "x#2", "x#3"]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert safe_name("call_0001") == "call_0001" and safe_name("1.wav") == "1.wav"
    assert safe_name("/data/calls/a.wav").startswith("a~")
    assert safe_name("a/1.wav") == safe_name("a/1.wav")  # deterministic, so resumes find their files


def test_writer_keeps_existing_files_unless_overwriting(tmp_path):
    writer = SubtitleWriter(str(tmp_path), ["srt", "txt"], overwrite=False)
    assert len(writer.write("x", "a", [{"start": 0, "end": 1, "text": "a"}])) == 2
    assert writer.write("x", "b", [{"start": 0, "end": 1, "text": "b"}]) == []
    assert (tmp_path / "x.txt").read_text() == "a\n"
    writer.write("x", "b", [{"start": 0, "end": 1, "text": "b"}], overwrite=True)
    assert (tmp_path / "x.txt").read_text() == "b\n"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_parse_formats():
    assert parse_formats("srt, VTT,srt") == ("srt", "vtt")
    assert parse_formats("all") == ("srt", "vtt", "txt", "tsv", "json")
    with pytest.raises(ValueError, match="unknown subtitle format 'doc'"):
        parse_formats("srt,doc")


# --- timestamp tokens -------------------------------------------------------------------------
TB, EOT = 1000, 900  # timestamp_begin, end of text
SPECIAL = {EOT, 950, 951}  # end of text, start of transcript, a language
VOCAB = {1: " Hello", 2: " there.", 3: " How", 4: " are", 5: " you?"}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def ts(seconds: float) -> int:
    return TB + round(seconds / 0.02)


def test_parse_timestamped_segments_with_offset():
    tokens = [950, 951, ts(0), 1, 2, ts(2.4), ts(2.4), 3, 4, 5, ts(5.0), EOT]
    text, segs = parse_timestamped(tokens, timestamp_begin=TB, special=SPECIAL, decode=decode, offset_s=60.0,
                                   duration_s=8.0)
    assert text == "Hello there. How are you?"
    assert [(s.start, s.end, s.text) for s in segs] == [(60.0, 62.4, "Hello there."), (62.4, 65.0, "How are you?")]


def test_parse_timestamped_unfinished_and_untimed():
    # the last segment has no end (the window ran out): it ends with the window
    text, segs = parse_timestamped([ts(1.0), 1, 2, ts(3.0), ts(3.2), 3, 4], timestamp_begin=TB, special=SPECIAL,
                                   decode=decode, duration_s=6.5)
    assert [(s.start, s.end) for s in segs] == [(1.0, 3.0), (3.2, 6.5)]
    # no times at all (e.g. a model that skipped them): one segment over the window
    text, segs = parse_timestamped([1, 2, EOT], timestamp_begin=TB, special=SPECIAL, decode=decode, duration_s=4.0)
    assert text == "Hello there." and [(s.start, s.end) for s in segs] == [(0.0, 4.0)]
    # times past the window are clamped; times going backwards are made monotonic
    _, segs = parse_timestamped([ts(3.0), 1, ts(9.0), ts(1.0), 2, ts(2.0)], timestamp_begin=TB, special=SPECIAL,
                                decode=decode, duration_s=5.0)
    assert [(s.start, s.end) for s in segs] == [(3.0, 5.0), (5.0, 5.0)]


def test_stitch_orders_windows_and_joins_text():
    w2 = WindowResult(40.0, 10.0, "Second.", [Segment(41.0, 45.0, "Second.")])
    w1 = WindowResult(0.0, 30.0, " First one. ", [Segment(0.5, 2.0, "First"), Segment(2.0, 31.0, "one.")])
    empty = WindowResult(31.0, 5.0, "", [])
    text, segs = stitch([w2, empty, w1])
    assert text == "First one. Second."
    assert [(s.start, s.end) for s in segs] == [(0.5, 2.0), (2.0, 30.0), (41.0, 45.0)]
