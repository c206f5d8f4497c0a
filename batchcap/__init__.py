"""batchcap: caption images and transcribe recordings in batches, into parquet or CSV tables.

    from batchcap import transcribe, caption_images
    transcribe("calls/", "calls.parquet", model="/models/whisper-small")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AudioOptions", "ImageOptions", "RunResult", "__version__", "caption_images", "transcribe"]

_LAZY = {
    "transcribe": ("batchcap.asr", "transcribe"),
    "AudioOptions": ("batchcap.asr", "AudioOptions"),
    "caption_images": ("batchcap.captioning", "caption_images"),
    "ImageOptions": ("batchcap.captioning", "ImageOptions"),
    "RunResult": ("batchcap.runner", "RunResult"),
}


def __getattr__(name: str) -> Any:  # heavy modules (torch, transformers) load on first use only
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'batchcap' has no attribute {name!r}")
