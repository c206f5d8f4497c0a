"""The options of both fine-tunes, declared once: the library's dataclasses and the CLI's defaults.

This module imports nothing heavy (no torch, no transformers), so the Click layer can read its defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..fetch import FetchConfig

DEFAULT_IMAGE_MODEL = "nlpconnect/vit-gpt2-image-captioning"
DEFAULT_AUDIO_MODEL = "openai/whisper-small"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
BEST_METRICS = ("cider_d", "val_loss")
LORA_SCOPES = ("all", "decoder")
LANGUAGE_COLUMN = "language"  # the manifest column train audio reads a row's language from, when present


@dataclass
class TrainOptions:
    """What both fine-tunes take: runtime, the training loop's shape, data and the output directory."""

    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (half precision: CUDA autocast)
    seed: int = 0
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1  # batches per optimizer step
    val_fraction: float = 0.1  # seeded share of the manifest's items held out (when no val_manifest)
    val_manifest: str | None = None
    limit: int | None = None  # only the first N manifest rows
    workers: int = 8  # threads fetching and decoding the manifest
    resume: bool = False
    overwrite: bool = False
    path_column: str | None = None
    reference_columns: Sequence[str] = ()
    id_column: str | None = None
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def update(self, overrides: dict[str, Any], caller: str) -> None:
        """Set keyword overrides; an unknown name is the caller's TypeError."""
        for key, value in overrides.items():
            if key not in {f.name for f in dataclasses.fields(self)}:
                raise TypeError(f"{caller}() got an unexpected option {key!r}")
            setattr(self, key, value)


@dataclass
class ImageTrainOptions(TrainOptions):
    model: str | None = None  # a VisionEncoderDecoder checkpoint; None: DEFAULT_IMAGE_MODEL unless encoder+decoder
    encoder: str | None = None  # a fresh pair: vision encoder + text decoder (hub ids or directories)
    decoder: str | None = None
    unfreeze_last: int = 5
    train_all: bool = False
    epochs: int = 10
    lr: float = 5e-5
    max_length: int = 32  # caption tokens, EOS included
    max_grad_norm: float = 1.0
    best_metric: str = "cider_d"
    cache_dir: str | None = None  # downloaded images; None: OUT_DIR/cache


@dataclass
class AudioTrainOptions(TrainOptions):
    model: str = DEFAULT_AUDIO_MODEL
    language: str | None = None  # rows without a language column value; required for multilingual checkpoints
    language_column: str | None = None  # None: the manifest's ``language`` column when it has one
    task: str = "transcribe"
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_targets: Sequence[str] = ("q_proj", "v_proj")
    lora_scope: str = "all"  # all: encoder and decoder; decoder: decoder only (no backward through the encoder)
    unfreeze_last: int = 0  # top decoder layers trained in full
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 1e-3
    warmup: float = 0.1  # < 1: fraction of the steps; >= 1: steps
    weight_decay: float = 0.0
    eval_batch_size: int | None = None
    num_beams: int = 1  # validation decoding
    normalize: str = "auto"
    progress: bool = False  # transformers' progress bars
    fetch: FetchConfig = field(default_factory=lambda: FetchConfig(max_bytes=2 * 2**30))


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (what the CLI shows and uses)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{cls.__name__} has no field {name!r}")
