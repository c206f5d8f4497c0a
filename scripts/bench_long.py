#!/usr/bin/env python3
"""Long recordings: batchcap batched long-form vs --long-form sequential vs faster-whisper.

On ``~/.cache/batchcap-dev/speech-en/long/manifest.csv`` (recordings of 2-5 minutes joined from
real clips, a ``clips`` column of [start_s, end_s, text]), each system in its own subprocess:
WER (each recording's language's normalizer, as ``batchcap audio`` scores: ``--language`` or the manifest's
``language`` column), RTFx (audio
seconds / wall seconds, model load excluded), peak RSS, and the share of clip boundaries within
0.5 s of a segment boundary.

    python scripts/bench_long.py
    python scripts/bench_long.py --systems batchcap faster-whisper-batched --hour   # + a 1-hour join
    python scripts/bench_long.py --manifest ~/.cache/batchcap-dev/speech-it/long/manifest.csv \\
        --model ~/.cache/batchcap-dev/models/whisper-base --ct2 ~/.cache/batchcap-dev/models/.dl/base-ct2 --language it
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEV = Path("~/.cache/batchcap-dev").expanduser()
SYSTEMS = ("batchcap", "batchcap-sequential", "faster-whisper-int8", "faster-whisper-batched", "batchcap-clips")


def cut_clips(paths: list[str], clip_lists: list[list], folder: str) -> list[list[str]]:
    """The clips each recording was joined from, cut back out of it by their [start_s, end_s]: the same
    speech as short clips (a reference point for long-form WER)."""
    import soundfile as sf

    out = []
    for k, (path, clips) in enumerate(zip(paths, clip_lists)):
        samples, rate = sf.read(path, dtype="float32")
        names = []
        for j, (a, b, _) in enumerate(clips):
            name = os.path.join(folder, f"r{k:03d}-c{j:04d}.wav")
            sf.write(name, samples[int(a * rate):int(b * rate)], rate, subtype="PCM_16")
            names.append(name)
        out.append(names)
    return out


def worker(system: str, paths: list[str], args: argparse.Namespace) -> dict:
    import soundfile as sf

    audio_s = sum(sf.info(p).duration for p in paths)
    out: dict = {"system": system}
    if system.startswith("batchcap"):
        from batchcap.memory import torch_huge_pages

        torch_huge_pages()  # as the CLI does, before torch is imported
    if system == "batchcap-clips":
        from batchcap.asr import AudioOptions, load_transcriber, transcribe
        from batchcap.output import read_table

        manifest = {r["path"]: json.loads(r["clips"]) for r in csv.DictReader(open(args.manifest, encoding="utf-8"))}
        transcriber = load_transcriber(AudioOptions(model=args.model, language=args.language))
        with tempfile.TemporaryDirectory() as tmp:
            groups = cut_clips(paths, [manifest[p] for p in paths], tmp)
            flat = [c for g in groups for c in g]
            audio_s = sum(sf.info(c).duration for c in flat)
            t0 = time.perf_counter()
            transcribe(flat, os.path.join(tmp, "out.parquet"), transcriber=transcriber, quiet=True,
                       batch_size=args.batch_size, language=args.language)
            out["wall_s"] = time.perf_counter() - t0
            by_id = {r["id"]: r for r in read_table(os.path.join(tmp, "out.parquet")).to_pylist()}
        out["texts"] = [" ".join(by_id[c]["text"] or "" for c in g) for g in groups]
        out["segments"] = [[(a, b) for a, b, _ in manifest[p]] for p in paths]  # the clips' own bounds
    elif system.startswith("batchcap"):
        from batchcap.asr import AudioOptions, load_transcriber, transcribe
        from batchcap.output import read_table

        opts = AudioOptions(model=args.model, language=args.language, batch_size=args.batch_size,
                            long_form="sequential" if system.endswith("sequential") else "batched")
        t0 = time.perf_counter()
        transcriber = load_transcriber(opts)
        out["load_s"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            transcribe(paths, os.path.join(tmp, "out.parquet"), transcriber=transcriber, quiet=True,
                       long_form=opts.long_form, batch_size=args.batch_size, language=args.language)
            out["wall_s"] = time.perf_counter() - t0
            rows = read_table(os.path.join(tmp, "out.parquet")).to_pylist()
        by_id = {r["id"]: r for r in rows}
        out["texts"] = [by_id[p]["text"] or "" for p in paths]
        out["segments"] = [[(s["start"], s["end"]) for s in by_id[p]["segments"] or []] for p in paths]
        out["languages"] = [by_id[p].get("language") for p in paths]
    else:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        t0 = time.perf_counter()
        model = WhisperModel(args.ct2, device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 2)
        pipe = BatchedInferencePipeline(model) if system.endswith("batched") else None
        out["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out["texts"], out["segments"] = [], []
        out["languages"] = []
        for p in paths:
            if pipe is not None:
                segs, info = pipe.transcribe(p, batch_size=16, language=args.language, beam_size=1)
            else:
                segs, info = model.transcribe(p, language=args.language, beam_size=1)
            out["languages"].append(info.language)
            segs = list(segs)
            out["texts"].append(" ".join(s.text.strip() for s in segs))
            out["segments"].append([(s.start, s.end) for s in segs])
        out["wall_s"] = time.perf_counter() - t0
    out["audio_s"] = audio_s
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def boundary_share(clips: list, segments: list[tuple[float, float]], tol: float = 0.5) -> tuple[int, int]:
    bounds = [x for s in segments for x in s]
    found = total = 0
    for a, b, _ in clips:
        for x in (a, b):
            total += 1
            found += any(abs(x - y) <= tol for y in bounds)
    return found, total


def over_pauses(clips: list, segments: list[tuple[float, float]], pause_s: float = 2.0) -> int:
    """Segments that cover a pause of over ``pause_s`` between two clips (all but 0.5 s of it each side):
    a subtitle shown through a silence."""
    pauses = [(a[1] + 0.5, b[0] - 0.5) for a, b in zip(clips, clips[1:]) if b[0] - a[1] > pause_s]
    return sum(1 for start, end in segments if any(start <= lo and end >= hi for lo, hi in pauses))


def make_hour(rows: list[dict], target: Path, minutes: float = 60.0) -> dict:
    """Join the recordings (repeated) into one of about ``minutes`` minutes, at 8 kHz like them."""
    import numpy as np
    import soundfile as sf

    clips, refs, t, rate = [], [], 0.0, None
    with sf.SoundFile(str(target), "w", samplerate=8000, channels=1, subtype="PCM_16") as f:
        while t < minutes * 60:
            for r in rows:
                x, rate = sf.read(r["path"], dtype="float32")
                assert rate == 8000
                f.write(x)
                clips += [[a + t, b + t, c] for a, b, c in json.loads(r["clips"])]
                refs.append(r["reference"])
                t += len(x) / rate
                f.write(np.zeros(8000, np.float32))
                t += 1.0
                if t >= minutes * 60:
                    break
    return {"path": str(target), "reference": " ".join(refs), "clips": json.dumps(clips)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(DEV / "speech-en/long/manifest.csv"))
    ap.add_argument("--model", default=str(DEV / "models/whisper-tiny.en"))
    ap.add_argument("--ct2", default=str(DEV / "models/.dl/tiny.en-ct2"))
    ap.add_argument("--language", default=None)
    ap.add_argument("--detect", action="store_true",
                    help="let each system detect the language (--language, or the manifest's language column, "
                         "then only picks the normalizer)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    ap.add_argument("--hour", action="store_true", help="also one recording of about an hour (joined)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.manifest, newline="", encoding="utf-8")))
    if args.worker:
        paths = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(args.system_name, paths, args)))
        return
    sets = [("recordings", rows)]
    if args.hour:
        hour = make_hour(rows, Path(tempfile.gettempdir()) / "batchcap-hour.wav")
        sets.append(("1-hour join", [hour]))
    from batchcap.metrics import get_normalizer, wer_counts

    normalizers: dict[str, Any] = {}

    def norm(row: dict) -> Any:
        language = args.language or row.get("language") or "en"
        if language not in normalizers:
            normalizers[language] = get_normalizer("auto", language, None)
        return normalizers[language]
    print("| set | system | WER | RTFx | peak RSS MB | clip bounds within 0.5 s | segments over a pause |")
    # batchcap-clips: the same speech as short clips cut at the clips' own bounds (its bounds column is trivial)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, subset in sets:
        paths = [r["path"] for r in subset]
        for system in args.systems:
            if system == "batchcap-clips" and label != "recordings":
                continue
            cmd = [sys.executable, __file__, "--worker", json.dumps(paths), "--model", args.model, "--ct2", args.ct2,
                   "--batch-size", str(args.batch_size), "--manifest", args.manifest]
            if args.language and not args.detect:
                cmd += ["--language", args.language]
            env = dict(os.environ, BENCH_SYSTEM=system,
                       PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"| {label} | {system} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | |")
                continue
            res = json.loads(line[7:])
            errors = words = found = total = spanning = count = 0
            for r, text, segs in zip(subset, res["texts"], res["segments"]):
                spanning += over_pauses(json.loads(r["clips"]), segs)
                count += len(segs)
                e, n = wer_counts(norm(r)(r["reference"]), norm(r)(text))
                errors, words = errors + e, words + n
                f, t = boundary_share(json.loads(r["clips"]), segs)
                found, total = found + f, total + t
            detected = Counter(res.get("languages") or [])
            print(f"| {label} | {system} | {errors / words:.2%} | {res['audio_s'] / res['wall_s']:.1f} "
                  f"| {res['peak_rss_mb']:.0f} | {found / total:.1%} | {spanning} of {count} |"
                  + (f" detected: {dict(detected)}" if args.detect and detected else ""), flush=True)


if __name__ == "__main__":
    _system = os.environ.get("BENCH_SYSTEM")
    if _system:
        argparse.Namespace.system_name = _system  # the worker's system comes from the environment
    main()
