"""Scoring against references, by kind: :mod:`.asr` (WER, CER, text normalization) and
:mod:`.captions` (BLEU, ROUGE-L, CIDEr-D as pycocoevalcap computes them)."""

from .asr import (
    NORMALIZER_MODES,
    ErrorRate,
    TextNormalizer,
    cer_counts,
    error_counts,
    get_normalizer,
    is_english,
    language_key,
    load_english_spelling,
    resolve_mode,
    score_transcript,
    wer_counts,
)
from .captions import CAPTION_METRICS, caption_metrics, coco_tokenize

__all__ = ["CAPTION_METRICS", "NORMALIZER_MODES", "ErrorRate", "TextNormalizer", "caption_metrics", "cer_counts",
           "coco_tokenize", "error_counts", "get_normalizer", "is_english", "language_key",
           "load_english_spelling",
           "resolve_mode", "score_transcript", "wer_counts"]
