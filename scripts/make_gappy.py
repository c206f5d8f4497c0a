#!/usr/bin/env python3
"""Long recordings with long pauses, as in calls: short clips of a speech manifest joined with a few
seconds of quiet room noise between them, for ``scripts/bench_long.py``.

Windows of batched long-form end at pauses over 3 s only where joining would pass 24 s, so these
recordings test what recordings of real telephone speech joined tightly (``get-speech.sh``'s
``long/``) do not: utterances heard with their neighbours across a long pause, and a recording's
language followed by windows unsure of theirs.

    python scripts/make_gappy.py ~/.cache/batchcap-dev/speech-it/manifest.csv /tmp/gappy/it
    python scripts/bench_long.py --manifest /tmp/gappy/it/manifest.csv --language it --detect \\
        --model ~/.cache/batchcap-dev/models/whisper-base --ct2 ~/.cache/batchcap-dev/models/.dl/base-ct2

Writes ``gappyN.wav`` and ``manifest.csv`` (path, reference, language, clips: [start_s, end_s, text]).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchcap.audio import decode_audio  # noqa: E402
from batchcap.items import ItemError  # noqa: E402

SR = 16_000


def quiet(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Room noise at about -54 dBFS."""
    return (0.002 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", help="a clip manifest: path, reference[, language]")
    ap.add_argument("out", help="folder for the recordings and their manifest")
    ap.add_argument("--recordings", type=int, default=6)
    ap.add_argument("--clips", type=int, default=25, help="clips per recording")
    ap.add_argument("--gap", type=float, default=4.0, help="seconds of quiet between clips")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    with open(os.path.expanduser(args.manifest), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    random.Random(args.seed).shuffle(rows)
    os.makedirs(args.out, exist_ok=True)
    out_rows, k = [], 0
    for r in range(args.recordings):
        noise = np.random.default_rng(r)
        parts, clips, t = [], [], 0.0
        while len(clips) < args.clips and k < len(rows):
            row = rows[k]
            k += 1
            try:
                samples = decode_audio(open(row["path"], "rb").read())
            except ItemError:  # silent or unreadable prompts
                continue
            if len(samples) > 20 * SR:
                continue
            parts += [quiet(noise, args.gap), samples]
            t += args.gap
            clips.append([round(t, 3), round(t + len(samples) / SR, 3), row["reference"]])
            t += len(samples) / SR
        parts.append(quiet(noise, args.gap))
        path = os.path.join(args.out, f"gappy{r}.wav")
        sf.write(path, np.concatenate(parts), SR, subtype="PCM_16")
        language = rows[0].get("language") or ""
        out_rows.append([path, " ".join(c[2] for c in clips), language, json.dumps(clips, ensure_ascii=False)])
    with open(os.path.join(args.out, "manifest.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reference", "language", "clips"])
        writer.writerows(out_rows)
    print(f"{len(out_rows)} recordings in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
