"""Cut long recordings into windows of at most 24 s at pauses, for batched transcription.

A voice activity detector (VAD) scores short frames of the recording; :func:`plan_windows` turns
the scores into speech regions and packs consecutive regions into windows of at most
``max_window_s`` seconds, cutting only in pauses (a region longer than that is cut at its quietest
point). Windows are spans of the original recording, pauses of up to 3 s inside them included;
speech either side of a longer pause may share a window, joined without the pause (``Window.pieces``;
``Window.recording_time`` maps a time of the window back to the recording). Pure silence is never
transcribed.

Two detectors, both returning per-frame scores (higher = more speech-like):

- :class:`EnergyVad` (the default, no dependency): log energy of 10 ms frames, thresholds set
  from the recording's own level distribution (its quiet floor and its loud frames).
- :class:`SileroVad`: the Silero VAD network (MIT) through onnxruntime, from the ONNX file that the
  ``faster-whisper`` package ships (``pip install faster-whisper onnxruntime``), or from a path.

Both work in blocks, so scoring an hour-long recording allocates no copy of it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .items import FatalError
from .models.whisper_timestamps import TIME_PRECISION

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
# Whisper hears 30 s, but in a window filled to its end it often stops short and defers the last
# seconds (which then cost a second encoding, see WhisperTranscriber._short). Windows of at most 24 s
# left that to 2 windows in ~70 where 30 s left it to 19-26, and ran faster at the same WER (long
# recordings of real speech, English / Italian / Russian: the README's long-form section).
MAX_WINDOW_S = 24.0
JOIN_SNAP_S = TIME_PRECISION  # one step of Whisper's timestamps: a time this close to a join is at the join


@dataclass(frozen=True)
class Window:
    """What the model hears of a recording, in samples at 16 kHz: ``samples[start:end]``, or, for a
    window that bridges pauses longer than ``max_merge_gap_s``, its ``pieces`` (spans of the
    recording, in order) joined end to end, the pauses between them left out."""

    start: int
    end: int
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return self.pieces or ((self.start, self.end),)

    @property
    def duration_s(self) -> float:
        """Seconds of audio the model hears (the pieces' total)."""
        return sum(b - a for a, b in self.spans) / SAMPLE_RATE

    @property
    def joins_s(self) -> tuple[float, ...]:
        """Where the pieces meet, in seconds of the window's audio (none for a window of one span)."""
        out, at = [], 0
        for a, b in self.spans[:-1]:
            at += b - a
            out.append(at / SAMPLE_RATE)
        return tuple(out)

    def audio(self, samples: np.ndarray) -> np.ndarray:
        """The window's samples of the recording ``samples`` (a view unless pieces are joined)."""
        if not self.pieces:
            return samples[self.start:self.end]
        return np.concatenate([samples[a:b] for a, b in self.pieces])

    def recording_time(self, t: float, end: bool = False, snap_s: float = JOIN_SNAP_S) -> float:
        """The time in the recording (s) of time ``t`` of the window's audio. At a join, a start
        (``end`` False) is placed at the start of the later piece, an end at the end of the earlier;
        so is a start less than ``snap_s`` before a join, and an end less than ``snap_s`` after one
        (Whisper's times come in 20 ms steps, the joins anywhere: a segment that starts at a join
        must not start in the piece before it, a pause away from its words)."""
        at = max(0.0, t) * SAMPLE_RATE  # samples into what is left of the window's audio
        snap = snap_s * SAMPLE_RATE
        *before, (a, b) = self.spans
        for first, last in before:
            length = last - first
            if (end and at <= length + snap) or (not end and at < length - snap):
                return (first + min(at, length)) / SAMPLE_RATE
            at = max(0.0, at - length)
        return (a + min(at, b - a)) / SAMPLE_RATE  # in the last piece, or past it: its end


@dataclass
class FrameScores:
    """Per-frame speech scores of one recording and the hysteresis thresholds that read them:
    a region starts where a score reaches ``on`` and lasts while scores stay at or above ``off``."""

    scores: np.ndarray  # float32 [frames]
    hop: int  # samples per frame
    on: float
    off: float


class Vad(Protocol):
    name: str

    def score(self, samples: np.ndarray) -> FrameScores: ...


@dataclass
class VadConfig:
    """How scores become windows (seconds)."""

    max_window_s: float = MAX_WINDOW_S
    min_silence_s: float = 0.25  # shorter pauses do not end a speech region
    min_speech_s: float = 0.08  # shorter bursts (clicks) are dropped
    pad_s: float = 0.2  # kept around each region (never past half the pause to the next)
    max_merge_gap_s: float = 3.0  # longer pauses are left out of a window (no compute spent on silence)
    join_pauses: bool = True  # speech either side of such a pause may share a window, joined (else: two windows)
    # ... keeping this much of the pause either side. Whisper may then write the two sides as one segment;
    # the transcriber cuts such a segment at the join by its words' times (WhisperTranscriber._decode_clips).
    # 0.5 s made Whisper cut there itself more often, but cost 1.2-1.3x the time (README: long pauses)
    join_pad_s: float = 0.2
    min_window_s: float = 0.1


class EnergyVad:
    """Log energy of 10 ms frames against the recording's own level distribution.

    The thresholds sit between the quiet floor (10th percentile of frame energies) and the loud
    frames (97th percentile): ``on`` halfway (in dB) and at least 6 dB above the floor, ``off`` a
    third of the way; never above the loud level less 3 dB (a recording without pauses is all
    speech) nor below -65 / -70 dBFS (near-digital silence is never speech).
    """

    name = "energy"
    hop = 160  # 10 ms
    block = SAMPLE_RATE * 60  # samples scored at once

    def score(self, samples: np.ndarray) -> FrameScores:
        n = len(samples) // self.hop
        db = np.empty(n, np.float32)
        step = self.block // self.hop * self.hop
        for start in range(0, n * self.hop, step):
            chunk = samples[start:min(start + step, n * self.hop)].astype(np.float32, copy=False)
            frames = chunk.reshape(-1, self.hop)
            power = np.einsum("ij,ij->i", frames, frames) / self.hop
            db[start // self.hop:start // self.hop + len(frames)] = 10 * np.log10(power + 1e-12)
        if n == 0:
            return FrameScores(db, self.hop, 0.0, 0.0)
        floor, loud = np.percentile(db, [10, 97])
        span = max(float(loud - floor), 0.0)
        # a recording without pauses (floor close to the loud frames) is speech throughout
        on = max(min(float(floor) + max(6.0, span * 0.5), float(loud) - 3.0), -65.0)
        off = max(min(float(floor) + max(4.0, span * 0.33), on), -70.0)
        return FrameScores(db, self.hop, on, off)


class SileroVad:
    """Silero VAD (v6, MIT licence) through onnxruntime: speech probabilities of 32 ms frames.

    The model file is the one faster-whisper ships (``faster_whisper/assets/silero_vad_v6.onnx``),
    found without importing faster-whisper, or ``model_path``. Probabilities above ``threshold``
    start speech, below ``threshold - 0.15`` end it (Silero's own defaults).
    """

    name = "silero"
    hop = 512
    context = 64
    block_frames = 4096

    def __init__(self, model_path: str | None = None, threshold: float = 0.5):
        try:
            import onnxruntime
        except ImportError:
            raise FatalError("the Silero VAD needs onnxruntime: pip install onnxruntime faster-whisper") from None
        path = model_path or find_silero_model()
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=options)
        self.threshold = threshold

    def score(self, samples: np.ndarray) -> FrameScores:
        n = math.ceil(len(samples) / self.hop)
        probs = np.empty(n, np.float32)
        h = np.zeros((1, 1, 128), np.float32)
        c = np.zeros((1, 1, 128), np.float32)
        previous_tail = np.zeros(self.context, np.float32)
        for first in range(0, n, self.block_frames):
            last = min(n, first + self.block_frames)
            chunk = samples[first * self.hop:last * self.hop].astype(np.float32, copy=False)
            if len(chunk) < (last - first) * self.hop:
                chunk = np.pad(chunk, (0, (last - first) * self.hop - len(chunk)))
            frames = chunk.reshape(-1, self.hop)
            # every frame is fed with the 64 samples before it (the network's context)
            context = np.concatenate([previous_tail[None], frames[:-1, -self.context:]], axis=0)
            previous_tail = frames[-1, -self.context:].copy()
            batch = np.concatenate([context, frames], axis=1)
            out, h, c = self.session.run(None, {"input": batch, "h": h, "c": c})
            probs[first:last] = np.asarray(out, np.float32).reshape(-1)[:last - first]
        return FrameScores(probs, self.hop, self.threshold, max(self.threshold - 0.15, 0.01))


def find_silero_model() -> str:
    """The Silero ONNX file inside the installed faster-whisper package (not imported: only located)."""
    import importlib.util

    spec = importlib.util.find_spec("faster_whisper")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "assets", "silero_vad_v6.onnx")
        if os.path.exists(path):
            return path
    raise FatalError("the Silero VAD model ships with faster-whisper: pip install faster-whisper onnxruntime "
                     "(or use --vad energy)")


def make_vad(name: str) -> Vad:
    if name == "energy":
        return EnergyVad()
    if name == "silero":
        return SileroVad()
    raise FatalError(f"unknown VAD {name!r}: energy or silero")


def speech_regions(scores: FrameScores, config: VadConfig | None = None) -> list[tuple[int, int]]:
    """Speech as ``[(start_frame, end_frame)]``: hysteresis, short pauses bridged, clicks dropped."""
    config = config or VadConfig()
    s = scores.scores
    if len(s) == 0:
        return []
    frame_s = scores.hop / SAMPLE_RATE
    regions: list[tuple[int, int]] = []
    above_on = s >= scores.on
    above_off = s >= scores.off
    i, n = 0, len(s)
    starts = np.flatnonzero(above_on)
    k = 0
    while k < len(starts):
        i = int(starts[k])
        # the region lasts while scores stay >= off
        below = np.flatnonzero(~above_off[i:])
        end = n if len(below) == 0 else i + int(below[0])
        regions.append((i, end))
        k = int(np.searchsorted(starts, end))
    min_gap = max(1, round(config.min_silence_s / frame_s))
    merged: list[tuple[int, int]] = []
    for start, end in regions:
        if merged and start - merged[-1][1] < min_gap:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    min_len = round(config.min_speech_s / frame_s)
    return [(a, b) for a, b in merged if b - a >= max(1, min_len)]


def plan_windows(scores: FrameScores, n_samples: int, config: VadConfig | None = None) -> list[Window]:
    """Windows of at most ``config.max_window_s`` covering the speech, cut only in pauses.

    Regions are padded (into the pause, never past its middle), regions longer than a window are
    cut at their quietest frames, and consecutive regions are packed into one window while the
    window stays within the limit. A pause of up to ``max_merge_gap_s`` stays inside the window; a
    longer one is left out, the regions either side joined as the window's ``pieces`` (``join_pauses``;
    off, it ends the window). Joined, a short answer after a long pause is heard with the speech around
    it, as in one stretch of talk, rather than alone.
    """
    config = config or VadConfig()
    hop = scores.hop
    max_len = int(config.max_window_s * SAMPLE_RATE)
    pad = int(config.pad_s * SAMPLE_RATE)
    regions = [(a * hop, min(b * hop, n_samples)) for a, b in speech_regions(scores, config)]
    padded: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(regions):
        lo = 0 if i == 0 else (regions[i - 1][1] + a) // 2
        hi = n_samples if i == len(regions) - 1 else (b + regions[i + 1][0]) // 2
        padded.append((max(lo, a - pad), min(hi, b + pad)))
    pieces: list[tuple[int, int]] = []
    for a, b in padded:
        pieces.extend(_split_long(a, b, scores, max_len))
    windows: list[Window] = []
    max_gap = int(config.max_merge_gap_s * SAMPLE_RATE)
    # what a join keeps of the pause beyond each side's padding (never more than a third of the pause)
    join_extra = max(0, min(int(config.join_pad_s * SAMPLE_RATE) - pad, max_gap // 3))
    cur: list[list[int]] = []  # the spans of the window being packed
    heard = 0  # its samples
    for a, b in pieces:
        if cur and a - cur[-1][1] <= max_gap and heard + b - cur[-1][1] <= max_len:
            heard += b - cur[-1][1]  # the pause stays in: one span
            cur[-1][1] = b
            continue
        if cur and config.join_pauses and a - cur[-1][1] > max_gap and heard + b - a + 2 * join_extra <= max_len:
            # after a long pause: joined without it, but for join_pad_s of it either side
            cur[-1][1] += join_extra
            cur.append([a - join_extra, b])
            heard += b - a + 2 * join_extra
            continue
        if cur:
            windows.append(_window(cur))
        cur, heard = [[a, b]], b - a
    if cur:
        windows.append(_window(cur))
    min_len = int(config.min_window_s * SAMPLE_RATE)
    return [w for w in windows if w.duration_s * SAMPLE_RATE >= min_len]


def _window(spans: list[list[int]]) -> Window:
    pieces = tuple((a, b) for a, b in spans) if len(spans) > 1 else ()
    return Window(spans[0][0], spans[-1][1], pieces)


def _split_long(a: int, b: int, scores: FrameScores, max_len: int) -> list[tuple[int, int]]:
    """Cut ``[a, b)`` (samples) into pieces of at most ``max_len`` at the quietest moments: each cut
    is the centre of the lowest 200 ms average score in the second half of the allowed span."""
    hop = scores.hop
    out: list[tuple[int, int]] = []
    smooth = max(1, round(0.2 * SAMPLE_RATE / hop))
    while b - a > max_len:
        lo_f = (a + max_len // 2) // hop
        hi_f = (a + max_len) // hop - 1
        seg = scores.scores[lo_f:hi_f].astype(np.float64)
        if len(seg) > smooth:
            avg = np.convolve(seg, np.ones(smooth) / smooth, mode="same")
            cut_f = lo_f + int(np.argmin(avg))
        else:
            cut_f = hi_f
        cut = min(max(cut_f * hop, a + 1), a + max_len)
        out.append((a, cut))
        a = cut
    out.append((a, b))
    return out


def split_recording(samples: np.ndarray, vad: Vad, config: VadConfig | None = None) -> list[Window]:
    """Score ``samples`` (mono, 16 kHz) with ``vad`` and plan its windows."""
    return plan_windows(vad.score(samples), len(samples), config)
