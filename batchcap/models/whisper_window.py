"""Whisper's encoder on the clip, with the rest of its 30 s window taken from a cached silent window.

Whisper's encoder always looks at 30 s (1,500 positions after the convolutions). A 3 s clip is
90 % padding, and the encoder's cost is spent on it. Cutting the window instead (whisper.cpp's
``audio_ctx``) changes what the decoder sees and makes stock checkpoints loop on short clips.

This encoder keeps the full window but computes only its first ``L`` positions (the clip plus a
margin of silence). Every layer's self-attention still attends over all 1,500 positions: the keys
and values of the positions past ``L`` come from a run of the encoder over a window of pure
padding, computed once per padding value and cached; so do the final states of those positions
that the decoder's cross-attention reads. The one approximation: in a real run the padding
positions also attend to the clip, in the cached run they see only padding. On the 563 real clips
of the ASR benchmark this changes WER by less than a tenth of a point (README) at a fraction of the
encoder's cost.

The padding value is what Whisper's feature extractor gives zero samples: the clip's log-mel floor,
``(max - 8 + 4) / 4``, which depends on the clip's loudness; the cache is keyed by that value
rounded to ``step``.

The cached windows' keys and values (the bulk of a cached window: 37 MB of 39 for whisper-tiny.en
in float32, 74 of 77 MB for whisper-base) are kept in float16 where the model computes in float32,
and widened per batch: a run holds a window per loudness level (five on the English benchmark), and
this halves that memory. float16 keeps 11 bits of each value, far finer than the approximations above
(the tail's states, which the tests compare with transformers' encoder exactly, stay as computed).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float16 if it is float32 and fits (its values finite in float16), else as it is."""
    if tensor.dtype != torch.float32:
        return tensor
    half = tensor.to(torch.float16)
    return half if bool(torch.isfinite(half).all()) else tensor


@dataclass
class _Silence:
    keys: list[torch.Tensor]  # per encoder layer [heads, positions, head_dim]
    values: list[torch.Tensor]
    states: torch.Tensor  # encoder output [positions, d_model]
    cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per decoder layer: its cross-attention K, V


class LiveWindowEncoder:
    """Runs ``encoder`` (a transformers WhisperEncoder) on a live prefix of the window."""

    def __init__(self, encoder: Any, decoder: Any = None, *, step: float = 0.1, max_cached: int = 8,
                 compact: bool = True):
        self.encoder = encoder
        self.compact = compact  # keep the cached windows' keys and values in float16 (see the module's text)
        self.decoder = decoder
        self.step = step
        self.max_cached = max_cached
        self.positions = encoder.embed_positions.weight.shape[0]  # 1,500
        self._cache: OrderedDict[float, _Silence] = OrderedDict()

    @property
    def frames(self) -> int:
        """Mel frames of Whisper's full window (3,000)."""
        return self.positions * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]

    # --- the encoder's pieces, as WhisperEncoder / WhisperEncoderLayer compute them -------------
    def _embed(self, features: torch.Tensor, length: int) -> torch.Tensor:
        enc = self.encoder
        hidden = functional.gelu(enc.conv2(functional.gelu(enc.conv1(features))))
        hidden = hidden[:, :, :length].permute(0, 2, 1)
        return hidden + enc.embed_positions.weight[:length]

    @staticmethod
    def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    @staticmethod
    def _feed_forward(layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
        if hidden.dtype == torch.float16:
            limit = torch.finfo(hidden.dtype).max - 1000
            hidden = hidden.clamp(-limit, limit)
        return hidden

    def _attend(self, layer: Any, hidden: torch.Tensor, tail: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention of ``hidden``'s positions over themselves followed by the cached tail's keys
        and values (``tail(dtype)`` gives them, in the dtype of this layer's own); returns the new hidden
        states and this layer's own keys and values."""
        attn = layer.self_attn
        normed = layer.self_attn_layer_norm(hidden)
        query = self._heads(attn, attn.q_proj(normed) * attn.scaling)
        key = self._heads(attn, attn.k_proj(normed))
        value = self._heads(attn, attn.v_proj(normed))
        all_keys, all_values = key, value
        if tail is not None:
            keys, values = tail(key.dtype)
            all_keys = torch.cat([key, keys], dim=2)
            all_values = torch.cat([value, values], dim=2)
        out = functional.scaled_dot_product_attention(query, all_keys, all_values, scale=1.0)
        out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        return hidden + attn.out_proj(out), key, value

    # --- the cached silent window -------------------------------------------------------------
    def key(self, pad_value: float) -> float:
        return round(round(pad_value / self.step) * self.step, 6)

    def silence(self, pad_value: float) -> _Silence:
        """The encoder's keys, values and output for a window of nothing but ``pad_value``."""
        key = self.key(pad_value)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        weight = self.encoder.conv1.weight
        features = torch.full((1, weight.shape[1], self.frames), key, dtype=weight.dtype, device=weight.device)
        hidden = self._embed(features, self.positions)
        keys, values = [], []
        for layer in self.encoder.layers:
            hidden, k, v = self._attend(layer, hidden)
            hidden = self._feed_forward(layer, hidden)
            keys.append(self._store(k[0]))
            values.append(self._store(v[0]))
        silence = _Silence(keys, values, self.encoder.layer_norm(hidden)[0])
        self._cache[key] = silence
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return silence

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        return _compact(tensor) if self.compact else tensor

    # --- a batch ------------------------------------------------------------------------------
    @staticmethod
    def _tails(silences: list[_Silence], batch: int) -> tuple[list[_Silence], Any]:
        """The distinct cached windows of a batch, and a function stacking one of their tensors per clip,
        in ``dtype`` (each window's part widened before it is repeated for the batch's clips)."""
        unique = {id(s): s for s in silences}
        groups = list(unique.values())
        if len(groups) == 1:
            def one(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
                part = parts[0].to(dtype)
                return part[None].expand(batch, *part.shape)
            return groups, one
        order = list(unique)
        index = torch.tensor([order.index(id(s)) for s in silences], device=groups[0].states.device)

        def pick(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.stack([p.to(dtype) for p in parts]).index_select(0, index)
        return groups, pick

    def cross_attention_cache(self, states: torch.Tensor, length: int, pad_values: list[float]) -> Any:
        """The decoder's cross-attention keys and values for encoder output ``states`` whose positions
        from ``length`` on are the cached silent window's: only the live positions are projected.

        Returns an ``EncoderDecoderCache`` to pass to ``generate`` (greedy: one row per clip). With
        batchcap's attention function (attention.py) the cache holds each clip's live positions and,
        once per silent window, the tail shared by the clips padded with it; otherwise every clip's
        tail is copied in.
        """
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        from .attention import NAME, SharedTail, attach_shared_tail

        silences = [self.silence(v) for v in pad_values]
        for silence in silences:
            if silence.cross is None:
                projected = [self._project(layer.encoder_attn, silence.states[None]) for layer in self.decoder.layers]
                silence.cross = [(self._store(k[0]), self._store(v[0])) for k, v in projected]
        groups, tail = self._tails(silences, states.shape[0])
        shared = getattr(self.decoder.config, "_attn_implementation", None) == NAME
        index = self._group_rows(silences, groups, states.device) if shared else []
        live = states[:, :length]
        cross = DynamicCache()
        for i, layer in enumerate(self.decoder.layers):
            key, value = self._project(layer.encoder_attn, live)
            if shared:
                cross.update(key.contiguous(), value.contiguous(), i)
                attach_shared_tail(cross.layers[i].keys, SharedTail(
                    [s.cross[i][0][:, length:].to(key.dtype) for s in groups],
                    [s.cross[i][1][:, length:].to(value.dtype) for s in groups], index))
                continue
            keys = torch.cat([key, tail([s.cross[i][0][:, length:] for s in groups], key.dtype)], dim=2)
            values = torch.cat([value, tail([s.cross[i][1][:, length:] for s in groups], value.dtype)], dim=2)
            cross.update(keys, values, i)
        return EncoderDecoderCache(DynamicCache(), cross)

    @staticmethod
    def _group_rows(silences: list[_Silence], groups: list[_Silence], device: Any) -> list[Any]:
        """Per distinct silent window, the batch rows padded with it (None: all of them)."""
        if len(groups) == 1:
            return [None]
        return [torch.tensor([row for row, s in enumerate(silences) if s is group], device=device)
                for group in groups]

    def _project(self, attn: Any, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(attn, attn.k_proj(states)), self._heads(attn, attn.v_proj(states))

    def __call__(self, features: torch.Tensor, pad_values: list[float]) -> torch.Tensor:
        """Encoder output [batch, 1500, d_model] for ``features`` [batch, n_mels, frames] (frames
        < 3,000, ending in padding), each clip padded with its own ``pad_values`` entry."""
        length = features.shape[-1] // (self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0])
        if length < self.positions:
            # two more padding frames, so the last live positions' convolutions see what the full window has
            features = functional.pad(features, (0, 2), mode="replicate")
        silences = [self.silence(v) for v in pad_values]
        groups, tail = self._tails(silences, features.shape[0])
        hidden = self._embed(features, length)
        for i, layer in enumerate(self.encoder.layers):
            def cached(dtype: torch.dtype, i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
                return (tail([s.keys[i][:, length:] for s in groups], dtype),
                        tail([s.values[i][:, length:] for s in groups], dtype))
            hidden, _, _ = self._attend(layer, hidden, cached)
            hidden = self._feed_forward(layer, hidden)
        hidden = self.encoder.layer_norm(hidden)
        rest = tail([s.states[length:] for s in groups], hidden.dtype)
        return torch.cat([hidden, rest], dim=1)
