"""Greedy (and sampled) decoding that stops computing a row once it has ended.

transformers' ``generate`` runs every row of a batch through each decoding step until the last row
ends: a batch where one transcript runs to 60 tokens and the others end by 20 pays for every row for
60 steps. On the 563 English clips (whisper-tiny.en) 32 % of the row-steps ``generate`` computed were
rows that had already ended; in the guard's sampled fallback (one clip: 4 temperatures x 5 samples =
20 rows), a single sample looping up to the token cap kept all 20 rows running for 26 steps where the
other 19 had ended by step 7.

``decode`` is that loop with ended rows dropped: once a quarter of the rows still decoded have ended
(so that the caches are not copied at every step), they leave the decoder's caches and the
processors' per-row state (processors that hold any have ``keep_rows``). Each step is what greedy
``generate`` does: the decoder on the new tokens over its caches, the logits of the last position in
float32, the processors in order, then the highest-scoring token, or the token ``sample`` draws. Rows
that ended and are not dropped yet take the end token again, as ``generate`` pads them.

It also scores each hypothesis as openai-whisper does: the mean log-probability of its tokens up to
and including the end token, from the logits after the processors (before any temperature).

``limits`` gives each row its own maximum length: the guard cuts a clip's hypothesis one token past
the clip's token bound, and a looping short clip stops there rather than at the bound of the longest
clip in its batch.

``settle`` lets the caller end rows whose result it no longer needs: the guard's later fallback
temperatures are sampled in one call, and once a clip's first passing temperature is known its higher
ones are not kept (guard.FirstPass), so their samples stop there instead of running on, maybe to the
token cap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .attention import keep_cache_rows, own_cache
from .common import cache_kwarg

DROP_SHARE = 0.25  # ended rows are dropped once they are this share of the rows still decoded


@dataclass
class Decoded:
    sequences: Any  # [rows, length]: each row's prompt and generated tokens; ended rows padded with the end token
    logprobs: list[float | None]  # per row: mean log-probability of its tokens through the end token (None: none)
    stopped: frozenset[int] = frozenset()  # rows ``settle`` ended before their end token (incomplete, unused)
    capped: frozenset[int] = frozenset()  # rows cut at their own length limit (``limits``) before their end token


# settle(rows that just ended, hypothesis) -> rows to end now; hypothesis(row) -> (generated ids through the end
# token if any, mean log-probability)
Settle = Callable[[list[int], Callable[[int], tuple[list[int], float | None]]], list[int]]


def decode(decoder: Any, head: Any, prompts: Any, encoder_states: Any, cache: Any, processors: Sequence[Any], *,
           end_id: int, max_length: int, sample: Any = None, drop_share: float = DROP_SHARE,
           settle: Settle | None = None, limits: Sequence[int] | None = None) -> Decoded:
    """Decode ``prompts`` ([rows, begin] token ids, the same length for every row) until every row has
    ended or ``max_length`` tokens (prompt included); ``limits``: each row's own maximum length (at most
    ``max_length``), a row that reaches it leaves unended (``Decoded.capped``).

    ``decoder``: Whisper's decoder, called with ``cache`` (an EncoderDecoderCache; its cross-attention
    part filled already, or filled by the first step from ``encoder_states``, one row per prompt);
    ``head``: the projection from decoder states to logits (or a ``shortlist.ShortlistHead``, whose
    candidates are picked by the processors run on its estimate); ``processors``: called as
    ``p(input_ids, scores)`` on the rows still decoded; ``sample``: draws each row's token from its scores
    (``draw``), else the highest is taken. Rows are dropped with ``keep_cache_rows`` from decode's own
    copy of ``cache`` (``own_cache``: the caller's keeps every row) and with ``keep_rows(keep, rows)`` of the
    processors and ``sample`` that have it.
    ``settle``: called with the rows (original indices) that ended at a step (or reached their limit);
    the rows it returns end there too (``Decoded.stopped``)."""
    import torch

    rows, begin = prompts.shape
    device = prompts.device
    out = torch.full((rows, max(max_length, begin)), end_id, dtype=torch.long, device=device)
    out[:, :begin] = prompts
    total = torch.zeros(rows, dtype=torch.float32, device=device)
    count = torch.zeros(rows, dtype=torch.float32, device=device)
    alive = torch.arange(rows, device=device)  # the original row of each row still decoded
    ended = torch.zeros(rows, dtype=torch.bool, device=device)  # of those: ended, not dropped yet
    stateful = [p for p in (*processors, sample) if hasattr(p, "keep_rows")]
    key = cache_kwarg(decoder)
    cache = own_cache(cache)  # the caller's cache keeps its rows (it may be read again: samples, word times)
    ids, step, length = prompts, prompts, begin
    stopped: set[int] = set()
    capped: set[int] = set()
    limit = torch.tensor(limits, device=device) if limits is not None else None

    def hypothesis(row: int) -> tuple[list[int], float | None]:
        generated = out[row, begin:length].tolist()
        if end_id in generated:
            generated = generated[:generated.index(end_id) + 1]
        c = float(count[row])
        return generated, (float(total[row]) / c if c else None)
    while length < max_length:
        # encoder states are read only while the cross-attention cache is empty (the first step): a view
        # of the right batch size afterwards, never a copy
        hidden = decoder(input_ids=step, encoder_hidden_states=encoder_states[:step.shape[0]], use_cache=True,
                         **{key: cache}).last_hidden_state[:, -1]
        if hasattr(head, "refine"):  # an int8 estimate, float32 for what the rules leave best (shortlist.py)
            scores = head.estimate(hidden)
            ruled = scores.clone()
            for processor in processors:
                ruled = processor(ids, ruled)
            scores = head.refine(hidden, scores, ruled)
            del ruled
        else:
            scores = head(hidden).float()
        for processor in processors:
            scores = processor(ids, scores)
        norm = scores.logsumexp(-1)
        chosen = sample.draw(scores) if sample is not None else scores.argmax(-1)
        chosen = chosen.masked_fill(ended, end_id)
        picked = scores.gather(1, chosen[:, None])[:, 0] - norm
        counted = ~ended
        # an ended row's end token may be ruled out (-inf): where, not a product (-inf * 0 = nan)
        total.index_add_(0, alive, torch.where(counted, picked, torch.zeros_like(picked)))
        count.index_add_(0, alive, counted.float())
        out[alive, length] = chosen
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        length += 1
        new = (chosen == end_id) & ~ended
        ended |= new
        if limit is not None:  # rows at their own limit leave unended; settle hears of them too
            cut = (limit[alive] <= length) & ~ended
            if bool(cut.any()):
                capped.update(alive[cut].tolist())
                ended |= cut
                new |= cut
        if settle is not None and bool(new.any()):
            stop = [r for r in settle(alive[new].tolist(), hypothesis) if r not in stopped]
            if stop:
                stopped.update(stop)
                ended |= torch.isin(alive, torch.tensor(stop, device=device))
        done = int(ended.sum())
        if done == len(alive):
            break
        if done and done >= drop_share * len(alive):
            keep = (~ended).nonzero()[:, 0]
            keep_cache_rows(cache, keep)
            for holder in stateful:
                holder.keep_rows(keep, len(alive))
            alive, ids, ended, chosen = alive[keep], ids[keep], ended[keep], chosen[keep]
        step = chosen[:, None]
    means = [float(t / c) if c else None for t, c in zip(total.tolist(), count.tolist())]
    # length starts at begin and only grows
    return Decoded(out[:, :length], means, frozenset(stopped), frozenset(capped))
