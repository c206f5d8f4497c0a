"""decoding.py's loop: rows leave the batch as they end, and what is left decodes as it would have.

A tiny random Whisper rarely ends a transcript by itself, so a test processor ends each row at a step
chosen by the row's prompt (a marker token), and keeps the end token out before that: rows end at
known, different steps, whatever the random weights say."""

from __future__ import annotations

import pytest
import torch

from batchcap.models.attention import (
    TAIL_ATTR,
    cache_rows,
    keep_cache_rows,
    repeated_cross_cache,
    uses_step_attention,
)
from batchcap.models.common import cache_kwarg
from batchcap.models.decoding import decode
from batchcap.models.whisper_logits import Suppress
from tests.conftest import tone

pytestmark = pytest.mark.usefixtures("one_thread")

MARKERS = [60, 61, 62, 63]  # token 1 of each row's prompt
ENDS = {60: 3, 61: 9, 62: 1, 63: 6}  # generated tokens before each row's end token


class EndAt:
    """Ends the row whose prompt carries marker m after ENDS[m] generated tokens; no end before."""

    def __init__(self, begin: int, eot: int):
        self.begin, self.eot = begin, eot

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.begin
        due = torch.tensor([ENDS[int(m)] == step for m in input_ids[:, 1]])
        scores[:, self.eot] = float("-inf")
        scores[due] = float("-inf")
        scores[due, self.eot] = 0.0
        return scores


@pytest.fixture(scope="module")
def transcriber(tiny_whisper):
    from batchcap.models.whisper import WhisperTranscriber

    return WhisperTranscriber(tiny_whisper, device="cpu", language="en", dtype="float32")  # exact sums


def _inputs(t):
    """Four clips' live-window states and a filled cross-attention cache (with shared tails), fresh."""
    batch = [t.prepare(tone(0.8 + 0.9 * i, freq=250 + 170 * i, seed=i)) for i in range(4)]
    states, cross = t._encode(batch, False)
    t._first_position(batch, states, cross)
    return states, cross


def _decoder_rows(t):
    """Rows the decoder is called with, per call (a forward pre-hook)."""
    seen: list[int] = []
    handle = t.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return seen, handle


def _run(t, drop_share):
    states, cross = _inputs(t)
    prompts = torch.tensor([[t.sot_id, m] for m in MARKERS])
    rules = [Suppress(t._not_text_ids), EndAt(prompts.shape[1], t.eot_id)]
    seen, handle = _decoder_rows(t)
    try:
        out = decode(t.model.get_decoder(), t.model.proj_out, prompts, states, t._cache(cross), rules,
                     end_id=t.eot_id, max_length=20, drop_share=drop_share)
    finally:
        handle.remove()
    return out, seen


def test_ended_rows_leave_the_batch_and_the_others_decode_as_before(transcriber):
    t = transcriber
    with torch.inference_mode():
        kept, kept_rows = _run(t, drop_share=2.0)  # never dropped: what generate computes
        dropped, dropped_rows = _run(t, drop_share=0.0)  # dropped as soon as they end
    # each row: its marker's number of tokens, then the end token; ended rows padded with it
    generated = kept.sequences[:, 2:]
    for row, m in zip(generated.tolist(), MARKERS):
        assert row.index(t.eot_id) == ENDS[m] and set(row[ENDS[m]:]) == {t.eot_id}
    assert generated.shape[1] == max(ENDS.values()) + 1
    assert torch.equal(dropped.sequences, kept.sequences)
    assert dropped.logprobs == pytest.approx(kept.logprobs, abs=1e-4)
    assert all(lp is not None and lp < 0 for lp in kept.logprobs)
    # the decoder's work: 4 rows at every step without dropping; with it, each row until its end only
    assert kept_rows == [4] * 10
    assert dropped_rows == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]


def test_the_callers_cross_attention_cache_keeps_every_row(transcriber):
    """Rows leave decode's copy of the cache, not the caller's: the fallback's samples and word alignment
    read the clips' cross-attention keys again after a decoding call that dropped rows (they once found
    one row left: an IndexError that failed every batch with word timestamps)."""
    t = transcriber
    with torch.inference_mode():
        states, cross = _inputs(t)
        before = [(layer.keys, layer.values, getattr(layer.keys, TAIL_ATTR, None)) for layer in cross.layers]
        prompts = torch.tensor([[t.sot_id, m] for m in MARKERS])
        seen, handle = _decoder_rows(t)
        try:
            decode(t.model.get_decoder(), t.model.proj_out, prompts, states, t._cache(cross),
                   [Suppress(t._not_text_ids), EndAt(2, t.eot_id)], end_id=t.eot_id, max_length=20, drop_share=0.0)
        finally:
            handle.remove()
    assert seen[-1] == 1  # rows were dropped
    assert len(cross.layers) == len(before)
    for layer, (keys, values, tail) in zip(cross.layers, before):
        assert layer.keys is keys and layer.values is values and keys.shape[0] == 4
        assert getattr(layer.keys, TAIL_ATTR, None) is tail


def test_settle_ends_the_rows_it_returns_and_the_others_decode_as_before(transcriber):
    """When the row with marker 62 ends (step 1), ``settle`` ends the one with marker 61 (due at step 9):
    it leaves the decoder there, is reported as stopped, and the other rows' tokens are unchanged."""
    t = transcriber
    calls = []

    def settle(rows, hypothesis):
        calls.append([(r, *hypothesis(r)) for r in rows])
        return [1] if 2 in rows else []
    prompts = torch.tensor([[t.sot_id, m] for m in MARKERS])
    with torch.inference_mode():
        states, cross = _inputs(t)
        seen, handle = _decoder_rows(t)
        try:
            out = decode(t.model.get_decoder(), t.model.proj_out, prompts, states, t._cache(cross),
                         [Suppress(t._not_text_ids), EndAt(2, t.eot_id)], end_id=t.eot_id, max_length=20,
                         drop_share=0.0, settle=settle)
        finally:
            handle.remove()
        plain, plain_rows = _run(t, drop_share=0.0)
    assert out.stopped == {1} and plain.stopped == frozenset()
    assert [[r for r, _, _ in call] for call in calls] == [[2], [0], [3]]  # each row as it ends, once
    row, ids, logprob = calls[0][0]
    assert ids == out.sequences[2, 2:2 + ENDS[62] + 1].tolist() and ids[-1] == t.eot_id
    assert logprob == pytest.approx(plain.logprobs[2], abs=1e-5)
    # row 1 leaves with row 2 (after step 2) instead of running to step 10
    assert seen == [4, 4, 2, 2, 1, 1, 1] and plain_rows == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]
    for r in (0, 2, 3):
        assert torch.equal(out.sequences[r], plain.sequences[r, :out.sequences.shape[1]])
    assert out.sequences.shape[1] == 2 + ENDS[63] + 1


def test_a_row_stops_at_its_own_limit(transcriber):
    """Row 1 (due to end after 9 tokens) may have 5: it leaves the decoder after its fifth token, unended
    (``capped``), with the tokens it had; the other rows are unchanged."""
    t = transcriber
    prompts = torch.tensor([[t.sot_id, m] for m in MARKERS])
    rules = [Suppress(t._not_text_ids), EndAt(2, t.eot_id)]
    with torch.inference_mode():
        states, cross = _inputs(t)
        seen, handle = _decoder_rows(t)
        try:
            heard = []
            out = decode(t.model.get_decoder(), t.model.proj_out, prompts, states, t._cache(cross), rules,
                         end_id=t.eot_id, max_length=20, drop_share=0.0, limits=[20, 2 + 5, 20, 20],
                         settle=lambda rows, hypothesis: heard.append([(r, len(hypothesis(r)[0])) for r in rows]) or [])
        finally:
            handle.remove()
        plain, plain_rows = _run(t, drop_share=0.0)
    assert out.capped == {1} and plain.capped == frozenset()
    # settle hears of each row once, as it ends or reaches its limit (row 1: 5 tokens, no end token)
    assert heard == [[(2, 2)], [(0, 4)], [(1, 5)], [(3, 7)]]
    assert out.sequences[1, 2:7].tolist() == plain.sequences[1, 2:7].tolist()
    assert t.eot_id not in plain.sequences[1, 2:7].tolist()
    for r in (0, 2, 3):
        assert torch.equal(out.sequences[r], plain.sequences[r, :out.sequences.shape[1]])
    assert seen == [4, 4, 3, 3, 2, 1, 1] and plain_rows == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]


def test_the_loop_gives_what_greedy_generate_gives(transcriber):
    """Same prompts, processors and caches: the loop's tokens are greedy generate's."""
    from transformers import GenerationMixin, LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutput

    t = transcriber
    prompts = torch.tensor([[t.sot_id, m] for m in MARKERS])
    with torch.inference_mode():
        ours, _ = _run(t, drop_share=0.25)
        states, cross = _inputs(t)
        theirs = GenerationMixin.generate(
            t.model, encoder_outputs=BaseModelOutput(last_hidden_state=states), decoder_input_ids=prompts,
            logits_processor=LogitsProcessorList([Suppress(t._not_text_ids), EndAt(2, t.eot_id)]),
            num_beams=1, do_sample=False, max_length=20, pad_token_id=t.eot_id, suppress_tokens=None,
            begin_suppress_tokens=None, **{cache_kwarg(t.model): t._cache(cross)})
    assert torch.equal(ours.sequences, theirs)


def test_kept_rows_of_a_shared_tail_cache_attend_as_they_did(transcriber):
    """Two clips, three rows each, their keys shared per clip (the guard's samples): after keeping rows
    1, 3 and 4 (one of clip 0, two of clip 1) each kept row's decoder output is what it was."""
    t = transcriber
    batch = [t.prepare(tone(1.0, freq=300)), t.prepare(tone(2.5, freq=900, seed=1))]
    with torch.inference_mode():
        states, cross = t._encode(batch, True)  # the full window, as the fallback decodes it
        states = states + torch.randn(states.shape, generator=torch.Generator().manual_seed(0)) * 3  # distinct
        t._first_position(batch, states, cross)  # fills the cross-attention cache

        def shared():
            return repeated_cross_cache(cache_rows(cross, torch.tensor([0, 1])), 3, uses_step_attention(t.model))

        full = shared()
        assert getattr(full.layers[0].keys, TAIL_ATTR) is not None
        ids = torch.tensor([[t.sot_id, 70]] * 6)
        decoder = t.model.get_decoder()
        before = decoder(input_ids=ids, encoder_hidden_states=states.repeat_interleave(3, 0), use_cache=True,
                         **{cache_kwarg(decoder): t._cache(full)}).last_hidden_state
        keep = torch.tensor([1, 3, 4])
        cache = t._cache(shared())
        keep_cache_rows(cache, keep)
        tail = getattr(cache.cross_attention_cache.layers[0].keys, TAIL_ATTR)
        assert [index.tolist() for index in tail.index] == [[0], [1, 2]]  # renumbered by clip
        after = decoder(input_ids=ids[:3], encoder_hidden_states=states.repeat_interleave(3, 0)[keep], use_cache=True,
                        **{cache_kwarg(decoder): cache}).last_hidden_state
    assert torch.allclose(after, before[keep], atol=1e-5)
    assert (before[1] - before[3]).abs().max() > 0.1  # the clips' rows do differ


def test_processors_keep_the_state_of_the_rows_that_stay():
    """Per-row state follows the rows kept: each clip's time limit (its rows expanded per sample) and
    each row's sampling temperature."""
    from batchcap.models.whisper_logits import Sample, TimestampRules

    rules = TimestampRules(timestamp_begin=100, eot_id=50, no_timestamps_id=99, begin_index=2, limits=[110, 130])
    rules.keep_rows(torch.tensor([2, 3, 4]), 6)  # 2 clips x 3 samples: clip 0's last row, clip 1's first two
    assert rules.limits == [110, 130, 130]
    rules.keep_rows(torch.tensor([0, 2]), 3)
    assert rules.limits == [110, 130]
    scores = rules(torch.tensor([[1, 2], [1, 2]]), torch.zeros((2, 140)))  # the first generated position
    assert torch.isfinite(scores[0, 100:111]).all() and torch.isinf(scores[0, 111:]).all()
    assert torch.isfinite(scores[1, 100:131]).all() and torch.isinf(scores[1, 131:]).all()
    sample = Sample([0.5, 2.0, 0.7])
    sample.draw(torch.zeros((3, 4)))
    sample.keep_rows(torch.tensor([2, 0]), 3)
    assert sample.temperature == [0.7, 0.5] and sample.draw(torch.zeros((2, 4))).shape == (2,)
