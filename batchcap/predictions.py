"""What a model gives for one item: the typed values that cross from ``models/`` to the scorers."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Transcript:
    text: str
    language: str | None = None
    # the hallucination guard (models/guard.py): how the text was decoded, and its scores
    language_prob: float | None = None
    decode: str | None = None
    no_speech_prob: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    segments: list[Any] | None = None  # whisper_timestamps.Segment, times from the recording's start

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Transcript:
        """From a transcriber's result dict (keys this class does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Caption:
    caption: str
