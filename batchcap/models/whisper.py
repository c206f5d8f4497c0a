"""Whisper through transformers: batched, with the encoder computed on the clip only.

Clips up to 30 s: by default the encoder runs on the clip plus ``window_margin_s`` seconds, and
the rest of Whisper's 30 s window comes from a cached all-padding window (see whisper_window.py:
every position still attends over the full window, so checkpoints behave as trained).
``full_window=True`` runs the stock encoder over 3,000 frames for every clip, exactly as
openai-whisper and transformers do. Recordings over 30 s go through transformers' sequential
long-form decoding (timestamps, 30 s windows, full window each) and are never cut.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE
from ..items import FatalError
from .attention import use_step_attention
from .common import autocast_context, load_error_message, load_pretrained, resolve_device, resolve_precision

log = logging.getLogger(__name__)

HOP = 160  # samples per mel frame
WINDOW_FRAMES = 3000  # 30 s
FRAME_STEP = 50  # live windows are rounded up to half seconds (fewer distinct shapes)


@dataclass
class Prepared:
    """One clip ready for the model: its log-mel features (computed in a worker thread)."""

    features: np.ndarray  # [n_mels, frames]
    duration_s: float
    long_form: bool
    pad_value: float  # what padding frames take: the clip's log-mel floor (Whisper's value for zero samples)


class WhisperFeatures:
    """Whisper's log-mel features of a clip (worker threads, Ray CPU tasks): the feature extractor
    only, no model weights."""

    def __init__(self, model: str, *, full_window: bool = False, window_margin_s: float = 1.0):
        from transformers import WhisperFeatureExtractor

        if not full_window and window_margin_s <= 0:
            raise FatalError("the window margin must be positive (it holds the padding the encoder sees)")
        try:
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(model)
        except Exception as exc:
            raise FatalError(load_error_message(model, exc)) from exc
        self.full_window = full_window
        self.window_margin_s = window_margin_s

    def prepare(self, samples: np.ndarray) -> Prepared:
        duration = len(samples) / SAMPLE_RATE
        if len(samples) > WINDOW_FRAMES * HOP:
            feats = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
                                           return_tensors="np").input_features[0]
            return Prepared(feats, duration, True, float(feats.min()))
        frames = WINDOW_FRAMES
        if not self.full_window:
            needed = math.ceil((duration + self.window_margin_s) * 100 / FRAME_STEP) * FRAME_STEP
            frames = min(WINDOW_FRAMES, needed)
        feats = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, padding="max_length",
                                       max_length=frames * HOP, return_tensors="np").input_features[0]
        # zero samples get the clamp floor (max - 8), normalised like every frame: (x + 4) / 4
        return Prepared(feats, duration, False, float(feats.min()))


class WhisperTranscriber:
    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", language: str | None = None,
                 task: str = "transcribe", num_beams: int = 1, max_new_tokens: int | None = None,
                 full_window: bool = False, window_margin_s: float = 1.0,
                 attn_implementation: str | None = "sdpa"):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

        self.name = model
        self.device = resolve_device(device)
        self.dtype, self.autocast = resolve_precision(dtype, self.device)
        self._features = WhisperFeatures(model, full_window=full_window, window_margin_s=window_margin_s)
        self.feature_extractor = self._features.feature_extractor
        try:
            self.tokenizer = WhisperTokenizerFast.from_pretrained(model)
        except Exception as exc:
            raise FatalError(load_error_message(model, exc)) from exc
        self.model = load_pretrained(WhisperForConditionalGeneration, model, self.dtype, attn_implementation)
        self.model.to(self.device).eval()
        if self.autocast is not None:  # the matmuls' weights in the autocast dtype, once (see cast_matmul_weights)
            from .common import cast_matmul_weights

            cast_matmul_weights(self.model, self.autocast)
        use_step_attention(self.model, self.device)
        self._torch = torch
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False)) and bool(getattr(gen, "lang_to_id", None))
        if language and not self.multilingual:
            if language.lower() not in ("en", "english"):
                raise FatalError(f"{model} is an English-only model; it cannot take --language {language}")
            language = None
        if task == "translate" and not self.multilingual:
            raise FatalError(f"{model} is an English-only model; it cannot --task translate")
        self.language = language
        self.task = task
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.full_window = full_window
        self.window_margin_s = window_margin_s
        from .whisper_window import LiveWindowEncoder

        self.live_encoder = LiveWindowEncoder(self.model.get_encoder(), self.model.get_decoder())
        self._id_to_lang = {v: k.strip("<|>") for k, v in (getattr(gen, "lang_to_id", None) or {}).items()}
        # An explicit language/task replaces the checkpoint's forced_decoder_ids (a v4-era field
        # that conflicts with them in v5 generate).
        if getattr(gen, "forced_decoder_ids", None) is not None and self.multilingual:
            gen.forced_decoder_ids = None

    @property
    def english_spelling_dir(self) -> str | None:
        return self.name if os.path.isdir(self.name) else getattr(self.tokenizer, "name_or_path", None)

    def prepare(self, samples: np.ndarray) -> Prepared:
        """Features of one clip for this transcriber's window settings (see WhisperFeatures)."""
        return self._features.prepare(samples)

    # --- main thread ------------------------------------------------------------------------
    def transcribe(self, batch: list[Prepared]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(batch)
        short = [i for i, p in enumerate(batch) if not p.long_form]
        long = [i for i, p in enumerate(batch) if p.long_form]
        with self._torch.inference_mode(), self._autocast():
            if short:
                for i, res in zip(short, self._short([batch[i] for i in short])):
                    out[i] = res
            if long:
                for i, res in zip(long, self._long([batch[i] for i in long])):
                    out[i] = res
        return [r for r in out if r is not None]

    def _autocast(self) -> Any:
        return autocast_context(self.device, self.autocast)

    def _pad_stack(self, batch: list[Prepared]) -> Any:
        """Stack features of different lengths; padding frames take each clip's own floor value,
        which is exactly what Whisper's feature extractor gives zero samples."""
        width = max(p.features.shape[-1] for p in batch)
        rows = [np.pad(p.features, ((0, 0), (0, width - p.features.shape[-1])), constant_values=p.pad_value)
                for p in batch]
        return self._torch.from_numpy(np.stack(rows)).to(self.device, self.dtype)

    def _encode(self, batch: list[Prepared]) -> tuple[Any, Any]:
        """Encoder outputs, and for a live window the decoder's cross-attention cache built from it."""
        from transformers.modeling_outputs import BaseModelOutput

        features = self._pad_stack(batch)
        if features.shape[-1] >= WINDOW_FRAMES:
            return self.model.get_encoder()(features), None
        pad_values = [p.pad_value for p in batch]
        states = self.live_encoder(features, pad_values)
        cache = None
        if self.num_beams == 1:  # beam search expands the batch: it builds its own cache
            cache = self.live_encoder.cross_attention_cache(states, features.shape[-1] // 2, pad_values)
        return BaseModelOutput(last_hidden_state=states), cache

    def _languages(self, n: int, **inputs: Any) -> list[str] | None:
        if not self.multilingual:
            return None
        if self.language:
            return [self.language] * n
        ids = self.model.detect_language(**inputs).tolist()
        return [self._id_to_lang.get(i, "en") for i in ids]

    def _generate_kwargs(self, languages: list[str] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "do_sample": False}
        if self.max_new_tokens:
            kwargs["max_new_tokens"] = self.max_new_tokens
        if self.multilingual:
            kwargs["language"] = languages
            kwargs["task"] = self.task
        return kwargs

    def _short(self, batch: list[Prepared]) -> list[dict[str, Any]]:
        encoded, cache = self._encode(batch)
        languages = self._languages(len(batch), encoder_outputs=encoded)
        kwargs = self._generate_kwargs(languages)
        if cache is not None:
            kwargs["cache"] = cache
        tokens = self.model.generate(encoder_outputs=encoded, **kwargs)
        return self._results(tokens, languages)

    def _long(self, batch: list[Prepared]) -> list[dict[str, Any]]:
        lengths = [p.features.shape[-1] for p in batch]
        width = max(lengths)
        features = self._pad_stack(batch)
        mask = self._torch.zeros((len(batch), width), dtype=self._torch.long, device=self.device)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        languages = self._languages(len(batch), input_features=features[:, :, :WINDOW_FRAMES])
        tokens = self.model.generate(input_features=features, attention_mask=mask, return_timestamps=True,
                                     condition_on_prev_tokens=False, **self._generate_kwargs(languages))
        if isinstance(tokens, dict):
            tokens = tokens["sequences"]
        return self._results(tokens, languages)

    def _results(self, tokens: Any, languages: list[str] | None) -> list[dict[str, Any]]:
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        langs = languages or ["en"] * len(texts)
        return [{"text": t.strip(), "language": lang} for t, lang in zip(texts, langs)]
