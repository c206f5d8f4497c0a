#!/usr/bin/env python3
"""Compare the VADs batchcap can cut long recordings with (energy, silero) against known clip bounds.

The long recordings of ``~/.cache/batchcap-dev/speech-*/long/manifest.csv`` are real clips joined
with pauses; their ``clips`` column gives each clip's [start_s, end_s, text]. For each VAD, clean
and with white noise added at a given SNR (the joins are near-digital silence, which flatters an
energy detector):

- bounds found: share of clip starts and ends within 0.5 s of a speech-region boundary
- speech kept: share of clip time inside the planned windows (what is not kept is never transcribed)
- forced cuts: cuts between windows not in a pause (speech longer than a window, cut at its quietest point)
- windows / mean length / share of window time outside clips
- speed: real-time factor of scoring (audio seconds per second of VAD)

    python scripts/bench_vad.py
    python scripts/bench_vad.py --manifest ~/.cache/batchcap-dev/speech-it/long/manifest.csv --snr 20 10
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchcap.audio import decode_audio  # noqa: E402
from batchcap.vad import SAMPLE_RATE, EnergyVad, SileroVad, plan_windows, speech_regions  # noqa: E402

DEFAULT = Path("~/.cache/batchcap-dev/speech-en/long/manifest.csv").expanduser()


def with_noise(samples: np.ndarray, clips: list, snr_db: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    speech = np.concatenate([samples[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] for a, b, _ in clips])
    power = float(np.mean(speech ** 2))
    noise = rng.standard_normal(len(samples)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    return (samples + noise).astype(np.float32)


def evaluate(samples: np.ndarray, clips: list, vad) -> dict:
    t0 = time.perf_counter()
    scores = vad.score(samples)
    windows = plan_windows(scores, len(samples))
    regions = speech_regions(scores)
    seconds = time.perf_counter() - t0
    hop = scores.hop / SAMPLE_RATE
    bounds = np.array(sorted({x * hop for r in regions for x in r}))
    clip_bounds = [x for a, b, _ in clips for x in (a, b)]
    found = sum(1 for x in clip_bounds if len(bounds) and np.min(np.abs(bounds - x)) <= 0.5)
    covered = np.zeros(len(samples), bool)
    for w in windows:
        for a, b in w.spans:  # what the model hears: a joined window's pauses are not in it
            covered[a:b] = True
    in_clip = np.zeros(len(samples), bool)
    for a, b, _ in clips:
        in_clip[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] = True
    kept = float((covered & in_clip).sum() / max(1, in_clip.sum()))
    outside = float((covered & ~in_clip).sum() / max(1, covered.sum()))
    # a cut not in a pause (the frame at the cut scores as speech) was forced inside speech longer than a window
    last = len(scores.scores) - 1
    forced = sum(1 for w, nxt in zip(windows, windows[1:])
                 if w.end >= nxt.start and scores.scores[min(w.end // scores.hop, last)] >= scores.off)
    return {"bounds": (found, len(clip_bounds)), "kept": kept, "outside": outside,
            "forced_cuts": (forced, max(0, len(windows) - 1)),
            "windows": len(windows), "mean_window_s": float(np.mean([w.duration_s for w in windows]) if windows else 0),
            "max_window_s": max((w.duration_s for w in windows), default=0.0),
            "seconds": seconds, "audio_s": len(samples) / SAMPLE_RATE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(DEFAULT))
    ap.add_argument("--snr", type=float, nargs="*", default=[20.0, 10.0], help="also with white noise at these SNRs")
    ap.add_argument("--vads", nargs="*", default=["energy", "silero"])
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.manifest, newline="", encoding="utf-8")))
    recordings = []
    for r in rows:
        with open(r["path"], "rb") as f:
            recordings.append((decode_audio(f.read()), json.loads(r["clips"])))
    vads = {"energy": EnergyVad, "silero": SileroVad}
    print(f"{len(recordings)} recordings, {sum(len(s) for s, _ in recordings) / SAMPLE_RATE / 60:.1f} min, "
          f"{sum(len(c) for _, c in recordings)} clips ({args.manifest})")
    print("| VAD | audio | bounds found (0.5 s) | speech kept | forced cuts | windows | mean / max s "
          "| window time outside clips | scoring RTFx |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for condition in [None, *args.snr]:
        for name in args.vads:
            vad = vads[name]()
            total = {"found": 0, "bounds": 0, "bad": 0, "cuts": 0, "kept": [], "outside": [], "windows": 0,
                     "lens": [], "max": 0.0, "seconds": 0.0, "audio_s": 0.0}
            for i, (samples, clips) in enumerate(recordings):
                x = samples if condition is None else with_noise(samples, clips, condition, seed=i)
                m = evaluate(x, clips, vad)
                total["found"] += m["bounds"][0]
                total["bounds"] += m["bounds"][1]
                total["bad"] += m["forced_cuts"][0]
                total["cuts"] += m["forced_cuts"][1]
                total["kept"].append(m["kept"])
                total["outside"].append(m["outside"])
                total["windows"] += m["windows"]
                total["lens"].append(m["mean_window_s"])
                total["max"] = max(total["max"], m["max_window_s"])
                total["seconds"] += m["seconds"]
                total["audio_s"] += m["audio_s"]
            label = "clean" if condition is None else f"+ white noise {condition:g} dB SNR"
            print(f"| {name} | {label} | {total['found'] / total['bounds']:.1%} | {np.mean(total['kept']):.2%} "
                  f"| {total['bad']} of {total['cuts']} | {total['windows']} | {np.mean(total['lens']):.1f} / "
                  f"{total['max']:.1f} | {np.mean(total['outside']):.1%} | {total['audio_s'] / total['seconds']:.0f} |")


if __name__ == "__main__":
    main()
