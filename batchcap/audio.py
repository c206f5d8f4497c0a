"""Decode and validate audio: any container libsndfile or FFmpeg (PyAV) reads -> mono float32 at 16 kHz."""

from __future__ import annotations

import io
import logging
import math

import numpy as np

from .items import DECODE_ERROR, EMPTY, ItemError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000


def decode_audio(data: bytes, *, sample_rate: int = SAMPLE_RATE, min_duration: float = 0.1,
                 silence_dbfs: float = -60.0) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``; ItemError for anything a model should not see."""
    if not data:
        raise ItemError(DECODE_ERROR, "empty file (0 bytes)")
    samples, rate = _read(data)
    if samples.size == 0:
        raise ItemError(EMPTY, "the file holds no audio samples", fields={"duration_s": 0.0})
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise ItemError(DECODE_ERROR, f"audio contains {bad} NaN or infinite samples")
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    duration = samples.shape[0] / rate
    if duration < min_duration:
        raise ItemError(EMPTY, f"clip is {duration * 1000:.0f} ms long, shorter than the {min_duration:g} s "
                        "minimum (--min-duration)", fields={"duration_s": round(duration, 3)})
    peak = float(np.abs(samples).max())
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak_db < silence_dbfs:
        raise ItemError(EMPTY, f"audio is silent (peak {peak_db:.0f} dBFS, below the {silence_dbfs:g} dBFS "
                        "threshold of --silence-threshold)", fields={"duration_s": round(duration, 3)})
    if rate != sample_rate:
        import soxr

        samples = soxr.resample(samples, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read(data: bytes) -> tuple[np.ndarray, int]:
    """(samples as float32 [frames] or [frames, channels], sample rate)."""
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return (samples[:, 0] if samples.shape[1] == 1 else samples), int(rate)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # "Error opening <_io.BytesIO object at 0x...>: Format not recognised." -> "Format not recognised"
        first_error = str(exc).rsplit(">: ", 1)[-1].rstrip(".") or type(exc).__name__
    return _read_av(data, first_error)


def _read_av(data: bytes, first_error: str) -> tuple[np.ndarray, int]:
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
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except ItemError:
        raise
    except Exception as exc:  # PyAV raises many error types (av.error.*, ValueError, ...)
        raise ItemError(DECODE_ERROR, f"not a readable audio file ({first_error})") from exc
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return samples, int(rate)
