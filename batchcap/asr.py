"""``batchcap audio``: recordings -> transcripts, scored against references when there are any."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .audio import decode_audio
from .fetch import FetchConfig
from .inputs import audio_spec
from .items import OK, Item, ItemError
from .job import JobOptions, build_task, run_pipeline
from .metrics import cer_counts, get_normalizer, load_english_spelling, wer_counts
from .runner import RunResult

log = logging.getLogger(__name__)

AUDIO_COLUMNS = ("id", "source", "text", "language", "language_prob", "decode", "no_speech_prob", "avg_logprob",
                 "compression_ratio", "duration_s", "status", "error", "model", "reference", "wer", "cer")
GUARD_COLUMNS = ("language_prob", "decode", "no_speech_prob", "avg_logprob", "compression_ratio")
DEFAULT_AUDIO_MODEL = "openai/whisper-small"


@dataclass
class AudioOptions(JobOptions):
    model: str = DEFAULT_AUDIO_MODEL
    language: str | None = None  # "es": every recording; "es,en": the candidates detection picks from
    language_column: str | None = None  # manifest column of each recording's language (default: language)
    task: str = "transcribe"
    max_new_tokens: int | None = None
    full_window: bool = False  # run the encoder over all 30 s for every clip (exact, slower)
    window_margin_s: float = 1.0  # otherwise: the encoder computes the clip plus this much padding
    normalize: str = "auto"  # auto | whisper | basic | none
    min_duration: float = 0.1
    silence_dbfs: float = -60.0
    workers: int = 4
    # the hallucination guard (models/guard.py); None switches a check off
    fallback: bool = True
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    fetch: FetchConfig = field(default_factory=lambda: FetchConfig(max_bytes=2 * 2**30))


class AudioTask:
    kind = "audio"
    reserved_columns = AUDIO_COLUMNS

    def __init__(self, transcriber: Any, options: AudioOptions):
        """``transcriber`` None gives a task that can build rows' scores and summarize, not predict
        (the Ray engine's driver side)."""
        self.transcriber = transcriber
        self.options = options
        self.model_name = transcriber.name if transcriber is not None else options.model
        self.audio_seconds = 0.0  # transcribed by this run
        self.started = time.time()
        spelling_dir = getattr(transcriber, "english_spelling_dir", None) if transcriber else options.model
        self._spelling = load_english_spelling(spelling_dir)

    def load(self, item: Item, data: bytes) -> Any:
        samples = decode_audio(data, min_duration=self.options.min_duration,
                               silence_dbfs=self.options.silence_dbfs)
        return self.transcriber.prepare(samples, language=item.language)

    def size(self, loaded: Any) -> float:
        return loaded.duration_s

    def predict(self, batch: list[Any]) -> list[dict[str, Any]]:
        results = self.transcriber.transcribe(batch)
        self.audio_seconds += sum(p.duration_s for p in batch)
        return results

    def row(self, item: Item, loaded: Any | None, result: dict[str, Any] | None,
            error: ItemError | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": item.id,
            "source": item.source,
            "text": result["text"] if result else None,
            "language": result["language"] if result else None,
            **{name: result.get(name) if result else None for name in GUARD_COLUMNS},
            "duration_s": round(loaded.duration_s, 3) if loaded is not None else error.fields.get("duration_s")
            if error else None,
            "status": OK if error is None else error.status,
            "error": None if error is None else error.message,
            "model": self.model_name,
        }
        if item.references:
            reference = " ".join(item.references)
            row["reference"] = reference
            row["wer"] = row["cer"] = None
            if result is not None:
                scores = self._score(reference, result["text"], result["language"])
                row["wer"], row["cer"] = scores["wer"], scores["cer"]
        return row

    def _score(self, reference: str, text: str, language: str | None) -> dict[str, Any]:
        norm = get_normalizer(self.options.normalize, language, self._spelling)
        ref, hyp = norm(reference), norm(text)
        w_err, w_tot = wer_counts(ref, hyp)
        c_err, c_tot = cer_counts(ref, hyp)
        return {"wer": w_err / w_tot if w_tot else None, "cer": c_err / c_tot if c_tot else None,
                "w": (w_err, w_tot), "c": (c_err, c_tot)}

    def summarize(self, table: Any) -> dict[str, Any]:
        rows = table.to_pylist() if table.num_rows else []
        audio_s = sum(r.get("duration_s") or 0.0 for r in rows if r.get("status") == OK)
        wall = time.time() - self.started
        summary: dict[str, Any] = {
            "model": self.model_name,
            "audio_hours": round(audio_s / 3600, 4),
            "audio_s_this_run": round(self.audio_seconds, 2),
            "rtfx_this_run": round(self.audio_seconds / wall, 2) if wall > 0 and self.audio_seconds else None,
        }
        decodes: dict[str, int] = {}
        for r in rows:
            if r.get("decode"):
                decodes[r["decode"]] = decodes.get(r["decode"], 0) + 1
        if decodes:
            summary["decode_counts"] = dict(sorted(decodes.items(), key=lambda kv: -kv[1]))
            summary["fallbacks"] = sum(n for d, n in decodes.items() if d not in ("greedy", "beam", "long_form"))
        w = [0, 0]
        c = [0, 0]
        scored = 0
        for r in rows:
            if r.get("status") != OK or not r.get("reference") or r.get("text") is None:
                continue
            s = self._score(r["reference"], r["text"], r.get("language"))
            w[0] += s["w"][0]
            w[1] += s["w"][1]
            c[0] += s["c"][0]
            c[1] += s["c"][1]
            scored += 1
        if scored:
            summary.update({
                "wer": round(w[0] / w[1], 5) if w[1] else None,
                "cer": round(c[0] / c[1], 5) if c[1] else None,
                "scored_rows": scored,
                "word_errors": w[0], "reference_words": w[1],
                "normalize": self.options.normalize,
            })
        return summary


def load_transcriber(options: AudioOptions) -> Any:
    from .models.guard import GuardConfig
    from .models.whisper import WhisperTranscriber

    guard = GuardConfig(compression_ratio_threshold=options.compression_ratio_threshold,
                        logprob_threshold=options.logprob_threshold, no_speech_threshold=options.no_speech_threshold,
                        fallback=options.fallback)
    return WhisperTranscriber(options.model, device=options.device, dtype=options.dtype,
                              language=options.language, task=options.task, num_beams=options.num_beams,
                              max_new_tokens=options.max_new_tokens, full_window=options.full_window,
                              window_margin_s=options.window_margin_s, guard=guard)


def transcribe(inputs: str | Sequence[str], output: str = "transcripts.parquet", *,
               options: AudioOptions | None = None, transcriber: Any = None, **overrides: Any) -> RunResult:
    """Transcribe every recording of ``inputs`` (directories, files, manifests) into ``output``.

    The same pipeline as ``batchcap audio``: resumes from what ``output`` already holds, writes
    the final file atomically and a summary JSON beside it. Keyword overrides set AudioOptions
    fields, e.g. ``transcribe("calls/", "out.parquet", model="/models/whisper-small", batch_size=8)``.
    """
    options = options or AudioOptions()
    options.update(overrides, "transcribe")
    spec = audio_spec(options.path_column, options.reference_columns, options.id_column, options.language_column)
    spec.reserved = AUDIO_COLUMNS
    make_task = functools.partial(build_task, AudioTask, load_transcriber, options, transcriber)
    # Clips are sorted by duration within windows of batch_size * group items: a wide window keeps
    # a long clip from setting the encoder length and the decoding steps of a batch of short ones
    # (on the 563-clip benchmark, 256 items instead of 64 took the run from 88 s to 72 s).
    group = max(4, math.ceil(256 / max(1, options.batch_size)))
    return run_pipeline(inputs, output, options, spec, make_task, group=group)
