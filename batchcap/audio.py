"""Decode and validate audio: any container libsndfile or FFmpeg (PyAV) reads -> mono float32 at 16 kHz.

Length cap (``max_duration_s``, ``--max-duration``): a small file can hold hours of audio (FLAC or Opus
compress near-silence to almost nothing: 3 hours of it is a few hundred KB), and decoded samples cost
4 bytes a sample at the source rate. The cap is checked from the header / container before any sample is
decoded, and again while decoding (libsndfile is read in blocks, PyAV frame by frame), so a header that
lies, or says nothing, never lets more than the cap plus one block into memory.
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .items import DECODE_ERROR, EMPTY, ItemError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
# 4 hours: longer than the meetings, lectures, hearings and podcast episodes batch transcription sees, and
# the most one item may cost: 0.9 GB of 16 kHz float32 samples once decoded (2.8 GB while a 48 kHz source is
# decoded). Longer recordings need an explicit --max-duration.
DEFAULT_MAX_DURATION_S = 4 * 3600.0
BLOCK_FRAMES = 1 << 16  # libsndfile reads this many frames at a time
CANCELLED_MIX = 0.01  # a channel mean with under 1 % of the loudest channel's energy: channels in antiphase
DC_OFFSET = 1e-3  # a mean sample value beyond this (-60 dBFS) is an offset, removed before the silence check
MIN_DECODED_SHARE = 0.9  # damaged audio is transcribed when at least this share of its duration decodes
EMPTY_FILE_BYTES = 1024  # a file with no samples and fewer bytes is empty; with more, FFmpeg has a look
_UNKNOWN_FRAMES = 2**62  # libsndfile reports SF_COUNT_MAX when a stream does not say its length
# libsndfile's log of a header whose chunk runs past the end of the file: "data : 160000 (should be 47969)"
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND|RIFF|RIFX|FORM|riff)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_CHUNK = 0x7FFF0000  # sizes a streaming writer puts where it cannot know the length (with 0)


@dataclass
class _Budget:
    """Seconds decoded so far against ``--max-duration``; raises the item's decode_error past it."""

    limit_s: float | None
    decoded_s: float = 0.0

    def check_header(self, seconds: float | None) -> None:
        if self.limit_s and seconds and seconds > self.limit_s:
            raise self._error(f"recording is {_human(seconds)} long, longer than --max-duration "
                              f"({_human(self.limit_s)})", seconds)

    def add(self, frames: int, rate: int) -> None:
        self.decoded_s += frames / rate
        if self.limit_s and self.decoded_s > self.limit_s:
            raise self._error(f"recording is longer than --max-duration ({_human(self.limit_s)}): decoding stopped "
                              f"after {_human(self.decoded_s)}", None)

    def _error(self, message: str, seconds: float | None) -> ItemError:
        return ItemError(DECODE_ERROR, message, fields={"duration_s": round(seconds, 3) if seconds else None,
                                                        "max_duration_s": self.limit_s,
                                                        "decoded_s": round(self.decoded_s, 3)})


def _human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds % 1 else f"{seconds:.0f} s"


def decode_audio(data: bytes, *, sample_rate: int = SAMPLE_RATE, min_duration: float = 0.1,
                 silence_dbfs: float = -60.0, max_duration_s: float | None = DEFAULT_MAX_DURATION_S) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``; ItemError for anything a model should not see.

    ``max_duration_s`` (None: no cap): longer recordings are a decode_error, found without decoding them.
    """
    if not data:
        raise ItemError(DECODE_ERROR, "empty file (0 bytes)")
    # NaN / inf samples (float files) are refused below with their count, not warned of on stderr
    with np.errstate(invalid="ignore", over="ignore"):
        samples, rate = _read(data, _Budget(max_duration_s))
        if samples.size == 0:
            raise ItemError(EMPTY, "the file holds no audio samples", fields={"duration_s": 0.0})
        finite = np.isfinite(samples.sum(dtype=np.float64))  # NaN / inf propagate; no temporary array of flags
    if not finite:
        bad = int((~np.isfinite(samples)).sum())
        raise ItemError(DECODE_ERROR, f"audio contains {bad} NaN or infinite samples")
    duration = samples.shape[0] / rate
    if duration < min_duration:
        raise ItemError(EMPTY, f"clip is {duration * 1000:.0f} ms long, shorter than the {min_duration:g} s "
                        "minimum (--min-duration)", fields={"duration_s": round(duration, 3)})
    offset = float(samples.mean(dtype=np.float64))
    if abs(offset) > DC_OFFSET:  # a recorder's DC offset: silence with an offset is still silence
        samples -= np.float32(offset)
    peak = max(float(samples.max()), -float(samples.min()))  # no temporary copy of hours of samples
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak == 0 and offset:  # nothing but the offset: a flat line, not the quiet the dBFS figure would suggest
        raise ItemError(EMPTY, f"audio is a constant value ({offset:+.3g}: a DC offset, no sound)",
                        fields={"duration_s": round(duration, 3)})
    if peak_db < silence_dbfs:
        raise ItemError(EMPTY, f"audio is silent (peak {peak_db:.0f} dBFS, below the {silence_dbfs:g} dBFS "
                        "threshold of --silence-threshold)", fields={"duration_s": round(duration, 3)})
    if rate != sample_rate:
        import soxr

        samples = soxr.resample(samples, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _mono(block: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames]: the mean of the channels, or the loudest channel where the channels
    cancel in the mean (a phase-inverted microphone or a miswired balanced line: left = -right)."""
    if block.shape[1] == 1:
        return block[:, 0]
    mix = block.mean(axis=1, dtype=np.float32)
    energy = np.einsum("ij,ij->j", block, block, dtype=np.float64)
    loudest = int(energy.argmax())
    if float(np.dot(mix, mix)) < CANCELLED_MIX * float(energy[loudest]):
        return np.ascontiguousarray(block[:, loudest])
    return mix


def _frames_mono(frames: Any) -> list[np.ndarray]:
    """Mono samples of PyAV's packed float frames ([1, frames * channels] each)."""
    return [_mono(f.to_ndarray().reshape(-1, len(f.layout.channels))) for f in frames]


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def _read_blocks(f: Any, budget: _Budget) -> np.ndarray:
    """Mono samples of an open ``soundfile.SoundFile``, block by block into one array sized from the header
    (frames the header did not announce, or all of them when it announced none, are gathered apart)."""
    rate = int(f.samplerate)
    declared = f.frames if 0 < f.frames < _UNKNOWN_FRAMES else 0
    if declared:
        budget.check_header(declared / rate)
    out = np.empty(declared, np.float32)
    block = np.empty((BLOCK_FRAMES, f.channels), np.float32)
    extra: list[np.ndarray] = []
    filled = 0
    while True:
        got = f.read(dtype="float32", always_2d=True, out=block)
        if not len(got):
            break
        budget.add(len(got), rate)
        mono = _mono(got)
        fit = min(len(mono), declared - filled)
        out[filled:filled + fit] = mono[:fit]
        filled += fit
        if fit < len(mono):
            extra.append(mono[fit:].copy())  # ``block`` is reused
    return np.concatenate([out[:filled], *extra]) if extra else out[:filled]


def _read(data: bytes, budget: _Budget) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate), through libsndfile, else FFmpeg."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            samples, rate = _read_blocks(f, budget), int(f.samplerate)
            _check_cut_short(f.extra_info, len(samples) / rate)
        if samples.size or len(data) < EMPTY_FILE_BYTES:
            return samples, rate
        # no samples, yet bytes after the header: a WAV whose recorder died before writing the data size
        # (0) leaves it so; FFmpeg reads up to the end of the file
        first_error = "the header announces no audio samples"
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # "Error opening <_io.BytesIO object at 0x...>: Format not recognised." -> "Format not recognised"
        first_error = str(exc).rsplit(">: ", 1)[-1].rstrip(".") or type(exc).__name__
        if first_error.startswith("File does not exist"):  # what libsndfile's MPEG reader says of bad frames
            first_error = "MPEG data that does not decode"
    return _read_av(data, first_error, _Budget(budget.limit_s))


def _check_cut_short(header_log: str, decoded_s: float) -> None:
    """A file cut short (a partial copy or download, a recorder that died) whose header still announces its
    whole length: libsndfile reads what is there and logs the chunk that runs past the end of the file.
    Under ``MIN_DECODED_SHARE`` of the announced audio is the row's decode_error, as damaged audio is in
    FFmpeg's path; a header that cannot know the length (0, 0xFFFFFFFF: a streaming writer's) says nothing."""
    shares = {}
    for chunk, declared, actual in _SHORT_CHUNK.findall(header_log or ""):
        if 0 < int(declared) < _UNKNOWN_CHUNK:
            shares[chunk] = int(actual) / int(declared)
    share = shares.get("data", shares.get("SSND", min(shares.values(), default=1.0)))
    if share < MIN_DECODED_SHARE:
        raise ItemError(DECODE_ERROR, f"truncated audio: the file holds {decoded_s:.1f} s of the "
                        f"{decoded_s / max(share, 1e-9):.1f} s its header announces")
    if share < 1.0:
        log.info("the file holds %.0f %% of the audio its header announces", 100 * share)


def _ffmpeg_reason(exc: Exception) -> str:
    """PyAV's error without its errno and file name: "[Errno 1094995529] Invalid data found when processing
    input: '<none>'" -> "Invalid data found when processing input"."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return re.sub(r"^\[Errno -?\d+\]\s*", "", str(text)).split(": '", 1)[0].strip() or type(exc).__name__


def _container_seconds(container: Any, stream: Any) -> float | None:
    """The duration the container or the stream declares (None when neither does)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE units
    return None


def _read_av(data: bytes, first_error: str, budget: _Budget) -> tuple[np.ndarray, int]:
    """FFmpeg through PyAV, for what libsndfile does not read (m4a, aac, webm, ...)."""
    try:
        import av
    except ImportError:
        raise ItemError(DECODE_ERROR, f"not a readable audio file ({first_error}); "
                        "install PyAV (pip install av) for m4a/aac/webm") from None
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise ItemError(DECODE_ERROR, "no audio stream in the file")
            stream = container.streams.audio[0]
            rate = stream.rate or SAMPLE_RATE
            declared = _container_seconds(container, stream)
            budget.check_header(declared)
            resampler = av.AudioResampler(format="flt", rate=rate)  # channels kept: mixed by ``_mono``
            chunks = []
            packets = damaged = 0
            for packet in container.demux(stream):
                packets += 1
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:  # a damaged stretch: skipped, as the ffmpeg command does
                    damaged += 1
                    continue
                for frame in frames:
                    budget.add(frame.samples, frame.sample_rate or rate)
                    chunks.extend(_frames_mono(resampler.resample(frame)))
            chunks.extend(_frames_mono(resampler.resample(None)))
    except ItemError:
        raise
    except Exception as exc:  # PyAV raises many error types (av.error.*, ValueError, ...)
        raise ItemError(DECODE_ERROR, f"not a readable audio file ({first_error}); FFmpeg: {_ffmpeg_reason(exc)}"
                        ) from exc
    samples = _joined(chunks)
    if damaged:  # a little damage is skipped; a file that is mostly damage is the row's decode_error
        got = len(samples) / rate
        if declared and got < MIN_DECODED_SHARE * declared:
            raise ItemError(DECODE_ERROR, f"damaged audio: {damaged} packets do not decode, and only {got:.1f} s "
                            f"of its {declared:.1f} s do")
        if not declared and (not len(samples) or damaged > (1 - MIN_DECODED_SHARE) * packets):
            raise ItemError(DECODE_ERROR, f"damaged audio: {damaged} of {packets} packets do not decode")
        log.info("skipped %d damaged packet(s); %.1f s of the audio decode", damaged, got)
    return samples, int(rate)
