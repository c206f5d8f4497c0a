"""Word-level timestamps by cross-attention alignment (batchcap/models/whisper_words.py): DTW, the
attention normalisation and median filter, the word split and punctuation merge on hand-made input,
words into segments, then the tiny random Whisper end to end (one decoder pass for a batch)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from batchcap.models import whisper_words as ww
from batchcap.models.whisper_timestamps import Segment
from batchcap.models.whisper_words import WordTiming
from tests.conftest import tone


def _reference_dtw(x: np.ndarray) -> tuple[list[int], list[int]]:
    """openai-whisper's DTW, cell by cell (the batched one must find the very same path, ties included)."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0, 0] = 0
    trace = -np.ones((n + 1, m + 1), dtype=int)
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = (i - 1, j - 1) if trace[i, j] == 0 else (i - 1, j) if trace[i, j] == 1 else (i, j - 1)
    path.reverse()
    return [p[0] for p in path], [p[1] for p in path]


def test_dtw_follows_the_cheap_cells_of_a_hand_made_matrix():
    x = np.array([[0, 0, 9, 9, 9, 9],
                  [9, 9, 0, 9, 9, 9],
                  [9, 9, 9, 0, 0, 9],
                  [9, 9, 9, 9, 9, 0]], dtype=float)
    rows, cols = ww.dtw(x)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (1, 2), (2, 3), (2, 4), (3, 5)]
    # each row starts where the path enters it
    assert ww.token_start_positions(rows, cols).tolist() == [0, 2, 3, 5]


def test_batched_dtw_matches_the_cell_by_cell_one_for_every_shape_and_tie():
    rng = np.random.default_rng(0)
    shapes = [(3, 7), (5, 5), (1, 4), (6, 2), (4, 9)]
    # small integers: many ties, so the tie rules are exercised
    costs = [rng.integers(0, 3, size=s).astype(float) for s in shapes]
    paths = ww.dtw_batch(costs)
    for cost, (rows, cols) in zip(costs, paths):
        assert (rows.tolist(), cols.tolist()) == _reference_dtw(cost)
    # groups split by size give the same paths
    old = ww.DTW_GROUP_CELLS
    try:
        ww.DTW_GROUP_CELLS = 40
        again = ww.dtw_batch(costs)
    finally:
        ww.DTW_GROUP_CELLS = old
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(paths, again))


def test_median_filter_reflects_at_the_edges():
    x = torch.tensor([1.0, 5.0, 2.0, 8.0, 3.0])
    assert ww.median_filter(x, 3).tolist() == [5.0, 2.0, 5.0, 3.0, 8.0]
    spikes = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 7.0, 0.0, 0.0]])
    assert ww.median_filter(spikes, 3).tolist() == [[0.0] * 8]
    assert ww.median_filter(torch.tensor([4.0, 1.0]), 7).tolist() == [4.0, 1.0]  # too short: unchanged
    with pytest.raises(ValueError):
        ww.median_filter(x, 4)


def test_attention_matrix_gives_each_token_its_block_of_frames():
    # 2 heads, 5 rows (a prompt row, 3 text tokens, the end), 40 frames; text token k attends to
    # frames [10k, 10k + 10), the end row to the last frames; one head has a one-frame spike far away
    tokens, frames = 5, 40
    logits = torch.full((2, tokens, frames), -4.0)
    logits[:, 0, 0:2] = 4.0  # the prompt row: the very start
    for k in range(3):
        logits[:, k + 1, 10 * k:10 * k + 10] = 4.0
    logits[:, 4, 30:] = 4.0
    logits[1, 1, 35] = 12.0  # a spike the median filter removes
    matrix = ww.attention_matrix(logits, medfilt_width=7)
    assert matrix.shape == (tokens, frames)
    filtered = ww.median_filter(((logits.softmax(-1) - logits.softmax(-1).mean(-2, keepdim=True))
                                 / logits.softmax(-1).std(-2, unbiased=False, keepdim=True)), 7)
    assert filtered[1, 1, 35] < filtered[1, 1, 5]  # the spike is gone after filtering
    rows, cols = ww.dtw(-matrix[1:].double().numpy())  # the text tokens and the end, as align_words slices
    starts = ww.token_start_positions(rows, cols) * ww.SECONDS_PER_POSITION
    assert np.allclose(starts, [0.0, 0.2, 0.4, 0.6])


class _Tokenizer:
    """Token ids are indexes into a list of strings (a decode that is easy to read in a test)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, **_kwargs):
        return "".join(self.pieces[i] for i in ids)


def test_words_split_at_spaces_and_punctuation():
    pieces = ["<|endoftext|>", " (", "Hel", "lo", ",", " wor", "ld", ".", ")"]
    words, ids = ww.split_words([1, 2, 3, 4, 5, 6, 7, 8, 0], _Tokenizer(pieces), eot_id=0)
    assert words == [" (Hello", ",", " world", ".", ")", "<|endoftext|>"]
    assert ids == [[1, 2, 3], [4], [5, 6], [7], [8], [0]]


def test_punctuation_merges_into_its_neighbours():
    # as a split into characters gives them: an opening mark alone, closing marks alone
    words = [" (", "Hello", ",", " world", ".", ")"]
    raw = [WordTiming(w, [k], float(k), float(k + 1), 0.5, k) for k, w in enumerate(words)]
    merged = ww.merge_punctuations(raw)
    assert [w.word for w in merged] == [" (Hello,", " world.)"]
    assert [w.tokens for w in merged] == [[0, 1, 2], [3, 4, 5]]
    # the receiving word keeps its times and its own first token's place
    assert [(w.start, w.end, w.token_index) for w in merged] == [(1.0, 2.0, 1), (3.0, 4.0, 3)]
    assert raw[0].word == " ("  # the input is left as it was
    kept = ww.merge_punctuations([WordTiming(" a ", [0], 0, 1, 1, 0), WordTiming(".", [1], 1, 2, 1, 1)])
    assert [w.word for w in kept] == [" a ", "."]  # a word ending in a space takes no closing mark


def test_words_of_languages_without_spaces_are_whole_characters(tiny_whisper):
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(tiny_whisper)
    ids = tok("日本語です", add_special_tokens=False).input_ids
    assert len(ids) > 5  # bytes: characters span tokens
    words, groups = ww.split_words(ids, tok, eot_id=tok.eos_token_id, language="ja")
    assert words == list("日本語です") and sum(groups, []) == ids
    spaced, _ = ww.split_words(tok(" the 日本 fox", add_special_tokens=False).input_ids, tok, eot_id=tok.eos_token_id)
    assert spaced == [" the", " 日本", " fox"]


def test_words_go_to_their_segments_clamped_and_a_long_first_word_is_cut():
    # two segments (absolute times, clip at 10 s): tokens 0-2 and 3-4; the word at token 3 starts
    # the second segment but DTW gave it the pause before it (which Whisper's times gave the segment)
    words = [WordTiming(" a", [1], 0.1, 0.4, 0.9, 0), WordTiming(" b", [2], 0.4, 0.7, 0.9, 1),
             WordTiming(" c.", [3, 4], 0.7, 1.0, 0.9, 2), WordTiming(" d", [5], 1.0, 3.3, 0.8, 3),
             WordTiming(" e", [6], 3.3, 3.6, 0.8, 4)]
    segments = [Segment(10.0, 11.2, "a b c."), Segment(11.2, 13.8, "d e")]
    placed = ww.words_per_segment(words, [3, 2], segments, offset_s=10.0)
    assert [[w.word for w in seg] for seg in placed] == [[" a", " b", " c."], [" d", " e"]]
    first, second = placed
    assert (first[0].start, first[-1].end) == (10.1, 11.0)
    # " d" (2.3 s against a median of 0.3 s) starts at most 2 x 0.3 s before its end, then in its segment
    assert second[0].start == pytest.approx(12.7) and second[0].end == pytest.approx(13.3)
    assert second[1].start == pytest.approx(13.3) and second[1].end == pytest.approx(13.6)
    # clamped into their segments: a segment that ends earlier cuts its words
    cut = ww.words_per_segment(words, [3, 2], [Segment(10.2, 10.9, ""), Segment(11.2, 13.5, "")], offset_s=10.0)
    assert [(w.start, w.end) for w in cut[0]] == [(10.2, 10.4), (10.4, 10.7), (10.7, 10.9)]
    assert cut[1][-1].end == 13.5
    for seg, segment in zip(placed, segments):
        for w in seg:
            assert segment.start <= w.start <= w.end <= segment.end
    with pytest.raises(ValueError):
        ww.words_per_segment(words, [5], segments)


def test_words_outside_their_whole_segment_are_kept_where_they_were_said():
    """Whisper wrote a segment at 0-7 s of a joined window whose speech is at 8.2-10.2 s: clamped into the
    segment, every word collapsed onto 7.0, and the cut at the window's joins made a zero-length subtitle
    1.2 s before the speech. Words that do not meet their segment at all keep their aligned times; the
    parts cut at the joins follow them."""
    from batchcap.models.whisper_timestamps import Segment, split_at_joins

    words = [WordTiming(" Simultaneous", [1], 8.2, 9.0, 0.9, 0), WordTiming(" call", [2], 9.0, 9.3, 0.9, 1),
             WordTiming(" limit", [3], 9.3, 9.7, 0.9, 2), WordTiming(" reached.", [4], 9.7, 10.2, 0.9, 3)]
    segment = Segment(0.0, 7.0, "Simultaneous call limit reached.")
    (placed,) = ww.words_per_segment(words, [4], [segment])
    assert [(w.start, w.end) for w in placed] == [(8.2, 9.0), (9.0, 9.3), (9.3, 9.7), (9.7, 10.2)]
    segment.words = placed
    parts = split_at_joins(segment, [2.5, 5.0, 8.0])
    assert [(p.start, p.end, p.text) for p in parts] == [(8.2, 10.2, "Simultaneous call limit reached.")]
    # words that meet their segment are still clamped into it
    (inside,) = ww.words_per_segment(words, [4], [Segment(0.0, 9.5, "")])
    assert inside[-1].end == 9.5 and all(w.end <= 9.5 for w in inside)


def test_a_word_the_path_gave_no_time_still_has_a_cue_to_show():
    """A one-word turn ("Extension.", said at 13.27-14.46) that the alignment squeezed into its last frame:
    the segment spanned its word, 14.39-14.39, a zero-length SRT cue a player never shows. A word under
    MIN_WORD_S gets up to a median word's length, before its end, inside its segment."""
    from batchcap.models.whisper_timestamps import Segment

    words = [WordTiming(" Press", [1], 0.5, 0.8, 0.9, 0), WordTiming(" three.", [2], 0.8, 1.3, 0.9, 1),
             WordTiming(" Extension.", [3], 4.39, 4.39, 0.9, 2)]
    segments = [Segment(10.0, 11.5, "Press three."), Segment(12.63, 14.63, "Extension.")]
    first, (extension,) = ww.words_per_segment(words, [2, 1], segments, offset_s=10.0)
    median = 0.4  # of the words' nonzero durations (0.3, 0.5)
    assert (extension.start, extension.end) == (pytest.approx(14.39 - median), 14.39)
    # at its segment's start, it runs on after it instead
    (at_start,) = ww.words_per_segment([WordTiming(" Yes.", [1], 0.0, 0.0, 0.9, 0),
                                        WordTiming(" no", [2], 1.0, 1.4, 0.9, 1)], [2],
                                       [Segment(0.0, 2.0, "Yes. no")])
    assert (at_start[0].start, at_start[0].end) == (0.0, pytest.approx(0.4)) and at_start[1].start >= 0.4


def test_default_alignment_heads_are_the_second_half_of_the_decoder():
    model = SimpleNamespace(generation_config=SimpleNamespace(alignment_heads=None),
                            config=SimpleNamespace(decoder_layers=4, decoder_attention_heads=2))
    assert ww.model_alignment_heads(model) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    model.generation_config.alignment_heads = [[1, 0], [3, 1]]
    assert ww.model_alignment_heads(model) == [(1, 0), (3, 1)]
    model.generation_config.alignment_heads = [[7, 0], [9, 1]]  # a distilled model with its teacher's heads
    assert ww.model_alignment_heads(model) == [(2, 0), (2, 1), (3, 0), (3, 1)]


# --- the tiny random Whisper end to end ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_whisper):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    model.generation_config.alignment_heads = None  # openai-whisper's default heads
    return model, WhisperTokenizerFast.from_pretrained(tiny_whisper), WhisperFeatureExtractor.from_pretrained(
        tiny_whisper)


def _inputs(tiny, durations, texts):
    model, tok, fe = tiny
    feats = [fe(tone(d, seed=k), sampling_rate=16000, return_tensors="pt").input_features[0]
             for k, d in enumerate(durations)]
    with torch.no_grad():
        states = model.get_encoder()(torch.stack(feats)).last_hidden_state
    gen = model.generation_config
    prompt = [gen.decoder_start_token_id, gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"],
              gen.no_timestamps_token_id]
    tokens = [tok(t, add_special_tokens=False).input_ids if t else [] for t in texts]
    frames = [math.ceil(d * 50) for d in durations]
    return states, [prompt] * len(durations), tokens, frames


def _align(tiny, states, prompts, tokens, frames, **kwargs):
    model, tok, _ = tiny
    gen = model.generation_config
    return ww.align_words(model, states, prompts, tokens, frames, tok, eot_id=gen.eos_token_id,
                          no_timestamps_id=gen.no_timestamps_token_id, **kwargs)


def test_tiny_whisper_words_of_a_batch_in_one_decoder_pass(tiny):
    model, tok, _ = tiny
    durations = [2.0, 5.3, 0.7, 3.0]
    texts = [" the quick brown fox, jumps over the lazy dog.", " hello world (this is) a test of speech",
             " one two", ""]
    states, prompts, tokens, frames = _inputs(tiny, durations, texts)
    calls = []
    hook = model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        out = _align(tiny, states, prompts, tokens, frames)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert out[3] == []  # no text, no words
    for words, ids, duration in zip(out[:3], tokens, durations):
        assert words
        assert "".join(w.word for w in words) == tok.decode(ids)
        assert sum((w.tokens for w in words), []) == ids
        previous = 0.0
        for w in words:
            assert previous <= w.start <= w.end <= duration
            assert 0.0 < w.probability <= 1.0
            previous = w.end
    assert [w.word for w in out[0]][:4] == [" the", " quick", " brown", " fox,"]
    assert " (this" in [w.word for w in out[1]] and " is)" in [w.word for w in out[1]]


def test_tiny_whisper_alignment_ignores_other_clips_and_padding(tiny):
    durations = [2.0, 4.0]
    texts = [" the quick brown fox", " please leave a message after the tone please"]
    states, prompts, tokens, frames = _inputs(tiny, durations, texts)
    together = _align(tiny, states, prompts, tokens, frames)
    alone = _align(tiny, states[:1], prompts[:1], tokens[:1], frames[:1])
    assert [(w.word, w.start, w.end) for w in together[0]] == [(w.word, w.start, w.end) for w in alone[0]]
    assert [w.probability for w in together[0]] == pytest.approx([w.probability for w in alone[0]], abs=1e-5)


def test_tiny_whisper_cross_attention_cache_gives_the_same_words_without_projecting_keys(tiny):
    from transformers.cache_utils import DynamicCache

    model, _, _ = tiny
    states, prompts, tokens, frames = _inputs(tiny, [2.0, 3.5], [" one two three four", " a red circle"])
    cross = DynamicCache()
    decoder = model.get_decoder()
    with torch.no_grad():
        for i, layer in enumerate(decoder.layers):
            attn = layer.encoder_attn
            shape = (states.shape[0], -1, attn.num_heads, attn.head_dim)
            keys, values = attn.k_proj(states).view(shape), attn.v_proj(states).view(shape)
            cross.update(keys.transpose(1, 2), values.transpose(1, 2), i)
    projected = []
    hooks = [layer.encoder_attn.k_proj.register_forward_hook(lambda *_: projected.append(1))
             for layer in decoder.layers]
    try:
        cached = _align(tiny, states, prompts, tokens, frames, cross_cache=cross)
    finally:
        for h in hooks:
            h.remove()
    assert projected == []
    plain = _align(tiny, states, prompts, tokens, frames)
    assert [[(w.word, w.start, w.end) for w in c] for c in cached] == [[(w.word, w.start, w.end) for w in c]
                                                                        for c in plain]


def test_transcriber_live_window_cache_gives_the_words_of_the_full_states(tiny_whisper):
    """What WhisperTranscriber hands over: its live-window encoder states and cross-attention cache
    (the silent tail shared by the clips, batchcap's attention function) give the words the plain
    states give."""
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", dtype="float32", language="en")
    batch = [t.prepare(tone(d, seed=k)) for k, d in enumerate([1.5, 4.2])]
    tokens = [t.tokenizer(x, add_special_tokens=False).input_ids for x in (" the lazy dog", " one two three four")]
    frames = [math.ceil(p.duration_s * 50) for p in batch]
    gen = t.model.generation_config
    prompts = [[t.sot_id, gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"], gen.no_timestamps_token_id]] * 2
    with torch.inference_mode():
        states, cross = t._encode(batch, False)
        assert cross is not None and cross.get_seq_length() < states.shape[1]  # live positions only
        live = cross.get_seq_length()
        runs = [ww.align_words(t.model, states, prompts, tokens, n, t.tokenizer, eot_id=t.eot_id,
                               no_timestamps_id=gen.no_timestamps_token_id, cross_cache=c)
                for n in (frames, [live + 100] * 2) for c in (cross, None)]  # then past the live positions
    assert max(frames) < live
    for a, b in (runs[:2], runs[2:]):
        assert [[(w.word, w.start, w.end) for w in c] for c in a] == [[(w.word, w.start, w.end) for w in c] for c in b]
    assert all(runs[0])


def test_words_of_a_batch_whose_rows_ended_at_different_steps(tiny_whisper):
    """The 0.5 s clip's loop stops at its own token cap, before the 3 s clip's: its row leaves the
    decoding batch, and word alignment afterwards still reads both clips' cross-attention keys."""
    from batchcap.models import guard as g
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", dtype="float32", language="en", word_timestamps=True,
                           guard=g.GuardConfig(fallback=False))
    seen = []
    handle = t.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        rows = t.transcribe([t.prepare(tone(0.5, seed=0)), t.prepare(tone(3.0, seed=1))])
    finally:
        handle.remove()
    assert (1, 1) in seen and seen[-1][0] == 2  # a decoding step of the 3 s clip alone; then both aligned
    for row in rows:
        words = [w for s in row["segments"] for w in s.words]
        assert words and "".join(w.word for w in words).strip() == row["text"].strip()


def test_a_segment_spans_its_words(tiny_whisper, monkeypatch):
    """With word times, a segment starts at its first word and ends at its last, as openai-whisper sets them:
    Whisper often starts a segment at its window's start, and a subtitle showed the text seconds (15 s after
    music) before it was said."""
    from batchcap.models import guard as g
    from batchcap.models import whisper_words
    from batchcap.models.whisper import WhisperTranscriber
    from batchcap.models.whisper_timestamps import Word

    real = whisper_words.words_per_segment

    def inside(words, counts, segments, **kwargs):  # the aligned words, moved well inside their segments
        out = real(words, counts, segments, **kwargs)
        return [[Word(round((s.start + s.end) / 2, 3), round((s.start + 3 * s.end) / 4, 3), w.word, w.probability)
                 for w in group] for s, group in zip(segments, out)]

    monkeypatch.setattr(whisper_words, "words_per_segment", inside)
    t = WhisperTranscriber(tiny_whisper, device="cpu", dtype="float32", language="en", word_timestamps=True,
                           guard=g.GuardConfig(fallback=False))
    rows = t.transcribe([t.prepare(tone(3.0, seed=1)), t.prepare(tone(2.0, seed=2))])
    spans = [(s.start, s.end, s.words[0].start, s.words[-1].end) for r in rows for s in r["segments"] if s.words]
    assert spans and any(a != b for a, b, _, _ in spans)
    assert all((start, end) == (first, last) for start, end, first, last in spans)
