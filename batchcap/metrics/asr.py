"""ASR error rates against references: text normalization, WER and CER.

Text is normalized first (:func:`get_normalizer`), then compared word by word (WER) and character by
character (CER) with ``jiwer``. Error counts are kept as integers so that a corpus rate is
``sum(errors) / sum(reference length)`` (:class:`ErrorRate`), never a mean of per-row rates.

CER convention: characters of the normalized text with whitespace collapsed, i.e. ``" ".join(text.split())``.
The single spaces between words count as characters (as in ``jiwer.cer``); leading, trailing and repeated
whitespace does not.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

NORMALIZER_MODES = ("auto", "whisper", "language", "basic", "none")
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")

_ENGLISH_NAMES = frozenset({"en", "eng", "english"})

# Languages written without spaces between words: a "word" error rate over whitespace-split text would be a
# sentence error rate. Their WER counts characters (grapheme clusters), as the Whisper paper's
# ``split_letters`` scoring does for Chinese, Japanese, Thai, Lao and Burmese.
CHARACTER_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my", "km", "bo"})
# Whisper codes that num2words spells under another name
_NUM2WORDS_CODES = {"kk": "kz"}
_LONGEST_SPELLED = 15  # digits; longer runs (ids, phone numbers read digit by digit) stay digits
# A whole number written in groups of three digits ("1.000.000", "3,500", "10 000" with a no-break space):
# one number. Only a group separator repeated the same way, and not before a decimal part.
_GROUPED_NUMBER = re.compile(r"(?<![\d.,'’])\d{1,3}(?P<sep>[.,'’\u00a0\u202f])\d{3}(?:(?P=sep)\d{3})*"
                             r"(?![\d'’]|[.,]\d)")
# Letters a language's writers may leave out: Russian and Belarusian write ё as е in most printed text
_OPTIONAL_LETTERS = {"ru": str.maketrans("ё", "е"), "be": str.maketrans("ё", "е")}
# Languages whose combining marks are optional vowel points (Arabic harakat and shadda, Hebrew niqqud),
# written in some texts and left out of most: dropped. Every other language's marks are part of its
# spelling (Devanagari and the other Brahmic vowel signs and viramas, Thai vowels and tones) and kept.
_OPTIONAL_MARKS = frozenset({"ar", "fa", "ur", "ps", "sd", "ug", "he", "yi"})


# --------------------------------------------------------------------------------------------------------
# ASR text normalization
# --------------------------------------------------------------------------------------------------------


def is_english(language: str | None) -> bool:
    """True for ``None`` (unknown, assumed English), ``en``, ``eng``, ``english`` and ``en-US``-style tags."""
    if language is None:
        return True
    lang = language.strip().lower().replace("_", "-")
    return lang in _ENGLISH_NAMES or lang.startswith("en-")


def normalizer_file(model: str | None, *, local_only: bool = True) -> str | None:
    """The path of ``normalizer.json`` (Whisper's British -> American spelling map) for ``--model`` as the user
    gave it: in a model directory, else for a hub id in the Hugging Face cache. With ``local_only=False`` a hub
    id's file may be downloaded (training saves it beside the merged model); scoring never downloads."""
    if not model:
        return None
    if os.path.isdir(model):
        path = os.path.join(model, "normalizer.json")
        return path if os.path.isfile(path) else None
    try:
        if local_only:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model, "normalizer.json")
        else:
            from transformers.utils import cached_file

            path = cached_file(model, "normalizer.json", _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - not a repo id, no cache, no network: no mapping
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def english_spelling(model: str | None) -> dict[str, str]:
    """Whisper's British -> American mapping for ``--model`` (see :func:`normalizer_file`; nothing is downloaded).
    The run's scores, the report and ``train audio``'s evaluation all resolve it here, so a hub id and a
    local folder of the same model score alike."""
    path = normalizer_file(model)
    return load_english_spelling(os.path.dirname(path)) if path else {}


def load_english_spelling(model_dir: str | os.PathLike[str] | None) -> dict[str, str]:
    """The British -> American spelling mapping of a Whisper tokenizer directory (``normalizer.json``).

    Returns ``{}`` when there is no directory or no such file, or when the file is unreadable (logged).
    """
    if model_dir is None:
        return {}
    path = Path(model_dir) / "normalizer.json"
    if not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable spelling normalizer %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        logger.warning("ignoring spelling normalizer %s: not a JSON object of strings", path)
        return {}
    return data


def language_key(language: str | None) -> str | None:
    """Whisper's code for a language given as a code, a name or a locale (``it``, ``Italian``, ``pt_BR``);
    the lowercased first part of the tag where Whisper does not know it; None for None or blank."""
    if language is None or not str(language).strip():
        return None
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    name = str(language).strip().lower()
    return TO_LANGUAGE_CODE.get(name) or name.replace("_", "-").split("-")[0]


def resolve_mode(mode: str, language: str | None) -> str:
    """The normalizer mode ``auto`` stands for: ``whisper`` for English (or no language), else ``language``."""
    if mode not in NORMALIZER_MODES:
        raise ValueError(f"unknown normalizer mode {mode!r}; expected one of {', '.join(NORMALIZER_MODES)}")
    if mode == "auto":
        return "whisper" if is_english(language) else "language"
    return mode


class TextNormalizer:
    """A text normalizer for scoring; call it on a string. ``mode`` is the resolved mode (never ``auto``).

    ``by_characters``: the output is split into characters (languages without spaces), so that WER counts
    characters; CER is then counted on the text without those separating spaces (:func:`error_counts`).
    """

    def __init__(self, mode: str, impl: Callable[[str], str] | None = None, by_characters: bool = False):
        self.mode = mode
        self._impl = impl
        self.by_characters = by_characters

    def __call__(self, text: str) -> str:
        if self._impl is None:
            return text
        # Whisper's normalizers may leave leading/trailing or double spaces.
        return " ".join(self._impl(text).split())

    def __repr__(self) -> str:
        return f"TextNormalizer({self.mode!r})"


def basic_keeping_marks(text: str, drop_marks: bool = False) -> str:
    """Whisper's ``BasicTextNormalizer`` (lowercase, bracketed and parenthesised text dropped, NFKC,
    symbols and punctuation as spaces, whitespace collapsed), except for combining marks: Whisper's
    replaces them with spaces too, which cuts a Hindi, Tamil or Thai word into bare consonants ("नमस्ते"
    becomes "नमस त", and WER counts the pieces as words); here they stay in their word, or, with
    ``drop_marks``, are removed from it (optional vowel points)."""
    text = text.lower()
    text = re.sub(r"[<\[][^>\]]*[>\]]", "", text)
    text = re.sub(r"\(([^)]+?)\)", "", text)
    out = []
    for ch in unicodedata.normalize("NFKC", text):
        kind = unicodedata.category(ch)[0]
        if kind == "M":
            if not drop_marks:
                out.append(ch)
        else:
            out.append(" " if kind in "SP" else ch)
    return re.sub(r"\s+", " ", "".join(out).lower())


class _LanguageNormalizer:
    """Whisper's ``BasicTextNormalizer`` with each word's marks kept (:func:`basic_keeping_marks`), then whole
    numbers written in words of ``code`` (num2words: "1" and "один" are the same word to a listener, and
    references and models write numbers either way), then, for languages without spaces, one token per
    character."""

    def __init__(self, code: str | None):
        drop = code in _OPTIONAL_MARKS
        self._basic = functools.partial(basic_keeping_marks, drop_marks=drop)
        self._spell = _number_speller(code)
        self._spelled: dict[str, str] = {}
        self._by_characters = code in CHARACTER_LANGUAGES
        self._letters = _OPTIONAL_LETTERS.get(code or "")

    def __call__(self, text: str) -> str:
        if self._spell is not None:
            text = _GROUPED_NUMBER.sub(lambda m: "".join(ch for ch in m.group() if ch.isdigit()), text)
        text = self._basic(text)
        if self._letters is not None:
            text = text.translate(self._letters)
        if self._by_characters:
            import regex

            if self._spell is not None:  # digits inside a run of characters: there are no word boundaries
                text = regex.sub(r"\d+", lambda m: "".join(self._number(m.group()).split()), text)
            return " ".join(regex.findall(r"\X", "".join(text.split())))
        if self._spell is not None:
            text = " ".join(self._number(t) if t.isdigit() else t for t in text.split())
        return text

    def _number(self, digits: str) -> str:
        words = self._spelled.get(digits)
        if words is None:
            words = digits
            # "007", "0451": read digit by digit, as leading zeros are
            parts = list(digits) if len(digits) > 1 and int(digits[0]) == 0 else [digits]
            if len(digits) <= _LONGEST_SPELLED:
                try:
                    words = " ".join(self._basic(self._spell(int(part))) for part in parts) or digits
                except Exception:  # noqa: BLE001 - num2words raises assorted errors on numbers it cannot say
                    words = digits
            if len(self._spelled) < 10_000:
                self._spelled[digits] = words
        return words


def _number_speller(code: str | None) -> Callable[[int], str] | None:
    """num2words for ``code``, or None where it has no such language (or is not installed)."""
    if not code or code in _ENGLISH_NAMES:
        return None
    try:
        from num2words import CONVERTER_CLASSES, num2words
    except ImportError:  # pragma: no cover - a declared dependency
        logger.warning("num2words is not installed: numbers are scored as written")
        return None
    lang = _NUM2WORDS_CODES.get(code, code)
    if lang not in CONVERTER_CLASSES:
        return None
    return lambda number: num2words(number, lang=lang)


def get_normalizer(
    mode: str, language: str | None, english_spelling: dict[str, str] | None = None
) -> Callable[[str], str]:
    """A text normalizer for WER/CER.

    * ``whisper``: Whisper's English normalizer as shipped in transformers (``EnglishTextNormalizer``):
      lowercase, drop bracketed text and fillers (uh, um, hmm), expand contractions, write numbers as digits
      ("twenty five" -> "25"), map British to American spelling with ``english_spelling`` (see
      :func:`load_english_spelling`; with none, spellings are left as they are), strip punctuation.
    * ``language``: ``basic``, then whole numbers written in words of ``language`` (num2words, for the ~50
      languages it knows: "1" -> "один"), optional letters written plainly (Russian ё as е), and
      for languages written without spaces (:data:`CHARACTER_LANGUAGES`) one token per character, so that WER
      counts characters.
    * ``basic``: Whisper's language-agnostic ``BasicTextNormalizer``: lowercase, drop bracketed text,
      replace punctuation and symbols with spaces (diacritics kept).
    * ``none``: the text unchanged (WER still splits on whitespace; CER collapses whitespace).
    * ``auto``: ``whisper`` for English (``language`` None, ``en``, ``english``...), else ``language``.
    """
    mode = resolve_mode(mode, language)
    if mode == "none":
        return TextNormalizer("none")
    if mode == "language":
        code = language_key(language)
        return TextNormalizer("language", _LanguageNormalizer(code), by_characters=code in CHARACTER_LANGUAGES)

    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if mode == "whisper":
        if not english_spelling:
            logger.debug("whisper normalizer without a spelling mapping: British spellings are kept")
        return TextNormalizer("whisper", EnglishTextNormalizer(dict(english_spelling or {})))
    return TextNormalizer("basic", BasicTextNormalizer())


# --------------------------------------------------------------------------------------------------------
# WER / CER
# --------------------------------------------------------------------------------------------------------


def wer_counts(ref: str, hyp: str) -> tuple[int, int]:
    """(word errors = substitutions + deletions + insertions, reference word count) of normalized text.

    Words are whitespace-separated. An empty reference gives ``(hypothesis word count, 0)``: insertions
    still count towards a corpus total, but the row has no rate of its own.
    """
    ref_words = ref.split()
    hyp_words = hyp.split()
    if not ref_words or not hyp_words:
        return len(ref_words) + len(hyp_words), len(ref_words)

    import jiwer

    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return out.substitutions + out.deletions + out.insertions, len(ref_words)


def cer_counts(ref: str, hyp: str) -> tuple[int, int]:
    """(character errors, reference character count) of normalized text.

    Both texts are whitespace-collapsed first (``" ".join(text.split())``); the single spaces between words
    count as characters. An empty reference gives ``(hypothesis character count, 0)``.
    """
    ref_text = " ".join(ref.split())
    hyp_text = " ".join(hyp.split())
    if not ref_text or not hyp_text:
        return len(ref_text) + len(hyp_text), len(ref_text)

    import jiwer

    out = jiwer.process_characters(ref_text, hyp_text)
    return out.substitutions + out.deletions + out.insertions, len(ref_text)


def error_counts(ref: str, hyp: str, normalizer: Callable[[str], str] | None = None) -> tuple[int, int, int, int]:
    """(word errors, reference words, character errors, reference characters) of already normalized text.

    With a ``by_characters`` normalizer the "words" are characters, and CER ignores the spaces put between
    them (a wrong character is one error, not one in twice the length)."""
    word_errors, ref_words = wer_counts(ref, hyp)
    char_errors, ref_chars = cer_counts(*character_texts(ref, hyp, getattr(normalizer, "by_characters", False)))
    return word_errors, ref_words, char_errors, ref_chars


def character_texts(ref: str, hyp: str, by_characters: bool) -> tuple[str, str]:
    """The normalized texts CER compares: as they are, or, for a ``by_characters`` normalizer, without the
    spaces it put between the characters."""
    return ("".join(ref.split()), "".join(hyp.split())) if by_characters else (ref, hyp)


@dataclass
class ErrorRate:
    """Accumulates error counts; ``rate`` = total errors / total reference length (None while that is 0)."""

    errors: int = 0
    total: int = 0

    def add(self, errors: int, total: int) -> None:
        self.errors += errors
        self.total += total

    @property
    def rate(self) -> float | None:
        return self.errors / self.total if self.total else None


def score_transcript(ref: str, hyp: str | None, normalize: Callable[[str], str] | None = None) -> dict:
    """WER and CER of one transcript against its reference, after ``normalize`` (None: text as is).

    Returns ``wer``, ``cer`` (None when the normalized reference is empty), ``word_errors``, ``ref_words``,
    ``char_errors``, ``ref_chars``. A missing hypothesis (None) scores as an empty one.
    """
    norm = normalize or (lambda text: text)
    ref_n = norm(ref)
    hyp_n = norm(hyp or "")
    word_errors, ref_words, char_errors, ref_chars = error_counts(ref_n, hyp_n, norm)
    return {
        "wer": word_errors / ref_words if ref_words else None,
        "cer": char_errors / ref_chars if ref_chars else None,
        "word_errors": word_errors,
        "ref_words": ref_words,
        "char_errors": char_errors,
        "ref_chars": ref_chars,
    }
