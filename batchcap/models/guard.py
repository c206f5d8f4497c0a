"""The hallucination guard's arithmetic: when a Whisper hypothesis is suspect, and which attempt to keep.

Pure functions on numbers and strings (no model), shared by every decoding path.

A hypothesis is suspect when (openai-whisper's and faster-whisper's checks, plus a length bound):

* its text's zlib compression ratio is above ``compression_ratio_threshold`` (Whisper's 2.4): a
  looping phrase compresses far better than speech;
* its mean token log-probability (text tokens and the end token, as openai-whisper averages it) is
  below ``logprob_threshold`` (Whisper's -1.0);
* it has more tokens than its duration can hold: ``TOKENS_PER_SECOND * duration + TOKEN_SLACK`` text
  tokens (or decoding was cut at that cap, plus room for timestamps, before the end token).

The bound comes from real speech: the reference transcripts of the 1,719 telephone prompts of the
English, Italian and Russian benchmark sets (scripts/bench_asr.py), tokenized with Whisper's
multilingual tokenizer, against the clips' durations. The densest clip of 5 s or more carries 12.3
tokens/s (Italian), the densest of any length 16 tokens/s (a 0.75 s clip whose reference includes an
annotation); 15 tokens/s plus 10 tokens is above every clip of the three sets, with room for
Whisper's punctuation and numbers spelled out; a 1.8 s clip may have 37 tokens, a 30 s one 460 (more
than Whisper's 448-token window, so the bound never cuts a full window of real speech).

Those three languages are written in scripts Whisper's byte-level BPE merges well (3.3-5.3 UTF-8 bytes a
token over their references). Scripts it splits into several tokens a syllable carry far more tokens a
second of the same speech: 1.0-1.3 bytes a token for Malayalam, Georgian and Burmese sentences, 2.2 for
Hindi, and 19-44 tokens/s at ordinary speaking rates (Malayalam, Burmese, Georgian, Khmer, Sinhala): the
bound cut nearly every such clip and marked it ``unresolved``. Their languages
(``DENSE_SCRIPT_LANGUAGES``) get ``DENSE_SCRIPT_FACTOR`` times the bound; a translation (English) does not.

A clip is "no speech" (openai-whisper's rule) when the probability of the no-speech token at the
first decoding position is above ``no_speech_threshold`` AND the hypothesis' mean log-probability is
below ``logprob_threshold``: its text is dropped rather than retried.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TOKENS_PER_SECOND = 15.0
TOKEN_SLACK = 10
# Brahmic scripts (Devanagari, Bengali-Assamese, Gurmukhi, Gujarati, Tamil, Telugu, Kannada, Malayalam,
# Sinhala), Burmese, Khmer, Lao, Tibetan, Ge'ez (Amharic), Georgian and Armenian
DENSE_SCRIPT_LANGUAGES = frozenset({"hi", "mr", "ne", "sa", "bn", "as", "pa", "gu", "ta", "te", "kn", "ml", "si",
                                    "my", "km", "lo", "bo", "am", "ka", "hy"})
DENSE_SCRIPT_FACTOR = 4.0
WHISPER_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)

# what happened to a clip (the ``decode`` column)
GREEDY = "greedy"
BEAM = "beam"
FULL_WINDOW = "full_window"
NO_SPEECH = "no_speech"
UNRESOLVED = "unresolved"
LONG_FORM = "long_form"


def temperature_label(temperature: float) -> str:
    return f"temperature={temperature:g}"


def severity(decode: str) -> float:
    """How far the guard had to go for a text: first-pass decoding < no speech < the full window <
    each higher fallback temperature < unresolved (for a recording, the worst of its windows)."""
    if decode == UNRESOLVED:
        return 100.0
    if decode.startswith("temperature="):
        return 10.0 + float(decode.split("=", 1)[1])
    return {FULL_WINDOW: 3.0, NO_SPEECH: 1.0}.get(decode, 0.0)


def worst_decode(decodes: list[str]) -> str:
    """The ``decode`` value of a recording decoded in windows: its worst window's."""
    return max(decodes, key=severity)


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the guard; ``None`` switches a check off."""

    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    fallback: bool = True  # retry suspects (full window, then temperatures); else only flag them
    temperatures: tuple[float, ...] = WHISPER_TEMPERATURES
    best_of: int = 5  # samples per clip at a temperature above 0 (openai-whisper's and faster-whisper's default)
    tokens_per_second: float = TOKENS_PER_SECOND
    token_slack: int = TOKEN_SLACK


def compression_ratio(text: str) -> float:
    """Length of the UTF-8 text over its zlib-compressed length (openai-whisper's measure); 0 for ''."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def token_bound(duration_s: float, config: GuardConfig = GuardConfig(), density: float = 1.0) -> int:
    """Most text tokens a clip of ``duration_s`` seconds can plausibly hold (``density``: its language's
    factor, :func:`language_density`)."""
    return int((config.tokens_per_second * max(0.0, duration_s) + config.token_slack) * density)


def language_density(language: str | None, task: str = "transcribe") -> float:
    """How many times the bound's tokens a second the text of ``language`` takes (1 for a translation,
    which is English)."""
    return DENSE_SCRIPT_FACTOR if task != "translate" and language in DENSE_SCRIPT_LANGUAGES else 1.0


@dataclass
class Attempt:
    """One decoding of one clip, with the scores the guard judges it by."""

    text: str
    tokens: int  # text tokens (no special tokens)
    avg_logprob: float | None
    no_speech_prob: float | None
    decode: str  # how it was decoded: greedy, beam, full_window, temperature=0.4
    segments: Any = None  # the hypothesis' segments (times), when it was decoded with timestamps
    ran_out: bool = False  # decoding was cut at the guard's token cap before the end token
    ids: Any = None  # the generated token ids (text and times, before the end token)
    density: float = 1.0  # its language's factor on the token bound (language_density)
    compression_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.compression_ratio = compression_ratio(self.text)


def problems(attempt: Attempt, duration_s: float, config: GuardConfig = GuardConfig()) -> list[str]:
    """The checks ``attempt`` fails: any of compression_ratio, avg_logprob, token_bound ([] = fine)."""
    found = []
    if config.compression_ratio_threshold is not None \
            and attempt.compression_ratio > config.compression_ratio_threshold:
        found.append("compression_ratio")
    if config.logprob_threshold is not None and attempt.avg_logprob is not None \
            and attempt.avg_logprob < config.logprob_threshold:
        found.append("avg_logprob")
    if attempt.tokens > token_bound(duration_s, config, attempt.density) or attempt.ran_out:
        found.append("token_bound")
    return found


def is_no_speech(attempt: Attempt, config: GuardConfig = GuardConfig()) -> bool:
    """openai-whisper's silence rule: a likely no-speech token and an unconfident hypothesis."""
    if config.no_speech_threshold is None or attempt.no_speech_prob is None:
        return False
    if attempt.no_speech_prob <= config.no_speech_threshold:
        return False
    return config.logprob_threshold is None or (attempt.avg_logprob is not None
                                                and attempt.avg_logprob < config.logprob_threshold)


def is_suspect(attempt: Attempt, duration_s: float, config: GuardConfig = GuardConfig()) -> bool:
    return not is_no_speech(attempt, config) and bool(problems(attempt, duration_s, config))


def least_bad(attempts: Sequence[Attempt], duration_s: float, config: GuardConfig = GuardConfig()) -> Attempt:
    """The attempt to keep when none passes: one that does not loop (compression ratio and token
    bound) before one that does; then the most confident (highest mean log-probability); among
    looping ones, the shortest, then the least repetitive. Ties: the earliest."""
    def key(a: Attempt) -> tuple[int, float, int, float]:
        found = problems(a, duration_s, config)
        if "compression_ratio" in found or "token_bound" in found:
            return (1, 0.0, a.tokens, a.compression_ratio)
        return (0, -(a.avg_logprob if a.avg_logprob is not None else float("-inf")), 0, 0.0)
    return min(attempts, key=key)


class FirstPass:
    """The rows of one sampled decoding call to end early: rows are clip-major (clip, then run, i.e.
    temperature, then sample), ``runs`` temperatures of ``samples`` samples per clip. A clip keeps its
    first run, in order, whose best sample passes (one temperature at a time would stop there); once
    every sample of its runs up to such a run has ended, its later runs' samples are not needed.

    ``passes(row, ids, avg_logprob)``: whether that row's ended hypothesis passes the guard. Called as
    ``decoding.decode``'s ``settle``."""

    def __init__(self, runs: int, samples: int, passes: Callable[[int, list[int], float | None], bool]):
        self.runs, self.samples, self.passes = runs, samples, passes
        self.ended: set[int] = set()
        self.verdicts: dict[tuple[int, int], bool] = {}  # (clip, run) -> some sample passes
        self.settled: set[int] = set()  # clips whose kept run is known

    def __call__(self, rows: list[int], hypothesis: Callable[[int], tuple[list[int], float | None]]) -> list[int]:
        self.ended.update(rows)
        per_clip = self.runs * self.samples
        stop = []
        for clip in sorted({r // per_clip for r in rows} - self.settled):
            for run in range(self.runs):
                first = clip * per_clip + run * self.samples
                members = range(first, first + self.samples)
                if not all(r in self.ended for r in members):
                    break  # this run is not over: nothing after it can be decided yet
                if (clip, run) not in self.verdicts:
                    self.verdicts[clip, run] = any(self.passes(r, *hypothesis(r)) for r in members)
                if self.verdicts[clip, run]:
                    self.settled.add(clip)
                    stop += [r for r in range(first + self.samples, (clip + 1) * per_clip) if r not in self.ended]
                    break
        return stop
