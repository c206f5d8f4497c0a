"""``batchcap audio``: recordings -> transcripts, scored against references when there are any."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .audio import DEFAULT_MAX_DURATION_S, decode_audio
from .fetch import FetchConfig
from .inputs import audio_spec
from .items import EMPTY, OK, FatalError, Item, ItemError
from .job import Job, JobOptions, adopt_loaded, call_options, run_pipeline
from .metrics import error_counts, get_normalizer
from .metrics.asr import NORMALIZER_MODES, english_spelling
from .predictions import Transcript
from .runner import RunResult
from .stages import ModelFreePreprocessor

log = logging.getLogger(__name__)

AUDIO_COLUMNS = ("id", "source", "text", "language", "language_prob", "decode", "no_speech_prob", "avg_logprob",
                 "compression_ratio", "duration_s", "segments", "status", "error", "model", "reference", "wer", "cer")
GUARD_COLUMNS = ("language_prob", "decode", "no_speech_prob", "avg_logprob", "compression_ratio")
LONG_SAMPLES = 30 * 16_000  # recordings longer than one Whisper window
DEFAULT_AUDIO_MODEL = "openai/whisper-small"


@dataclass
class AudioOptions(JobOptions):
    model: str = DEFAULT_AUDIO_MODEL
    language: str | None = None  # "es": every recording; "es,en": the candidates detection picks from
    language_column: str | None = None  # manifest column of each recording's language (default: language)
    run_languages: bool = True  # unsure detections lean on the languages the run was surely detected in
    task: str = "transcribe"
    max_new_tokens: int | None = None
    full_window: bool = False  # run the encoder over all 30 s for every clip (exact, slower)
    window_margin_s: float = 1.0  # otherwise: the encoder computes the clip plus this much padding
    timestamps: bool = True  # Whisper's timestamp tokens (segments with times); off: one segment per clip/window
    word_timestamps: bool = False  # words with times in each segment (cross-attention alignment)
    normalize: str = "auto"  # auto | whisper | language | basic | none (metrics.get_normalizer)
    min_duration: float = 0.1
    silence_dbfs: float = -60.0
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S  # longer recordings: decode_error, found before decoding
    workers: int = 4
    # the hallucination guard (models/guard.py); None switches a check off
    fallback: bool = True
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    fetch: FetchConfig = field(default_factory=lambda: FetchConfig(max_bytes=2 * 2**30, deadline=600.0))
    # recordings over 30 s: "batched" (VAD windows batched with the clips) or "sequential" (transformers)
    long_form: str = "batched"
    vad: str = "energy"  # energy | silero
    write: Sequence[str] = ()  # subtitle / text formats written per item: srt, vtt, txt, tsv, json
    write_dir: str | None = None  # default: OUTPUT without extension + ".subtitles"
    max_line_width: int | None = None
    max_line_count: int | None = None

    limit_numbers: ClassVar[tuple[str, ...]] = (*JobOptions.limit_numbers, "max_duration_s", "max_new_tokens",
                                                   "max_line_width", "max_line_count")
    real_numbers: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {
        **JobOptions.real_numbers, "min_duration": (0.0, None, False), "silence_dbfs": (None, None, False),
        "window_margin_s": (0.1, 30.0, False), "compression_ratio_threshold": (0.0, None, True),
        "logprob_threshold": (None, None, True), "no_speech_threshold": (0.0, 1.0, True)}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        **JobOptions.choices, "task": ("transcribe", "translate"), "normalize": NORMALIZER_MODES,
        "long_form": ("batched", "sequential"), "vad": ("energy", "silero")}


class AudioPreprocessor(ModelFreePreprocessor):
    """Decode, check and compute Whisper's features: no model weights (only the feature extractor)."""

    options: AudioOptions

    def load_features(self) -> Any:
        from .models.whisper import WhisperFeatures

        return WhisperFeatures(self.options.model, full_window=self.options.full_window,
                               window_margin_s=self.options.window_margin_s)

    def load(self, item: Item, data: bytes) -> Any:
        samples = decode_audio(data, min_duration=self.options.min_duration,
                               silence_dbfs=self.options.silence_dbfs, max_duration_s=self.options.max_duration_s)
        if self.options.long_form == "batched" and len(samples) > LONG_SAMPLES:
            return self._split(samples, language=item.language)
        return self.features.prepare(samples, language=item.language)

    def _split(self, samples: Any, language: str | None = None) -> Any:
        """A long recording as VAD windows; their features are computed when they reach the model."""
        from .longform import LongRecording
        from .vad import make_vad, split_recording

        vad = getattr(self, "_vad", None)
        if vad is None:
            vad = self._vad = make_vad(self.options.vad)
        windows = split_recording(samples, vad)
        duration = len(samples) / 16_000
        if not windows:
            raise ItemError(EMPTY, f"no speech found in {duration:.0f} s (--vad {self.options.vad})",
                            fields={"duration_s": round(duration, 3)})
        return LongRecording(samples, windows, duration, language=language)

    def size(self, loaded: Any) -> float:
        return loaded.duration_s


class WhisperPredictor:
    """The model: batches of prepared clips -> transcripts."""

    def __init__(self, transcriber: Any, batch_size: int = 16):
        self.transcriber = transcriber
        self.batch_size = batch_size
        self._earlier: dict[str, tuple[str, float]] = {}  # see resume
        start_run = getattr(transcriber, "start_run", None)
        if start_run is not None:  # a transcriber used for an earlier run forgets that run's languages
            start_run()

    resume_columns = ("status", "language", "language_prob")

    def resume(self, rows: Iterable[dict[str, Any]]) -> None:
        """The rows earlier runs wrote (oldest first), for a resumed run: the language and probability of
        each that counts as heard (an ok row, detected surely or given: no probability counts as sure),
        kept by id for :meth:`skipped`."""
        self._earlier = {}
        heard = getattr(self.transcriber, "run_languages", None)
        if heard is None:
            return
        for row in rows:
            if row.get("status") != "ok" or not row.get("language"):
                continue
            probability = 1.0 if row.get("language_prob") is None else float(row["language_prob"])
            if probability >= heard.sure:
                self._earlier[row["id"]] = (str(row["language"]), probability)

    def skipped(self, ids: list[str]) -> None:
        """A batch of items done by an earlier run, which this run skips: their languages count as heard
        where the batch would have run (run_languages.py), so that a resumed run leans as an uninterrupted
        one did. A long recording counts once (its windows did one each then)."""
        heard = getattr(self.transcriber, "run_languages", None)
        if heard is not None:
            for i in ids:
                if i in self._earlier:
                    heard.observe(*self._earlier[i])

    def predict(self, batch: list[Any]) -> list[Transcript]:
        """Clips and the windows of long recordings, batched together (longform.transcribe_units)."""
        from .longform import transcribe_units
        from .models.guard import worst_decode

        return [Transcript.from_dict(r)
                for r in transcribe_units(self.transcriber, batch, self.batch_size, worst_decode=worst_decode)]


class AudioScorer:
    """Rows with WER / CER against references, and the run's figures: no model needed."""

    kind = "audio"
    reserved_columns = AUDIO_COLUMNS

    def __init__(self, options: AudioOptions):
        self.options = options
        self.model_name = options.model
        self.audio_seconds = 0.0  # transcribed by this run
        self._spelling = english_spelling(options.model)
        self.subtitles = _subtitle_writer(options)
        self._warned_translate = False

    def row(self, item: Item, loaded: Any | None, prediction: Transcript | None,
            error: ItemError | None) -> dict[str, Any]:
        duration = round(loaded.duration_s, 3) if loaded is not None else (error.fields.get("duration_s")
                                                                          if error else None)
        row: dict[str, Any] = {
            "id": item.id,
            "source": item.source,
            "text": prediction.text if prediction else None,
            "language": prediction.language if prediction else None,
            **{name: getattr(prediction, name) if prediction else None for name in GUARD_COLUMNS},
            "duration_s": duration,
            "segments": _segment_rows(prediction.segments) if prediction is not None and error is None else None,
            "status": OK if error is None else error.status,
            "error": None if error is None else error.message,
            "model": self.model_name,
        }
        if self.subtitles is not None and (error is None and prediction is not None or row["status"] == EMPTY):
            # one file per recording: a silent one (empty) gets empty files, as one Whisper heard nothing in
            self.subtitles.write(item.id, row["text"] or "", row["segments"] or [], row["language"])
        if item.references:
            reference = " ".join(item.references)
            row["reference"] = reference
            row["wer"] = row["cer"] = None
            if prediction is not None:
                language = prediction.language
                if self.options.task == "translate":  # the text is English whatever the recording's language
                    language = "en"
                    if not self._warned_translate:
                        self._warned_translate = True
                        log.warning("--task translate: WER and CER compare the English translations with the "
                                    "manifest's references, which should be English translations too")
                scores = self._score(reference, prediction.text, language)
                row["wer"], row["cer"] = scores.wer, scores.cer
        return row

    def observe(self, row: dict[str, Any]) -> None:
        if row.get("status") == OK:
            self.audio_seconds += row.get("duration_s") or 0.0

    def finalize_table(self, table: Any) -> Any:
        """Subtitle files missing for ok rows of earlier runs (e.g. --write added on a rerun)."""
        if self.subtitles is not None and table.num_rows:
            from .subtitles import row_segments

            for batch in table.to_batches(max_chunksize=1024):
                for r in batch.to_pylist():
                    if r.get("status") == OK and r.get("text") is not None or r.get("status") == EMPTY:
                        self.subtitles.write(str(r["id"]), r.get("text") or "", row_segments(r), r.get("language"),
                                             overwrite=False)
        return table

    def _score(self, reference: str, text: str, language: str | None) -> RowScores:
        if self.options.task == "translate":  # the text is English whatever the recording's language
            language = "en"
        norm = get_normalizer(self.options.normalize, language, self._spelling)
        return RowScores(*error_counts(norm(reference), norm(text), norm))

    def summarize(self, table: Any, wall_time_s: float) -> dict[str, Any]:
        audio_s = 0.0
        decodes: dict[str, int] = {}
        by_language: dict[str, list[int]] = {}  # language -> [word errors, reference words, char errors, chars, rows]
        wanted = [n for n in ("status", "duration_s", "reference", "text", "language", "decode")
                  if n in table.column_names]
        for batch in table.select(wanted).to_batches(max_chunksize=4096):  # never the whole table as Python objects
            for r in batch.to_pylist():
                if r.get("status") != OK:
                    continue
                if r.get("decode"):
                    decodes[r["decode"]] = decodes.get(r["decode"], 0) + 1
                audio_s += r.get("duration_s") or 0.0
                if not r.get("reference") or r.get("text") is None:
                    continue
                s = self._score(r["reference"], r["text"], r.get("language"))
                counts = by_language.setdefault(str(r.get("language") or "unknown"), [0, 0, 0, 0, 0])
                for k, v in enumerate((s.word_errors, s.reference_words, s.char_errors, s.reference_chars, 1)):
                    counts[k] += v
        summary: dict[str, Any] = {
            "model": self.model_name,
            "audio_hours": round(audio_s / 3600, 4),
            "audio_s_this_run": round(self.audio_seconds, 2),
            "rtfx_this_run": round(self.audio_seconds / wall_time_s, 2)
            if wall_time_s > 0 and self.audio_seconds else None,
        }
        if decodes:
            summary["decode_counts"] = dict(sorted(decodes.items(), key=lambda kv: -kv[1]))
            summary["fallbacks"] = sum(n for d, n in decodes.items() if d not in ("greedy", "beam", "long_form"))
        we, wr, ce, cr, scored = (sum(column) for column in zip(*by_language.values())) if by_language else [0] * 5
        if scored:
            summary.update({
                "wer": round(we / wr, 6) if wr else None,
                "cer": round(ce / cr, 6) if cr else None,
                "scored_rows": scored,
                "word_errors": we, "reference_words": wr,
                "normalize": self.options.normalize,
                "task": self.options.task,  # the report scores translations as English, as here
            })
            if len(by_language) > 1:  # a multilingual set: each language's own corpus rates
                summary["wer_by_language"] = {
                    lang: {"wer": round(e / n, 6) if n else None, "cer": round(c / k, 6) if k else None,
                           "scored_rows": rows}
                    for lang, (e, n, c, k, rows) in sorted(by_language.items(), key=lambda kv: -kv[1][4])}
        return summary


@dataclass
class RowScores:
    word_errors: int
    reference_words: int
    char_errors: int
    reference_chars: int

    @property
    def wer(self) -> float | None:
        return self.word_errors / self.reference_words if self.reference_words else None

    @property
    def cer(self) -> float | None:
        return self.char_errors / self.reference_chars if self.reference_chars else None


def load_transcriber(options: AudioOptions) -> Any:
    from .models.guard import GuardConfig
    from .models.whisper import WhisperTranscriber

    guard = GuardConfig(compression_ratio_threshold=options.compression_ratio_threshold,
                        logprob_threshold=options.logprob_threshold, no_speech_threshold=options.no_speech_threshold,
                        fallback=options.fallback)
    return WhisperTranscriber(options.model, device=options.device, dtype=options.dtype,
                              language=options.language, task=options.task, num_beams=options.num_beams,
                              max_new_tokens=options.max_new_tokens, full_window=options.full_window,
                              window_margin_s=options.window_margin_s, guard=guard,
                              timestamps=options.timestamps, word_timestamps=options.word_timestamps,
                              run_languages=options.run_languages)


def load_predictor(options: AudioOptions) -> WhisperPredictor:
    return WhisperPredictor(load_transcriber(options), max(1, options.batch_size))


def _segment_rows(segments: Any) -> list[dict[str, Any]]:
    """Segments as table values: {start, end, text}, and ``words`` [{start, end, word, probability}] when
    word timestamps were asked for."""
    rows = []
    for s in segments or []:
        if isinstance(s, dict):
            rows.append(s)
            continue
        row: dict[str, Any] = {"start": s.start, "end": s.end, "text": s.text}
        if s.words is not None:
            row["words"] = [{"start": w.start, "end": w.end, "word": w.word,
                             "probability": None if w.probability is None else round(float(w.probability), 4)}
                            for w in s.words]
        rows.append(row)
    return rows


def _subtitle_writer(options: AudioOptions) -> Any:
    if not options.write:
        return None
    from .subtitles import SubtitleOptions, SubtitleWriter, parse_formats

    formats = parse_formats(options.write if isinstance(options.write, str) else list(options.write))
    return SubtitleWriter(options.write_dir or "subtitles", formats,
                          SubtitleOptions(options.max_line_width, options.max_line_count), overwrite=True)


def _check_long_form_options(options: AudioOptions, output: str) -> None:
    from .subtitles import default_subtitle_dir, parse_formats

    if options.long_form == "batched" and options.vad == "silero":
        from .vad import find_silero_model

        find_silero_model()
    try:
        options.write = parse_formats(options.write if isinstance(options.write, str) else list(options.write or ()))
    except ValueError as exc:
        raise FatalError(str(exc)) from None
    if options.write and not options.write_dir:
        options.write_dir = default_subtitle_dir(output)


def _canonical_language(value: Any) -> str | None:
    """A language setting as Whisper's codes, sorted and joined by commas ("es", "en,es"); None to detect
    among all.
    A name Whisper does not know is left as given (loading the transcriber says so)."""
    from .models.whisper import _language_list, language_code

    names = _language_list(value)
    if not names:
        return None
    try:
        return ",".join(sorted(set(language_code(n) for n in names)))  # candidates: a set
    except ValueError:
        return ",".join(names)


def audio_job(options: AudioOptions) -> Job:
    """The audio job: its preprocessor and scorer hold no model; the predictor loads where it runs."""
    # Clips are sorted by duration within windows of batch_size * group items: a wide window keeps
    # a long clip from setting the encoder length and the decoding steps of a batch of short ones
    # (on the 563-clip benchmark, 256 items instead of 64 took the run from 88 s to 72 s).
    group = max(4, math.ceil(256 / max(1, options.batch_size)))
    # Longest first: the long clips, whose language detection is surest, teach the run its languages
    # before the short ones that lean on them (models/run_languages.py)
    return Job(AudioPreprocessor(options), AudioScorer(options), functools.partial(load_predictor, options),
               group=group, longest_first=True)


def transcribe(inputs: str | Sequence[str], output: str = "transcripts.parquet", *,
               options: AudioOptions | None = None, transcriber: Any = None, **overrides: Any) -> RunResult:
    """Transcribe every recording of ``inputs`` (directories, files, manifests) into ``output``.

    The same pipeline as ``batchcap audio``: resumes from what ``output`` already holds, writes
    the final file atomically and a summary JSON beside it. Keyword overrides set AudioOptions
    fields, e.g. ``transcribe("calls/", "out.parquet", model="/models/whisper-small", batch_size=8)``.
    ``transcriber``: an already loaded WhisperTranscriber to use instead of loading ``options.model``.
    """
    options = call_options(options, AudioOptions, overrides, "transcribe")
    if transcriber is not None:  # features, rows and scores follow the model actually used
        settings = dict(getattr(transcriber, "settings", {}))
        if "language" in settings:  # "en,es", ["en", "es"] and "English,es" are one setting
            settings["language"] = _canonical_language(settings["language"])
            options.language = _canonical_language(options.language)
        adopt_loaded(options, AudioOptions, {"model": transcriber.name, **settings}, "transcriber")
    options.check()
    output = os.fspath(output)
    _check_long_form_options(options, output)
    spec = audio_spec(options.path_column, options.reference_columns, options.id_column, options.language_column)
    spec.reserved = AUDIO_COLUMNS
    predictor = WhisperPredictor(transcriber, max(1, options.batch_size)) if transcriber is not None else None
    return run_pipeline(inputs, output, options, spec, audio_job(options), predictor=predictor)
