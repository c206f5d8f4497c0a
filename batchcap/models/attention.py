"""SDPA, except for one-token decoding steps on the CPU.

PyTorch's CPU kernel for ``scaled_dot_product_attention`` is slow when the query is a single token
and the keys are many (a decoder step attending over Whisper's 1,500 encoder positions): measured
at 16 x 6 heads x 1,500 keys, 12 ms in bf16 and 5 ms in fp32, against 3.7 / 4.1 ms for a plain
matmul-softmax-matmul. This attention function takes that plain path for one-token queries and SDPA
for everything else; the softmax runs in float32 either way.

It also takes cross-attention keys and values in two parts (``SharedTail``): per-clip keys for the
first positions and, for the rest, one tensor shared by every clip of a group. Whisper's live window
(whisper_window.py) uses it: the silent tail of the 30 s window is the same for every clip with the
same padding value, so the decoder's cross-attention cache holds it once instead of once per clip.

``repeated_cross_cache`` uses the same split for the rows that decode one input several times (the
samples of the guard's fallback): one copy of the input's keys for all of them. For beam-search
captions it was slower (many images per batch, each a Python-level group, over only 197 positions), so
their beams get copies.

Used on the CPU for Whisper (identical transcripts, a quarter less model time) and for captioning
(GPT-2 decoding over 197 image patches: identical fp32 captions, greedy +13 % and beam 4 +27 %
images/s in bf16, where it also matched fp32 captions more often than SDPA did).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

NAME = "batchcap_sdpa_step"
TAIL_ATTR = "_batchcap_shared_tail"


@dataclass
class SharedTail:
    """The positions after a cache's own keys/values, shared by the clips of each group.

    ``keys[g]`` / ``values[g]``: [heads, positions, head_dim] of group g; ``index[g]``: the batch rows
    of group g (a LongTensor), or None when the one group holds every row.
    """

    keys: list[Any]
    values: list[Any]
    index: list[Any]

    def full(self, key: Any, value: Any) -> tuple[Any, Any]:
        """The whole keys and values, every row's tail materialised (what the split path avoids)."""
        import torch

        rows = key.shape[0]
        tail_k = key.new_empty((rows, *self.keys[0].shape))
        tail_v = value.new_empty((rows, *self.values[0].shape))
        for k, v, index in zip(self.keys, self.values, self.index):
            if index is None:
                tail_k.copy_(k.expand_as(tail_k))
                tail_v.copy_(v.expand_as(tail_v))
            else:
                tail_k.index_copy_(0, index, k.to(key.dtype).expand(len(index), *k.shape))
                tail_v.index_copy_(0, index, v.to(value.dtype).expand(len(index), *v.shape))
        return torch.cat([key, tail_k], dim=2), torch.cat([value, tail_v], dim=2)

    def kept(self, keep: Any, rows: int) -> SharedTail:
        """The tail of the rows ``keep`` (indices among the ``rows`` rows), renumbered from 0 in that
        order; a group left without rows is left out."""
        import torch

        if len(self.index) == 1 and self.index[0] is None:  # one group holds every row
            return self
        position = torch.full((rows,), -1, dtype=torch.long, device=keep.device)
        position[keep] = torch.arange(len(keep), device=keep.device)
        keys, values, index = [], [], []
        for k, v, members in zip(self.keys, self.values, self.index):
            members = position[members]
            members = members[members >= 0]
            if len(members):
                keys.append(k)
                values.append(v)
                index.append(members)
        return SharedTail(keys, values, index)


def attach_shared_tail(key: Any, tail: SharedTail) -> None:
    """Mark a cached key tensor as followed by ``tail`` (read by this module's attention function)."""
    setattr(key, TAIL_ATTR, tail)


def uses_step_attention(module: Any) -> bool:
    """Whether ``module`` (a model or a sub-model) runs this module's attention function."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None) == NAME


@functools.cache
def beam_cache_class() -> type:
    """An EncoderDecoderCache that reorders only its self-attention part when beams are reordered.

    Beams never leave their input, and the cross-attention keys and values of an input's beams are the
    same, so reordering them changes nothing; transformers copies them all at every step anyway
    (Whisper-tiny, 3 beams: 55 MB per step, and on 25 s of noise 80 s where greedy took 4)."""
    from transformers.cache_utils import EncoderDecoderCache

    class EncoderDecoderCacheForBeams(EncoderDecoderCache):
        def reorder_cache(self, beam_idx: Any) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return EncoderDecoderCacheForBeams


def repeated_cross_cache(cross: Any, repeats: int, shared: bool) -> Any:
    """A cross-attention cache (a DynamicCache) for ``repeats`` consecutive rows per row of ``cross``
    (a filled DynamicCache, one row per input): the samples of one clip, the beams of one image.

    ``shared`` (the model runs this module's attention function): each input's keys and values stay
    one tensor, read once per decoding step for all its rows instead of once per row, which is what
    a decoding step over an encoder's keys costs (Whisper: 1,500 positions per layer); only the first
    position is kept per row (the cache's own part). Otherwise they are copied per row. Either way
    nothing is projected again. The rows of an input must stay together (beam search reorders beams
    within an image; a cache holding this must not reorder its cross-attention part)."""
    import torch
    from transformers.cache_utils import DynamicCache

    out = DynamicCache()
    for i, (key, value) in enumerate(_whole_layers(cross)):
        if not shared or repeats == 1 or key.shape[2] < 2:
            out.update(key.repeat_interleave(repeats, 0), value.repeat_interleave(repeats, 0), i)
            continue
        inputs = key.shape[0]
        out.update(key[:, :, :1].repeat_interleave(repeats, 0), value[:, :, :1].repeat_interleave(repeats, 0), i)
        rows = [None] if inputs == 1 else [torch.arange(c * repeats, (c + 1) * repeats, device=key.device)
                                           for c in range(inputs)]
        attach_shared_tail(out.layers[i].keys, SharedTail([key[c, :, 1:].contiguous() for c in range(inputs)],
                                                          [value[c, :, 1:].contiguous() for c in range(inputs)],
                                                          rows))
    return out


def cache_rows(cross: Any, index: Any) -> Any:
    """The rows ``index`` of a filled cross-attention cache (a DynamicCache), or None when ``cross``
    is None or still empty (to be filled by the decoder's first step)."""
    from transformers.cache_utils import DynamicCache

    if cross is None or not len(cross.layers) or cross.get_seq_length() == 0:
        return None
    out = DynamicCache()
    for i, (key, value) in enumerate(_whole_layers(cross)):
        out.update(key.index_select(0, index), value.index_select(0, index), i)
    return out


def own_cache(cache: Any) -> Any:
    """A copy of ``cache`` (an EncoderDecoderCache or a DynamicCache) that holds the same tensors (no data
    copied, shared tails kept): rows dropped from it with ``keep_cache_rows``, or layers it fills, leave
    ``cache`` as it was. A filled cross-attention cache is read again after a decoding call that dropped
    rows (the fallback's samples, word alignment)."""
    import copy

    if hasattr(cache, "cross_attention_cache"):
        out = copy.copy(cache)
        out.self_attention_cache = own_cache(cache.self_attention_cache)
        out.cross_attention_cache = own_cache(cache.cross_attention_cache)
        if isinstance(getattr(cache, "is_updated", None), dict):
            out.is_updated = dict(cache.is_updated)
        return out
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def keep_cache_rows(cache: Any, keep: Any) -> None:
    """Keep only the rows ``keep`` (a LongTensor of row indices, in order) of a cache, in place: an
    EncoderDecoderCache (both parts) or a DynamicCache, shared tails renumbered with their rows."""
    parts = [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "cross_attention_cache") \
        else [cache]
    for part in parts:
        for layer in part.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or not hasattr(keys, "index_select"):
                continue  # a layer not filled yet
            tail = getattr(keys, TAIL_ATTR, None)
            rows = keys.shape[0]
            layer.keys = keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            if tail is not None:
                attach_shared_tail(layer.keys, tail.kept(keep, rows))


def _whole_layers(cross: Any) -> Any:
    """Each layer's keys and values of a cache, shared tails copied in."""
    for layer in cross.layers:
        tail = getattr(layer.keys, TAIL_ATTR, None)
        yield tail.full(layer.keys, layer.values) if tail is not None else (layer.keys, layer.values)


SCORES_PER_CALL = 1 << 22  # attention scores held at once (float32) by the split path: 16 MB


def _split_attention(query: Any, key: Any, value: Any, tail: SharedTail, scaling: float) -> Any:
    """softmax(q [k; tail_k]^T) [v; tail_v], with each group's tail multiplied once for all its rows.
    Many query positions at once (a teacher-forced pass over a transcript: word alignment) are taken a
    slice at a time, so that the scores of every row, head, position and key are never all held: 16 rows
    x 8 heads x 150 tokens x 1,500 keys would be 115 MB, and its softmax as much again."""
    import torch

    rows, heads, steps, dim = query.shape
    per_step = rows * heads * (key.shape[2] + tail.keys[0].shape[1])
    step = max(1, SCORES_PER_CALL // per_step)
    if steps > step:
        return torch.cat([_split_attention(query[:, :, a:a + step], key, value, tail, scaling)
                          for a in range(0, steps, step)], dim=1)
    live = key.shape[2]
    span = tail.keys[0].shape[1]
    scores = query.new_empty((rows, heads, steps, live + span), dtype=torch.float32)
    # one query position: keys x query is the faster order of the same products (oneDNN's bf16
    # matrix-vector kernel; 1.1 against 1.5 ms per layer at 16 rows x 6 heads x 1,250 keys)
    scores[..., :live] = (torch.matmul(key, query.transpose(2, 3)).transpose(2, 3) if steps == 1
                          else torch.matmul(query, key.transpose(2, 3)))
    for k, index in zip(tail.keys, tail.index):
        q = query if index is None else query.index_select(0, index)
        n = q.shape[0]
        part = torch.matmul(q.permute(1, 0, 2, 3).reshape(heads, n * steps, dim), k.to(q.dtype).transpose(1, 2))
        part = part.view(heads, n, steps, span).permute(1, 0, 2, 3)
        if index is None:
            scores[..., live:] = part
        else:
            scores[index, :, :, live:] = part.float()
    if scaling != 1.0:
        scores *= scaling
    weights = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(weights[..., :live], value).float()  # the two parts add up in float32
    for v, index in zip(tail.values, tail.index):
        w = weights[..., live:] if index is None else weights[..., live:].index_select(0, index)
        n = w.shape[0]
        part = torch.matmul(w.permute(1, 0, 2, 3).reshape(heads, n * steps, span), v.to(w.dtype))
        part = part.view(heads, n, steps, dim).permute(1, 0, 2, 3)
        if index is None:
            out += part
        else:
            out.index_add_(0, index, part.float())
    return out.to(value.dtype).transpose(1, 2).contiguous()


def _step_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tail = getattr(key, TAIL_ATTR, None)
    if tail is not None:
        if attention_mask is None and not module.training:
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            return _split_attention(query, key, value, tail, scale), None
        key, value = tail.full(key, value)
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if scaling != 1.0:
        scores = scores * scaling
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.float().softmax(dim=-1).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - a transformers without the registries
        return False
    AttentionInterface.register(NAME, _step_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks SDPA gets
    return True


def use_step_attention(model: Any, device: Any) -> bool:
    """On the CPU, switch ``model`` from SDPA to SDPA-with-plain-decoding-steps; False where it
    stays as it was (other devices, other attention implementations)."""
    if device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa" or not _register():
        return False
    try:
        model.set_attn_implementation(NAME)
    except Exception as exc:  # noqa: BLE001 - an optimisation: a model that refuses it keeps SDPA
        log.debug("keeping SDPA: %s", exc)
        return False
    return True
