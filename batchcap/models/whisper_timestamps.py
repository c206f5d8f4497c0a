"""Whisper's timestamp tokens -> segments, and the windows of one recording -> its text and segments.

With timestamps, Whisper writes ``<|0.00|> text <|2.40|><|2.40|> more text <|5.00|>``: each
segment's text sits between a start and an end token (steps of 20 ms from the window's start).
This module is pure (token ids in, dataclasses out) so it can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TIME_PRECISION = 0.02  # seconds per timestamp token step


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float | None = None


@dataclass
class Segment:
    start: float
    end: float
    text: str
    words: list[Word] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.words is None:
            d.pop("words")
        return d


@dataclass
class WindowResult:
    """One window's transcript: times in seconds from the recording's start."""

    offset_s: float
    duration_s: float
    text: str
    segments: list[Segment]


def split_timestamped(tokens: Sequence[int], *, timestamp_begin: int, special: Collection[int],
                      duration_s: float | None = None,
                      precision: float = TIME_PRECISION) -> list[tuple[float, float, list[int]]]:
    """One window's generated tokens cut at its times: ``(start_s, end_s, text token ids)`` per segment,
    before any clean-up (see ``parse_timestamped``)."""
    segments: list[tuple[float, float, list[int]]] = []
    pending: list[int] = []
    start: float | None = None
    last_time = 0.0
    for t in (int(x) for x in tokens):
        if t >= timestamp_begin:
            time = (t - timestamp_begin) * precision
            if pending:
                segments.append((start if start is not None else last_time, time, pending))
                pending = []
                start = None
            else:
                start = time
            last_time = time
        elif t not in special:
            pending.append(t)
    if pending:
        begin = start if start is not None else last_time
        segments.append((begin, max(begin, duration_s if duration_s is not None else last_time), pending))
    return segments


def unfinished_at(tokens: Sequence[int], *, timestamp_begin: int, eot_id: int,
                  precision: float = TIME_PRECISION) -> tuple[int, float] | None:
    """Where a window's transcript stopped short, as openai-whisper reads it to decide where to seek:
    ``(index, seconds)`` when the tokens (up to the end token) have a completed segment (a time
    pair) but do not end on a single closing time, i.e. the last segment is open, or the window ended
    on a new segment's start: everything from ``index`` on is dropped and the audio from ``seconds``
    on is to be decoded again. None when the transcript is complete (or has no time pair)."""
    body = [int(t) for t in tokens]
    if eot_id in body:
        body = body[:body.index(eot_id)]
    is_time = [t >= timestamp_begin for t in body]
    if len(body) >= 2 and is_time[-1] and not is_time[-2]:
        return None  # ends on the closing time of a finished segment
    pairs = [k for k in range(1, len(body)) if is_time[k] and is_time[k - 1]]
    if not pairs:
        return None
    cut = pairs[-1]  # the end time of the last finished segment is body[cut - 1]
    return cut, (body[cut - 1] - timestamp_begin) * precision


def parse_timestamped(tokens: Sequence[int], *, timestamp_begin: int, special: Collection[int],
                      decode: Callable[[list[int]], str], offset_s: float = 0.0,
                      duration_s: float | None = None, precision: float = TIME_PRECISION,
                      token_ids: list[list[int]] | None = None) -> tuple[str, list[Segment]]:
    """``(text, segments)`` of one window's generated tokens.

    Ids at or above ``timestamp_begin`` are times; ids in ``special`` (start of transcript, language,
    task, end of text) carry no text and are skipped. Text with no closing time (the window ended first) ends at
    ``duration_s``; text before any time starts at 0. Times are clamped to ``[0, duration_s]``,
    made non-decreasing, shifted by ``offset_s`` and rounded to milliseconds. ``token_ids``, when
    given, receives the text token ids of each kept segment (for word alignment).
    """
    out: list[Segment] = []
    previous_end = 0.0
    for begin, end, ids in split_timestamped(tokens, timestamp_begin=timestamp_begin, special=special,
                                             duration_s=duration_s, precision=precision):
        text = decode(ids)
        if not text.strip():
            continue
        if duration_s is not None:
            begin, end = min(begin, duration_s), min(end, duration_s)
        begin = max(begin, previous_end)
        end = max(end, begin)
        previous_end = end
        out.append(Segment(round(offset_s + begin, 3), round(offset_s + end, 3), text))
        if token_ids is not None:
            token_ids.append(ids)
    text = "".join(s.text for s in out).strip()
    for s in out:
        s.text = s.text.strip()
    return text, out


def shift_segment(segment: Segment, offset_s: float) -> Segment:
    """``segment`` (and its words) moved ``offset_s`` seconds later."""
    return map_segment(segment, lambda t, end: t + offset_s)


def map_segment(segment: Segment, to_time: Callable[[float, bool], float]) -> Segment:
    """``segment`` (and its words) with every start ``t`` at ``to_time(t, False)`` and every end at
    ``to_time(t, True)`` (a window's times placed in its recording), to the millisecond."""
    def start(t: float) -> float:
        return round(to_time(t, False), 3)

    def end(t: float) -> float:
        return round(to_time(t, True), 3)
    words = None if segment.words is None else [
        Word(start(w.start), end(w.end), w.word, w.probability) for w in segment.words]
    return Segment(start(segment.start), end(segment.end), segment.text, words)


def crosses(segment: Segment, joins: Sequence[float], tolerance: float = TIME_PRECISION) -> bool:
    """Whether ``segment`` reaches over one of ``joins`` (times where a window's joined pieces meet) by
    more than ``tolerance`` either side (a time that close to a join is placed at it: Window.recording_time,
    whose ``vad.JOIN_SNAP_S`` is this same step)."""
    return any(segment.start < j - tolerance and segment.end > j + tolerance for j in joins)


def split_at_joins(segment: Segment, joins: Sequence[float]) -> list[Segment]:
    """``segment`` cut at every join it reaches over, by its words: each word goes to the side its
    middle is on, a part keeps the text of its words and spans from its first word to its last (the
    segment's own start and end at the outer sides), never past a join. Whisper can write two
    utterances joined across a left-out pause as one segment; in the recording that segment would
    cover the whole pause. A segment without words, or over no join, is returned as it is; a part
    with no words is left out."""
    if not segment.words:
        return [segment]
    # words placed outside Whisper's segment (whisper_words.words_per_segment keeps them where they are
    # when it and they do not meet) widen it: the parts follow the words, never a zero-length one
    span = Segment(min(segment.start, segment.words[0].start), max(segment.end, segment.words[-1].end), segment.text)
    inside = sorted(j for j in joins if crosses(span, [j]))
    if not inside:
        return [segment]
    bounds = [span.start, *inside, span.end]
    groups: list[list[Word]] = [[] for _ in inside] + [[]]
    for w in segment.words:
        middle = (w.start + w.end) / 2
        groups[sum(1 for j in inside if middle >= j)].append(w)
    parts = []
    for k, words in enumerate(groups):
        if not words:
            continue
        low, high = bounds[k], bounds[k + 1]
        start = low if k == 0 else min(max(low, words[0].start), high)
        end = high if k == len(inside) else max(min(high, words[-1].end), start)
        kept = [Word(min(max(w.start, start), end), min(max(w.end, start), end), w.word, w.probability)
                for w in words]
        parts.append(Segment(round(start, 3), round(end, 3), "".join(w.word for w in words).strip(), kept))
    return parts


def whole_clip(text: str, duration_s: float, offset_s: float = 0.0) -> list[Segment]:
    """One segment for a transcript that came without times (e.g. sequential long-form text)."""
    text = text.strip()
    return [Segment(round(offset_s, 3), round(offset_s + duration_s, 3), text)] if text else []


def stitch(windows: Sequence[WindowResult]) -> tuple[str, list[Segment]]:
    """A recording's text and segments from its windows (in any order): sorted by time, texts
    joined with single spaces, segments kept inside their window (one that starts after the window's
    end is dropped) and non-overlapping."""
    texts: list[str] = []
    segments: list[Segment] = []
    previous_end = 0.0
    for w in sorted(windows, key=lambda w: w.offset_s):
        if w.text.strip():
            texts.append(w.text.strip())
        limit = w.offset_s + w.duration_s
        for s in w.segments:
            if s.start >= limit and limit > w.offset_s:  # past the window's audio: nothing was said there
                continue
            start = max(s.start, previous_end)
            end = max(min(s.end, limit), start)
            segments.append(Segment(round(start, 3), round(end, 3), s.text, s.words))
            previous_end = end
    return " ".join(texts), segments


def segments_to_rows(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in segments]


def parse_generate_output(out: Any, tokenizer: Any, generation_config: Any,
                          durations: Sequence[float]) -> list[tuple[str, list[Segment]]]:
    """``(text, segments)`` per clip from ``WhisperForConditionalGeneration.generate`` run with
    ``return_timestamps=True``: a tensor of token ids (clips up to 30 s), or the dict that
    sequential long-form decoding returns with ``return_segments=True`` (times already absolute)."""
    timestamp_begin = int(generation_config.no_timestamps_token_id) + 1
    eos = generation_config.eos_token_id
    special = set(tokenizer.all_special_ids) | set(eos if isinstance(eos, list) else [eos])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    if isinstance(out, Mapping) and out.get("segments") is not None:
        results = []
        for segs, duration in zip(out["segments"], durations):
            found: list[Segment] = []
            for seg in segs:
                ids = [int(t) for t in seg["tokens"].tolist()]
                text, inner = parse_timestamped(ids, timestamp_begin=timestamp_begin, special=special, decode=decode)
                if not text:
                    continue
                start, end = float(seg["start"]), float(seg["end"])
                found.append(Segment(round(start, 3), round(min(max(end, start), duration), 3), text))
            _, kept = stitch([WindowResult(0.0, duration, "", found)])
            results.append((" ".join(s.text for s in kept), kept))
        return results
    tokens = out["sequences"] if isinstance(out, Mapping) else out
    return [parse_timestamped([int(t) for t in row], timestamp_begin=timestamp_begin, special=special, decode=decode,
                              duration_s=duration)
            for row, duration in zip(tokens.tolist(), durations)]
