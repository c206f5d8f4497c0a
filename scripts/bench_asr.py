#!/usr/bin/env python3
"""Compare batchcap's Whisper transcription with faster-whisper and the transformers pipeline.

Every system transcribes the same clips in its own subprocess (so that its peak RSS is its own),
and every transcript is scored here with the same normalizer (Whisper's English one, with the
model's British -> American spelling map) and the same corpus WER (edit totals / reference words).

    python scripts/bench_asr.py --limit 40
    python scripts/bench_asr.py --systems batchcap faster-whisper-int8 --json bench.json
    python scripts/bench_asr.py --model ~/.cache/batchcap-dev/models/whisper-base --device cuda
    # multilingual: no language given (detection), then each clip's language from the manifest column
    python scripts/bench_asr.py --manifest ~/.cache/batchcap-dev/speech-it/manifest.csv \
        --model ~/.cache/batchcap-dev/models/whisper-base --language auto --limit 200 \
        --systems batchcap batchcap-full faster-whisper-int8
    python scripts/bench_asr.py --manifest ... --language column --systems batchcap

--language: en (default: every system is told English), auto (no language: each system detects it;
the table adds language accuracy against the manifest's ``language`` column), column (each clip's
language from that column), or any code. WER normalizes each clip with its reference language's
normalizer (Whisper's English one for English, the basic one otherwise). "fallbacks" counts the clips
a system redid (batchcap: decode column other than greedy; faster-whisper: a segment decoded at a
temperature above 0); "over bound" counts transcripts with more tokens than the guard's token bound
(batchcap/models/guard.py) allows for the clip's duration.

RTFx = audio seconds / wall seconds, where the wall time covers reading, decoding and resampling
the files, feature extraction and decoding, but not loading the model (reported as "load s").
No system gets a warm-up run; ``--repeat N`` times each N times and keeps the best. Each row notes
how many cores' worth of CPU other processes used while its worker ran (a noisy-timing warning).

Systems (all greedy, English):
  batchcap, batchcap-fp32                 batchcap.transcribe(): dtype auto (bf16 autocast on CPUs with
                                          native bf16, float32 with the int8 vocabulary shortlist on other
                                          x86 CPUs, fp16 on CUDA) / plain float32; the encoder computes the clip
                                          + 1 s, the rest of the window comes from a cached silent window
  batchcap-full, batchcap-full-fp32       the same with full_window=True: the stock encoder over 30 s
  batchcap-noguard                        batchcap with fallback=False, no_speech_threshold=None: suspects are
                                          flagged, never redone (the guard's scores are still computed)
  batchcap-notimestamps                   batchcap with timestamps=False (--no-timestamps): no timestamp tokens,
                                          so no seek; one segment per clip
  batchcap-plain                          both: no timestamps, nothing redone (the round before the guard)
  batchcap-clip-languages                 batchcap with run_languages=False: an unsure detection keeps its own
                                          most likely language, whatever the run's other clips are detected in
  faster-whisper-int8/-fp32/-fp16         WhisperModel(--ct2).transcribe(path) one file at a time, no VAD
                                          (int8 is int8_float16 on CUDA; fp16 runs on CUDA only)
  faster-whisper-batched-int8             BatchedInferencePipeline: batches the Silero-VAD chunks of ONE
                                          file (short clips gain nothing); VAD may drop a short clip whole
  hf-pipeline                             transformers pipeline, chunk_length_s=30, batch_size; num_beams=1
                                          (its own default is 5); audio decoded here (no ffmpeg needed)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEV_CACHE = Path("~/.cache/batchcap-dev").expanduser()
DEFAULT_MANIFEST = DEV_CACHE / "speech-en" / "manifest.csv"
DEFAULT_MODEL = DEV_CACHE / "models" / "whisper-tiny.en"
SAMPLE_RATE = 16_000
LONG_S = 30.0  # the extra WER column covers clips up to this long (one Whisper window)
PATH_COLUMNS = ("path", "audio", "file", "filename", "file_name", "audio_path", "audio_filepath")
REFERENCE_COLUMNS = ("reference", "text", "transcript", "transcription", "sentence", "normalized_text")


@dataclass
class Clip:
    id: str
    path: str
    reference: str
    duration_s: float
    language: str | None = None  # from the manifest's language column


@dataclass
class Outcome:
    """What one system's worker reports back."""

    system: str
    ok: bool = False
    error: str | None = None
    texts: list[str] = field(default_factory=list)  # one per clip, in clip order ("" for a failed clip)
    load_s: float | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    walls: list[float] = field(default_factory=list)  # one per --repeat; wall_s is the best
    others_cpu: float | None = None  # cores' worth of CPU other processes used while the worker ran
    notes: list[str] = field(default_factory=list)
    languages: list[str | None] = field(default_factory=list)  # detected / used, one per clip
    fallbacks: int | None = None  # clips redone by the system's guard
    redone: list[dict[str, Any]] = field(default_factory=list)  # batchcap: clips the guard redid, before/after


# ------------------------------------------------------------------------------------------------------
# systems (each runs inside a worker process)
# ------------------------------------------------------------------------------------------------------

Runner = Callable[[list[Clip], argparse.Namespace, Outcome], None]


class _Timed:
    """Store the seconds the block takes in ``outcome.<attr>``."""

    def __init__(self, outcome: Outcome, attr: str):
        self.outcome, self.attr = outcome, attr

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:  # a failed load has no load time
            setattr(self.outcome, self.attr, time.perf_counter() - self.start)


def _repeat(outcome: Outcome, args: argparse.Namespace, once: Callable[[], Any]) -> Any:
    """Run the timed part ``--repeat`` times (same model, same clips); keep the best wall time."""
    result = None
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        result = once()
        _sync(args)
        outcome.walls.append(time.perf_counter() - start)
    outcome.wall_s = min(outcome.walls)
    return result


def _sync(args: argparse.Namespace) -> None:
    """Wait for queued GPU work so that a timer's end means the work is done."""
    if args.device == "cuda" and "torch" in sys.modules:
        sys.modules["torch"].cuda.synchronize()


def _read_audio(path: str) -> Any:
    """Mono float32 at 16 kHz, as batchcap reads it (libsndfile, then soxr HQ resampling)."""
    import numpy as np
    import soundfile as sf
    import soxr

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _batchcap(overrides: dict[str, Any]) -> Runner:
    def run(clips: list[Clip], args: argparse.Namespace, outcome: Outcome) -> None:
        import pyarrow.parquet as pq

        from batchcap.asr import AudioOptions, load_transcriber, transcribe

        language = None if args.language in ("auto", "column") else args.language
        options = AudioOptions(model=args.model, device=args.device, language=language, batch_size=args.batch_size,
                               quiet=True, overwrite=True, **overrides)
        with _Timed(outcome, "load_s"):
            transcriber = load_transcriber(options)
        redone: list[dict[str, Any]] = []
        plain = transcriber.transcribe

        def transcribe_batch(batch: list[Any]) -> list[dict[str, Any]]:  # keeps the guard's first texts
            results = plain(batch)
            redone.extend({"first": r["first_text"], "final": r["text"], "decode": r["decode"]}
                          for r in results if r.get("first_text") is not None)
            return results
        transcriber.transcribe = transcribe_batch
        precision = str(transcriber.dtype).replace("torch.", "")
        if transcriber.autocast is not None:
            precision += f" weights, {str(transcriber.autocast).replace('torch.', '')} autocast"
        outcome.notes.append(precision)
        outcome.notes.append("full 30 s window" if options.full_window else "live window + cached silence")
        with tempfile.TemporaryDirectory(prefix="bench-batchcap-") as tmp:
            manifest = os.path.join(tmp, "manifest.csv")
            with open(manifest, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if args.language == "column":
                    writer.writerow(["id", "path", "reference", "language"])
                    writer.writerows([c.id, c.path, c.reference, c.language or ""] for c in clips)
                else:
                    writer.writerow(["id", "path", "reference"])
                    writer.writerows([c.id, c.path, c.reference] for c in clips)
            result = _repeat(outcome, args, lambda: transcribe(manifest, os.path.join(tmp, "out.parquet"),
                                                               options=options, transcriber=transcriber))
            rows = {str(r["id"]): r for r in pq.read_table(result.output).to_pylist()}
        failed = [c.id for c in clips if rows.get(c.id, {}).get("status") != "ok"]
        if failed:
            first = rows.get(failed[0], {})
            why = f"{first.get('status')}: {first.get('error')}"
            outcome.notes.append(f"{len(failed)} failed rows (e.g. {why[:70]})")
        outcome.texts = [(rows.get(c.id, {}).get("text") or "") for c in clips]
        outcome.languages = [rows.get(c.id, {}).get("language") for c in clips]
        decodes = [rows.get(c.id, {}).get("decode") for c in clips]
        outcome.fallbacks = sum(1 for d in decodes if d not in (None, "greedy", "beam", "long_form"))
        counts: dict[str, int] = {}
        for d in decodes:
            counts[str(d)] = counts.get(str(d), 0) + 1
        outcome.notes.append("decode " + ", ".join(f"{n} {d}" for d, n in sorted(counts.items(), key=lambda x: -x[1])))
        by_text = {}
        for c, r in zip(clips, outcome.texts):
            by_text.setdefault(r, c.id)
        outcome.redone = [dict(r, id=by_text.get(r["final"])) for r in redone]
        _cuda_peak(args, outcome)

    return run


def _cuda_peak(args: argparse.Namespace, outcome: Outcome) -> None:
    if args.device == "cuda" and "torch" in sys.modules:
        peak = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
        outcome.notes.append(f"peak GPU alloc {peak:.0f} MB")


def _faster_whisper(compute_type_cpu: str, compute_type_cuda: str, batched: bool = False) -> Runner:
    def run(clips: list[Clip], args: argparse.Namespace, outcome: Outcome) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        if not args.ct2 or not os.path.isdir(args.ct2):
            raise RuntimeError(f"no CTranslate2 model directory {args.ct2 or ''!r} (pass --ct2; the default is "
                               "<models>/.dl/<name>-ct2 beside --model)")
        compute_type = compute_type_cuda if args.device == "cuda" else compute_type_cpu
        if not compute_type:
            raise RuntimeError(f"not run on {args.device}")
        with _Timed(outcome, "load_s"):
            model = WhisperModel(args.ct2, device=args.device, compute_type=compute_type, cpu_threads=args.threads)
            pipe = BatchedInferencePipeline(model) if batched else None
        outcome.notes.append(f"compute_type={compute_type}")

        def once() -> list[str]:
            texts, outcome.languages, fallbacks = [], [], 0
            for clip in clips:
                language = clip.language if args.language == "column" else \
                    None if args.language == "auto" else args.language
                if pipe is not None:  # batches the VAD chunks of one file; files go one at a time
                    segments, info = pipe.transcribe(clip.path, language=language, beam_size=1,
                                                     without_timestamps=True, batch_size=args.batch_size)
                else:  # its default guard: temperatures 0-1, compression 2.4, log-prob -1, no-speech 0.6
                    segments, info = model.transcribe(clip.path, language=language, beam_size=1,
                                                      condition_on_previous_text=False, vad_filter=False,
                                                      without_timestamps=True)
                segments = list(segments)  # a lazy generator: decodes here
                texts.append("".join(s.text for s in segments).strip())
                outcome.languages.append(info.language)
                fallbacks += any((getattr(s, "temperature", 0.0) or 0.0) > 0 for s in segments)
            outcome.fallbacks = fallbacks
            return texts

        outcome.texts = _repeat(outcome, args, once)
        if batched:
            outcome.notes.append("Silero VAD chunks (onnxruntime)")

    return run


def _hf_pipeline(clips: list[Clip], args: argparse.Namespace, outcome: Outcome) -> None:
    import torch
    from transformers import pipeline

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    with _Timed(outcome, "load_s"):
        asr = pipeline("automatic-speech-recognition", model=args.model, device=args.device, dtype=dtype)
    generation = asr.model.generation_config
    # Greedy like the other systems: the ASR pipeline's own default is num_beams=5 (and max_new_tokens=256).
    kwargs: dict[str, Any] = {"num_beams": 1}
    if getattr(generation, "is_multilingual", False):
        kwargs.update(language="en", task="transcribe")
        generation.forced_decoder_ids = None  # v4-era field that conflicts with language/task
    outcome.notes.append(f"{str(dtype).replace('torch.', '')}; greedy; soundfile+soxr decoding")

    def inputs() -> Any:  # decoded lazily, inside the timed loop
        for clip in clips:
            yield {"raw": _read_audio(clip.path), "sampling_rate": SAMPLE_RATE}

    def once() -> list[str]:
        results = asr(inputs(), chunk_length_s=30, batch_size=args.batch_size, generate_kwargs=kwargs)
        return [r["text"].strip() for r in results]

    outcome.texts = _repeat(outcome, args, once)
    _cuda_peak(args, outcome)


SYSTEMS: dict[str, Runner] = {
    "batchcap": _batchcap({}),
    "batchcap-fp32": _batchcap({"dtype": "float32"}),
    "batchcap-clip-languages": _batchcap({"run_languages": False}),  # each clip's own detection only
    "batchcap-full": _batchcap({"full_window": True}),
    "batchcap-noguard": _batchcap({"fallback": False, "no_speech_threshold": None}),
    "batchcap-notimestamps": _batchcap({"timestamps": False}),
    "batchcap-plain": _batchcap({"timestamps": False, "fallback": False, "no_speech_threshold": None}),
    "batchcap-full-fp32": _batchcap({"full_window": True, "dtype": "float32"}),
    "faster-whisper-int8": _faster_whisper("int8", "int8_float16"),
    "faster-whisper-fp32": _faster_whisper("float32", "float32"),
    "faster-whisper-fp16": _faster_whisper("", "float16"),
    "faster-whisper-batched-int8": _faster_whisper("int8", "int8_float16", batched=True),
    "hf-pipeline": _hf_pipeline,
}
CUDA_ONLY = {"faster-whisper-fp16"}


def worker(args: argparse.Namespace) -> int:
    outcome = Outcome(args.worker)
    try:
        clips = [Clip(**c) for c in json.loads(Path(args.clips).read_text(encoding="utf-8"))]
        if args.worker.startswith(("batchcap", "hf-")):  # faster-whisper's workers never import torch
            if args.worker.startswith("batchcap"):
                from batchcap.memory import torch_huge_pages

                torch_huge_pages()  # as the CLI does, before torch is imported
            import torch

            torch.set_num_threads(args.threads)
        SYSTEMS[args.worker](clips, args, outcome)
        if len(outcome.texts) != len(clips):
            raise RuntimeError(f"{len(outcome.texts)} transcripts for {len(clips)} clips")
        outcome.ok = True
    except BaseException as exc:  # noqa: B036 - report anything, KeyboardInterrupt included
        traceback.print_exc()
        outcome.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    outcome.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(args.result).write_text(json.dumps(asdict(outcome)), encoding="utf-8")
    return 0 if outcome.ok else 1


# ------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------


def read_clips(manifest: str, limit: int | None, seed: int) -> list[Clip]:
    import soundfile as sf

    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        path_col = next((c for c in PATH_COLUMNS if c in columns), None)
        ref_col = next((c for c in REFERENCE_COLUMNS if c in columns), None)
        if path_col is None or ref_col is None:
            raise SystemExit(f"{manifest}: needs a path column ({'/'.join(PATH_COLUMNS)}) and a reference "
                             f"column ({'/'.join(REFERENCE_COLUMNS)}); it has {columns}")
        rows = [(r[path_col], r[ref_col] or "", r.get("language") or None) for r in reader]
    chosen = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        random.Random(seed).shuffle(chosen)  # a deterministic spread over the whole manifest
        chosen = sorted(chosen[:limit])
    clips = []
    for i in chosen:
        path = rows[i][0] if os.path.isabs(rows[i][0]) else os.path.join(base, rows[i][0])
        info = sf.info(path)
        clips.append(Clip(f"c{i:06d}", path, rows[i][1], info.frames / info.samplerate, rows[i][2]))
    return clips


def default_ct2(model: str) -> str | None:
    name = os.path.basename(os.path.normpath(model)).removeprefix("whisper-")
    candidate = Path(model).expanduser().parent / ".dl" / f"{name}-ct2"
    return str(candidate) if candidate.is_dir() else None


def run_system(system: str, clips_file: str, args: argparse.Namespace, tmp: str) -> Outcome:
    result = os.path.join(tmp, f"{system}.json")
    log = os.path.join(tmp, f"{system}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--clips", clips_file, "--result", result,
           "--model", args.model, "--ct2", args.ct2 or "", "--batch-size", str(args.batch_size),
           "--device", args.device, "--threads", str(args.threads), "--repeat", str(args.repeat),
           "--language", args.language]
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    busy, children, started = _cpu_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=args.timeout or None, check=False)
        returncode: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = f"timed out after {args.timeout} s"
    if os.path.isfile(result):
        outcome = Outcome(**json.loads(Path(result).read_text(encoding="utf-8")))
    else:
        tail = [line for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        last = tail[-1].strip()[:200] if tail else ""
        if isinstance(returncode, int) and returncode < 0:
            returncode = f"killed by signal {-returncode}"
        outcome = Outcome(system, error=f"worker exited ({returncode}) {last}".strip())
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if busy is not None and elapsed > 0:
        outcome.others_cpu = max(0.0, (_cpu_busy_s() - busy - own) / elapsed)
    if not outcome.ok or args.verbose:
        text = Path(log).read_text(encoding="utf-8", errors="replace").strip()
        if text:
            print(f"--- {system} worker output (last 30 lines) ---", file=sys.stderr)
            print("\n".join(text.splitlines()[-30:]), file=sys.stderr)
    return outcome


def _cpu_busy_s() -> float | None:
    """Seconds all CPUs have spent busy (steal included) since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text(encoding="utf-8").splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def score(clips: list[Clip], outcome: Outcome, normalize: Callable[[Clip], Callable[[str], str]],
          bound: Callable[[Clip, str], bool]) -> dict[str, Any]:
    from batchcap.metrics import get_normalizer, is_english, wer_counts

    basic = get_normalizer("basic", None)
    errors, words, short_errors, short_words = 0, 0, 0, 0
    basic_errors, basic_words = 0, 0  # Whisper's basic normalizer for other languages: numbers as written
    per_clip = []
    for clip, text in zip(clips, outcome.texts):
        e, n = wer_counts(normalize(clip)(clip.reference), normalize(clip)(text or ""))
        be, bn = (e, n) if is_english(clip.language) else wer_counts(basic(clip.reference), basic(text or ""))
        basic_errors, basic_words = basic_errors + be, basic_words + bn
        per_clip.append(e)
        errors, words = errors + e, words + n
        if clip.duration_s <= LONG_S:
            short_errors, short_words = short_errors + e, short_words + n
    known = [(c.language, lang) for c, lang in zip(clips, outcome.languages) if c.language]
    accuracy = sum(a == b for a, b in known) / len(known) if known and outcome.languages else None
    return {"wer": errors / words if words else None, "wer_le30": short_errors / short_words if short_words else None,
            "language_accuracy": accuracy, "over_bound": sum(bound(c, t) for c, t in zip(clips, outcome.texts)),
            "word_errors": errors, "reference_words": words, "clip_errors": per_clip,
            "wer_basic": basic_errors / basic_words if basic_words and (basic_errors, basic_words) != (errors, words)
            else None,
            "empty": sum(1 for t in outcome.texts if not (t or "").strip())}


def machine(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "python":
                            platform.python_version()}
    try:
        info["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for package in ("torch", "transformers", "ctranslate2", "faster-whisper"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if args.device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True)
            info["gpu"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["gpu"] = "unknown (nvidia-smi failed)"
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(clips: list[Clip], outcomes: list[Outcome], scores: dict[str, dict[str, Any]], info: dict[str, Any],
           args: argparse.Namespace) -> None:
    audio_s = sum(c.duration_s for c in clips)
    n_short = sum(1 for c in clips if c.duration_s <= LONG_S)
    longest = max(clips, key=lambda c: c.duration_s)
    versions = ", ".join(f"{p} {info.get(p)}" for p in ("torch", "transformers", "ctranslate2", "faster-whisper"))
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['threads']} threads used)"
          + (f", GPU {info['gpu']}" if "gpu" in info else "")
          + (f", load avg before {info['load_avg_before']}" if "load_avg_before" in info else ""))
    print(f"python {info['python']}, {versions}")
    print(f"model {args.model}" + (f", ct2 {args.ct2}" if args.ct2 else "") + f", device {args.device}, "
          f"batch size {args.batch_size}")
    print(f"{len(clips)} clips, {audio_s / 60:.2f} audio minutes (longest {longest.duration_s:.1f} s; {n_short} clips "
          f"<= {LONG_S:g} s)" + (f", --limit {args.limit} (seed {args.seed})" if args.limit else ""))
    print()
    base = next((o for o in outcomes if o.ok and o.system == args.agree_with), None)
    agree_head = f"same text as {base.system} %" if base else "same text %"
    print(f"| system | WER % | WER % (<= {LONG_S:g} s) | language % | fallbacks | over bound | RTFx | wall s | load s "
          f"| peak RSS MB | {agree_head} | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for o in outcomes:
        if not o.ok:
            rss = _fmt(o.peak_rss_mb, ".0f")
            print(f"| {o.system} | - | - | - | - | - | - | - | {_fmt(o.load_s, '.1f')} | {rss} | - | "
                  f"FAILED: {o.error} |")
            continue
        s = scores[o.system]
        wer = _fmt(s["wer"] * 100 if s["wer"] is not None else None, ".2f")
        wer30 = _fmt(s["wer_le30"] * 100 if s["wer_le30"] is not None else None, ".2f")
        rtfx = audio_s / o.wall_s if o.wall_s else None
        notes = list(o.notes) + ([f"{s['empty']} empty"] if s["empty"] else [])
        if s.get("wer_basic") is not None:
            notes.append(f"WER {s['wer_basic'] * 100:.2f} % with the basic normalizer (numbers as written)")
        if len(o.walls) > 1:
            notes.append("best of " + "/".join(f"{w:.1f}" for w in o.walls) + " s")
        if o.others_cpu is not None and o.others_cpu >= 0.05:
            notes.append(f"other processes used {o.others_cpu:.1f} cores meanwhile")
        same = None
        if base is not None:
            same = 100 * sum(a.strip() == b.strip() for a, b in zip(o.texts, base.texts)) / len(clips)
        acc = _fmt(s["language_accuracy"] * 100 if s["language_accuracy"] is not None else None, ".1f")
        print(f"| {o.system} | {wer} | {wer30} | {acc} | {_fmt(o.fallbacks, 'd')} | {s['over_bound']} | "
              f"{_fmt(rtfx, '.1f')} | {_fmt(o.wall_s, '.1f')} | "
              f"{_fmt(o.load_s, '.1f')} | {_fmt(o.peak_rss_mb, '.0f')} | {_fmt(same, '.1f')} | {'; '.join(notes)} |")
    if args.worst:
        print()
        print(f"clips with the most word errors (errors / reference words, duration), top {args.worst} per system:")
        for o in outcomes:
            if not o.ok:
                continue
            errs = scores[o.system]["clip_errors"]
            top = sorted(range(len(clips)), key=lambda i: -errs[i])[: args.worst]
            parts = [f"{clips[i].id} {errs[i]}/{len(clips[i].reference.split())} ({clips[i].duration_s:.0f} s)"
                     for i in top if errs[i]]
            print(f"  {o.system}: {', '.join(parts) or 'none'}")
    for o in outcomes:
        if o.ok and o.redone:
            print()
            print(f"{o.system}: clips the guard redid (first decoding -> kept), {len(o.redone)} in all:")
            for r in o.redone[: args.worst * 3]:
                print(f"  {r['id']} [{r['decode']}] {r['first'][:90]!r} -> {r['final'][:90]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="CSV with path,reference columns")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="transformers Whisper checkpoint directory")
    parser.add_argument("--ct2", default=None, help="CTranslate2 conversion of --model (default: "
                        "<models>/.dl/<name>-ct2 next to it)")
    parser.add_argument("--limit", type=int, default=None, help="only N clips, spread over the manifest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit spread")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--systems", nargs="+", default=None, metavar="SYSTEM",
                        help=f"subset of: {', '.join(SYSTEMS)} (space or comma separated; default: all that "
                        "run on --device)")
    parser.add_argument("--repeat", type=int, default=1, help="time the transcription N times per system "
                        "(model loaded once) and report the best wall time")
    parser.add_argument("--json", default=None, help="write all results (transcripts included) here")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per system (0: none)")
    parser.add_argument("--agree-with", default="batchcap-full", metavar="SYSTEM",
                        help="report the share of clips whose transcript is identical to this system's")
    parser.add_argument("--worst", type=int, default=3, help="list each system's N worst clips (0: none)")
    parser.add_argument("--language", default="en", help="en (default), auto (detect), column (the manifest's "
                        "language column), or a language code")
    parser.add_argument("--verbose", action="store_true", help="print every worker's output")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clips", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # batchcap from this checkout, installed or not
    args.model = os.path.expanduser(args.model)
    if args.worker:
        args.ct2 = args.ct2 or None
        return worker(args)

    if args.systems is None:
        systems = [s for s in SYSTEMS if args.device == "cuda" or s not in CUDA_ONLY]
    else:
        systems = [s for item in args.systems for s in item.split(",") if s]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown:
            parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.ct2 = os.path.expanduser(args.ct2) if args.ct2 else default_ct2(args.model)
    clips = read_clips(os.path.expanduser(args.manifest), args.limit, args.seed)
    if not clips:
        raise SystemExit("no clips")
    info = machine(args)

    from transformers import WhisperTokenizerFast

    from batchcap.metrics import get_normalizer, load_english_spelling
    from batchcap.models.guard import token_bound

    spelling = load_english_spelling(args.model)
    normalizers: dict[str, Callable[[str], str]] = {}

    def normalize(clip: Clip) -> Callable[[str], str]:
        language = clip.language or (args.language if args.language not in ("auto", "column") else "en")
        if language not in normalizers:
            normalizers[language] = get_normalizer("auto", language, spelling)
        return normalizers[language]

    tokenizer = WhisperTokenizerFast.from_pretrained(args.model)

    def over_bound(clip: Clip, text: str) -> bool:
        tokens = len(tokenizer(" " + text, add_special_tokens=False).input_ids) if text else 0
        return tokens > token_bound(clip.duration_s)
    outcomes: list[Outcome] = []
    scores: dict[str, dict[str, Any]] = {}
    audio_s = sum(c.duration_s for c in clips)
    with tempfile.TemporaryDirectory(prefix="bench-asr-") as tmp:
        clips_file = os.path.join(tmp, "clips.json")
        Path(clips_file).write_text(json.dumps([asdict(c) for c in clips]), encoding="utf-8")
        for system in systems:
            print(f"running {system} on {len(clips)} clips ...", file=sys.stderr, flush=True)
            outcome = run_system(system, clips_file, args, tmp)
            outcomes.append(outcome)
            if outcome.ok:
                scores[system] = score(clips, outcome, normalize, over_bound)
                wer = scores[system]["wer"]
                print(f"  {system}: WER {_fmt(wer * 100 if wer is not None else None, '.2f')} %, "
                      f"RTFx {_fmt(audio_s / outcome.wall_s if outcome.wall_s else None, '.1f')}",
                      file=sys.stderr, flush=True)
            else:
                print(f"  {system}: FAILED: {outcome.error}", file=sys.stderr, flush=True)
    report(clips, outcomes, scores, info, args)
    if args.json:
        payload = {
            "machine": info,
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "clips", "result")},
            "audio_s": audio_s,
            "clips": [asdict(c) for c in clips],
            "systems": [dict(asdict(o), rtfx=audio_s / o.wall_s if o.ok and o.wall_s else None,
                             **{k: v for k, v in scores.get(o.system, {}).items()}) for o in outcomes],
        }
        Path(args.json).write_text(json.dumps(payload, indent=1), encoding="utf-8")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
