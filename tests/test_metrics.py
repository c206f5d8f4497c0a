"""Tests for batchcap.metrics: normalizers, WER/CER counts, corpus rates and caption metrics."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchcap.metrics import (
    CAPTION_METRICS,
    ErrorRate,
    caption_metrics,
    cer_counts,
    coco_tokenize,
    get_normalizer,
    is_english,
    load_english_spelling,
    score_transcript,
    wer_counts,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- WER / CER


def test_wer_substitution_deletion_insertion_by_hand() -> None:
    # ref: the cat sat on the mat        (6 words)
    # hyp: the cat sit on     mat today
    #              S       D        I    -> 1 substitution + 1 deletion + 1 insertion = 3 errors
    assert wer_counts("the cat sat on the mat", "the cat sit on mat today") == (3, 6)
    scores = score_transcript(
        "the cat sat on the mat", "the cat sit on mat today", get_normalizer("none", None)
    )
    assert scores["wer"] == pytest.approx(0.5)
    assert (scores["word_errors"], scores["ref_words"]) == (3, 6)


def test_wer_splits_on_any_whitespace() -> None:
    assert wer_counts("a\tb  c\n", " a b c") == (0, 3)


def test_cer_by_hand_spaces_count_once() -> None:
    # "hello world" is 11 characters with its space; "helo wrld" drops one "l" and the "o" of world.
    assert cer_counts("hello world", "helo wrld") == (2, 11)
    # The space between words is a character: losing it is one deletion.
    assert cer_counts("ab cd", "abcd") == (1, 5)
    # Leading, trailing and repeated whitespace is not.
    assert cer_counts("a  b ", " a b") == (0, 3)
    scores = score_transcript("hello world", "helo wrld")
    assert scores["cer"] == pytest.approx(2 / 11)
    assert (scores["char_errors"], scores["ref_chars"]) == (2, 11)


def test_empty_reference_and_hypothesis() -> None:
    assert wer_counts("", "") == (0, 0)
    assert cer_counts("", "  ") == (0, 0)
    assert wer_counts("", "two words") == (2, 0)  # insertions, no reference words
    assert cer_counts("", "ab c") == (4, 0)
    assert wer_counts("two words", "") == (2, 2)  # all deleted
    assert cer_counts("ab", "") == (2, 2)

    scores = score_transcript("", "two words")
    assert scores["wer"] is None and scores["cer"] is None
    assert scores["word_errors"] == 2 and scores["ref_words"] == 0

    missing = score_transcript("two words", None)
    assert missing["wer"] == 1.0 and missing["cer"] == 1.0

    # A row without reference words has no rate, but its insertions count in the corpus.
    corpus = ErrorRate()
    for ref, hyp in [("", "uh huh"), ("one two three four", "one two three four")]:
        row = score_transcript(ref, hyp)
        corpus.add(row["word_errors"], row["ref_words"])
    assert corpus.rate == pytest.approx(2 / 4)


def test_error_rate_is_pooled_not_mean_of_rows() -> None:
    rows = [
        ("hello", "world"),  # 1 error / 1 word: row WER 1.0
        (
            "one two three four five six seven eight nine",
            "one two three four five six seven eight nine",
        ),  # 0 / 9
    ]
    corpus = ErrorRate()
    row_wers = []
    for ref, hyp in rows:
        errors, words = wer_counts(ref, hyp)
        corpus.add(errors, words)
        row_wers.append(errors / words)
    assert corpus.rate == pytest.approx(1 / 10)
    assert sum(row_wers) / len(row_wers) == pytest.approx(0.5)
    assert ErrorRate().rate is None


# ---------------------------------------------------------------------------------------------- normalizers


@pytest.mark.parametrize("mode", ["whisper", "basic"])
def test_punctuation_and_case_ignored_when_normalizing(mode: str) -> None:
    normalize = get_normalizer(mode, "en")
    assert score_transcript("Hello, World!", "hello world", normalize)["wer"] == 0.0


def test_none_normalizer_is_identity() -> None:
    normalize = get_normalizer("none", "en")
    assert normalize("Hello, World!") == "Hello, World!"
    # "Hello," vs "hello" and "World!" vs "world": 2 substitutions.
    assert score_transcript("Hello, World!", "hello world", normalize)["word_errors"] == 2


def test_spelling_mapping_applies_with_whisper_normalizer() -> None:
    with_map = get_normalizer("whisper", "en", {"colour": "color"})
    without = get_normalizer("whisper", "en")
    assert with_map("The colour.") == "the color"
    assert score_transcript("The colour is red.", "the color is red", with_map)["wer"] == 0.0
    assert score_transcript("The colour is red.", "the color is red", without)["word_errors"] == 1


def test_numbers_with_english_normalizer() -> None:
    english = get_normalizer("whisper", None)
    assert english("twenty five") == "25"
    assert english("Twenty-five dollars") == "$25"
    assert english("one hundred and five") == "105"
    assert score_transcript("twenty five apples", "25 apples", english)["wer"] == 0.0
    # The basic normalizer leaves number words alone: "twenty five" vs "25" = 1 substitution + 1 deletion.
    basic = get_normalizer("basic", None)
    assert score_transcript("twenty five", "25", basic)["word_errors"] == 2


def test_english_normalizer_expands_contractions_and_drops_fillers() -> None:
    english = get_normalizer("whisper", "en")
    assert english("Um, I won't go (laughs)") == "i will not go"


def test_basic_normalizer_keeps_diacritics_and_trims() -> None:
    basic = get_normalizer("basic", "fr")
    assert basic("  Élève, café!  ") == "élève café"


def test_auto_mode_picks_by_language() -> None:
    for language in (None, "en", "English", "en-US", "en_gb"):
        assert get_normalizer("auto", language).mode == "whisper"  # type: ignore[attr-defined]
        assert is_english(language)
    for language in ("fr", "german", "zh"):
        assert get_normalizer("auto", language).mode == "language"  # type: ignore[attr-defined]
        assert not is_english(language)


def test_language_normalizer_spells_numbers_in_the_rows_language() -> None:
    """A reference's "1" and a transcript's "один" are the same word; Whisper's basic normalizer calls them
    a substitution (as `--normalize basic` still does)."""
    for language in ("ru", "Russian", "ru-RU"):
        russian = get_normalizer("auto", language)
        assert russian("Нажмите 1, потом 21.") == "нажмите один потом двадцать один"
        assert score_transcript("Нажмите 1 для перехода", "Нажмите один для перехода.", russian)["wer"] == 0.0
    assert score_transcript("Nażmite 1", "nażmite один", get_normalizer("basic", "ru"))["word_errors"] == 1
    # digits grouped by thousands are one number; leading zeros are read digit by digit
    assert russian("10\u00a0000 рублей, код 007") == "десять тысяч рублей код ноль ноль семь"
    assert get_normalizer("auto", "it")("3.000 euro, 2,5 litri") == "tremila euro due cinque litri"
    # ё is optional in Russian print: "вперёд" and "вперед" are one word
    assert score_transcript("Шаг вперёд", "шаг вперед", get_normalizer("auto", "ru"))["wer"] == 0.0
    italian = get_normalizer("language", "it")
    assert score_transcript("Premere 3, poi il 1990", "premere tre poi il millenovecentonovanta", italian)["wer"] == 0
    # digit runs too long to be said as one number (ids, phone numbers) stay digits; so do languages num2words
    # does not know, and digits inside words
    assert italian("chiama 0039061234567890123") == "chiama 0039061234567890123"
    assert get_normalizer("auto", "yo")("ọmọ 5") == "ọmọ 5"
    assert italian("covid19") == "covid19"


def test_language_normalizer_keeps_a_words_marks() -> None:
    """Whisper's basic normalizer turns every combining mark into a space: a Hindi or Tamil word becomes a
    run of bare consonants, and WER counts the pieces. Each word's marks stay in it; Arabic and Hebrew
    optional vowel points are dropped (written in some texts, left out of most)."""
    hindi = get_normalizer("auto", "hi")
    assert hindi("नमस्ते दुनिया, आप कैसे हैं?") == "नमस्ते दुनिया आप कैसे हैं"
    scores = score_transcript("नमस्ते दुनिया", "नमस्ते दुनिया", hindi)
    assert (scores["ref_words"], scores["wer"]) == (2, 0.0)
    # a wrong vowel sign is one wrong word of two; Whisper's basic normalizer sees five "words" and no error
    assert score_transcript("नमस्ते दुनिया", "नमस्ते दूनिया", hindi)["word_errors"] == 1
    basic = score_transcript("नमस्ते दुनिया", "नमस्ते दूनिया", get_normalizer("basic", "hi"))
    assert (basic["ref_words"], basic["word_errors"]) == (5, 0)
    assert get_normalizer("auto", "ta")("வணக்கம் உலகம்!") == "வணக்கம் உலகம்"
    thai = get_normalizer("auto", "th")  # scored by character: a base and its marks are one character
    assert thai("สวัสดีครับ") == "ส วั ส ดี ค รั บ"
    assert get_normalizer("auto", "ar")("مَرْحَبًا بالعالم") == "مرحبا بالعالم"
    assert score_transcript("שָׁלוֹם", "שלום", get_normalizer("auto", "he"))["wer"] == 0.0
    # precomposed accents are unchanged, decomposed ones composed
    assert get_normalizer("auto", "fr")("E\u0301le\u0300ve, café!") == "élève café"


def test_languages_without_spaces_are_scored_by_character() -> None:
    japanese = get_normalizer("auto", "ja")
    assert japanese.by_characters and japanese("東京は3時です。") == "東 京 は 三 時 で す"  # type: ignore[attr-defined]
    # one wrong character of seven: WER and CER both 1/7 (CER not diluted by the spaces between characters)
    scores = score_transcript("東京は三時です", "東京は二時です", japanese)
    assert (scores["word_errors"], scores["ref_words"], scores["char_errors"], scores["ref_chars"]) == (1, 7, 1, 7)
    chinese = get_normalizer("auto", "zh")
    assert score_transcript("你好 世界", "你好世界", chinese)["wer"] == 0.0
    # the same pair scored as whitespace-separated words: one "word" wrong out of one
    assert score_transcript("東京は三時です", "東京は二時です", get_normalizer("basic", "ja"))["wer"] == 1.0


def test_report_scores_rows_as_the_run_does() -> None:
    """The report's per-row counts (rapidfuzz, its own loop) equal the run's (error_counts) in every language."""
    from batchcap.report.align import Normalizers, score_rows

    rows = [("The colour is red.", "the color is red", "en"), ("Нажмите 1", "нажмите один", "ru"),
            ("Нажмите 2", "нажмите три", "ru"), ("東京は三時です", "東京は二時でした", "ja"), ("你好 世界", "", "zh")]
    refs, hyps, languages = zip(*rows)
    report = score_rows(["ok"] * len(rows), refs, hyps, languages, Normalizers("auto"))
    for i, (ref, hyp, language) in enumerate(rows):
        run = score_transcript(ref, hyp, get_normalizer("auto", language))
        assert (report.word_errors[i], report.ref_words[i], report.char_errors[i], report.ref_chars[i]) == (
            run["word_errors"], run["ref_words"], run["char_errors"], run["ref_chars"]), (ref, hyp, language)


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ValueError, match="normalizer mode"):
        get_normalizer("fancy", "en")


def test_load_english_spelling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_english_spelling(None) == {}
    assert load_english_spelling(tmp_path) == {}  # no normalizer.json
    (tmp_path / "normalizer.json").write_text(json.dumps({"colour": "color", "favourite": "favorite"}))
    assert load_english_spelling(str(tmp_path)) == {"colour": "color", "favourite": "favorite"}

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "normalizer.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="batchcap.metrics"):
        assert load_english_spelling(bad) == {}
    assert "normalizer.json" in caplog.text


def test_import_is_cheap() -> None:
    code = "import sys, batchcap.metrics; print('transformers' in sys.modules, 'jiwer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------- captions

CAPTIONS: list[tuple[str, list[str]]] = [
    (
        "A man riding a wave on top of a surfboard.",
        [
            "A surfer riding a large wave in the ocean.",
            "A man on a surfboard riding a wave.",
            "a person surfing on a big wave",
        ],
    ),
    ("Two giraffes standing in a field.", ["Two giraffes standing next to each other in a grassy field."]),
    (
        "A kitchen with a stove and a fridge",
        [
            "A kitchen with stainless steel appliances.",
            "The kitchen has a stove, a fridge and a sink.",
            "An empty kitchen with white cabinets",
            "a clean kitchen with a refrigerator and an oven",
            "A small kitchen.",
        ],
    ),
    (
        "The cat's bowl is empty, so it's looking up.",
        [
            "A cat looking up at the camera next to its empty bowl.",
            "The cat isn't happy: its bowl is empty!",
        ],
    ),
    (
        "",
        ["A plate of food with broccoli and rice.", "Broccoli and rice on a white plate."],
    ),  # failed caption
    (
        "A red double-decker bus on a street in London.",
        [
            "A red double-decker bus driving down a city street.",
            "A double decker bus (red) is on the road.",
            "A bus in London.",
            "A red bus parked near a building.",
        ],
    ),
    ("a dog laying on a bed", ["A dog sleeping on a bed next to a laptop.", "a dog laying on a bed"]),
    (
        "A baseball player swinging a bat at a ball.",
        [
            "A baseball player swinging his bat during a game.",
            "A batter hits the ball -- the catcher waits.",
            "A man swinging a baseball bat.",
        ],
    ),
    (
        "A woman holding an umbrella in the rain",
        [
            "A woman with an umbrella walks in the rain.",
            'A lady holding a "pink" umbrella on a rainy day.',
        ],
    ),
    ("zebra", ["Two zebras grazing in a field; one looks at the camera.", "Zebras eating grass."]),
]


def test_coco_tokenize_by_hand() -> None:
    assert coco_tokenize("A man's dog (black), 50% off!") == [
        "a",
        "man",
        "'s",
        "dog",
        "-lrb-",
        "black",
        "-rrb-",
        "50",
        "%",
        "off",
    ]
    assert coco_tokenize("Don't stop -- it's $3.50...") == ["do", "n't", "stop", "it", "'s", "$", "3.50"]
    assert coco_tokenize("Mr. Smith's U.S. trip, in 1,000 \u201cwords\u201d.") == [
        "mr.",
        "smith",
        "'s",
        "u.s.",
        "trip",
        "in",
        "1,000",
        "words",
    ]
    assert coco_tokenize("A black-and-white photo; the end.") == [
        "a",
        "black-and-white",
        "photo",
        "the",
        "end",
    ]
    assert coco_tokenize("") == [] and coco_tokenize(None) == []


def test_identical_captions_score_perfectly() -> None:
    sentences = [
        "a man riding a wave on top of a surfboard",
        "two giraffes standing next to each other in a field",
        "a kitchen with stainless steel appliances and a sink",
    ]
    corpus, rows = caption_metrics(sentences, [[s] for s in sentences])
    assert corpus["bleu_4"] == pytest.approx(1.0, abs=1e-8)
    assert corpus["rouge_l"] == pytest.approx(1.0)
    assert corpus["cider_d"] == pytest.approx(10.0)
    for row in rows:
        assert set(row) == set(CAPTION_METRICS)
        assert row["bleu_4"] == pytest.approx(1.0, abs=1e-8)
        assert row["rouge_l"] == pytest.approx(1.0)


def test_disjoint_and_empty_captions_score_zero() -> None:
    hyps = ["purple elephants dancing wildly tonight", "", "a dog on a couch"]
    refs = [["a man riding a horse on a beach"], ["a plate of food"], ["a brown dog sitting on a couch"]]
    _, rows = caption_metrics(hyps, refs)
    for row in rows[:2]:
        assert row["bleu_4"] < 1e-9  # pycocoevalcap's smoothing leaves ~1e-16, not exactly 0
        assert row["rouge_l"] == 0.0
        assert row["cider_d"] == 0.0
    assert rows[1]["bleu_1"] == 0.0  # empty: brevity penalty exp(1 - 1/0) underflows to 0
    assert rows[2]["rouge_l"] > 0 and rows[2]["cider_d"] > 0


def test_corpus_bleu_pools_counts() -> None:
    hyps = ["a b c d", "e f g h"]
    refs = [["a b c d"], ["e f g x"]]
    corpus, rows = caption_metrics(hyps, refs)
    # Pooled matches / n-grams: 1-grams 7/8, 2-grams 5/6, 3-grams 3/4, 4-grams 1/2; lengths equal (no penalty).
    assert corpus["bleu_4"] == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25, abs=1e-8)
    assert corpus["bleu_1"] == pytest.approx(7 / 8, abs=1e-8)
    mean_row = (rows[0]["bleu_4"] + rows[1]["bleu_4"]) / 2
    assert abs(corpus["bleu_4"] - mean_row) > 0.2
    # BLEU-4 alone (what a report needs when the table holds the other scores) is the same figure
    from batchcap.metrics.captions import corpus_bleu

    assert corpus_bleu(hyps, refs) == corpus["bleu_4"]
    more = ["A man rides a horse.", None, "two dogs play in the snow", ""]
    more_refs = [["a man riding a horse", "a person on a horse"], ["a cat"], ["dogs playing in snow"], ["x y"]]
    assert corpus_bleu(more, more_refs) == caption_metrics(more, more_refs)[0]["bleu_4"]


def test_rouge_l_takes_best_precision_and_recall_separately() -> None:
    hyp = "a man riding a horse"
    # One reference: LCS "a man a horse" = 4 of 5 words each way -> P = R = F = 0.8.
    _, rows = caption_metrics([hyp, "x"], [["a man on a horse"], ["y"]])
    assert rows[0]["rouge_l"] == pytest.approx(0.8)
    # Two references: best precision 5/5 (second), best recall 2/2 (first) -> F = 1 as pycocoevalcap computes.
    _, rows = caption_metrics([hyp, "x"], [["a man", "a man riding a brown horse"], ["y"]])
    assert rows[0]["rouge_l"] == pytest.approx(1.0)


def test_cider_needs_a_set_of_items() -> None:
    corpus, rows = caption_metrics(["a dog on a couch"], [["a dog on a couch"]])
    assert corpus["cider_d"] == 0.0 and rows[0]["cider_d"] == 0.0
    assert corpus["bleu_4"] == pytest.approx(1.0, abs=1e-8)


def test_caption_metrics_input_checks() -> None:
    assert caption_metrics([], []) == ({}, [])
    with pytest.raises(ValueError):
        caption_metrics(["a"], [])
    with pytest.raises(ValueError):
        caption_metrics(["a"], [[]])
    with pytest.raises(TypeError):
        caption_metrics(["a"], ["a reference string"])  # type: ignore[list-item]


def _pycoco_scores(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[dict, list[dict]]:
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    bleu, bleu_rows = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_rows = rouge_mod.Rouge().compute_score(gts, res)
    cider, cider_rows = cider_mod.Cider().compute_score(gts, res)
    corpus = {f"bleu_{k + 1}": bleu[k] for k in range(4)} | {"rouge_l": rouge, "cider_d": cider}
    rows = [
        {f"bleu_{k + 1}": bleu_rows[k][i] for k in range(4)}
        | {"rouge_l": rouge_rows[i], "cider_d": cider_rows[i]}
        for i in range(len(gts))
    ]
    return corpus, rows


def _assert_scores_match(ours: tuple[dict, list[dict]], theirs: tuple[dict, list[dict]]) -> None:
    for name in CAPTION_METRICS:
        assert ours[0][name] == pytest.approx(theirs[0][name], abs=1e-6), name
        for i, (row, ref_row) in enumerate(zip(ours[1], theirs[1], strict=True)):
            assert row[name] == pytest.approx(ref_row[name], abs=1e-6), (name, i)


def test_agrees_with_pycocoevalcap_scorers() -> None:
    hyps = [hyp for hyp, _ in CAPTIONS]
    refs = [row_refs for _, row_refs in CAPTIONS]
    # Same tokenization on both sides (ours), then pycocoevalcap's own scorers.
    gts = {i: [" ".join(coco_tokenize(r)) for r in row_refs] for i, row_refs in enumerate(refs)}
    res = {i: [" ".join(coco_tokenize(hyp))] for i, hyp in enumerate(hyps)}
    theirs = _pycoco_scores(gts, res)
    ours = caption_metrics(hyps, refs)
    _assert_scores_match(ours, theirs)
    assert all(math.isfinite(v) for v in ours[0].values())


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_agrees_with_pycocoevalcap_end_to_end_with_java_tokenizer() -> None:
    tokenizer_mod = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    rows = CAPTIONS
    tokenizer = tokenizer_mod.PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in row_refs] for i, (_, row_refs) in enumerate(rows)})
    res = tokenizer.tokenize({i: [{"caption": hyp}] for i, (hyp, _) in enumerate(rows)})
    for i, (hyp, row_refs) in enumerate(rows):
        assert res[i] == [" ".join(coco_tokenize(hyp))]
        assert gts[i] == [" ".join(coco_tokenize(r)) for r in row_refs]
    _assert_scores_match(
        caption_metrics([h for h, _ in rows], [r for _, r in rows]), _pycoco_scores(gts, res)
    )
