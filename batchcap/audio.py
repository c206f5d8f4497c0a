"""Decode and validate audio: any container libsndfile or FFmpeg (PyAV) reads -> mono float32 at 16 kHz.

Length cap (``max_duration_s``, ``--max-duration``): a small file can hold hours of audio (FLAC or Opus
compress near-silence to almost nothing: 3 hours of it is a few hundred KB), and decoded samples cost
4 bytes a sample at the source rate. The cap is checked from the header / container before any sample is
decoded, and again while decoding (libsndfile is read in blocks, PyAV frame by frame), so a header that
lies, or says nothing, never lets more than the cap plus one block into memory. Samples are resampled to
16 kHz block by block as they are decoded (:class:`_Samples`), so memory follows the output rate, not the
source's: 10 minutes of silence at 655 kHz is a 1.5 MB FLAC that took 1.6 GB when resampled whole.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable
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
# a channel mean with under 3/4 of the energy of the mean of independent channels (sum of energies / n**2):
# channels in antiphase (two channels correlated below -0.25), with whatever they share (a hum, a second voice)
CANCELLED_MIX = 0.75
DC_OFFSET = 1e-3  # a mean sample value beyond this (-60 dBFS) is an offset, removed before the silence check
MIN_DECODED_SHARE = 0.9  # damaged audio is transcribed when at least this share of its duration decodes
EMPTY_FILE_BYTES = 1024  # a file with no samples and fewer bytes is empty; with more, FFmpeg has a look
_UNKNOWN_FRAMES = 2**62  # libsndfile reports SF_COUNT_MAX when a stream does not say its length
# libsndfile's log of a header whose chunk runs past the end of the file: "data : 160000 (should be 47969)"
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND|RIFF|RIFX|FORM|riff)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_CHUNK = 0x7FFF0000  # sizes a streaming writer puts where it cannot know the length (with 0)
# Float samples are expected within ±1. Beyond it: integer samples stored as float (up to 2**31), or a
# corrupt sample (a bit flip: 3e38, which overflowed the log-mel into inf / NaN and failed its batch). Such a
# recording is decoded again to find its level (this percentile of |x|); where that is over full scale the
# samples are divided by it, and what remains beyond ±1 is clipped (as FFmpeg's conversion to integers clips
# it), at the source rate, before resampling spreads a spike over its neighbours.
LEVEL_PERCENTILE = 99.9
LEVEL_PROBE = 1_000_000  # samples of |x| the level is taken from
# peaks up to this are left as they are: lossy decoders overshoot full scale on loud masters (1.1-1.5 on
# podcasts and broadcast), and a float file may keep some headroom; integer-scaled floats are thousands
FULL_SCALE_LIMIT = 4.0


class _Samples:
    """Mono samples gathered block by block at the source ``rate``, resampled to ``target`` as they come
    (soxr's stream gives exactly the samples of one whole-array call), with what the checks need of the
    source: its frame count, sum, extremes and non-finite samples. ``expected_frames`` (the header's, 0 if
    unknown) sizes the output array, so that the usual file is never held twice.

    ``scale`` (offset, gain): each source sample becomes ``clip((x - offset) * gain, -1, 1)`` before
    resampling. ``probe`` (a step): nothing is kept but every step-th sample (``probed``).
    Once a sample is beyond ``FULL_SCALE_LIMIT`` without ``scale``, or not finite, only the statistics are
    gathered: the samples are not used."""

    def __init__(self, rate: int, target: int, expected_frames: int = 0, *,
                 scale: tuple[float, float] | None = None, probe: int = 0):
        self.rate, self.target = int(rate), int(target)
        self.frames = self.nonfinite = 0
        self.track, self.tracks = 0, 1  # which audio track of how many (containers FFmpeg reads)
        self.high, self.low = -math.inf, math.inf
        self.probed: list[np.ndarray] = []
        self._sum = 0.0
        self._scale, self._probe = scale, probe
        self._stream = None
        if self.rate != self.target and not probe:
            import soxr

            self._stream = soxr.ResampleStream(self.rate, self.target, 1, dtype="float32", quality="HQ")
        self._out = np.empty(int(expected_frames * self.target / self.rate) + 1 if expected_frames and not probe
                             else 0, np.float32)
        self._filled = 0
        self._extra: list[np.ndarray] = []

    @property
    def mean(self) -> float:
        return self._sum / self.frames if self.frames else 0.0

    def level(self) -> tuple[float, float]:
        """(DC offset, peak after the offset): the offset 0 where it is within ``DC_OFFSET``."""
        offset = self.mean if abs(self.mean) > DC_OFFSET else 0.0
        return offset, max(self.high - offset, offset - self.low)

    def silent(self, silence_dbfs: float) -> bool:
        offset, peak = self.level()
        return self.frames > 0 and not self.nonfinite and (peak <= 0 or 20 * math.log10(peak) < silence_dbfs)

    @property
    def over_full_scale(self) -> bool:
        return self.high > FULL_SCALE_LIMIT or self.low < -FULL_SCALE_LIMIT

    def add(self, mono: np.ndarray) -> None:
        if not len(mono):
            return
        first = self.frames
        self.frames += len(mono)
        total = float(mono.sum(dtype=np.float64))  # NaN / inf propagate; float64 cannot overflow here
        if not math.isfinite(total):
            self.nonfinite += int((~np.isfinite(mono)).sum())
        if self.nonfinite:
            return  # the row is a decode_error: only the count is wanted from here on
        self._sum += total
        self.high, self.low = max(self.high, float(mono.max())), min(self.low, float(mono.min()))
        if self._probe:
            self.probed.append(mono[(-first) % self._probe::self._probe].copy())
            return
        if self._scale is not None:
            offset, gain = self._scale
            mono = np.clip((mono - np.float32(offset)) * np.float32(gain), -1.0, 1.0)
        elif self.over_full_scale:
            return  # decoded again with a scale (:func:`_within_full_scale`)
        self._put(self._stream.resample_chunk(np.ascontiguousarray(mono)) if self._stream is not None else mono)

    def finish(self) -> np.ndarray:
        """The samples at the target rate."""
        if self._stream is not None and not self.nonfinite:
            self._put(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
        out = self._out[:self._filled]
        if self._extra:
            return np.concatenate([out, *self._extra])
        # a header that announced far more than there was: the rest of its array is given back
        return out.copy() if self._filled < len(self._out) // 2 else out

    def remove_offset(self, samples: np.ndarray, offset: float) -> None:
        """``samples`` (from :meth:`finish`) as if ``offset`` had been taken from every source sample before
        resampling: minus ``offset`` times what a constant 1 becomes, streamed through a resampler of its own
        (a step of the offset at each end otherwise, which a constant file's check would hear as sound)."""
        if self._stream is None:
            samples -= np.float32(offset)
            return
        import soxr

        stream = soxr.ResampleStream(self.rate, self.target, 1, dtype="float32", quality="HQ")
        ones = np.ones(BLOCK_FRAMES, np.float32)
        pos, left = 0, self.frames
        while True:
            n = min(left, BLOCK_FRAMES)
            left -= n
            part = stream.resample_chunk(ones[:n], last=left == 0)
            samples[pos:pos + len(part)] -= np.float32(offset) * part
            pos += len(part)
            if left == 0:
                break

    def _put(self, chunk: np.ndarray) -> None:
        fit = min(len(chunk), len(self._out) - self._filled)
        self._out[self._filled:self._filled + fit] = chunk[:fit]
        self._filled += fit
        if fit < len(chunk):
            self._extra.append(np.array(chunk[fit:], np.float32))  # a copy: ``chunk`` may be a reused buffer


_Make = Callable[[int, int], _Samples]  # (source rate, frames the header announces) -> a collector


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
    def make(rate: int, frames: int) -> _Samples:
        return _Samples(rate, sample_rate, frames)

    # NaN / inf samples (float files) are refused below with their count, not warned of on stderr
    with np.errstate(invalid="ignore", over="ignore"):
        decoded = first = _read(data, _Budget(max_duration_s), make)
        while decoded.silent(silence_dbfs) and decoded.track + 1 < decoded.tracks:
            # a silent track beside others: a meeting recorder's system audio beside its microphone
            try:
                decoded = _read_av(data, "another audio track", _Budget(max_duration_s), make, decoded.track + 1)
            except ItemError:  # a track that does not decode: the silent one stands
                break
        if decoded.silent(silence_dbfs):
            decoded = first  # all silent: the first track's figures are the row's
        elif decoded is not first:
            log.info("audio track 1 of %d is silent: track %d is transcribed", decoded.tracks, decoded.track + 1)
    tracks = f" in all {decoded.tracks} audio tracks" if decoded.tracks > 1 else ""
    if decoded.frames == 0:
        raise ItemError(EMPTY, "the file holds no audio samples", fields={"duration_s": 0.0})
    if decoded.nonfinite:
        raise ItemError(DECODE_ERROR, f"audio contains {decoded.nonfinite} NaN or infinite samples")
    duration = decoded.frames / decoded.rate
    if duration < min_duration:
        raise ItemError(EMPTY, f"clip is {duration * 1000:.0f} ms long, shorter than the {min_duration:g} s "
                        "minimum (--min-duration)", fields={"duration_s": round(duration, 3)})
    offset, peak = decoded.level()  # a recorder's DC offset: silence with an offset is still silence
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak == 0 and offset:  # nothing but the offset: a flat line, not the quiet the dBFS figure would suggest
        raise ItemError(EMPTY, f"audio is a constant value ({offset:+.3g}: a DC offset, no sound)",
                        fields={"duration_s": round(duration, 3)})
    if peak_db < silence_dbfs:
        raise ItemError(EMPTY, f"audio is silent{tracks} (peak {peak_db:.0f} dBFS, below the {silence_dbfs:g} dBFS "
                        "threshold of --silence-threshold)", fields={"duration_s": round(duration, 3)})
    if decoded.over_full_scale:
        samples = _within_full_scale(data, _Budget(max_duration_s), sample_rate, decoded, peak)
    else:
        samples = decoded.finish()
        if offset:
            decoded.remove_offset(samples, offset)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _within_full_scale(data: bytes, budget: _Budget, target: int, decoded: _Samples, peak: float) -> np.ndarray:
    """Float samples beyond ±1, decoded twice more: once for their offset and level, taken from a sample of
    them that one corrupt sample cannot move (a trimmed mean, a percentile), once with the offset taken away,
    divided by the level where it is over full scale (integer samples stored as float: speech at 25,000 was an
    ``ok`` row with no text) and clipped to ±1 (a corrupt sample, the peaks of a float file with headroom)."""
    with np.errstate(invalid="ignore", over="ignore"):
        step = max(1, decoded.frames // LEVEL_PROBE)
        probe = _read(data, budget, lambda rate, _: _Samples(rate, target, probe=step), decoded.track)
        values = np.sort(np.concatenate(probe.probed)) if probe.probed else np.zeros(1, np.float32)
        trim = int(len(values) * (100 - LEVEL_PERCENTILE) / 100)
        offset = float(values[trim:len(values) - trim].mean(dtype=np.float64))
        level = float(np.percentile(np.abs(values - np.float32(offset)), LEVEL_PERCENTILE))
        gain = 1.0 / level if level > 1.0 else 1.0
        if abs(offset) * gain <= DC_OFFSET:
            offset = 0.0
        scaled = _read(data, _Budget(budget.limit_s), lambda rate, n: _Samples(rate, target, n, scale=(offset, gain)),
                       decoded.track)
    log.info("samples beyond full scale (peak %.3g): %s", peak,
             f"divided by their level {level:.3g} and clipped to ±1" if gain != 1.0 else "clipped to ±1")
    return scaled.finish()


def _mono(block: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames]: the mean of the channels, or the loudest channel where the channels
    cancel in the mean (a phase-inverted microphone or a miswired balanced line: left = -right, with or
    without a hum or a second voice both channels carry)."""
    if block.shape[1] == 1:
        return block[:, 0]
    mix = block.mean(axis=1, dtype=np.float32)
    energy = np.einsum("ij,ij->j", block, block, dtype=np.float64)
    if float(np.dot(mix, mix)) < CANCELLED_MIX * float(energy.sum()) / block.shape[1] ** 2:
        return np.ascontiguousarray(block[:, int(energy.argmax())])
    return mix


class _FrameBlocks:
    """PyAV's packed float frames ([1, frames * channels] each, a thousand samples or so) gathered into blocks
    of about ``BLOCK_FRAMES`` before they are mixed down and added: done frame by frame, that Python work made
    MP3 and AAC decoding 3-4 times slower."""

    def __init__(self, samples: _Samples):
        self.samples = samples
        self._parts: list[np.ndarray] = []
        self._frames = 0
        self._channels = 0

    def put(self, frames: Any) -> None:
        for frame in frames:
            channels = len(frame.layout.channels)
            if channels != self._channels:
                self.flush()
                self._channels = channels
            self._parts.append(frame.to_ndarray().reshape(-1, channels))
            self._frames += self._parts[-1].shape[0]
            if self._frames >= BLOCK_FRAMES:
                self.flush()

    def flush(self) -> None:
        if self._parts:
            block = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)
            self.samples.add(_mono(block))
        self._parts, self._frames = [], 0


def _read_blocks(f: Any, budget: _Budget, make: _Make) -> _Samples:
    """The samples of an open ``soundfile.SoundFile``, read block by block."""
    rate = int(f.samplerate)
    declared = f.frames if 0 < f.frames < _UNKNOWN_FRAMES else 0
    if declared:
        budget.check_header(declared / rate)
    out = make(rate, declared)
    block = np.empty((BLOCK_FRAMES, f.channels), np.float32)
    while True:
        got = f.read(dtype="float32", always_2d=True, out=block)
        if not len(got):
            break
        budget.add(len(got), rate)
        out.add(_mono(got))
    return out


def _read(data: bytes, budget: _Budget, make: _Make, track: int = 0) -> _Samples:
    """The file's samples through libsndfile, else FFmpeg; MP3 through FFmpeg (libsndfile's MPEG reader stops
    at the frame count of the first header: the parts after the first of joined MP3 files were dropped).
    ``track``: an audio track after the first (FFmpeg's)."""
    import soundfile as sf

    if track:
        return _read_av(data, "another audio track", budget, make, track)
    if _looks_mpeg(data) and _has_av():  # before libsndfile, whose MPEG reader warns on stderr of joined files
        return _read_av(data, "MPEG data that does not decode", budget, make)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.subtype.startswith("MPEG_LAYER") and _has_av():
                return _read_av(data, "MPEG data that does not decode", budget, make)
            samples = _read_blocks(f, budget, make)
            _check_cut_short(f.extra_info, samples.frames / samples.rate)
        if samples.frames or len(data) < EMPTY_FILE_BYTES:
            return samples
        # no samples, yet bytes after the header: a WAV whose recorder died before writing the data size
        # (0) leaves it so; FFmpeg reads up to the end of the file
        first_error = "the header announces no audio samples"
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # "Error opening <_io.BytesIO object at 0x...>: Format not recognised." -> "Format not recognised"
        first_error = str(exc).rsplit(">: ", 1)[-1].rstrip(".") or type(exc).__name__
        if first_error.startswith("File does not exist"):  # what libsndfile's MPEG reader says of bad frames
            first_error = "MPEG data that does not decode"
    return _read_av(data, first_error, _Budget(budget.limit_s), make)


def _looks_mpeg(data: bytes) -> bool:
    """An ID3 tag, or an MPEG audio frame's sync word and layer bits (layer 00 is AAC's ADTS: FFmpeg's too)."""
    return data[:3] == b"ID3" or len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


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


def _stream_seconds(stream: Any) -> float | None:
    """The audio track's own length: the ``DURATION`` tag FFmpeg's Matroska muxer writes per track
    ("00:00:10.064000000"; FFmpeg's demuxer gives a Matroska track the segment's duration), else its duration;
    None when it has neither."""
    tag = (getattr(stream, "metadata", None) or {}).get("DURATION")
    match = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*", str(tag or ""))
    if match:
        seconds = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])
        start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
        return seconds - start if 0 < start < seconds else seconds  # the track's end time, as Duration
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _container_seconds(container: Any, stream: Any) -> float | None:
    """The duration the audio track or the container declares (None when neither does). Matroska declares the
    segment's end time: a segment whose timestamps start at 4.5 h (ffmpeg's segment muxer keeps them) was
    "4.5 h long"; its start is taken off where that leaves a length (an under-estimate only delays the caps
    to decoding)."""
    own = _stream_seconds(stream)
    if own is not None:
        return own
    if container.duration is not None:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE units
        start = (container.start_time or 0) / 1_000_000
        return seconds - start if 0 < start < seconds else seconds
    return None


# containers whose declared length is written from the whole stream (not estimated from the bytes there
# are): a file with less audio than that was cut short
_WHOLE_LENGTH_FORMATS = ("matroska", "webm", "mov", "mp4")


def _declares_whole_length(container: Any, stream: Any, data: bytes) -> bool:
    """Whether the declared duration says how long the audio track was when written: its own length in a
    Matroska / WebM or MP4 header (a Matroska segment's length is its longest track's: 40 s of video beside
    10 s of audio is a whole file), an MP3's Xing / Info / VBRI frame (a frame count). Without one, FFmpeg
    estimates an MP3's length from its size, which a cut file shares."""
    names = set((container.format.name or "").split(","))
    if names & set(_WHOLE_LENGTH_FORMATS):
        return _stream_seconds(stream) is not None or len(container.streams) == 1
    if "mp3" in names:
        start = 10 + _syncsafe(data[6:10]) if data[:3] == b"ID3" else 0
        head = data[start:start + 4096]
        return any(tag in head for tag in (b"Xing", b"Info", b"VBRI"))
    return False


def _syncsafe(four: bytes) -> int:
    """An ID3v2 tag's size (7 bits a byte)."""
    return sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(four[:4])) if len(four) == 4 else 0


def _read_av(data: bytes, first_error: str, budget: _Budget, make: _Make, track: int = 0) -> _Samples:
    """FFmpeg through PyAV, for what libsndfile does not read (m4a, aac, webm, ...): the ``track``-th audio
    stream. A stream whose channel layout, sample format or rate changes midway (a broadcast capture's ad
    break, joined AAC files) gets a resampler per stretch, as the ``ffmpeg`` command reconfigures its filters."""
    try:
        import av
    except ImportError:
        raise ItemError(DECODE_ERROR, f"not a readable audio file ({first_error}); "
                        "install PyAV (pip install av) for m4a/aac/webm") from None
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise ItemError(DECODE_ERROR, "no audio stream in the file")
            stream = container.streams.audio[track]
            rate = stream.rate or SAMPLE_RATE
            declared = _container_seconds(container, stream)
            budget.check_header(declared)
            resampler = av.AudioResampler(format="flt", rate=rate)  # channels kept: mixed by ``_mono``
            samples = make(rate, int(declared * rate) if declared else 0)
            samples.track, samples.tracks = track, len(container.streams.audio)
            whole = declared is not None and _declares_whole_length(container, stream, data)
            blocks = _FrameBlocks(samples)
            setup = None
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
                    now = (frame.format.name, frame.layout.name, frame.sample_rate)
                    if setup is not None and now != setup:  # the rest of the old setup, then a new resampler
                        blocks.put(resampler.resample(None))
                        resampler = av.AudioResampler(format="flt", rate=rate)
                    setup = now
                    blocks.put(resampler.resample(frame))
            blocks.put(resampler.resample(None))
            blocks.flush()
    except ItemError:
        raise
    except Exception as exc:  # PyAV raises many error types (av.error.*, ValueError, ...)
        raise ItemError(DECODE_ERROR, f"not a readable audio file ({first_error}); FFmpeg: {_ffmpeg_reason(exc)}"
                        ) from exc
    got = samples.frames / rate
    if whole and not damaged and got < MIN_DECODED_SHARE * declared:  # a partial download or copy
        raise ItemError(DECODE_ERROR, f"truncated audio: the file holds {got:.1f} s of the {declared:.1f} s its "
                        "header announces")
    if damaged:  # a little damage is skipped; a file that is mostly damage is the row's decode_error
        if declared and got < MIN_DECODED_SHARE * declared:
            raise ItemError(DECODE_ERROR, f"damaged audio: {damaged} packets do not decode, and only {got:.1f} s "
                            f"of its {declared:.1f} s do")
        if not declared and (not samples.frames or damaged > (1 - MIN_DECODED_SHARE) * packets):
            raise ItemError(DECODE_ERROR, f"damaged audio: {damaged} of {packets} packets do not decode")
        log.info("skipped %d damaged packet(s); %.1f s of the audio decode", damaged, got)
    return samples
