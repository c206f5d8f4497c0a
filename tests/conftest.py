"""Shared fixtures: tiny models built offline, real audio files, a loopback HTTP server."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network beyond loopback
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.tiny_whisper import make_tiny_whisper  # noqa: E402


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random multilingual Whisper saved like a real checkpoint."""
    return make_tiny_whisper(str(tmp_path_factory.mktemp("models") / "tiny-whisper"), multilingual=True)


@pytest.fixture(scope="session")
def tiny_whisper_en(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random English-only Whisper (like whisper-*.en)."""
    return make_tiny_whisper(str(tmp_path_factory.mktemp("models") / "tiny-whisper.en"), multilingual=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode faster on one thread than on two contended ones (for a module's tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, channels: int = 1, amp: float = 0.3,
         seed: int = 0) -> np.ndarray:
    """A tone with a little noise: audible, not silent, deterministic."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    mono = (amp * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def write_audio(path, seconds: float, rate: int = 16000, channels: int = 1, freq: float = 440.0,
                subtype: str | None = None) -> str:
    import soundfile as sf

    sf.write(str(path), tone(seconds, rate, freq, channels), rate, subtype=subtype)
    return str(path)
from tests.httpserver import http_server  # noqa: E402,F401
from tests.tiny_models import tiny_captioner  # noqa: E402,F401
