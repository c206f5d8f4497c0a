"""Batched long-form transcription: recordings over 30 s as VAD windows batched with short clips.

A long recording is decoded and split into windows of at most 24 s at pauses (``vad.py``) in a
worker thread; its features are NOT computed there. :func:`transcribe_units` then treats every
short clip and every window of every long recording in a model batch as one unit, sorts the
units by duration (longest first), and runs them through the model ``batch_size`` at a time; a window's log-mel
features are computed just before its sub-batch runs (the next sub-batch's in a helper thread
while the model works) and dropped right after, so at most two sub-batches of window features
are alive, whatever the recordings' lengths. Each recording's text and segments are stitched
back from its windows in time order.

Languages: every window detects its own (a recording may switch languages), but sub-batches run
longest first, and a window whose own detection is unsure (a short utterance between long pauses, as
in calls) takes the language of most of its recording's confidently detected windows so far, as
``Prepared.language_prior``, instead of detecting again. A recording's ``language`` is the language of
most of its speech.

:data:`FEATURES` counts the window feature arrays alive (and the peak), for tests and logs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .memory import release_free_heap
from .models.whisper_timestamps import WindowResult, map_segment, stitch
from .vad import SAMPLE_RATE, Window

log = logging.getLogger(__name__)


class FeatureCounter:
    """Window feature arrays alive now, the most alive at once, and how many were made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.alive = 0
        self.peak = 0
        self.made = 0

    def acquire(self, n: int = 1) -> None:
        with self._lock:
            self.alive += n
            self.made += n
            self.peak = max(self.peak, self.alive)

    def release(self, n: int = 1) -> None:
        with self._lock:
            self.alive -= n

    def reset(self) -> None:
        with self._lock:
            self.peak = self.alive
            self.made = 0


FEATURES = FeatureCounter()


@dataclass
class LongRecording:
    """A recording over 30 s, decoded and split, waiting for the model (no features yet)."""

    samples: np.ndarray
    windows: list[Window]
    duration_s: float
    long_form: bool = False  # not transformers' sequential long-form: windows are short clips
    language: str | None = None  # the recording's language when the manifest gives it

    @property
    def speech_s(self) -> float:
        return sum(w.duration_s for w in self.windows)


@dataclass
class _Unit:
    owner: int  # index in the model batch
    window: Window | None  # None: a short clip, prepared already
    prepared: Any = None
    duration_s: float = 0.0


@dataclass
class _Assembly:
    windows: list[WindowResult] = field(default_factory=list)
    languages: Counter = field(default_factory=Counter)  # seconds of windows per language
    sure: Counter = field(default_factory=Counter)  # ... of windows detected confidently in it
    decodes: list[tuple[Any, bool]] = field(default_factory=list)  # (decode, wrote text) per window
    scored: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (seconds, result) per window

    def language_so_far(self) -> str | None:
        """The language of most of the recording's confidently detected windows so far (None: none yet)."""
        return self.sure.most_common(1)[0][0] if self.sure else None


def transcribe_units(transcriber: Any, batch: Sequence[Any], batch_size: int,
                     worst_decode: Callable[[Sequence[Any]], Any] | None = None) -> list[dict[str, Any]]:
    """One result per item of ``batch`` (prepared clips and :class:`LongRecording`), in order."""
    from .models.whisper import AUTO_LANGUAGE  # the transcriber's module: loaded already

    units: list[_Unit] = []
    sequential: list[int] = []
    for i, item in enumerate(batch):
        if isinstance(item, LongRecording):
            units.extend(_Unit(i, w, duration_s=w.duration_s) for w in item.windows)
        elif getattr(item, "long_form", False):
            sequential.append(i)  # transformers' sequential long-form (--long-form sequential)
        else:
            units.append(_Unit(i, None, item, item.duration_s))
    results: list[dict[str, Any] | None] = [None] * len(batch)
    for start in range(0, len(sequential), batch_size):
        idx = sequential[start:start + batch_size]
        for i, res in zip(idx, transcriber.transcribe([batch[i] for i in idx])):
            results[i] = res
    # longest first: a recording's long windows, whose language detection is surest, are decoded before
    # its short ones, which then follow the recording's language where their own detection is unsure
    units.sort(key=lambda u: -u.duration_s)
    chunks = [units[s:s + batch_size] for s in range(0, len(units), batch_size)]
    sure = getattr(transcriber, "confident_language_prob", None)
    assemblies: dict[int, _Assembly] = {i: _Assembly() for i, item in enumerate(batch)
                                        if isinstance(item, LongRecording)}
    with ThreadPoolExecutor(1, thread_name_prefix="batchcap-features") as pool:
        pending: Future | None = pool.submit(_prepare, transcriber, batch, chunks[0]) if chunks else None
        for n, chunk in enumerate(chunks):
            prepared = pending.result() if pending is not None else []
            if sure is not None:
                for unit, p in zip(chunk, prepared):
                    if unit.window is not None and getattr(p, "language", None) in (None, AUTO_LANGUAGE):
                        p.language_prior = assemblies[unit.owner].language_so_far()
            pending = pool.submit(_prepare, transcriber, batch, chunks[n + 1]) if n + 1 < len(chunks) else None
            try:
                outputs = transcriber.transcribe(prepared)
            except BaseException:
                if pending is not None:  # the next sub-batch's features die with this call
                    pending.cancel() or pending.exception()
                    if not pending.cancelled() and pending.exception() is None:
                        FEATURES.release(sum(1 for u in chunks[n + 1] if u.window is not None))
                raise
            finally:
                del prepared
                FEATURES.release(sum(1 for u in chunk if u.window is not None))
                if n + 1 < len(chunks):  # between sub-batches; after the last, stages.predict_batch does it
                    release_free_heap()
            for unit, res in zip(chunk, outputs):
                if unit.window is None:
                    results[unit.owner] = res
                    continue
                a = assemblies[unit.owner]
                w = unit.window
                # segments with no word in them ("." over a music outro or hold music) are no transcript: as
                # subtitles they showed a lone dot for seconds, and their windows made the row "unresolved"
                said = has_words(res.get("text"))
                text = res["text"] if said else ""
                segs = []
                for s in res.get("segments") or []:
                    if has_words(s):
                        segs.append(map_segment(s, w.recording_time))
                    elif said and str(s.text or "").strip():  # its text goes too: row text and segments agree
                        text = text.replace(str(s.text).strip(), "", 1)
                text = " ".join(text.split()) if said and len(segs) < len(res.get("segments") or []) else text
                a.windows.append(WindowResult(w.start_s, w.end_s - w.start_s, text, segs if said else []))
                if res.get("language"):
                    a.languages[res["language"]] += w.duration_s
                    if sure is not None and (res.get("language_prob") or 0.0) >= sure:
                        a.sure[res["language"]] += w.duration_s
                if "decode" in res:
                    a.decodes.append((res["decode"], said))
                a.scored.append((w.duration_s, res))
    for i, a in assemblies.items():
        text, segments = stitch(a.windows)
        language = a.languages.most_common(1)[0][0] if a.languages else None
        result: dict[str, Any] = {"text": text, "segments": segments, "language": language,
                                  "windows": len(a.windows), **recording_scores(a.scored, language)}
        if a.decodes:  # the worst of the windows that wrote text: a dropped noise window does not make a
            # recording full of speech "no_speech"; with no text anywhere, the worst of all
            spoken = [d for d, said in a.decodes if said]
            result["decode"] = (worst_decode or _first_unusual)(spoken or [d for d, _ in a.decodes])
        results[i] = result
    return [r if r is not None else {"text": "", "segments": [], "language": None} for r in results]


def has_words(text_or_segment: Any) -> bool:
    """Whether a text (or a segment's text) holds a letter or a digit, not only punctuation and symbols."""
    text = text_or_segment.get("text") if isinstance(text_or_segment, dict) else \
        getattr(text_or_segment, "text", text_or_segment)
    return any(ch.isalnum() for ch in str(text or ""))


def recording_scores(windows: Sequence[tuple[float, dict[str, Any]]], language: str | None) -> dict[str, Any]:
    """A recording's guard columns from its windows' ``(seconds, result)``, so that a long row can be
    filtered as a clip's can:

    * ``avg_logprob``: the mean token log-probability over the windows that kept text (each window's mean
      weighted by its tokens plus the end token, as the mean itself counts them);
    * ``compression_ratio``: the worst (highest) window's, as ``decode`` reports the worst window;
    * ``no_speech_prob``: the lowest window's: the recording is as sure to hold speech as its surest window;
    * ``language_prob``: the detection probability of the recording's language, averaged over the windows
      detected in it, weighted by their seconds (None where every window's language was given).
    """
    def rounded(x: float) -> float:
        return round(float(x), 4)

    spoken = [res for _, res in windows if has_words(res.get("text")) and res.get("avg_logprob") is not None]
    weights = [(res.get("tokens") or 0) + 1 for res in spoken]
    ratios = [res["compression_ratio"] for _, res in windows
              if has_words(res.get("text")) and res.get("compression_ratio") is not None]
    no_speech = [res["no_speech_prob"] for _, res in windows if res.get("no_speech_prob") is not None]
    detected = [(seconds, res["language_prob"]) for seconds, res in windows
                if res.get("language") == language and res.get("language_prob") is not None]
    seconds = sum(s for s, _ in detected)
    return {
        "avg_logprob": rounded(sum(w * r["avg_logprob"] for w, r in zip(weights, spoken)) / sum(weights))
        if spoken else None,
        "compression_ratio": rounded(max(ratios)) if ratios else None,
        "no_speech_prob": rounded(min(no_speech)) if no_speech else None,
        "language_prob": rounded(sum(s * p for s, p in detected) / seconds) if detected and seconds > 0 else None,
    }


def _prepare(transcriber: Any, batch: Sequence[Any], chunk: list[_Unit]) -> list[Any]:
    """The model inputs of one sub-batch: window features computed here (counted), clips as they are."""
    out = []
    for unit in chunk:
        if unit.window is None:
            out.append(unit.prepared)
            continue
        recording = batch[unit.owner]
        prepared = transcriber.prepare(unit.window.audio(recording.samples), language=recording.language)
        if hasattr(prepared, "joins"):  # where its pieces meet: no segment is left spanning a pause
            prepared.joins = unit.window.joins_s
            prepared.speech_window = True
        out.append(prepared)
        FEATURES.acquire()
    return out


def _first_unusual(values: Sequence[Any]) -> Any:
    """Without a ranking from the decoding guard: the most common value unless another occurs."""
    counts = Counter(values)
    common = counts.most_common(1)[0][0]
    return next((v for v in values if v != common), common)


def windows_summary(recording: LongRecording) -> str:
    return (f"{len(recording.windows)} windows, {recording.speech_s:.0f} s of "
            f"{len(recording.samples) / SAMPLE_RATE:.0f} s")
