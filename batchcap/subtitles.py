"""Subtitle and text files from transcripts with segments: SRT, WebVTT, TXT, TSV and JSON.

The formats are openai-whisper's: SRT cues numbered from 1 with ``HH:MM:SS,mmm`` times, WebVTT
with a ``WEBVTT`` header and ``MM:SS.mmm`` times (hours when there are any), TXT one segment per
line, TSV ``start\\tend\\ttext`` in integer milliseconds, JSON ``{"text", "segments", "language"}``.

``max_line_width`` wraps a cue's text at word boundaries; ``max_line_count`` then starts a new cue
once a cue has that many lines. Where segments carry word times the new cue starts at its first
word's time; otherwise the segment's time is shared among its cues by their share of characters
(openai-whisper applies these options only with word timestamps).

File names come from item ids (:func:`safe_name`): no directories, no traversal, unique per id.
Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .fsutil import atomic_write

FORMATS = ("srt", "vtt", "txt", "tsv", "json")

_SAFE_CHARS = re.compile(r"[^\w\-. ,+=@()\[\]]", re.UNICODE)
_SAFE_ID = re.compile(r"^[\w\-][\w\-. ,+=@()\[\]]*$", re.UNICODE)
_MAX_NAME_BYTES = 180  # leaves room for the hash and the extension under the usual 255-byte limit
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


@dataclass
class SubtitleOptions:
    max_line_width: int | None = None
    max_line_count: int | None = None


def parse_formats(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"srt,vtt"`` or ``["srt", "vtt"]`` (or ``all``) -> ``("srt", "vtt")``; ValueError if unknown."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item == "all":
            out.extend(f for f in FORMATS if f not in out)
            continue
        if item not in FORMATS:
            raise ValueError(f"unknown subtitle format {item!r}: use {', '.join(FORMATS)} or all")
        if item not in out:
            out.append(item)
    return tuple(out)


def safe_name(item_id: str) -> str:
    """A file name (without extension) for ``item_id``: the id itself when it is a plain name,
    else its last path component (extension dropped, unsafe characters replaced) plus ``~`` and a
    hash of the whole id. ``~`` never occurs in a plain name, so two ids never share a name."""
    item_id = str(item_id)
    normalized = unicodedata.normalize("NFC", item_id)
    if (normalized == item_id and _SAFE_ID.match(item_id) and not item_id.endswith((".", " "))
            and len(item_id.encode()) <= _MAX_NAME_BYTES and item_id.split(".")[0].lower() not in _RESERVED):
        return item_id
    last = re.split(r"[\\/]", item_id.rstrip("/\\"))[-1]
    stem = os.path.splitext(last)[0] if "." in last.lstrip(".") else last
    stem = _SAFE_CHARS.sub("_", unicodedata.normalize("NFC", stem)).strip(". ")
    stem = stem.encode()[:_MAX_NAME_BYTES].decode(errors="ignore") or "item"
    digest = hashlib.sha1(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem}~{digest}"


def default_subtitle_dir(output: str) -> str:
    """Where a run writing ``output`` puts its subtitle files by default: ``OUT.parquet`` -> ``OUT.subtitles``."""
    return os.path.splitext(output)[0] + ".subtitles"


def subtitle_path(directory: str, item_id: str, fmt: str) -> str:
    return os.path.join(directory, f"{safe_name(item_id)}.{fmt}")


# --- times ------------------------------------------------------------------------------------
def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


# --- cues -------------------------------------------------------------------------------------
def _seg(s: Any) -> dict[str, Any]:
    return s if isinstance(s, Mapping) else s.to_dict()


def cues(segments: Iterable[Any], options: SubtitleOptions | None = None) -> Iterator[tuple[float, float, str]]:
    """``(start, end, text)`` of each cue: one per segment, or more where lines are limited."""
    options = options or SubtitleOptions()
    for raw in segments:
        seg = _seg(raw)
        text = " ".join(str(seg.get("text") or "").split()).replace("-->", "->")
        if not text:
            continue
        start, end = float(seg["start"]), float(seg["end"])
        if not options.max_line_width:
            yield start, end, text
            continue
        words = seg.get("words") or None
        lines = _wrap(text, options.max_line_width)
        per_cue = options.max_line_count or len(lines)
        groups = [lines[i:i + per_cue] for i in range(0, len(lines), per_cue)]
        if len(groups) == 1:
            yield start, end, "\n".join(groups[0])
            continue
        yield from _timed_groups(groups, start, end, words)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


def _timed_groups(groups: list[list[str]], start: float, end: float,
                  words: list[Any] | None) -> Iterator[tuple[float, float, str]]:
    counts = [sum(len(line.split()) for line in g) for g in groups]
    if words and len(words) == sum(counts):
        i = 0
        for g, n in zip(groups, counts):
            first, last = _seg(words[i]), _seg(words[i + n - 1])
            yield float(first["start"]), float(last["end"]), "\n".join(g)
            i += n
        return
    spans = _group_words(groups, words) if words else None
    if spans is not None:  # words that split a text word ("inter" + "-astroisk", "28" + ".8"): by characters
        for g, (a, b) in zip(groups, spans):
            yield float(_seg(words[a])["start"]), float(_seg(words[b])["end"]), "\n".join(g)
        return
    chars = [sum(len(line) for line in g) for g in groups]
    total = sum(chars) or 1
    t = start
    for g, c in zip(groups, chars):
        nxt = t + (end - start) * c / total
        yield round(t, 3), round(nxt, 3), "\n".join(g)
        t = nxt


def _group_words(groups: list[list[str]], words: list[Any]) -> list[tuple[int, int]] | None:
    """Each group's first and last word, matched by the characters of the text (spaces left out), where
    Whisper's words make up the text but are not its space-separated words; None where they do not match."""
    import bisect

    spelled = ["".join(str(_seg(w).get("word") or "").split()) for w in words]
    sizes = [sum(len("".join(line.split())) for line in g) for g in groups]
    if "".join(spelled) != "".join("".join(line.split()) for g in groups for line in g) or not all(sizes):
        return None
    ends, total = [], 0
    for word in spelled:
        total += len(word)
        ends.append(total)
    spans, at = [], 0
    for size in sizes:
        spans.append((bisect.bisect_right(ends, at), bisect.bisect_right(ends, at + size - 1)))
        at += size
    return spans


# --- formats ----------------------------------------------------------------------------------
def render(fmt: str, text: str, segments: Sequence[Any], *, language: str | None = None,
           options: SubtitleOptions | None = None) -> str:
    segs = [_seg(s) for s in segments or []]
    if fmt == "srt":
        out = []
        for i, (a, b, t) in enumerate(cues(segs, options), start=1):
            out.append(f"{i}\n{format_timestamp(a, True, ',')} --> {format_timestamp(b, True, ',')}\n{t}\n")
        return "\n".join(out)
    if fmt == "vtt":
        out = ["WEBVTT\n"]
        for a, b, t in cues(segs, options):  # cue text is markup in WebVTT: "1 < 2" would open a tag
            t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            out.append(f"{format_timestamp(a)} --> {format_timestamp(b)}\n{t}\n")
        return "\n".join(out)
    if fmt == "txt":
        return "".join(f"{_one_line(s.get('text'))}\n" for s in segs)
    if fmt == "tsv":
        lines = ["start\tend\ttext"]
        for s in segs:
            text = _one_line(s.get("text"))
            lines.append(f"{round(1000 * float(s['start']))}\t{round(1000 * float(s['end']))}\t{text}")
        return "\n".join(lines) + "\n"
    if fmt == "json":
        clean = [{k: _plain(v) for k, v in s.items()} for s in segs]
        return json.dumps({"text": text or "", "segments": clean, "language": language}, ensure_ascii=False)
    raise ValueError(f"unknown subtitle format {fmt!r}")


def _one_line(text: Any) -> str:
    """A segment's text on one line: tabs, newlines and carriage returns (which split a TSV or TXT line) as
    single spaces."""
    return " ".join(str(text or "").split())


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class SubtitleWriter:
    """Writes the chosen formats for each finished row into ``directory``."""

    def __init__(self, directory: str, formats: Sequence[str], options: SubtitleOptions | None = None,
                 overwrite: bool = True):
        self.directory = directory
        self.formats = tuple(formats)
        self.options = options or SubtitleOptions()
        self.overwrite = overwrite
        self.written = 0
        self.kept = 0
        from . import storage

        self._exists = storage.exists  # an object store's prefix needs no folder (a local "s3:/..." tree was made)
        if storage.is_remote(directory):
            return
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(f"{directory} is a file, not a folder for subtitle files")
        os.makedirs(directory, exist_ok=True)

    def paths(self, item_id: str) -> dict[str, str]:
        return {fmt: subtitle_path(self.directory, item_id, fmt) for fmt in self.formats}

    def write(self, item_id: str, text: str | None, segments: Sequence[Any] | None,
              language: str | None = None, *, overwrite: bool | None = None) -> list[str]:
        """Write every format for one item; existing files are kept unless overwriting."""
        overwrite = self.overwrite if overwrite is None else overwrite
        written = []
        for fmt, path in self.paths(item_id).items():
            if not overwrite and self._exists(path):
                self.kept += 1
                continue
            atomic_write(path, render(fmt, text or "", list(segments or []), language=language,
                                      options=self.options))
            written.append(path)
            self.written += 1
        return written


def row_segments(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A result row's segments: the ``segments`` column (a list, or JSON text as in CSV output),
    else one segment of the whole text over ``duration_s`` (tables written before segments)."""
    segs = row.get("segments")
    if isinstance(segs, str):
        segs = json.loads(segs) if segs.strip() else []
    if segs:
        return [dict(s) for s in segs]
    text = (row.get("text") or "").strip()  # no segments (or none kept): the whole text, where it can be timed
    duration = row.get("duration_s")
    if not text or duration is None:
        return []
    return [{"start": 0.0, "end": float(duration), "text": text}]
