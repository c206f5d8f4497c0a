"""ASR error rates against references: text normalization, WER and CER.

Text is normalized first (:func:`get_normalizer`), then compared word by word (WER) and character by
character (CER) with ``jiwer``. Error counts are kept as integers so that a corpus rate is
``sum(errors) / sum(reference length)`` (:class:`ErrorRate`), never a mean of per-row rates.

CER convention: characters of the normalized text with whitespace collapsed, i.e. ``" ".join(text.split())``.
The single spaces between words count as characters (as in ``jiwer.cer``); leading, trailing and repeated
whitespace does not.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

NORMALIZER_MODES = ("auto", "whisper", "basic", "none")
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")

_ENGLISH_NAMES = frozenset({"en", "eng", "english"})


# --------------------------------------------------------------------------------------------------------
# ASR text normalization
# --------------------------------------------------------------------------------------------------------


def is_english(language: str | None) -> bool:
    """True for ``None`` (unknown, assumed English), ``en``, ``eng``, ``english`` and ``en-US``-style tags."""
    if language is None:
        return True
    lang = language.strip().lower().replace("_", "-")
    return lang in _ENGLISH_NAMES or lang.startswith("en-")


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


class TextNormalizer:
    """A text normalizer for scoring; call it on a string. ``mode`` is the resolved mode (never ``auto``)."""

    def __init__(self, mode: str, impl: Callable[[str], str] | None = None):
        self.mode = mode
        self._impl = impl

    def __call__(self, text: str) -> str:
        if self._impl is None:
            return text
        # Whisper's normalizers may leave leading/trailing or double spaces.
        return " ".join(self._impl(text).split())

    def __repr__(self) -> str:
        return f"TextNormalizer({self.mode!r})"


def get_normalizer(
    mode: str, language: str | None, english_spelling: dict[str, str] | None = None
) -> Callable[[str], str]:
    """A text normalizer for WER/CER.

    * ``whisper``: Whisper's English normalizer as shipped in transformers (``EnglishTextNormalizer``):
      lowercase, drop bracketed text and fillers (uh, um, hmm), expand contractions, write numbers as digits
      ("twenty five" -> "25"), map British to American spelling with ``english_spelling`` (see
      :func:`load_english_spelling`; with none, spellings are left as they are), strip punctuation.
    * ``basic``: Whisper's language-agnostic ``BasicTextNormalizer``: lowercase, drop bracketed text,
      replace punctuation and symbols with spaces (diacritics kept).
    * ``none``: the text unchanged (WER still splits on whitespace; CER collapses whitespace).
    * ``auto``: ``whisper`` for English (``language`` None, ``en``, ``english``...), else ``basic``.
    """
    if mode not in NORMALIZER_MODES:
        raise ValueError(f"unknown normalizer mode {mode!r}; expected one of {', '.join(NORMALIZER_MODES)}")
    if mode == "auto":
        mode = "whisper" if is_english(language) else "basic"
    if mode == "none":
        return TextNormalizer("none")

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
    word_errors, ref_words = wer_counts(ref_n, hyp_n)
    char_errors, ref_chars = cer_counts(ref_n, hyp_n)
    return {
        "wer": word_errors / ref_words if ref_words else None,
        "cer": char_errors / ref_chars if ref_chars else None,
        "word_errors": word_errors,
        "ref_words": ref_words,
        "char_errors": char_errors,
        "ref_chars": ref_chars,
    }
