"""Logits processors of batchcap's Whisper decoding (what may be picked at each step: decoding.py's
loop, and ``generate`` for beam search).

* ``Suppress``: rules out a fixed set of ids (the special tokens the guard could not see as text).
* ``TimestampRules``: openai-whisper's timestamp grammar (``ApplyTimestampRules``), vectorised over the
  batch, plus a per-clip upper bound: a clip of 3.2 s cannot end a segment at 14.00 s (the live window
  is shorter than 30 s, and so are the windows of a long recording).
* ``SuppressAtBegin``: rules out a fixed set of ids at the first generated position.
* ``Sample``: draws each row's token at a temperature (the guard's fallback).

The ones with per-row state drop rows with ``keep_rows`` as decoding.py drops ended rows.

transformers' own ``SuppressTokens*`` processors are not used: they rebuild a vocabulary-sized mask
with ``torch.isin`` at every step (~6 ms a step on a CPU); these index a precomputed id list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .whisper_timestamps import TIME_PRECISION

NEG_INF = float("-inf")


class Suppress:
    """Rules out the tokens ``ids`` (in place: generate hands processors its own copy)."""

    def __init__(self, ids: Any):
        self.ids = ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[:, self.ids[self.ids < scores.shape[-1]]] = NEG_INF
        return scores


class SuppressAtBegin(Suppress):
    """Rules out the tokens ``ids`` at the first generated position only (the checkpoint's
    ``begin_suppress_tokens``: a blank or the end token as the first text token)."""

    def __init__(self, ids: Any, begin_index: int):
        super().__init__(ids)
        self.begin_index = begin_index

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return super().__call__(input_ids, scores) if input_ids.shape[-1] == self.begin_index else scores


class Sample:
    """Draws each row's next token from softmax(scores / temperature), the whole distribution (as
    openai-whisper samples at a fallback temperature), for decoding.py's loop (``draw``), after the
    processors. ``temperature``: one for every row, or one per row (several temperatures in one batch).

    ``torch.multinomial`` draws one exponential variate per vocabulary entry: 17 ms a step for 20 rows
    of Whisper's 51,865 tokens on two CPU cores, more than the decoder step itself. This draws one
    uniform number per row from torch's global generator and inverts the cumulative distribution,
    which samples the same distribution: in float32 each running sum rounds once, so a token's
    interval is its probability within 6e-8 (float64 doubled the cost of a step)."""

    def __init__(self, temperature: float | Sequence[float]):
        values = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
        if not values or min(values) <= 0:
            raise ValueError("Sample needs temperatures above 0")
        self.temperature = values
        self._divisor: Any = None  # the temperatures as a tensor, built on the first step's device

    def keep_rows(self, keep: Any, rows: int) -> None:
        """Go on with the rows ``keep`` of the ``rows`` decoded so far (decoding.py drops ended rows)."""
        if len(self.temperature) > 1:
            self.temperature = [self.temperature[i] for i in keep.tolist()]
            self._divisor = None

    def draw(self, scores: Any) -> Any:
        """Each row's token (a LongTensor [rows]), drawn from its scores at its temperature."""
        import torch

        if self._divisor is None:
            divisor = torch.tensor(self.temperature, dtype=torch.float32, device=scores.device)
            self._divisor = divisor[:, None] if len(self.temperature) > 1 else divisor
        cdf = (scores.float() / self._divisor).softmax(-1).cumsum(-1)
        total = cdf[:, -1:]
        u = torch.rand((scores.shape[0], 1), dtype=torch.float32, device=scores.device) * total
        # below the total even where rand x total rounds up to it (then: the last token that has mass)
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        # the first entry whose cumulative mass exceeds u: zero-probability tokens have empty intervals
        return torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)[:, 0]


def timestamp_limits(durations: Sequence[float], timestamp_begin: int, last_timestamp: int) -> list[int]:
    """The highest timestamp id each clip may use: its duration, rounded up to the next 20 ms step."""
    return [min(last_timestamp, timestamp_begin + math.ceil(max(0.0, d) / TIME_PRECISION - 1e-6)) for d in durations]


class TimestampRules:
    """Whisper's timestamp grammar, as openai-whisper's ``ApplyTimestampRules`` applies it, for a batch
    at once (no Python loop over rows):

    * ``<|notimestamps|>`` never; the first generated token is a time of at most ``max_initial_s``;
    * times come in pairs (an end then a start), except a last time right before the end token: after a
      pair, text; after a lone time, a time or the end;
    * times never go back (a segment's start may repeat the previous end);
    * when the times together are likelier than the likeliest text token, a time is taken;
    * a row never names a time past ``limits[row]`` (its clip's end).

    ``limits`` has one entry per clip; rows expanded for beams or samples (``rows = clips * k``, in
    clip order) share their clip's limit."""

    def __init__(self, *, timestamp_begin: int, eot_id: int, no_timestamps_id: int, begin_index: int,
                 limits: Sequence[int], max_initial_s: float = 1.0):
        self.timestamp_begin = timestamp_begin
        self.eot_id = eot_id
        self.no_timestamps_id = no_timestamps_id
        self.begin_index = begin_index
        self.limits = list(limits)
        self.max_initial = round(max_initial_s / TIME_PRECISION)
        self._cache: dict[tuple[Any, int, int], tuple[Any, Any]] = {}

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def keep_rows(self, keep: Any, rows: int) -> None:
        """Go on with the rows ``keep`` of the ``rows`` decoded so far (decoding.py drops ended rows)."""
        per_row = self.limits if rows == len(self.limits) else \
            [limit for limit in self.limits for _ in range(rows // max(1, len(self.limits)))]
        self.limits = [per_row[i] for i in keep.tolist()]
        self._cache.clear()

    def _row_limits(self, rows: int, width: int, device: Any) -> tuple[Any, Any]:
        """Per row: the highest allowed time as an offset from ``timestamp_begin``; and the offsets 0..width-1."""
        import torch

        key = (device, rows, width)
        if key not in self._cache:
            limits = torch.tensor(self.limits, device=device) - self.timestamp_begin
            if rows != len(self.limits):
                limits = limits.repeat_interleave(rows // max(1, len(self.limits)))
            self._cache[key] = (limits, torch.arange(width, device=device))
        return self._cache[key]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        tb = self.timestamp_begin
        rows = scores.shape[0]
        scores[:, self.no_timestamps_id] = NEG_INF
        times = scores[:, tb:]
        limits, offsets = self._row_limits(rows, times.shape[-1], scores.device)
        generated = input_ids.shape[1] - self.begin_index
        if generated <= 0:
            scores[:, :tb] = NEG_INF  # a segment starts with its time
            upper = limits.clamp(max=self.max_initial)
            times.masked_fill_(offsets[None, :] > upper[:, None], NEG_INF)
            return scores
        last = input_ids[:, -1]
        last_time = last >= tb
        before_time = input_ids[:, -2] >= tb if generated >= 2 else torch.ones_like(last_time)
        times.masked_fill_((last_time & before_time)[:, None], NEG_INF)  # a pair just closed: text next
        scores[:, :self.eot_id].masked_fill_((last_time & ~before_time)[:, None], NEG_INF)  # a lone time: time/end
        # times never go back: the last one given (times only grow, so it is the largest) may repeat only
        # as the start of the next segment right after an end
        seen = input_ids[:, self.begin_index:]
        latest = torch.where(seen >= tb, seen - tb, -1).max(-1).values
        floor = torch.where(last_time & ~before_time, latest, latest + 1).clamp(min=0)
        times.masked_fill_((offsets[None, :] < floor[:, None]) | (offsets[None, :] > limits[:, None]), NEG_INF)
        # the times' total probability against the likeliest text token (same normaliser: compare logits)
        mass = times.float().logsumexp(-1)
        best_text = scores[:, :tb].float().max(-1).values
        scores[:, :tb].masked_fill_((mass > best_text)[:, None], NEG_INF)
        return scores
