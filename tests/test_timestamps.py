"""Decoding with Whisper's timestamp tokens on clips up to 30 s (and windows of long recordings): the
timestamp grammar on hand-made logits, then the tiny random Whisper end to end (segments inside the
clip, in time order; the guard's token cap with room for times)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from batchcap.models import guard as g
from batchcap.models.decoding import Decoded
from batchcap.models.whisper_logits import TimestampRules, timestamp_limits
from tests.conftest import tone

# a toy vocabulary: text 0-9, end 10, specials 11-13 (13 = <|notimestamps|>), times 14-29 (0.00-0.30 s)
EOT, NO_TS, TB, LAST = 10, 13, 14, 29
PROMPT = [11, 12]


def _rules(limits, max_initial_s=0.1):
    return TimestampRules(timestamp_begin=TB, eot_id=EOT, no_timestamps_id=NO_TS, begin_index=len(PROMPT),
                          limits=limits, max_initial_s=max_initial_s)


def _allowed(rules, generated, logits=None):
    """The ids the rules leave open after ``generated`` (one row per list; flat logits by default)."""
    ids = torch.tensor([PROMPT + row for row in generated])
    scores = torch.zeros(len(generated), LAST + 1) if logits is None else logits.clone()
    out = rules(ids, scores)
    return [set(torch.isfinite(row).nonzero()[:, 0].tolist()) for row in out]


def test_first_token_is_a_time_of_at_most_max_initial_and_the_clip():
    # max_initial 0.1 s = 5 steps: times 14..19; a clip of 0.06 s (limit 17) cuts it further
    limits = timestamp_limits([0.30, 0.06], TB, LAST)
    assert limits == [TB + 15, TB + 3]
    first, short = _allowed(_rules(limits), [[], []])
    assert first == set(range(TB, TB + 6)) and short == set(range(TB, TB + 4))


def test_times_come_in_pairs_and_never_go_back():
    logits = torch.zeros(1, LAST + 1)
    logits[:, TB:] = -5.0  # times unlikely: the "likely times" rule stays out of this test

    def allowed(generated):
        (row,) = _allowed(_rules(timestamp_limits([0.30], TB, LAST)), [generated], logits)
        return row
    after_first = allowed([TB])  # <|0.00|>: text must follow (a lone first time is a start)
    lone = allowed([TB, 3, 4, TB + 6])  # <|0.00|> text <|0.12|>: the segment ended: a start >= 0.12 or the end
    pair = allowed([TB, 3, TB + 6, TB + 6])  # a pair just closed: text
    text = allowed([TB, 3, TB + 6, TB + 6, 5])  # text after a start: text, the end, or a time after 0.12
    texts = set(range(EOT)) | {11, 12}  # text, and the specials: Suppress rules those out, not these rules
    assert after_first == texts | {EOT}
    assert lone == {EOT, 11, 12} | set(range(TB + 6, LAST + 1))
    assert pair == texts | {EOT}
    assert text == texts | {EOT} | set(range(TB + 7, LAST + 1))
    assert NO_TS not in after_first | lone | pair | text


def test_a_clip_never_names_a_time_past_its_end():
    rules = _rules(timestamp_limits([0.30, 0.09], TB, LAST))
    full, short = _allowed(rules, [[TB, 3, 4], [TB, 3, 4]])
    assert max(full) == LAST and max(short) == TB + 5  # 0.09 s rounds up to the 0.10 s step
    # rows expanded for samples (clips x 2, in clip order) share their clip's limit
    rows = _allowed(rules, [[TB, 3, 4]] * 4)
    assert [max(r) for r in rows] == [LAST, LAST, TB + 5, TB + 5]


def test_likely_times_rule_out_text():
    logits = torch.full((2, LAST + 1), -5.0)
    logits[:, 2] = 0.0  # one text token at p ~ e^0 ...
    logits[0, TB + 10:] = -1.0  # ... against 6 times of e^-1 each: together likelier than the text token
    timed, texty = _allowed(_rules(timestamp_limits([0.30] * 2, TB, LAST)), [[TB, 3], [TB, 3]], logits)
    assert timed == set(range(TB + 1, LAST + 1))
    assert 2 in texty and EOT in texty


def test_ran_out_is_a_token_bound_problem():
    cut = g.Attempt("a few words", 3, -0.2, 0.0, g.GREEDY, ran_out=True)
    assert g.problems(cut, 2.0) == ["token_bound"] and g.is_suspect(cut, 2.0)
    assert g.problems(g.Attempt("a few words", 3, -0.2, 0.0, g.GREEDY), 2.0) == []


# --- the tiny random Whisper ------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def transcriber(tiny_whisper):
    from batchcap.models.whisper import WhisperTranscriber

    return WhisperTranscriber(tiny_whisper, device="cpu", language="en")


def _record(t):
    """The generated part of every short-clip generate call's sequences."""
    seen: list[list[list[int]]] = []
    original = t._generate

    def generate(**kwargs):
        out = original(**kwargs)
        seen.append(out.sequences[:, kwargs["decoder_input_ids"].shape[1]:].tolist())
        return out
    t._generate = generate
    return seen


def test_generated_times_follow_the_grammar_and_segments_stay_in_the_clip(transcriber):
    t = transcriber
    t.guard = g.GuardConfig(fallback=False)
    durations = [0.7, 3.0, 11.0]
    seen = _record(t)
    rows = t.transcribe([t.prepare(tone(d, freq=250 + 150 * i)) for i, d in enumerate(durations)])
    (generated,) = seen
    tb = t.timestamp_begin
    for row, duration in zip(generated, durations):
        body = row[:row.index(t.eot_id)] if t.eot_id in row else row
        times = [(tok - tb) * 0.02 for tok in body if tok >= tb]
        assert body and body[0] >= tb and times[0] <= 1.0  # a time first, within max_initial
        assert times == sorted(times) and times[-1] <= math.ceil(duration / 0.02) * 0.02 + 1e-9
        assert t.model.generation_config.no_timestamps_token_id not in body
    for row, duration in zip(rows, durations):
        segs = [s.to_dict() for s in row["segments"]]
        assert all(0 <= s["start"] <= s["end"] <= duration for s in segs)
        assert all(x["end"] <= y["start"] for x, y in zip(segs, segs[1:]))
        assert row["text"].replace(" ", "") == "".join(s["text"] for s in segs).replace(" ", "")


def test_without_timestamps_each_clip_is_one_segment(tiny_whisper):
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", timestamps=False,
                           guard=g.GuardConfig(fallback=False, compression_ratio_threshold=None,
                                               logprob_threshold=None))
    seen = _record(t)
    rows = t.transcribe([t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=600))])
    assert all(tok < t.timestamp_begin for row in seen[0] for tok in row)
    for row, duration in zip(rows, (1.0, 2.0)):
        whole = [{"start": 0.0, "end": duration, "text": row["text"]}]
        assert [s.to_dict() for s in row["segments"]] == (whole if row["text"] else [])


def test_the_guard_cap_leaves_room_for_times_and_flags_a_cut_hypothesis(transcriber):
    # with the loop checks off, only the token bound judges: a 0.5 s clip may have 17 text tokens; its
    # decoding is cut at 17 + 1 + room for times (2 per 2 s, 2 more), and a hypothesis cut there is suspect
    t = transcriber
    t.guard = g.GuardConfig(fallback=False, compression_ratio_threshold=None, logprob_threshold=None)
    seen = _record(t)
    rows = t.transcribe([t.prepare(tone(0.5, freq=900))])
    (generated,) = seen[0]
    cap = g.token_bound(0.5) + 1 + 2 * (1 + math.ceil(0.5 / 2))
    # the random model loops to the cap (no end token): flagged, never silently kept
    assert len(generated) == cap and t.eot_id not in generated
    assert rows[0]["decode"] == g.UNRESOLVED


def test_unfinished_at_reads_where_whisper_stopped_short():
    from batchcap.models.whisper_timestamps import unfinished_at

    def at(tokens):
        return unfinished_at(tokens, timestamp_begin=TB, eot_id=EOT)
    assert at([TB, 3, 4, TB + 5, EOT]) is None  # one finished segment: complete
    assert at([TB, 3, TB + 5, TB + 5, 4, TB + 9, EOT]) is None  # two, the last closed
    assert at([TB, 3, 4, EOT]) is None  # no finished segment: nothing to go back to
    # an open last segment: its text is dropped, the audio from the last finished one's end redone
    assert at([TB, 3, TB + 5, TB + 5, 4, 6, EOT]) == (3, pytest.approx(0.10))
    # a new segment's start right before the end (Whisper defers what it heard last)
    assert at([TB, 3, TB + 5, TB + 7, EOT]) == (3, pytest.approx(0.10))


def _unguarded(tiny_whisper: str, language: str | None) -> tuple[Any, list[int], int, Any]:
    """A transcriber whose guard never redoes anything (a made-up first decoding stays), the ids of
    " Hello there", its first timestamp id and its own generate."""
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language=language,
                           guard=g.GuardConfig(fallback=False, compression_ratio_threshold=None,
                                               logprob_threshold=None, no_speech_threshold=None))
    return t, t.tokenizer.encode(" Hello there", add_special_tokens=False), t.timestamp_begin, t._generate


def test_a_clip_that_stopped_short_has_the_rest_of_its_audio_decoded(tiny_whisper):
    """The first decoding (made up here: the random model's own stops wherever it likes) ends on a new
    segment's start at 1.00 s of a 3 s clip; the rest (2 s) is decoded again by the real model, batched
    with nothing else, and its segments follow the first one's, shifted by 1.00 s."""

    t, text_ids, tb, original = _unguarded(tiny_whisper, "en")
    calls = []

    def generate(**kwargs):
        rules = next(p for p in kwargs["logits_processor"] if isinstance(p, TimestampRules))
        calls.append((kwargs["encoder_outputs"][0].shape[0], rules.limits))
        out = original(**kwargs)
        if len(calls) == 1:  # <|0.00|> Hello there <|1.00|><|1.00|> <|end|>
            made = kwargs["decoder_input_ids"][0].tolist() + [tb, *text_ids, tb + 50, tb + 50, t.eot_id]
            out = Decoded(torch.tensor([made]), out.logprobs)
        return out
    t._generate = generate
    seen = []
    inner_rest = t._rest
    t._rest = lambda p, at, language: seen.append((p.duration_s, at)) or inner_rest(p, at, language)
    (row,) = t.transcribe([t.prepare(tone(3.0))])
    assert seen == [(3.0, pytest.approx(1.0))]
    assert len(calls) >= 2 and calls[1][0] == 1  # the rest: one clip ...
    assert calls[1][1] == [tb + 100]  # ... of 2 s (times up to 2.00 s from its own start)
    first, *rest = [s.to_dict() for s in row["segments"]]
    assert first == {"start": 0.0, "end": 1.0, "text": "Hello there"}
    assert all(1.0 <= s["start"] <= s["end"] <= 3.0 for s in rest)
    # whatever the random model said about the rest follows the first segment's text
    assert rest and row["text"].startswith("Hello there ")
    assert row["text"].replace(" ", "") == "Hellothere" + "".join(s["text"] for s in rest).replace(" ", "")


@pytest.mark.parametrize("speech_window, language", [(True, None), (False, None), (True, "en")])
def test_speech_left_after_a_finished_transcript_of_a_vad_window_is_decoded_again(tiny_whisper, speech_window,
                                                                                   language):
    """A VAD window holds speech to its end. Its first decoding (made up here) is complete but ends at 1.00 s
    of a 6 s window whose language was unsure (the random model is unsure of every language): a recording that
    switched language inside the window lost 15 s of speech that way. The rest is decoded again, its language
    detected afresh (not the window's). Not a clip (no VAD window: the rest may be silence), nor a window whose
    language is sure (given here): where the VAD passed room noise, those rests were one-word hallucinations."""

    t, text_ids, tb, original = _unguarded(tiny_whisper, language)
    calls = []

    def generate(**kwargs):
        calls.append(kwargs["encoder_outputs"][0].shape[0])
        out = original(**kwargs)
        if len(calls) == 1:  # <|0.00|> Hello there <|1.00|> <|end|>: complete
            made = kwargs["decoder_input_ids"][0].tolist() + [tb, *text_ids, tb + 50, t.eot_id]
            out = Decoded(torch.tensor([made]), out.logprobs)
        return out
    t._generate = generate
    seen = []
    inner_rest = t._rest
    t._rest = lambda p, at, language: seen.append((at, language)) or inner_rest(p, at, language)
    window = t.prepare(tone(6.0))
    window.speech_window = speech_window
    (row,) = t.transcribe([window])
    first, *rest = [s.to_dict() for s in row["segments"]]
    assert first == {"start": 0.0, "end": 1.0, "text": "Hello there"}
    if not speech_window or language:
        assert seen == [] and rest == []
        return
    assert seen == [(pytest.approx(1.0), None)]  # from the transcript's end, the language detected again
    assert len(calls) >= 2 and all(1.0 <= s["start"] <= s["end"] <= 6.0 for s in rest)


def test_a_gap_rest_that_says_the_last_segment_again_keeps_it_once(tiny_whisper):
    """Whisper can place a segment before its speech, so the rest from that segment's end may hold the same
    words: seen on a recording of room noise, where "simultaneous call limit reached." came out twice. A gap
    rest's first segment that repeats the window's last one is dropped; what follows it is kept."""
    t, text_ids, tb, original = _unguarded(tiny_whisper, None)
    more = t.tokenizer.encode(" More words", add_special_tokens=False)
    calls = []

    def generate(**kwargs):
        calls.append(1)
        out = original(**kwargs)
        prompt = kwargs["decoder_input_ids"][0].tolist()
        if len(calls) == 1:  # the window: <|0.00|> Hello there <|1.00|> <|end|>
            out = Decoded(torch.tensor([prompt + [tb, *text_ids, tb + 50, t.eot_id]]), out.logprobs)
        elif len(calls) == 2:  # its rest: the same words again, then new ones
            made = prompt + [tb, *t.tokenizer.encode(" hello, there.", add_special_tokens=False), tb + 75,
                             tb + 75, *more, tb + 150, t.eot_id]
            out = Decoded(torch.tensor([made]), out.logprobs)
        return out
    t._generate = generate
    window = t.prepare(tone(6.0))
    window.speech_window = True
    (row,) = t.transcribe([window])
    assert [(s.start, s.end, s.text) for s in row["segments"]] == [(0.0, 1.0, "Hello there"), (2.5, 4.0, "More words")]
    assert row["text"] == "Hello there More words"


def test_word_timestamps_through_the_cli_short_clips_and_windows_of_a_long_recording(tiny_whisper, tmp_path):
    """--word-timestamps: every segment of every row has words inside it, in time order, whose text makes the
    segment's; a long recording's windows give words on the recording's clock (shifted with their window)."""
    import json

    import numpy as np
    import soundfile as sf

    from tests.conftest import write_audio
    from tests.helpers import rows_of, run_cli

    (tmp_path / "in").mkdir()
    write_audio(tmp_path / "in" / "a.wav", 2.5, freq=300)
    parts = [np.zeros(16000 * 20, np.float32)]  # 20 s of silence, then tones: the words come after 20 s
    for i in range(6):
        parts += [tone(4.0, freq=250 + 90 * i).astype(np.float32), np.zeros(16000 * 2, np.float32)]
    sf.write(str(tmp_path / "in" / "b.wav"), np.concatenate(parts), 16000, subtype="PCM_16")
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", tmp_path / "in", "-o", out, "--model", tiny_whisper, "--language", "en",
                           "--word-timestamps", "--no-fallback", "--write", "json")
    assert code == 0, output
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1]["duration_s"] > 50
    with_words = 0
    for row in rows:
        every = []
        for seg in row["segments"]:
            words = list(seg["words"])
            with_words += bool(words)
            assert all(seg["start"] <= w["start"] <= w["end"] <= seg["end"] for w in words)
            assert all(0 < w["probability"] <= 1 for w in words)
            every += words
        assert all(x["end"] <= y["start"] for x, y in zip(every, every[1:]))
        # the words make the row's text (a word goes to the segment of its first token: the random model's
        # words may run over a segment's end, real speech's end at its punctuation)
        assert "".join(w["word"] for w in every).replace(" ", "") == row["text"].replace(" ", "")
    assert with_words and all(s["start"] >= 19.0 for s in rows[1]["segments"])
    saved = json.loads(next((tmp_path / "out.subtitles").glob("b*.json")).read_text())
    assert saved["segments"][0]["words"][0]["start"] >= 19.0


def test_beam_search_with_timestamps(tiny_whisper):
    """Beam search takes the same timestamp rules (its rows are clips x beams) and is rescored per clip."""
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", num_beams=2,
                           guard=g.GuardConfig(fallback=False))
    seen = _record(t)
    durations = [0.8, 2.5]
    rows = t.transcribe([t.prepare(tone(d, freq=350 + 200 * i)) for i, d in enumerate(durations)])
    for row, generated, duration in zip(rows, seen[0], durations):
        body = generated[:generated.index(t.eot_id)] if t.eot_id in generated else generated
        times = [(tok - t.timestamp_begin) * 0.02 for tok in body if tok >= t.timestamp_begin]
        assert body[0] >= t.timestamp_begin and times == sorted(times)
        assert times[-1] <= math.ceil(duration / 0.02) * 0.02 + 1e-9
        assert row["decode"] in (g.BEAM, g.UNRESOLVED) and row["avg_logprob"] is not None
        assert all(0 <= s.start <= s.end <= duration for s in row["segments"])


def test_a_beam_hypothesis_is_scored_as_greedy_decoding_scores_the_same_tokens(tiny_whisper, monkeypatch):
    """Beam search's hypotheses are rescored by one teacher-forced pass; that pass took the raw log-softmax,
    without the decoding rules (timestamps, suppressed tokens) greedy decoding scores after, so the same
    tokens scored ~0.3 lower under beam search (a real clip: -1.10 against -0.77), crossed the guard's -1.0
    and were redone into a worse text. Here beam search is made to return greedy's tokens: same scores."""
    from transformers import GenerationMixin

    from batchcap.models.whisper import WhisperTranscriber

    clips = [tone(d, freq=300 + 170 * i) for i, d in enumerate((0.9, 2.4, 6.0))]
    # float32: on a CPU with bf16 (autocast), incremental steps and the teacher-forced pass round differently
    greedy = WhisperTranscriber(tiny_whisper, device="cpu", dtype="float32", language="en",
                                guard=g.GuardConfig(fallback=False))
    calls: list = []
    original = greedy._generate

    def record(**kwargs):
        out = original(**kwargs)
        calls.append(out.sequences)
        return out
    greedy._generate = record
    expected = [r["avg_logprob"] for r in greedy.transcribe([greedy.prepare(c) for c in clips])]
    (sequences,) = calls
    beam = WhisperTranscriber(tiny_whisper, device="cpu", dtype="float32", language="en", num_beams=2,
                              guard=g.GuardConfig(fallback=False))
    monkeypatch.setattr(GenerationMixin, "generate", lambda self, **kwargs: sequences)
    scored = [r["avg_logprob"] for r in beam.transcribe([beam.prepare(c) for c in clips])]
    assert scored == pytest.approx(expected, abs=2e-4)


def test_beam_search_keeps_cross_attention_in_place_with_the_same_results(tiny_whisper, monkeypatch):
    """transformers reorders the whole cache at every beam step; the cross-attention part of an input's
    beams is the same, so batchcap's cache leaves it (beam 3 on 24 real clips: 28.6 s against 37.5 s,
    identical transcripts). Same rows as with the stock cache, and the cross-attention is never copied."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from batchcap.models import whisper

    clips = [tone(d, freq=300 + 150 * i) for i, d in enumerate((0.9, 2.2, 3.1))]
    t = whisper.WhisperTranscriber(tiny_whisper, device="cpu", language="en", num_beams=3,
                                   guard=g.GuardConfig(fallback=False))
    reordered: list[int] = []
    stock_reorder = DynamicCache.reorder_cache
    monkeypatch.setattr(DynamicCache, "reorder_cache", lambda self, idx: reordered.append(id(self)) or
                        stock_reorder(self, idx))
    ours = [(r["text"], r["avg_logprob"]) for r in t.transcribe([t.prepare(c) for c in clips])]
    ours_reorders = len(reordered)
    reordered.clear()
    monkeypatch.setattr(whisper, "beam_cache_class", lambda: EncoderDecoderCache)
    stock = [(r["text"], r["avg_logprob"]) for r in t.transcribe([t.prepare(c) for c in clips])]
    assert ours == stock
    assert 0 < ours_reorders and len(reordered) == 2 * ours_reorders  # stock: self- and cross-attention


def test_a_segment_over_a_join_is_cut_there_by_its_words():
    from batchcap.models.whisper_timestamps import Segment, Word, crosses, split_at_joins

    words = [Word(0.3, 0.8, " Press", 0.9), Word(0.8, 1.2, " one.", 0.8),  # before the join at 2.0
             Word(2.6, 3.0, " Press", 0.9), Word(3.0, 3.5, " two.", 0.7)]  # after it
    whole = Segment(0.2, 3.6, "Press one. Press two.", words)
    assert crosses(whole, [2.0]) and not crosses(whole, [3.6, 5.0])
    first, second = split_at_joins(whole, [2.0, 5.0])
    assert (first.start, first.end, first.text) == (0.2, 1.2, "Press one.")  # Whisper's start, its last word's end
    assert (second.start, second.end, second.text) == (2.6, 3.6, "Press two.")  # its first word's start, Whisper's end
    assert first.words == words[:2] and second.words == words[2:]
    # a word whose middle is past the join goes after it, clamped into its part
    straddling = Segment(0.0, 4.0, "a b", [Word(0.5, 1.0, " a"), Word(1.8, 2.6, " b")])
    a, b = split_at_joins(straddling, [2.0])
    assert (a.text, b.text) == ("a", "b") and b.start == 2.0 and b.words[0].start == 2.0
    # all words on one side: one part, not reaching over the join; two joins: three parts
    (only,) = split_at_joins(Segment(0.0, 4.0, "x", [Word(2.5, 3.0, " x")]), [2.0])
    assert (only.start, only.end) == (2.5, 4.0)
    assert [p.text for p in split_at_joins(Segment(0.0, 9.0, "a b c", [Word(0.5, 1.0, " a"), Word(3.0, 3.5, " b"),
                                                                            Word(7.0, 8.0, " c")]), [2.0, 5.0])] \
        == ["a", "b", "c"]
    # a segment that starts or ends within a timestamp step (20 ms) of a join does not reach over it
    assert not crosses(Segment(4.06, 4.4, "con"), [4.0602]) and not crosses(Segment(3.0, 4.07, "x"), [4.06])
    near = Segment(4.06, 4.4, "con", [Word(4.1, 4.3, " con")])
    assert split_at_joins(near, [4.0602]) == [near]
    # no words, or no join inside: unchanged
    bare = Segment(0.0, 4.0, "no words")
    assert split_at_joins(bare, [2.0]) == [bare] and split_at_joins(whole, [9.0]) == [whole]
