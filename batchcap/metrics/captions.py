"""Caption metrics against reference captions: BLEU-1..4, ROUGE-L and CIDEr-D.

:func:`caption_metrics` computes BLEU-1..4, ROUGE-L and CIDEr-D exactly as the COCO caption evaluation code
(``pycocoevalcap``) does, on text tokenized by :func:`coco_tokenize`. Why the scorers are implemented here
rather than imported:

* ``pycocoevalcap`` (the reference, last released 2020) is a ~100 MB wheel of Java jars that also pulls in
  ``pycocotools``, and its tokenizer needs a Java runtime; too heavy for a runtime dependency.
* The maintained libraries compute *different* numbers: ``sacrebleu``/``nltk``/``torchmetrics`` BLEU use other
  smoothing and tokenization, ``rouge-score`` reports ROUGE-L with beta=1 and other tokenization, and none of
  them has CIDEr-D. ``aac-metrics`` reimplements the COCO scorers but depends on torch, sentence-transformers
  and a CLAP model package.
* The three scorers are short, dependency-free algorithms. They are written here to follow pycocoevalcap's
  arithmetic, including its quirks, and ``tests/test_metrics.py`` checks agreement with pycocoevalcap's own
  scorers to 1e-6 when it is installed.

Quirks kept for agreement: BLEU adds 1e-15 / 1e-9 to each n-gram precision (so a row with no 4-gram match
scores a small positive BLEU-4, not 0) and uses the closest reference length (ties: the shorter) for the
brevity penalty; ROUGE-L uses beta=1.2 with the best precision and the best recall over the references taken
separately; CIDEr-D uses sigma=6, clipping, a x10 scale, and its length penalty compares bigram counts
(``len - 1``) as pycocoevalcap's does.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence

logger = logging.getLogger(__name__)

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")

# --------------------------------------------------------------------------------------------------------
# Caption tokenization (a Python rendering of pycocoevalcap's PTBTokenizer step)
# --------------------------------------------------------------------------------------------------------

# Tokens pycocoevalcap removes after tokenizing. Its list also names -LRB- etc. in upper case, but the tokenizer
# runs with -lowerCase, so "-lrb-" ... survive as tokens there, and so they do here.
_COCO_PUNCT = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

# Characters the Stanford tokenizer normalizes.
_CHAR_MAP = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2013": " -- ",
        "\u2014": " -- ",
        "\u2026": " ... ",
        "\u00a0": " ",
        "\u20ac": "$",
        "\u00a3": "#",
        "\u00a2": " cents ",
        "\u00bd": "1/2",
        "\u00bc": "1/4",
        "\u00be": "3/4",
    }
)

# Words whose final period the tokenizer keeps (checked against Stanford CoreNLP 3.4.1).
# fmt: off
_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "inc", "co", "corp", "ltd", "vs", "etc", "prof", "gen",
    "gov", "sen", "rep", "rev", "mt", "ft", "ave", "blvd", "dept", "est", "jan", "feb", "mar", "apr",
    "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "capt", "col", "lt", "sgt", "messrs", "bros",
    "mme", "mlle", "assn", "univ", "cf", "al", "rd", "ext", "ct", "sq", "mon", "tue", "wed", "thu", "fri",
)
# fmt: on

_ABBR_ALT = "|".join(sorted(_ABBREVIATIONS, key=len, reverse=True))
_LETTER = r"[^\W\d_]"
_TOKEN_RE = re.compile(
    rf"""
    (?P<quoted_word>(?<!\w)'(?:\d0s|em|n')(?!\w))                     # '90s 'em 'n'
  | (?P<tis>(?<!\w)'t(?=(?:is|was)(?!\w)))                          # 'tis -> 't is
  | (?P<abbr>(?<![\w.])(?:(?:{_LETTER}\.){{2,}}|ph\.d\.|(?:{_ABBR_ALT})\.
      |{_LETTER}\.)(?!\w))                                          # u.s. e.g. mr. a.
  | (?P<number_abbr>(?<![\w.])(?:no|ca)\.(?=\s*\d))                  # no. 5
  | (?P<tag><[^<>\s]+>)                                             # <b>
  | (?P<emoticon>(?<!\S)[:;=]-?[()\[\]dp](?!\S))                   # :) ;-(
  | (?P<word>(?:\#(?={_LETTER})|@)?\w+
      (?:(?:[-/&@]|\.(?=\w)|(?<={_LETTER})'(?={_LETTER})|(?<=\d)'(?=s(?!\w))|(?<=\d)[,:](?=\d))\w+)*)
  | (?P<dots>\.{{2,}})
  | (?P<dashes>-{{2,}})
  | (?P<marks>[!?]+)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)

_CONTRACTIONS = r"(n't|'s|'re|'ve|'ll|'d|'m)"
_CONTRACTION_RE = re.compile(rf"^(.+?){_CONTRACTIONS}$")
# A hyphen right after a contraction is split off (and then dropped): "bird's-eye" -> "bird 's eye".
_CONTRACTION_HYPHEN_RE = re.compile(rf"{_CONTRACTIONS}-(?=\w)")
_N_INFIX_RE = re.compile(r"(?<=\w)('n')(?=\w)")
_WHOLE_WORD_SPLITS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "wanna": ["wan", "na"],
    "gotta": ["got", "ta"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
    "y'all": ["y'", "all"],
}


def _split_word(word: str) -> list[str]:
    if word in _WHOLE_WORD_SPLITS:
        return list(_WHOLE_WORD_SPLITS[word])
    if "'" not in word:
        return [word]
    pieces = _CONTRACTION_HYPHEN_RE.split(word)  # [word, suffix, word, suffix, ..., word]
    parts = [pieces[i] + pieces[i + 1] for i in range(0, len(pieces) - 1, 2)] + [pieces[-1]]
    out: list[str] = []
    for part in (p for whole in parts for p in _N_INFIX_RE.split(whole)):
        if not part:
            continue
        suffixes: list[str] = []
        while (match := _CONTRACTION_RE.match(part)) is not None:
            part, suffix = match.group(1), match.group(2)
            suffixes.insert(0, suffix)
        out.append(part)
        out.extend(suffixes)
    return out


def coco_tokenize(text: str | None) -> list[str]:
    """Tokens of a caption as pycocoevalcap scores them: PTB-tokenized, lowercased, punctuation removed.

    A Python rendering of pycocoevalcap's Stanford PTBTokenizer (CoreNLP 3.4.1, ``-lowerCase``) step, so no
    Java is needed. It reproduces that tokenizer on ordinary caption text: words, numbers ("1,000", "3.50",
    "3:30"), hyphenated words, English contractions ("don't" -> "do n't", "dog's" -> "dog 's"), common
    abbreviations ("mr.", "u.s."), "$"/"%" split off, quotes and punctuation dropped, and brackets kept as
    "-lrb-"/"-rrb-" (pycocoevalcap keeps them too, as its removal list is in upper case). Rare constructs may
    tokenize differently: HTML-like markup, unusual abbreviations, digits glued to letters after
    a colon ("12:00pm").
    """
    if not text:
        return []
    text = text.translate(_CHAR_MAP).lower()
    tokens: list[str] = []
    for match in _TOKEN_RE.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind == "word":
            tokens.extend(_split_word(token))
        elif kind == "emoticon":
            tokens.append("".join(_BRACKETS.get(char, char) for char in token))
        elif kind == "dots":
            tokens.append("...")
        elif kind == "dashes":
            tokens.append("--")
        elif kind == "other":
            if token in _BRACKETS:
                tokens.append(_BRACKETS[token])
            elif token in "\"'`":
                tokens.append("''")
            else:
                tokens.append(token)
        else:
            tokens.append(token)
    return [t for t in tokens if t not in _COCO_PUNCT]


# --------------------------------------------------------------------------------------------------------
# Caption metrics
# --------------------------------------------------------------------------------------------------------

_MAX_N = 4
_BLEU_TINY = 1e-15  # pycocoevalcap's smoothing of n-gram matches...
_BLEU_SMALL = 1e-9  # ...and of n-gram counts
_ROUGE_BETA = 1.2
_CIDER_SIGMA = 6.0

Ngram = tuple[str, ...]


def _ngrams(tokens: Sequence[str], max_n: int = _MAX_N) -> Counter[Ngram]:
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _bleu_scores(
    correct: Sequence[float], guess: Sequence[float], testlen: float, reflen: float
) -> list[float]:
    """BLEU-1..N from match counts, n-gram counts and lengths, with pycocoevalcap's smoothing."""
    scores = []
    product = 1.0
    for k in range(len(correct)):
        product *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [score * penalty for score in scores]
    return scores


def _bleu(hyps: list[list[str]], refs: list[list[list[str]]]) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..4 (pooled counts, summed closest reference lengths) and per-row BLEU-1..4."""
    total_correct = [0] * _MAX_N
    total_guess = [0] * _MAX_N
    total_test = total_ref = 0
    rows = []
    for hyp, row_refs in zip(hyps, refs, strict=True):
        max_ref_counts: dict[Ngram, int] = {}
        for ref in row_refs:
            for gram, count in _ngrams(ref).items():
                if count > max_ref_counts.get(gram, 0):
                    max_ref_counts[gram] = count
        testlen = len(hyp)
        reflen = min((abs(len(ref) - testlen), len(ref)) for ref in row_refs)[1]
        guess = [max(0, testlen - k) for k in range(_MAX_N)]
        correct = [0] * _MAX_N
        for gram, count in _ngrams(hyp).items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)
        rows.append(_bleu_scores(correct, guess, testlen, reflen))
        total_test += testlen
        total_ref += reflen
        for k in range(_MAX_N):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
    return _bleu_scores(total_correct, total_guess, total_test, total_ref), rows


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _rouge_l(hyp: list[str], refs: list[list[str]]) -> float:
    """ROUGE-L F-measure (beta 1.2) from the best precision and the best recall over the references."""
    if not hyp:
        return 0.0
    best_precision = best_recall = 0.0
    for ref in refs:
        if not ref:
            continue
        lcs = _lcs_length(ref, hyp)
        best_precision = max(best_precision, lcs / len(hyp))
        best_recall = max(best_recall, lcs / len(ref))
    if best_precision == 0 or best_recall == 0:
        return 0.0
    beta2 = _ROUGE_BETA**2
    return (1 + beta2) * best_precision * best_recall / (best_recall + beta2 * best_precision)


def _cider_d(hyps: list[list[str]], refs: list[list[list[str]]]) -> list[float]:
    """Per-row CIDEr-D; document frequencies come from the references of all rows together."""
    ref_counts = [[_ngrams(ref) for ref in row_refs] for row_refs in refs]
    doc_freq: Counter[Ngram] = Counter()
    for row in ref_counts:
        doc_freq.update(set().union(*row))
    log_rows = math.log(len(hyps))

    def tfidf(counts: Counter[Ngram]) -> tuple[list[dict[Ngram, float]], list[float]]:
        vec: list[dict[Ngram, float]] = [{} for _ in range(_MAX_N)]
        sq_norm = [0.0] * _MAX_N
        for gram, tf in counts.items():
            weight = tf * (log_rows - math.log(max(1.0, doc_freq.get(gram, 0))))
            vec[len(gram) - 1][gram] = weight
            sq_norm[len(gram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in sq_norm]

    scores = []
    for hyp, row_refs, row_counts in zip(hyps, refs, ref_counts, strict=True):
        hyp_vec, hyp_norm = tfidf(_ngrams(hyp))
        # pycocoevalcap's length for the penalty counts bigrams, i.e. len - 1 for a non-empty caption.
        hyp_len = max(len(hyp) - 1, 0)
        per_n = [0.0] * _MAX_N
        for ref, counts in zip(row_refs, row_counts, strict=True):
            ref_vec, ref_norm = tfidf(counts)
            delta = hyp_len - max(len(ref) - 1, 0)
            penalty = math.exp(-(delta**2) / (2 * _CIDER_SIGMA**2))
            for k in range(_MAX_N):
                ref_k = ref_vec[k]
                value = 0.0
                for gram, weight in hyp_vec[k].items():
                    ref_weight = ref_k.get(gram, 0.0)
                    value += min(weight, ref_weight) * ref_weight
                if hyp_norm[k] != 0 and ref_norm[k] != 0:
                    value /= hyp_norm[k] * ref_norm[k]
                per_n[k] += value * penalty
        scores.append(sum(per_n) / _MAX_N / len(row_refs) * 10.0)
    return scores


def corpus_bleu(hyps: Sequence[str | None], refs: Sequence[Sequence[str]]) -> float | None:
    """Corpus BLEU-4 alone, as :func:`caption_metrics` computes it, without ROUGE-L and CIDEr-D (a report
    whose table holds their per-row values needs only this; the whole set took it 60 % of its time)."""
    if not hyps:
        return None
    bleu_corpus, _ = _bleu([coco_tokenize(h) for h in hyps], [[coco_tokenize(r) for r in rs] for rs in refs])
    return bleu_corpus[_MAX_N - 1]


def caption_metrics(
    hyps: Sequence[str | None], refs: Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of captions, as pycocoevalcap computes them.

    ``hyps[i]`` is scored against the one or more references ``refs[i]``; give only rows that have
    references. Returns (corpus scores, per-row scores), keyed by :data:`CAPTION_METRICS`:

    * ``bleu_n``: corpus BLEU pools n-gram matches and lengths over all rows (brevity penalty from the sum
      of the closest reference lengths); it is not the mean of the row BLEUs.
    * ``rouge_l``: corpus score is the mean of the rows.
    * ``cider_d``: IDF weights come from the references of all rows, so a row's score depends on the
      whole set (it is the per-image score of the corpus computation); corpus score is the mean of the
      rows. With a single row every weight is 0 (log 1), so CIDEr-D is 0: it needs a set of images.

    An empty or missing hypothesis (a failed caption) scores 0 on every metric and still counts in the
    corpus (its reference length lowers corpus BLEU's brevity penalty). Text is tokenized with
    :func:`coco_tokenize`. No rows: ``({}, [])``.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    if not hyps:
        return {}, []
    hyp_tokens = [coco_tokenize(hyp) for hyp in hyps]
    ref_tokens = []
    for i, row_refs in enumerate(refs):
        if isinstance(row_refs, str):
            raise TypeError(f"row {i}: references must be a list of strings, not a string")
        if not row_refs:
            raise ValueError(f"row {i} has no references")
        ref_tokens.append([coco_tokenize(ref) for ref in row_refs])
    if len(hyps) == 1:
        logger.warning("CIDEr-D of a single captioned item is always 0 (its IDF needs a set of items)")

    bleu_corpus, bleu_rows = _bleu(hyp_tokens, ref_tokens)
    rouge_rows = [_rouge_l(hyp, row_refs) for hyp, row_refs in zip(hyp_tokens, ref_tokens, strict=True)]
    cider_rows = _cider_d(hyp_tokens, ref_tokens)

    rows = []
    for bleus, rouge, cider in zip(bleu_rows, rouge_rows, cider_rows, strict=True):
        row = {f"bleu_{k + 1}": bleus[k] for k in range(_MAX_N)}
        row["rouge_l"] = rouge
        row["cider_d"] = cider
        rows.append(row)
    corpus = {f"bleu_{k + 1}": bleu_corpus[k] for k in range(_MAX_N)}
    corpus["rouge_l"] = sum(rouge_rows) / len(rouge_rows)
    corpus["cider_d"] = sum(cider_rows) / len(cider_rows)
    return corpus, rows
