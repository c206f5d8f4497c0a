"""The hallucination guard: its arithmetic on hand-made strings, and the retry cascade driven by a tiny
random Whisper (which loops on every clip: 'peepeepee...', 24 tokens, the most its config allows)."""

from __future__ import annotations

import dataclasses

import pytest

from batchcap.models import guard as g
from tests.conftest import tone

# --- arithmetic -------------------------------------------------------------------------------------

def test_compression_ratio_separates_loops_from_speech():
    speech = "Please leave a message after the tone, and we will call you back as soon as we can."
    loop = "thank you " * 40
    assert g.compression_ratio("") == 0.0
    assert g.compression_ratio(speech) < 2.4 < g.compression_ratio(loop)
    # non-ASCII text is measured on its UTF-8 bytes, as openai-whisper does
    russian = "Пожалуйста, оставьте сообщение после сигнала."
    assert g.compression_ratio(russian) < 2.4 < g.compression_ratio("Продолжение следует... " * 20)


def test_token_bound_grows_with_duration():
    cfg = g.GuardConfig()
    assert g.token_bound(0.0, cfg) == cfg.token_slack == 10
    assert g.token_bound(1.8, cfg) == 37
    assert g.token_bound(30.0, cfg) == 460  # a full window of real speech is never over it
    assert g.token_bound(1.0, dataclasses.replace(cfg, tokens_per_second=5, token_slack=2)) == 7


def test_problems_and_suspect():
    cfg = g.GuardConfig()
    fine = g.Attempt("Please hold the line.", 6, -0.3, 0.01, g.GREEDY)
    assert g.problems(fine, 2.0, cfg) == [] and not g.is_suspect(fine, 2.0, cfg)
    loop = g.Attempt("no no no " * 30, 90, -0.2, 0.01, g.GREEDY)
    assert g.problems(loop, 1.8, cfg) == ["compression_ratio", "token_bound"]
    unsure = g.Attempt("Please hold the line.", 6, -1.4, 0.01, g.GREEDY)
    assert g.problems(unsure, 2.0, cfg) == ["avg_logprob"]
    # a check set to None is off; the token bound is always on
    off = dataclasses.replace(cfg, compression_ratio_threshold=None, logprob_threshold=None)
    assert g.problems(loop, 1.8, off) == ["token_bound"] and g.problems(loop, 60.0, off) == []


def test_no_speech_needs_both_the_token_and_low_confidence():
    cfg = g.GuardConfig()
    noise = g.Attempt("Thank you.", 3, -1.5, 0.9, g.GREEDY)
    confident = g.Attempt("Thank you.", 3, -0.2, 0.9, g.GREEDY)
    quiet_speech = g.Attempt("Thank you.", 3, -1.5, 0.2, g.GREEDY)
    assert g.is_no_speech(noise, cfg) and not g.is_suspect(noise, 1.0, cfg)
    assert not g.is_no_speech(confident, cfg)
    assert not g.is_no_speech(quiet_speech, cfg) and g.is_suspect(quiet_speech, 1.0, cfg)
    assert not g.is_no_speech(noise, dataclasses.replace(cfg, no_speech_threshold=None))


def test_least_bad_prefers_no_loop_then_confidence():
    cfg = g.GuardConfig()
    loop = g.Attempt("yes yes yes " * 20, 60, -0.1, 0.0, g.GREEDY)
    shorter_loop = g.Attempt("yes yes yes " * 10, 30, -0.1, 0.0, g.FULL_WINDOW)
    unsure = g.Attempt("yes please", 3, -1.8, 0.0, "temperature=0.2")
    less_unsure = g.Attempt("yes, please", 4, -1.2, 0.0, "temperature=0.4")
    assert g.least_bad([loop, unsure, less_unsure], 1.0, cfg) is less_unsure
    assert g.least_bad([loop, shorter_loop], 1.0, cfg) is shorter_loop


def test_first_pass_ends_a_clips_later_temperatures_once_an_earlier_one_passes():
    # 2 clips x 3 temperatures x 2 samples, clip-major; rows 2-3 (clip 0's second temperature) and all
    # of clip 1's third temperature pass
    passing = {2, 10}
    judged = []

    def passes(row, ids, logprob):
        judged.append(row)
        return row in passing
    first = g.FirstPass(3, 2, passes)
    hypothesis = lambda row: ([1, 2], -0.5)  # noqa: E731
    assert first([2, 3], hypothesis) == []  # clip 0's second temperature passes, but its first is not over
    assert first([0], hypothesis) == [] and judged == []
    assert first([1], hypothesis) == [4, 5]  # first over (fails), second over (passes): the third is not needed
    assert judged == [0, 1, 2]  # a run passes at its first passing sample
    assert first([4, 6, 7, 8, 9], hypothesis) == []  # clip 0 settled; clip 1 fails twice, its third runs on
    assert first([10], hypothesis) == []  # the third not over yet
    assert first([11], hypothesis) == []  # the last temperature: nothing after it
    assert judged == [0, 1, 2, 6, 7, 8, 9, 10]  # each run judged once, when it is over


# --- the cascade on a tiny random Whisper -------------------------------------------------------------

def test_dense_scripts_get_the_room_their_tokens_take():
    """Malayalam, Burmese, Georgian... take 19-44 tokens a second of ordinary speech (Whisper's BPE splits
    their syllables into bytes): the English-fitted bound cut nearly every such clip. Their languages get
    DENSE_SCRIPT_FACTOR times the bound; a translation into English does not."""
    cfg = g.GuardConfig()
    assert g.language_density("ml") == g.language_density("my") == g.language_density("ka") == 4.0
    assert g.language_density("en") == g.language_density("ru") == g.language_density("zh") == 1.0
    assert g.language_density("ml", "translate") == 1.0
    text = "ഇന്ന് നല്ല കാലാവസ്ഥയാണ്. ഞാൻ ചന്തയിലേക്ക് പോകുന്നു."  # 3 s of ordinary Malayalam: ~95 tokens
    assert g.problems(g.Attempt(text, 95, -0.3, 0.01, g.GREEDY, density=4.0), 3.0, cfg) == []
    assert g.problems(g.Attempt(text, 95, -0.3, 0.01, g.GREEDY), 3.0, cfg) == ["token_bound"]
    assert g.token_bound(3.0, cfg, 4.0) == 4 * g.token_bound(3.0, cfg)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def transcriber(tiny_whisper):
    """Without timestamp tokens: the random model's loops are then plain text (the cascade is the same
    with timestamps; see test_timestamps.py for the guard on that path)."""
    from batchcap.models.whisper import WhisperTranscriber

    return WhisperTranscriber(tiny_whisper, device="cpu", language="en", timestamps=False)


def _run(t, durations, **guard):
    guard.setdefault("best_of", 2)
    t.guard = g.GuardConfig(**guard)
    return t.transcribe([t.prepare(tone(d, freq=300 + 100 * i)) for i, d in enumerate(durations)])


def _encoder_calls(t):
    """Batch sizes of the stock (full-window) encoder's runs; the live window does not call it."""
    calls: list[int] = []
    handle = t.model.get_encoder().register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_loop_is_detected_and_flagged_without_fallback(transcriber):
    rows = _run(transcriber, [1.0, 2.0], fallback=False)
    for row in rows:
        assert row["text"].startswith("peepeepee") and row["decode"] == g.UNRESOLVED
        assert row["compression_ratio"] > 2.4 and row["avg_logprob"] < -1.0 and row["tokens"] == 24
        assert 0.0 <= row["no_speech_prob"] <= 1.0


def test_suspects_are_retried_on_the_full_window_together(transcriber):
    # loops of 24 tokens are over the token bound of a 0.5 s clip (17) but not of a 2 s one (40):
    # only the short clips are suspect, and their full-window retry is one batch of two
    calls, handle = _encoder_calls(transcriber)
    try:
        rows = _run(transcriber, [0.5, 2.0, 0.6, 3.0], compression_ratio_threshold=None, logprob_threshold=None,
                    temperatures=())
    finally:
        handle.remove()
    assert calls == [2]
    assert [r["decode"] for r in rows] == [g.UNRESOLVED, g.GREEDY, g.UNRESOLVED, g.GREEDY]
    # each clip's decoding stops one token past its own bound: the short clips' loops there, the longer
    # ones at the tiny model's own limit (24, below their bounds)
    assert [r["tokens"] for r in rows] == [g.token_bound(0.5) + 1, 24, g.token_bound(0.6) + 1, 24]


def test_a_dense_script_language_s_clips_decode_to_their_own_cap(transcriber, monkeypatch):
    """The cap that stops a clip's decoding follows its language: the tiny model's loops, over the bound
    of a 0.5 s English clip, run to the model's own limit once English counts as a dense script."""
    monkeypatch.setattr(g, "DENSE_SCRIPT_LANGUAGES", frozenset({"en"}))
    rows = _run(transcriber, [0.5, 0.6], compression_ratio_threshold=None, logprob_threshold=None, temperatures=())
    assert [r["tokens"] for r in rows] == [24, 24] and [r["decode"] for r in rows] == [g.GREEDY, g.GREEDY]


def test_full_window_retry_resolves_what_the_live_window_got_wrong(transcriber):
    # make the stock encoder's states differ from the live window's (scaled): the full window then
    # decodes another text, which passes a compression threshold the live window's loop does not
    def scale(module, args, out):
        out.last_hidden_state = out.last_hidden_state * 50
        return out
    handle = transcriber.model.get_encoder().register_forward_hook(scale)
    try:
        rows = _run(transcriber, [1.0, 2.0], compression_ratio_threshold=3.0, logprob_threshold=None)
    finally:
        handle.remove()
    assert [r["decode"] for r in rows] == [g.FULL_WINDOW, g.FULL_WINDOW]
    assert all(r["compression_ratio"] < 3.0 and r["first_text"].startswith("peepee") for r in rows)


def test_temperature_fallback_and_unresolved(transcriber):
    # greedy loops (ratio 4.25) on both windows; sampling at 0.2 gives varied text that passes 3.0,
    # except on the 0.5 s clip, where 24 tokens stay over the token bound at every temperature
    rows = _run(transcriber, [0.5, 1.0, 2.0], compression_ratio_threshold=3.0, logprob_threshold=None,
                temperatures=(0.2, 0.4))
    assert [r["decode"] for r in rows] == [g.UNRESOLVED, "temperature=0.2", "temperature=0.2"]
    assert rows[0]["text"] and rows[1]["compression_ratio"] < 3.0 and rows[1]["first_text"].startswith("peepee")
    # the unresolved clip keeps its least bad attempt: over the bound anyway, the least repetitive
    assert rows[0]["compression_ratio"] < 4.25
    # the same clips give the same samples, run after run
    again = _run(transcriber, [0.5, 1.0, 2.0], compression_ratio_threshold=3.0, logprob_threshold=None,
                 temperatures=(0.2, 0.4))
    assert [r["text"] for r in again] == [r["text"] for r in rows]


def test_full_window_option_goes_straight_to_temperatures(tiny_whisper):
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", full_window=True, timestamps=False)
    calls, handle = _encoder_calls(t)
    try:
        rows = _run(t, [1.0, 2.0], compression_ratio_threshold=3.0, logprob_threshold=None, temperatures=(0.4,))
    finally:
        handle.remove()
    assert calls == [2]  # the first encoding is reused for the fallback
    assert [r["decode"] for r in rows] == ["temperature=0.4", "temperature=0.4"]


def test_beam_search_is_guarded(tiny_whisper):
    from batchcap.models.whisper import WhisperTranscriber

    t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", num_beams=2, timestamps=False)
    rows = _run(t, [1.0], compression_ratio_threshold=3.0, logprob_threshold=None, temperatures=(0.2,))
    assert rows[0]["decode"] == "temperature=0.2" and rows[0]["first_text"]
    flagged = _run(t, [1.0], fallback=False)
    assert flagged[0]["decode"] == g.UNRESOLVED and flagged[0]["avg_logprob"] < -1.0


def test_no_speech_drops_the_text(transcriber):
    rows = _run(transcriber, [1.0], no_speech_threshold=1e-6)
    assert rows[0]["decode"] == g.NO_SPEECH and rows[0]["text"] == "" and rows[0]["no_speech_prob"] > 1e-6
    # a confident hypothesis is kept whatever the no-speech probability
    rows = _run(transcriber, [1.0], no_speech_threshold=1e-6, logprob_threshold=-100.0,
                compression_ratio_threshold=None, fallback=False)
    assert rows[0]["decode"] == g.GREEDY and rows[0]["text"]


def test_long_form_is_guarded(transcriber):
    t = transcriber
    t.guard = g.GuardConfig(compression_ratio_threshold=None, logprob_threshold=None, temperatures=(0.2,))
    rows = t.transcribe([t.prepare(tone(35.0))])
    assert rows[0]["decode"] in (g.LONG_FORM, g.UNRESOLVED) and rows[0]["language"] == "en"
    kwargs = t._long_form_guard()
    assert kwargs["temperature"] == (0.0, 0.2) and "no_speech_threshold" not in kwargs
    t.guard = g.GuardConfig()
    assert t._long_form_guard()["temperature"] == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert t._long_form_guard()["compression_ratio_threshold"] == pytest.approx(1.35)
    t.guard = g.GuardConfig(fallback=False)
    assert t._long_form_guard() == {}


def test_cli_thresholds_and_decode_column(tiny_whisper, tmp_path):
    import json

    from tests.conftest import write_audio
    from tests.helpers import rows_of, run_cli

    (tmp_path / "in").mkdir()
    for i, seconds in enumerate((1.0, 2.0)):
        write_audio(tmp_path / "in" / f"c{i}.wav", seconds, freq=300 + 100 * i)
    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", tmp_path / "in", "-o", out, "--model", tiny_whisper, "--language", "en",
                           "--compression-ratio-threshold", "3", "--logprob-threshold", "-100", "--no-timestamps")
    assert code == 0, output
    rows = rows_of(out)
    assert [r["decode"] for r in rows] == ["temperature=0.2", "temperature=0.2"]
    assert all(r["compression_ratio"] < 3 and r["avg_logprob"] < -1 and r["no_speech_prob"] < 0.6 for r in rows)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["decode_counts"] == {"temperature=0.2": 2} and summary["fallbacks"] == 2


def test_a_recording_reports_its_worst_window():
    from batchcap.models.guard import worst_decode

    assert worst_decode(["greedy", "full_window", "greedy"]) == "full_window"
    assert worst_decode(["temperature=0.2", "full_window", "temperature=0.6"]) == "temperature=0.6"
    assert worst_decode(["no_speech", "unresolved", "temperature=1"]) == "unresolved"
    assert worst_decode(["greedy", "no_speech"]) == "no_speech"


def test_decoding_logs_no_transformers_warning_per_batch(tiny_whisper_en):
    """The guard's per-batch token cap reaches generate without transformers' "Both max_new_tokens and
    max_length" warning (once per generate call: dozens of lines per run in the library API)."""
    from batchcap.models.whisper import WhisperTranscriber
    from tests.helpers import transformers_warnings

    with transformers_warnings() as records:
        t = WhisperTranscriber(tiny_whisper_en, device="cpu")  # loops: the guard redoes it several times
        rows = t.transcribe([t.prepare(tone(2.0)), t.prepare(tone(1.0, freq=300))])
    assert len(rows) == 2 and rows[0]["decode"] != "greedy"  # several generate calls were made
    assert not [m for m in records if "seem to have been set" in m], records
    # nor its padding false alarm (pad = end token, but no row of a call is padded)
    assert not [m for m in records if "attention mask" in m or "attention_mask" in m], records
