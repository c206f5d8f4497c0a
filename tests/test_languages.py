"""Languages: one for all clips, candidates for detection, one per clip (a manifest column)."""

from __future__ import annotations

import pytest

from batchcap.items import MODEL_ERROR, FatalError, ItemError
from tests.conftest import tone

pytestmark = pytest.mark.usefixtures("one_thread")


def _transcriber(model, **kwargs):
    from batchcap.models.guard import GuardConfig
    from batchcap.models.whisper import WhisperTranscriber

    return WhisperTranscriber(model, device="cpu", guard=GuardConfig(fallback=False), **kwargs)


def _generate_spy(t):
    """Record the language tokens of the prompts of every short-clip generate call."""
    seen: list = []
    original = t._generate

    def generate(**kwargs):
        seen.append([t._id_to_lang[int(row[1])] for row in kwargs["decoder_input_ids"]])
        return original(**kwargs)
    t._generate = generate
    return seen


def test_detection_without_candidates_picks_among_all(tiny_whisper):
    t = _transcriber(tiny_whisper)
    rows = t.transcribe([t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))])
    assert {r["language"] for r in rows} <= {"en", "de", "fr", "es"}
    assert all(0.25 <= r["language_prob"] <= 1.0 for r in rows)  # over four languages


def test_candidates_restrict_detection(tiny_whisper):
    free = _transcriber(tiny_whisper).transcribe
    t = _transcriber(tiny_whisper, language="fr, es")
    assert t.language is None and t.candidates == ["fr", "es"]
    clips = [t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))]
    unrestricted = {r["language"] for r in free(clips)}
    spy = _generate_spy(t)
    rows = t.transcribe(clips)
    assert all(r["language"] in ("fr", "es") for r in rows)
    assert spy == [[r["language"] for r in rows]]
    assert all(0.5 <= r["language_prob"] <= 1.0 for r in rows)  # renormalised over the two candidates
    # the candidates change the answer: unrestricted detection picks a language outside them
    assert unrestricted - {"fr", "es"}
    # names work as codes do
    assert _transcriber(tiny_whisper, language=["French", "german"]).candidates == ["fr", "de"]


def test_one_language_for_all(tiny_whisper):
    t = _transcriber(tiny_whisper, language="Spanish")
    spy = _generate_spy(t)
    rows = t.transcribe([t.prepare(tone(1.0)), t.prepare(tone(2.0))])
    assert spy == [["es", "es"]]
    assert [(r["language"], r["language_prob"]) for r in rows] == [("es", None), ("es", None)]


def test_per_clip_languages_in_one_batch(tiny_whisper):
    t = _transcriber(tiny_whisper, language="de")
    spy = _generate_spy(t)
    clips = [t.prepare(tone(1.0), language="fr"), t.prepare(tone(1.5)), t.prepare(tone(2.0), language="Spanish")]
    rows = t.transcribe(clips)
    assert spy == [["fr", "de", "es"]]
    assert [r["language"] for r in rows] == ["fr", "de", "es"]
    # without a run language, the clips without their own are detected (and only they get a probability)
    t = _transcriber(tiny_whisper, language="fr,es")
    rows = t.transcribe([t.prepare(tone(1.0), language="de"), t.prepare(tone(1.5))])
    assert rows[0]["language"] == "de" and rows[0]["language_prob"] is None
    assert rows[1]["language"] in ("fr", "es") and rows[1]["language_prob"] is not None


def test_unknown_languages(tiny_whisper, tiny_whisper_en):
    t = _transcriber(tiny_whisper)
    with pytest.raises(ItemError) as err:
        t.prepare(tone(1.0), language="klingon")
    assert err.value.status == MODEL_ERROR and "klingon" in err.value.message
    with pytest.raises(FatalError, match="does not know language 'it'"):
        _transcriber(tiny_whisper, language="fr,it")  # the tiny model knows en, de, fr, es
    with pytest.raises(FatalError, match="English-only"):
        _transcriber(tiny_whisper_en, language="es,en")
    en = _transcriber(tiny_whisper_en, language="en")
    assert en.prepare(tone(1.0), language="English").language == "en"
    rows = en.transcribe([en.prepare(tone(1.0)), en.prepare(tone(1.0), language="es")])
    assert [(r["language"], r["language_prob"]) for r in rows] == [("en", None), ("en", None)]
    # a language Whisper knows but this checkpoint lacks: detected instead
    rows = t.transcribe([t.prepare(tone(1.0), language="it")])
    assert rows[0]["language"] in ("en", "de", "fr", "es") and rows[0]["language_prob"] is not None


def test_live_window_detects_what_the_full_window_detects(tiny_whisper):
    live, full = _transcriber(tiny_whisper), _transcriber(tiny_whisper, full_window=True)
    clips = [tone(d, freq=f) for d, f in [(0.5, 200), (1.0, 440), (3.0, 800), (8.0, 300)]]
    a = live.transcribe([live.prepare(c) for c in clips])
    b = full.transcribe([full.prepare(c) for c in clips])
    assert [r["language"] for r in a] == [r["language"] for r in b]
    assert [r["language_prob"] for r in a] == pytest.approx([r["language_prob"] for r in b], abs=0.01)


# --- the CLI: a manifest language column -------------------------------------------------------------

def _manifest(tmp_path, column="language", languages=("fr", "es", "", "klingon")):
    import csv

    from tests.conftest import write_audio

    rows = []
    for i, lang in enumerate(languages):
        path = write_audio(tmp_path / f"c{i}.wav", 1.0 + 0.5 * i, freq=300 + 100 * i)
        rows.append({"path": path, "reference": "hello world", column: lang, "speaker": f"s{i}"})
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(manifest)


def test_manifest_language_column_sets_each_rows_language(tiny_whisper, tmp_path):
    import json

    from tests.helpers import rows_of, run_cli

    out = tmp_path / "out.parquet"
    code, output = run_cli("audio", _manifest(tmp_path), "-o", out, "--model", tiny_whisper, "--language", "de",
                           "--batch-size", "4", "--no-fallback")
    assert code == 3, output  # the klingon row fails alone
    rows = rows_of(out)
    # the manifest's language wins; an empty cell takes --language; no input_language column
    assert [r["language"] for r in rows[:3]] == ["fr", "es", "de"]
    assert [r["language_prob"] for r in rows[:3]] == [None, None, None]
    assert "input_language" not in rows[0] and [r["speaker"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert rows[3]["status"] == "model_error" and "klingon" in rows[3]["error"]
    assert all(r["decode"] == "unresolved" for r in rows[:3])  # the tiny model loops; flagged, not retried
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["decode_counts"] == {"unresolved": 3} and summary["fallbacks"] == 3
    assert "decode: 3 unresolved" in output
    # a multilingual set: each language's own rates beside the corpus's, from the rows' own scores
    by_language = summary["wer_by_language"]
    assert sorted(by_language) == ["de", "es", "fr"] and all(v["scored_rows"] == 1 for v in by_language.values())
    for r in rows[:3]:
        assert by_language[r["language"]]["wer"] == pytest.approx(r["wer"], abs=1e-5)
    assert "WER by language: " in output


def test_undetermined_languages_are_detected(tiny_whisper, tmp_path):
    """'auto', 'und' (ISO 639's undetermined), 'unknown' in a language column, or --language auto, mean
    "detect it": they were each row's model_error ("does not know language 'auto'")."""
    from tests.helpers import rows_of, run_cli

    out = tmp_path / "out.parquet"
    manifest = _manifest(tmp_path, languages=("auto", "UND", "unknown", "fr"))
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper, "--no-fallback",
                           "--max-new-tokens", "3")
    assert code == 0, output
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert all(r["language_prob"] is not None for r in rows[:3])  # detected
    assert (rows[3]["language"], rows[3]["language_prob"]) == ("fr", None)  # given
    code, output = run_cli("audio", manifest, "-o", tmp_path / "auto.parquet", "--model", tiny_whisper,
                           "--no-fallback", "--max-new-tokens", "3", "--language", "auto")
    assert code == 0, output  # it was "does not know language 'auto'" for the whole run
    assert [r["language_prob"] is None for r in rows_of(tmp_path / "auto.parquet")] == [False] * 3 + [True]


def test_a_row_asking_for_detection_wins_over_the_language_option(tiny_whisper, tmp_path):
    """``--language de`` for an archive, a row whose cell says ``auto`` or ``detect``: the row was forced into
    German (a Russian prompt came out as an English paraphrase). A row's own value wins, "detect" too; an empty
    cell takes the option's language."""
    from tests.helpers import rows_of, run_cli

    manifest = _manifest(tmp_path, languages=("auto", "detect", "", "fr"))
    code, output = run_cli("audio", manifest, "-o", tmp_path / "o.parquet", "--model", tiny_whisper, "--no-fallback",
                           "--max-new-tokens", "3", "--language", "de", "--no-run-languages")
    assert code == 0, output
    rows = rows_of(tmp_path / "o.parquet")
    assert [r["language_prob"] is not None for r in rows] == [True, True, False, False]  # detected, or given
    assert [r["language"] for r in rows[2:]] == ["de", "fr"]


def test_language_column_option_and_candidates(tiny_whisper, tmp_path):
    from tests.helpers import rows_of, run_cli

    manifest = _manifest(tmp_path, column="lang_code", languages=("es", "", "", ""))
    out = tmp_path / "out.csv"
    code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper, "--language-column", "lang_code",
                           "--language", "fr,es", "--no-fallback")
    assert code == 0, output
    rows = rows_of(out)
    assert rows[0]["language"] == "es" and all(r["language"] in ("fr", "es") for r in rows)
    assert all(r["language_prob"] >= 0.5 for r in rows[1:]) and "lang_code" not in rows[0]
    code, output = run_cli("audio", manifest, "-o", tmp_path / "x.csv", "--model", tiny_whisper,
                           "--language-column", "nope")
    assert code == 1 and "no column 'nope' (--language-column)" in output


def test_the_full_window_detection_keeps_no_cross_attention_keys(tiny_whisper):
    """The second detection needs one decoder position; its cross-attention keys (all 1,500 positions of every
    layer of every clip: 590 MB for 16 clips of whisper-base, the peak of an Italian run) are not cached, and
    it detects what a cached pass does."""
    import torch

    from batchcap.models import whisper as w

    t = _transcriber(tiny_whisper)
    clips = [t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))]
    calls: list = []
    decoder = t.model.get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["encoder_hidden_states"].shape[1], kwargs.get("use_cache"))),
        with_kwargs=True)
    try:
        rows = t.transcribe(clips)
    finally:
        handle.remove()
    assert all(r["language_prob"] < w.LIVE_DETECTION_MIN_PROB for r in rows)  # so detected again: full window
    first_positions = [c for c in calls if c[1] is not None]
    assert (1500, False) in first_positions  # the full-window detection
    assert all(use for _, use in first_positions[:1])  # the live window's first position fills its cache
    with torch.inference_mode(), t._inference():
        sub = [w.detection_window(p) for p in clips]
        states, cross = t._encode(sub, True)
        kept = t._first_position(sub, states, cross)
        states, cross = t._encode(sub, True)
        dropped = t._first_position(sub, states, cross, keep=False)
    assert len(cross) == 0  # nothing was projected into the caller's cache
    assert kept[0] == dropped[0] == [r["language"] for r in rows]
    assert kept[1] == pytest.approx(dropped[1], abs=1e-5)
    assert kept[2] == pytest.approx(dropped[2], abs=1e-5)


def test_unsure_live_detection_is_redone_on_the_zero_padded_full_window(tiny_whisper, monkeypatch):
    # the tiny model spreads its language probability (about 0.29 each): below the threshold, so every
    # clip's language is detected again, in one batch, on the full window padded with log-mel zeros;
    # the rows carry that detection's language and probability
    import torch

    from batchcap.models import whisper as w

    t = _transcriber(tiny_whisper)
    inputs: list = []
    handle = t.model.get_encoder().register_forward_hook(lambda module, args, out: inputs.append(args[0].clone()))
    try:
        clips = [t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))]
        rows = t.transcribe(clips)
        assert [x.shape[0] for x in inputs] == [2] and all(r["language_prob"] < w.LIVE_DETECTION_MIN_PROB
                                                          for r in rows)
        window = inputs[0]
        assert window.shape[-1] == 3000
        for k, p in enumerate(clips):  # the clip's own frames, then zeros (not the clip's floor value)
            frames = int(p.duration_s * 100) + 1
            assert torch.equal(window[k, :, :frames], torch.from_numpy(p.features[:, :frames]).to(window.dtype))
            assert float(window[k, :, frames:].abs().max()) == 0.0 and p.pad_value != 0.0
        with torch.inference_mode(), t._inference():
            sub = [w.detection_window(p) for p in clips]
            states, cross = t._encode(sub, True)
            languages, probs, _, _ = t._first_position(sub, states, cross)
        assert [r["language"] for r in rows] == languages
        assert [r["language_prob"] for r in rows] == pytest.approx(probs, abs=1e-3)
        # clips detected surely enough on the live window are not detected again
        inputs.clear()
        monkeypatch.setattr(w, "LIVE_DETECTION_MIN_PROB", 0.1)
        t.transcribe([t.prepare(tone(1.0))])
        assert inputs == []
    finally:
        handle.remove()


def test_an_unsure_window_takes_its_recordings_language_instead_of_detecting_again(tiny_whisper, monkeypatch):
    # the tiny model is never sure of a language (test above): a clip detects again on the full window,
    # a long recording's window with a prior (its recording's language so far) takes the prior instead
    from batchcap.models import whisper as w

    t = _transcriber(tiny_whisper)
    calls: list = []
    handle = t.model.get_encoder().register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        detected = t.transcribe([t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))])
        assert calls == [2]  # both detected again on the full window
        priors = [next(c for c in ("fr", "es", "de", "en") if c != r["language"]) for r in detected]
        clips = [t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))]
        for p, prior in zip(clips, priors):
            p.language_prior = prior
        calls.clear()
        spy = _generate_spy(t)
        rows = t.transcribe(clips)
        assert [r["language"] for r in rows] == priors and spy == [priors]
        assert calls == []  # no second detection
        # a window sure of its own language keeps it (a recording may switch languages)
        monkeypatch.setattr(w, "LIVE_DETECTION_MIN_PROB", 0.1)
        live = [r["language"] for r in t.transcribe([t.prepare(tone(1.0)), t.prepare(tone(2.0, freq=300))])]
        assert live != priors  # the prior would change the answer
        spy.clear()
        assert [r["language"] for r in t.transcribe(clips)] == live and spy == [live]
        # a language given for the clip wins over both
        clips[0].language = "de"
        assert t.transcribe(clips[:1])[0]["language"] == "de"
    finally:
        handle.remove()


def test_language_codes_whisper_spells_otherwise():
    from batchcap.models.whisper import language_code

    # a code, a name, a locale (FLEURS' jv_id, Java's iw_IL), withdrawn ISO codes, Whisper's own jw
    assert [language_code(x) for x in ("it", "Italian", "it-IT", "pt_BR", "jv", "jv_id", "jw", "iw", "iw_IL",
                                       "in", "ji", "mo", "Javanese")] == [
        "it", "it", "it", "pt", "jw", "jw", "jw", "he", "he", "id", "yi", "ro", "jw"]
    with pytest.raises(ValueError, match="does not know language 'xx'"):
        language_code("xx")


def test_three_letter_codes_and_macrolanguage_members():
    """ISO 639-2/3 codes (the language tags of MP4 / MKV tracks and of many corpora) and the members of
    macrolanguages FLEURS and phone locales use were each a model_error row: "Whisper does not know 'eng'"."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from batchcap.models.whisper import _ISO_639_2, language_code

    assert [language_code(x) for x in ("eng", "deu", "ger", "fre", "zho", "chi", "cmn_hans_cn", "nb_no", "nb-NO",
                                       "nob", "fil_ph", "yue", "haw", "RUS")] == [
        "en", "de", "de", "fr", "zh", "zh", "zh", "no", "no", "no", "tl", "yue", "haw", "ru"]
    assert set(_ISO_639_2) == set(LANGUAGES) - {"haw", "yue"}  # every language Whisper has, by its three letters
    for code, threes in _ISO_639_2.items():
        assert all(language_code(three) == code for three in threes.split())


def test_rows_are_scored_in_their_language_and_translations_in_english(tmp_path):
    """A row's language picks its normalizer: "1" and "uno" are one word in Italian. With --task translate the
    text is English whatever the recording's language, so it is scored with the English normalizer."""
    from batchcap.asr import AudioOptions, AudioScorer

    model = str(tmp_path / "no-model")  # the scorer needs no model (its spelling map is read if present)
    italian = AudioScorer(AudioOptions(model=model))._score("Premere 1 per continuare", "premere uno per continuare",
                                                          "it")
    assert (italian.word_errors, italian.reference_words) == (0, 4)
    translated = AudioScorer(AudioOptions(model=model, task="translate"))
    scores = translated._score("Press one to continue.", "press 1 to continue", "it")
    assert (scores.word_errors, scores.reference_words) == (0, 4)
    as_italian = AudioScorer(AudioOptions(model=model))._score("Press one to continue.", "press 1 to continue", "it")
    assert as_italian.word_errors == 1  # "one" against "uno"


def test_the_report_scores_translations_in_english():
    from batchcap.report.audio import score_result
    from batchcap.report.data import Result

    columns = {"id": ["a"], "status": ["ok"], "reference": ["Press one to continue."],
               "text": ["press 1 to continue"], "language": ["it"]}
    translated = score_result(Result("t.parquet", columns, summary={"task": "translate"}))
    transcribed = score_result(Result("t.parquet", columns, summary={"task": "transcribe"}))
    assert (translated.word_errors[0], transcribed.word_errors[0]) == (0, 1)


# --- the run's languages: an unsure detection leans on what the run surely speaks ---------------------

def test_run_languages_weigh_an_unsure_detection_by_the_runs_sure_ones():
    from batchcap.models.run_languages import RunLanguages

    run = RunLanguages(sure=0.8, memory=3)
    langs = ["en", "it", "es"]
    assert run.choose(langs, [0.5, 0.2, 0.3]) == 0  # nothing heard yet: the detector's own choice
    run.observe("it", 0.79)  # an unsure detection is not evidence
    run.observe("it", None)
    assert run.heard() == {} and run.choose(langs, [0.5, 0.2, 0.3]) == 0
    run.observe("it", 0.95)
    run.observe("it", 1.0)
    assert run.heard() == {"it": 2}
    assert run.choose(langs, [0.5, 0.2, 0.3]) == 1  # 0.2 x 3 against 0.5 x 1
    assert run.choose(langs, [0.7, 0.2, 0.1]) == 0  # 0.2 x 3 against 0.7 x 1
    assert run.choose(["es", "en"], [0.3, 0.7]) == 1  # a language outside the candidates weighs nothing
    for _ in range(3):  # the memory holds the last 3 sure detections
        run.observe("es", 0.9)
    assert run.heard() == {"es": 3} and run.choose(langs, [0.5, 0.2, 0.3]) == 2
    with pytest.raises(ValueError):
        run.choose([], [])


def test_an_unsure_clip_leans_on_the_languages_its_run_was_given_or_surely_detected_in(tiny_whisper):
    import torch

    from batchcap.models import whisper as w

    clips = [tone(1.0), tone(2.0, freq=300), tone(1.5, freq=600)]
    plain = _transcriber(tiny_whisper, run_languages=False)
    alone = plain.transcribe([plain.prepare(c) for c in clips])
    assert all(r["language_prob"] < w.LIVE_DETECTION_MIN_PROB for r in alone)  # the tiny model is never sure
    # an earlier batch of the run is given a language that none of the clips is detected in alone
    given = next(c for c in ("de", "fr", "es", "en") if c not in {r["language"] for r in alone})
    t = _transcriber(tiny_whisper)
    sub = [w.detection_window(t.prepare(c)) for c in clips]  # features outside autocast, as the pipeline makes them
    with torch.inference_mode(), t._inference():  # the detector's probabilities (full window: each is unsure)
        states, cross = t._encode(sub, True)
        _, _, _, dists = t._first_position(sub, states, cross)
    assert [r["language"] for r in alone] == [t.candidates[max(range(4), key=d.__getitem__)] for d in dists]
    first = t.transcribe([t.prepare(tone(3.0, freq=500), language=given) for _ in range(3)])
    assert [r["language"] for r in first] == [given] * 3 and t.run_languages.heard() == {given: 3}
    rows = t.transcribe([t.prepare(c) for c in clips])
    k = t.candidates.index(given)
    for r, dist in zip(rows, dists):  # p(language) x (sure count + 1)
        best = max(range(4), key=lambda j: dist[j] * (4 if j == k else 1))
        assert r["language"] == t.candidates[best]
        assert r["language_prob"] == pytest.approx(dist[best], abs=1e-3)  # the detector's own probability
    assert any(r["language"] == given for r in rows)
    # switched off, the same clips after the same batch keep the detector's own choice
    plain.transcribe([plain.prepare(tone(3.0, freq=500), language=given) for _ in range(3)])
    assert plain.run_languages is None
    assert [r["language"] for r in plain.transcribe([plain.prepare(c) for c in clips])] == \
        [r["language"] for r in alone]
    # one language for the run: nothing to lean on
    assert _transcriber(tiny_whisper, language="fr").run_languages is None


def test_the_cli_leans_on_the_manifests_languages_unless_told_not_to(tiny_whisper, tmp_path):
    from tests.helpers import rows_of, run_cli

    def languages(name, cells, *flags):
        out = tmp_path / f"{name}.csv"
        (tmp_path / name).mkdir()
        code, output = run_cli("audio", _manifest(tmp_path / name, languages=cells), "-o", out, "--model",
                               tiny_whisper, "--batch-size", "4", "--no-fallback", *flags)
        assert code == 0, output
        return [r["language"] for r in rows_of(out)]

    alone = languages("alone", ("", "", "", ""), "--no-run-languages")
    given = next(c for c in ("de", "fr", "es", "en") if c not in alone[2:])
    assert languages("leaning", (given, given, "", "")) == [given] * 4
    assert languages("own", (given, given, "", ""), "--no-run-languages") == [given, given] + alone[2:]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_resumed_run_leans_as_the_uninterrupted_run_did(tiny_whisper, tmp_path, fmt):
    # batches of 2, longest first: the two longer clips (given a language) run first, and the two short
    # ones lean on them. Cut in two, the first run writes the given rows; the resumed run skips their
    # batch and must hear their languages where that batch ran, or the short ones go their own way
    from tests.helpers import rows_of, run_cli

    def run(manifest, out, *flags):
        code, output = run_cli("audio", manifest, "-o", out, "--model", tiny_whisper, "--batch-size", "2",
                               "--no-fallback", *flags)
        assert code == 0, output
        return [r["language"] for r in rows_of(out)]

    (tmp_path / "alone").mkdir()
    alone = run(_manifest(tmp_path / "alone", languages=("", "", "", "")), tmp_path / "alone.csv",
                "--no-run-languages")
    given = next(c for c in ("de", "fr", "es", "en") if c not in alone[:2])
    (tmp_path / "m").mkdir()
    manifest = _manifest(tmp_path / "m", languages=("", "", given, given))
    whole = run(manifest, tmp_path / f"whole.{fmt}")
    assert whole == [given] * 4  # one run: the short clips leaned on the given ones
    lines = open(manifest, encoding="utf-8").read().splitlines(keepends=True)
    first = tmp_path / "first.csv"
    first.write_text(lines[0] + "".join(lines[3:]), encoding="utf-8")  # the header and the two given rows
    out = tmp_path / f"out.{fmt}"
    assert run(str(first), out) == [given, given]
    assert run(manifest, out) == whole  # resumed: the skipped batch's languages were heard
    out = tmp_path / f"off.{fmt}"
    run(str(first), out, "--no-run-languages")
    assert run(manifest, out, "--no-run-languages") == alone[:2] + [given, given]


def test_a_clip_sure_of_a_language_its_run_would_overturn_is_detected_again_on_the_full_window(
        tiny_whisper, monkeypatch):
    import torch

    from batchcap.models import whisper as w

    monkeypatch.setattr(w, "LIVE_DETECTION_MIN_PROB", 0.1)  # every detection of the tiny model is sure now
    clips = [tone(1.0), tone(2.0, freq=300), tone(1.5, freq=600)]

    def detect(t, full):
        sub = [w.detection_window(t.prepare(c)) if full else t.prepare(c) for c in clips]  # outside autocast
        with torch.inference_mode(), t._inference():
            states, cross = t._encode(sub, full)
            return t._first_position(sub, states, cross)

    for run_languages in (True, False):
        t = _transcriber(tiny_whisper, run_languages=run_languages)
        live, _, _, live_dists = detect(t, False)
        full, full_probs, _, _ = detect(t, True)
        given = next(c for c in ("de", "fr", "es", "en") if c not in live)
        t.transcribe([t.prepare(tone(3.0, freq=500), language=given) for _ in range(3)])
        k = t.candidates.index(given)
        # the clips the run's counts would move: p(given) x 4 above their live window's choice
        surprising = [i for i, d in enumerate(live_dists) if d[k] * 4 > max(d)] if run_languages else []
        assert not run_languages or surprising
        windows: list = []
        handle = t.model.get_encoder().register_forward_hook(
            lambda module, args, out, seen=windows: seen.append(tuple(args[0].shape)))
        try:
            rows = t.transcribe([t.prepare(c) for c in clips])
        finally:
            handle.remove()
        # (the live window runs its own layers, not the encoder's forward) the surprising clips on the full
        # window, in one batch
        assert windows == ([(len(surprising), windows[0][1], 3000)] if surprising else [])
        # sure on the full window too: that detection is final (it does not lean on the run)
        assert [r["language"] for r in rows] == [full[i] if i in surprising else live[i] for i in range(3)]
        for i in surprising:
            assert rows[i]["language_prob"] == pytest.approx(full_probs[i], abs=1e-3)


def test_a_windows_batches_run_from_its_longest_clips_to_its_shortest(tiny_whisper, tmp_path):
    # the long clips, surest of their language, are heard before the short ones that lean on them
    import pyarrow.parquet as pq

    from batchcap.asr import transcribe
    from tests.conftest import write_audio

    t = _transcriber(tiny_whisper)
    seen: list = []
    real = t.transcribe

    def spy(batch):
        seen.append([round(p.duration_s, 1) for p in batch])
        return real(batch)
    t.transcribe = spy
    durations = [1.0, 3.0, 0.5, 2.0, 1.5]
    files = [write_audio(tmp_path / f"c{i}.wav", d, freq=300 + 50 * i) for i, d in enumerate(durations)]
    out = tmp_path / "out.parquet"
    transcribe(files, str(out), transcriber=t, batch_size=2)
    # sorted by duration and cut into batches as before ([0.5, 1.0], [1.5, 2.0], [3.0]), run last to first
    # (and longest first within a batch too: longform.transcribe_units)
    assert seen == [[3.0], [2.0, 1.5], [1.0, 0.5]]
    rows = pq.read_table(out).to_pylist()
    assert [r["source"] for r in rows] == files and all(r["status"] == "ok" for r in rows)


def test_each_run_of_one_loaded_transcriber_starts_with_no_languages_heard(tiny_whisper, tmp_path):
    from batchcap.asr import transcribe
    from tests.conftest import write_audio

    t = _transcriber(tiny_whisper)
    (tmp_path / "a").mkdir()
    transcribe(_manifest(tmp_path / "a", languages=("fr", "fr", "fr", "")), str(tmp_path / "a.parquet"),
               transcriber=t)
    assert t.run_languages.heard() == {"fr": 3}
    files = [write_audio(tmp_path / f"b{i}.wav", 1.0 + i, freq=300 + 100 * i) for i in range(2)]
    transcribe(files, str(tmp_path / "b.parquet"), transcriber=t)
    assert t.run_languages.heard() == {}  # the tiny model is sure of nothing: only the first run knew French


def test_translations_are_scored_as_english(caplog):
    """Under --task translate the text is English whatever the recording's language: it was scored with the
    recording's language's normalizer (an Italian row's English text against Italian rules), silently."""
    import logging
    from types import SimpleNamespace

    from batchcap.asr import AudioOptions, AudioScorer
    from batchcap.items import Item
    from batchcap.predictions import Transcript

    item = Item(0, "a", "a.wav", references=["It is twenty-five past two."])
    heard = Transcript("It's 25 past 2.", language="it")
    loaded = SimpleNamespace(duration_s=2.0)
    rows = {}
    with caplog.at_level(logging.WARNING, logger="batchcap.asr"):
        for task in ("transcribe", "translate"):
            scorer = AudioScorer(AudioOptions(model="openai/whisper-base", task=task, normalize="auto"))
            rows[task] = scorer.row(item, loaded, heard, None)
            scorer.row(item, loaded, heard, None)
    assert rows["translate"]["wer"] == 0.0  # Whisper's English normalizer: "it's" = "it is", 25 = twenty-five
    assert rows["transcribe"]["wer"] > 0.0  # Italian rules do not know English contractions
    assert sum("--task translate" in r.getMessage() for r in caplog.records) == 1


def test_a_hub_id_scores_with_the_spelling_map_of_its_cached_checkpoint(tmp_path, monkeypatch):
    """``--model org/name`` (the default is a hub id) reads Whisper's British -> American map from the Hugging
    Face cache, as the report does: the run's WER does not depend on whether the model was given as a hub id
    or as a folder. Before, the run looked for ``org/name/normalizer.json`` under the working directory only."""
    import json

    from huggingface_hub import constants

    from batchcap.asr import AudioOptions, AudioScorer

    snapshot = tmp_path / "hub" / "models--org--whisper-x" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "normalizer.json").write_text(json.dumps({"dialled": "dialed", "cheque": "check"}), encoding="utf-8")
    (tmp_path / "hub" / "models--org--whisper-x" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--whisper-x" / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    for model in ("org/whisper-x", str(snapshot)):
        scores = AudioScorer(AudioOptions(model=model))._score("I dialled the cheque.", "I dialed the check.", "en")
        assert (scores.word_errors, scores.reference_words) == (0, 4), model


def test_the_printed_cer_is_the_exact_rate_rounded_once(tmp_path):
    """6 character errors in this reference give 7.59 %. The summary rounded the rate to 5 decimals
    (0.07595) and the printed line rounded that again to 7.60 %, where the report (exact) said 7.59 %."""
    import pyarrow as pa

    from batchcap.asr import AudioOptions, AudioScorer
    from batchcap.cli import summary_lines

    reference = "abcdefghij " * 7 + "abcdefgh"  # its character count is the scorer's (reference_chars)
    scorer = AudioScorer(AudioOptions(model=str(tmp_path / "no-model"), normalize="none"))
    text = "x" * 6 + reference[6:]
    scores = scorer._score(reference, text, "en")
    assert scores.char_errors == 6
    table = pa.table({"status": ["ok"], "duration_s": [1.0], "reference": [reference], "text": [text],
                      "language": ["en"]})
    summary = scorer.summarize(table, 1.0)
    exact = summary["cer"]
    assert abs(exact - 6 / scores.reference_chars) < 1e-6
    summary.update({"status_counts": {"ok": 1}, "rows": 1, "output": "o.parquet", "processed_this_run": 1,
                    "skipped_already_done": 0, "wall_time_s": 1.0})
    line = next(line for line in summary_lines(summary) if line.startswith("WER"))
    assert f"CER {6 / scores.reference_chars:.2%}" in line, line


def test_the_report_takes_every_normalizer_mode_a_run_takes():
    from click.testing import CliRunner

    from batchcap.cli import main
    from batchcap.metrics.asr import NORMALIZER_MODES

    help_text = CliRunner().invoke(main, ["report", "--help"]).output
    assert "language" in NORMALIZER_MODES and "language" in help_text.split("--normalize", 1)[1].split("--title")[0]


def test_training_and_scoring_find_the_same_normalizer_file(tmp_path, monkeypatch):
    """``train audio`` copies ``normalizer.json`` beside its merged model from the same resolver the scorer
    reads (a folder, else the Hugging Face cache): one lookup, where there were two that could disagree."""
    import json

    from huggingface_hub import constants

    from batchcap.metrics.asr import normalizer_file

    repo = tmp_path / "hub" / "models--org--whisper-y"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "normalizer.json").write_text(json.dumps({"colour": "color"}), encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for local_only in (True, False):
        assert normalizer_file("org/whisper-y", local_only=local_only) == str(snapshot / "normalizer.json")
        assert normalizer_file(str(snapshot), local_only=local_only) == str(snapshot / "normalizer.json")
        assert normalizer_file(str(tmp_path), local_only=local_only) is None  # a folder without one
        assert normalizer_file("org/not-cached", local_only=local_only) is None
