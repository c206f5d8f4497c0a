"""The guard's fallback decoding: sampling at a temperature (our Sample processor), each clip's
cross-attention keys shared by its samples, and the checkpoint's suppressed tokens applied by our
processors instead of transformers' (which rebuild a vocabulary mask at every step)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from batchcap.models.common import cache_kwarg
from batchcap.models.whisper_logits import Sample, SuppressAtBegin
from tests.conftest import tone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_draws_from_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, float("-inf"), 0.0, -1.0, float("-inf")])
    rows = 40_000
    torch.manual_seed(0)
    chosen = Sample(0.5).draw(logits.repeat(rows, 1))
    assert chosen.shape == (rows,) and chosen.dtype == torch.long
    freq = torch.bincount(chosen, minlength=6).double() / rows
    expected = (logits / 0.5).softmax(-1).double()
    assert freq[2] == 0 and freq[5] == 0  # ruled-out tokens are never drawn
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)  # T=0.5, not T=1 (0.64 vs 0.87 on top)
    hot = Sample(2.0).draw(logits.repeat(rows, 1))
    assert torch.bincount(hot, minlength=6)[0] / rows == pytest.approx(float((logits / 2).softmax(-1)[0]), abs=0.01)
    # one temperature per row: each row drawn at its own
    mixed = Sample([0.5, 2.0] * (rows // 2)).draw(logits.repeat(rows, 1))
    assert (mixed[0::2] == 0).double().mean() == pytest.approx(float(expected[0]), abs=0.015)
    assert (mixed[1::2] == 0).double().mean() == pytest.approx(float((logits / 2).softmax(-1)[0]), abs=0.015)
    with pytest.raises(ValueError):
        Sample(0.0)


def test_sample_never_draws_a_ruled_out_token_at_the_top_of_the_range(monkeypatch):
    """rand x total can round up to the total in float32: the draw is still a token that has mass (the
    last one), not the vocabulary's last entry, which is ruled out here."""
    logits = torch.tensor([[0.3, 1.7, -0.4, 2.2, float("-inf"), float("-inf")]] * 4)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a[0], dtype=torch.float32))
    assert Sample(0.7).draw(logits.clone()).tolist() == [3] * 4


def test_suppress_at_begin_rules_out_tokens_at_the_first_position_only():
    rule = SuppressAtBegin(torch.tensor([1, 3, 99]), begin_index=2)  # 99: past the vocabulary, ignored
    first = rule(torch.zeros((2, 2), dtype=torch.long), torch.zeros((2, 5)))
    assert torch.isinf(first[:, [1, 3]]).all() and torch.isfinite(first[:, [0, 2, 4]]).all()
    later = rule(torch.zeros((2, 3), dtype=torch.long), torch.zeros((2, 5)))
    assert torch.isfinite(later).all()


def test_samples_share_their_clips_cross_attention_keys(tiny_whisper):
    """One decoder step over the shared cache gives what it gives over keys copied per sample: two clips
    of different audio, three samples each (rows 0-2 are clip 0's, rows 3-5 clip 1's)."""
    from transformers.cache_utils import DynamicCache

    from batchcap.models.attention import TAIL_ATTR, repeated_cross_cache, uses_step_attention
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", dtype="float32")  # exact sums
    batch = [t.prepare(tone(1.0, freq=300)), t.prepare(tone(2.5, freq=900, seed=1))]
    with torch.inference_mode():
        states, cross = t._encode(batch, True)  # the full window, as the fallback decodes it
        states = states + torch.randn(states.shape, generator=torch.Generator().manual_seed(0)) * 3  # distinct
        t._first_position(batch, states, cross)  # fills the cross-attention cache
        shared = repeated_cross_cache(cross, 3, uses_step_attention(t.model))
        copied = DynamicCache()
        for i, layer in enumerate(cross.layers):
            copied.update(layer.keys.repeat_interleave(3, 0), layer.values.repeat_interleave(3, 0), i)
        assert all(getattr(layer.keys, TAIL_ATTR, None) is not None for layer in shared.layers)
        assert shared.layers[0].keys.shape[2] == 1  # per sample: one position; the rest once per clip
        ids = torch.tensor([[t.sot_id, 5]] * 6)
        decoder = t.model.get_decoder()
        out = [decoder(input_ids=ids, encoder_hidden_states=states.repeat_interleave(3, 0), use_cache=True,
                       **{cache_kwarg(decoder): t._cache(c)}).last_hidden_state for c in (shared, copied)]
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert (out[0][0] - out[0][3]).abs().max() > 0.1  # the two clips' rows do differ


def test_the_checkpoints_suppressed_tokens_are_never_generated(tiny_whisper, tmp_path):
    """generate is told not to build transformers' suppress processors; the checkpoint's
    ``suppress_tokens`` still hold (our Suppress carries them), greedy and sampled alike."""
    from batchcap.models import guard as g
    from batchcap.models.whisper import WhisperTranscriber

    def generated(model_dir):
        t = WhisperTranscriber(model_dir, device="cpu", language="en", timestamps=False,
                               guard=g.GuardConfig(compression_ratio_threshold=3.0, logprob_threshold=None,
                                                   temperatures=(0.6,), best_of=2))
        seen: list[int] = []
        original = t._generate

        def keep(**kwargs):
            out = original(**kwargs)
            seen.extend(out.sequences[:, kwargs["decoder_input_ids"].shape[1]:].flatten().tolist())
            return out
        t._generate = keep
        rows = t.transcribe([t.prepare(tone(1.0, freq=300)), t.prepare(tone(2.0, freq=500))])
        return seen, rows

    seen, _ = generated(tiny_whisper)
    eot = json.load(open(f"{tiny_whisper}/generation_config.json"))["eos_token_id"]
    common = max(set(seen) - {eot}, key=seen.count)  # the random model's favourite token
    copy = tmp_path / "suppressing"
    shutil.copytree(tiny_whisper, copy)
    config = json.load(open(copy / "generation_config.json"))
    config["suppress_tokens"] = sorted(set(config.get("suppress_tokens") or []) | {common})
    json.dump(config, open(copy / "generation_config.json", "w"))
    seen, rows = generated(str(copy))
    assert common not in seen and len(seen) > 20
    assert any(r["decode"] == "temperature=0.6" or r["decode"] == g.UNRESOLVED for r in rows)  # sampled too


def test_later_temperatures_are_sampled_together_and_the_first_that_passes_wins(tiny_whisper):
    """The first fallback temperature runs alone, the others together in one generate call per group of
    clips; a clip's result is still the first temperature, in order, whose sample passes."""
    import dataclasses

    from batchcap.models import guard as g
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", timestamps=False,
                           guard=g.GuardConfig(compression_ratio_threshold=3.0, logprob_threshold=None,
                                               temperatures=(0.2, 0.4, 0.6, 0.8), best_of=2))
    real_sample, real_generate = t._sample, t._generate
    stages, rows_per_call = [], []

    def generate(**kwargs):
        rows_per_call.append(kwargs["decoder_input_ids"].shape[0])
        return real_generate(**kwargs)

    def sample(states, cross, languages, no_speech, durations, temperatures):
        stages.append(tuple(temperatures))
        runs = real_sample(states, cross, languages, no_speech, durations, temperatures)
        loop = "peepee " * 30
        if tuple(temperatures) == (0.2,):  # every clip still loops at 0.2 ...
            return [[dataclasses.replace(a, text=loop) for a in clip] for clip in runs]
        # ... the 1 s clip passes from 0.6 on, the longer ones never
        return [[dataclasses.replace(a, text=loop if (durations[c] > 1.5 or a.decode == "temperature=0.4")
                                     else "Hello there.") for a in clip] for c, clip in enumerate(runs)]
    t._sample, t._generate = sample, generate
    clips = [t.prepare(tone(1.0 + i, freq=300 + 100 * i)) for i in range(6)]
    rows = t.transcribe(clips[:2])
    assert stages == [(0.2,), (0.4, 0.6, 0.8), (0.4, 0.6, 0.8)]
    # greedy (2 clips), the full window (2), 0.2 (2 clips x 2 samples), then the other three temperatures
    # together, a clip per call here (a batch of 2 x best_of 2 = 4 rows is less than one clip's 3 x 2)
    assert rows_per_call == [2, 2, 4, 6, 6]
    assert rows[0]["decode"] == "temperature=0.6" and rows[0]["text"] == "Hello there."
    assert rows[1]["decode"] == g.UNRESOLVED
    # calls stay near one temperature's size (batch x best_of = 12 rows): 6 suspects, 2 clips per call
    stages.clear()
    rows_per_call.clear()
    t.transcribe(clips)
    assert rows_per_call == [6, 6, 12, 12, 12, 12] and stages == [(0.2,)] + [(0.4, 0.6, 0.8)] * 3


class _EndPerRun:
    """Ends each row of a sampled call after ``ends[run]`` generated tokens (rows clip-major: clip, run,
    sample), no end before: the random model's samples then end when the test says. Keeps its rows'
    identities as decoding drops rows."""

    def __init__(self, rows: int, runs: int, samples: int, ends: list[int], begin: int, eot: int):
        self.due = torch.tensor([ends[(r % (runs * samples)) // samples] for r in range(rows)])
        self.begin, self.eot = begin, eot

    def keep_rows(self, keep, rows):
        self.due = self.due[keep]

    def __call__(self, input_ids, scores):
        due = self.due == input_ids.shape[1] - self.begin
        scores[:, self.eot] = float("-inf")
        scores[due] = float("-inf")
        scores[due, self.eot] = 0.0
        return scores


def test_a_clips_higher_temperatures_stop_once_a_lower_one_passes(tiny_whisper, monkeypatch):
    """In the later temperatures' shared call, a 0.5 s clip's samples at 0.4 end after 2 tokens (and pass),
    those at 0.6 would run 12: they stop when the 0.4 samples have all ended, and the clip's result is
    what decoding every temperature to its end gives."""
    from batchcap.models import guard as g
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", timestamps=False,
                           guard=g.GuardConfig(compression_ratio_threshold=3.0, logprob_threshold=None,
                                               temperatures=(0.2, 0.4, 0.6), best_of=2))
    real = t._generate

    def generate(**kwargs):
        if kwargs.get("sample") and len(set(kwargs["sample"].temperature)) == 2:  # the later stage
            rows, begin = kwargs["decoder_input_ids"].shape
            kwargs["logits_processor"].append(_EndPerRun(rows, 2, 2, [2, 12], begin, t.eot_id))
        return real(**kwargs)
    t._generate = generate
    seen = []  # rows of each decoder call
    handle = t.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    clip = t.prepare(tone(0.5, freq=300))
    try:
        settled = t.transcribe([clip])[0]
        settled_rows = list(seen)
        seen.clear()
        monkeypatch.setattr(g.FirstPass, "__call__", lambda self, rows, hypothesis: [])  # never settles
        plain = t.transcribe([clip])[0]
        plain_rows = list(seen)
    finally:
        handle.remove()
    # greedy and the full window loop to the 0.5 s clip's token bound; at 0.2 too; 0.4 passes
    assert settled["decode"] == plain["decode"] == "temperature=0.4"
    assert settled["text"] == plain["text"] and settled["avg_logprob"] == plain["avg_logprob"]
    assert settled["text"] != settled["first_text"]
    # the later call is the last: 1 clip x 2 temperatures x 2 samples; 0.4's rows end at its third step,
    # and 0.6's leave with them instead of running to their 13th
    assert settled_rows[-4:] == [2, 4, 4, 4]
    assert plain_rows[:len(settled_rows)] == settled_rows and plain_rows[len(settled_rows):] == [2] * 10
