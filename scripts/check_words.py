"""Check word timestamps (batchcap/models/whisper_words.py) against audio whose timing is known.

Pairs of real short clips (speech-en manifest) are joined with ``--gap`` seconds of silence between
them; each pair is transcribed with WhisperTranscriber's own encoder and decoder (timestamps on), its
words aligned, and the first word of the second clip compared with where that clip's speech starts
(its first 10 ms frame within 35 dB of its loudest, plus its place in the pair). The last word of the
first clip is compared with where its speech ends, likewise. Not a test: a measurement, e.g.

    PYTHONPATH=. python scripts/check_words.py --pairs 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from batchcap.audio import SAMPLE_RATE  # noqa: E402
from batchcap.models.whisper import WhisperTranscriber  # noqa: E402
from batchcap.models.whisper_timestamps import parse_timestamped  # noqa: E402
from batchcap.models.whisper_words import align_words, segment_tokens, words_per_segment  # noqa: E402

DEV = os.path.expanduser("~/.cache/batchcap-dev")


def speech_bounds(samples: np.ndarray, floor_db: float = 35.0) -> tuple[float, float]:
    """Seconds where speech starts and ends: the first and last 10 ms frame within ``floor_db`` of the loudest."""
    frame = SAMPLE_RATE // 100
    n = len(samples) // frame
    rms = np.sqrt((samples[:n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(1) + 1e-12)
    db = 20 * np.log10(rms)
    loud = np.nonzero(db > db.max() - floor_db)[0]
    return loud[0] / 100, (loud[-1] + 1) / 100


def load(path: str) -> np.ndarray:
    import soundfile as sf

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        samples = resample_poly(samples, SAMPLE_RATE, rate).astype(np.float32)
    return samples


def norm(word: str) -> str:
    return re.sub(r"[^a-z0-9']", "", word.lower())


def transcribe(t: WhisperTranscriber, clips: list[np.ndarray]) -> list[dict]:
    """Each clip's generated tokens, segments, aligned words and the words handed to its segments."""
    import torch

    batch = [t.prepare(c) for c in clips]
    recorded: list[list[int]] = []
    parse = t._parse

    def keep(generated: list[int], duration: float):  # the generated ids, which _decode does not return
        recorded.append(list(generated))
        return parse(generated, duration)

    t._parse = keep
    try:
        with torch.inference_mode(), t._inference():
            states, cross = t._encode(batch, t.full_window)
            languages, _, no_speech, _ = t._first_position(batch, states, cross)
            durations = [p.duration_s for p in batch]
            attempts = t._decode(states, cross, languages, no_speech, durations, "greedy")
            gen = t.model.generation_config
            prompts = [p + [int(gen.no_timestamps_token_id)] for p in t._prompts(languages, len(batch))]
            per_segment = [segment_tokens(g, timestamp_begin=t.timestamp_begin, special=t._special_set,
                                          decode=t._decode_text) for g in recorded]
            text_tokens = [[x for seg in segs for x in seg] for segs in per_segment]
            frames = [int(np.ceil(d * 50)) for d in durations]
            timings = []
            runs = []
            for cache in (None, cross):  # projecting the encoder's keys again, or reading the decoder's cache
                start = time.perf_counter()
                runs.append(align_words(t.model, states, prompts, text_tokens, frames, t.tokenizer, eot_id=t.eot_id,
                                        no_timestamps_id=int(gen.no_timestamps_token_id), cross_cache=cache,
                                        languages=languages))
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
            words = runs[1]
            differ = max((abs(x.start - y.start) for a, b in zip(*runs) for x, y in zip(a, b)), default=0.0)
            if [[x.word for x in a] for a in runs[0]] != [[x.word for x in a] for a in runs[1]]:
                differ = float("inf")
    finally:
        t._parse = parse
    out = []
    for g, a, segs, w, d in zip(recorded, attempts, per_segment, words, durations):
        _, segments = parse_timestamped(g, timestamp_begin=t.timestamp_begin, special=t._special_set,
                                        decode=t._decode_text, duration_s=d)
        placed = words_per_segment(w, [len(s) for s in segs], segments)
        out.append({"text": a.text, "segments": segments, "words": w, "placed": [x for p in placed for x in p]})
    print(f"align_words on {len(clips)} clips: {timings[0]:.2f} s projecting the keys again, {timings[1]:.2f} s "
          f"with the decoder's cross-attention cache; largest difference in a word's start {differ:.3f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(DEV, "models", "whisper-tiny.en"))
    ap.add_argument("--manifest", default=os.path.join(DEV, "speech-en", "manifest.csv"))
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds of silence between the two clips")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full-window", action="store_true", help="the stock encoder over 30 s, not the live window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the per-pair figures here")
    args = ap.parse_args()

    with open(args.manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(args.seed)
    candidates = []
    for i in rng.permutation(len(rows)):
        row = rows[int(i)]
        if len(row["reference"].split()) < 3:
            continue
        samples = load(row["path"])
        if 1.5 <= len(samples) / SAMPLE_RATE <= 8.0:
            candidates.append((row, samples))
        if len(candidates) >= 2 * args.pairs:
            break
    pairs = [(candidates[2 * k], candidates[2 * k + 1]) for k in range(len(candidates) // 2)]
    t = WhisperTranscriber(args.model, device=args.device, dtype=args.dtype, language="en",
                           full_window=args.full_window)
    gap = np.zeros(int(args.gap * SAMPLE_RATE), dtype=np.float32)
    joined = [np.concatenate([a[1], gap, b[1]]) for a, b in pairs]
    singles = transcribe(t, [a[1] for a, _ in pairs] + [b[1] for _, b in pairs])
    both = transcribe(t, joined)
    n = len(pairs)
    report = []
    for k, ((ra, a), (rb, b)) in enumerate(pairs):
        first, second, pair = singles[k], singles[n + k], both[k]
        expect_words = [norm(w.word) for w in first["words"] + second["words"]]
        got = [norm(w.word) for w in pair["words"]]
        if expect_words != got or not first["words"] or not second["words"]:
            print(f"skip pair {k}: the pair's words differ from its clips' ({' '.join(got)!r})", file=sys.stderr)
            continue
        m = len(first["words"])
        b_place = len(a) / SAMPLE_RATE + args.gap
        b_onset = b_place + speech_bounds(b)[0]
        a_offset = speech_bounds(a)[1]
        entry = {"a": os.path.basename(ra["path"]), "b": os.path.basename(rb["path"]),
                 "b_onset": round(b_onset, 3), "b_first_word": pair["words"][m].word,
                 "b_start_raw": pair["words"][m].start, "b_start_placed": pair["placed"][m].start,
                 "a_offset": round(a_offset, 3), "a_end_raw": pair["words"][m - 1].end,
                 "a_end_placed": pair["placed"][m - 1].end,
                 "segments": [(s.start, s.end) for s in pair["segments"]]}
        report.append(entry)
        print(f"{entry['a'][:28]:28} + {entry['b'][:28]:28} B speech at {b_onset:6.2f}: first word "
              f"{entry['b_first_word']!r:14} raw {entry['b_start_raw']:6.2f} placed {entry['b_start_placed']:6.2f}"
              f" | A ends {a_offset:5.2f}: raw {entry['a_end_raw']:5.2f} placed {entry['a_end_placed']:5.2f}")

    def summary(name: str, errors: list[float]) -> None:
        e = np.abs(errors)
        print(f"{name:34} median |err| {statistics.median(e):.3f} s  mean {e.mean():.3f}  max {e.max():.3f}  "
              f"within 0.3 s: {int((e <= 0.3).sum())}/{len(e)}  mean signed {np.mean(errors):+.3f}")

    if report:
        print(f"{len(report)} pairs, gap {args.gap} s, {args.model}, dtype {args.dtype}"
              f"{', full window' if args.full_window else ''}")
        summary("second clip's first word (raw)", [r["b_start_raw"] - r["b_onset"] for r in report])
        summary("second clip's first word (placed)", [r["b_start_placed"] - r["b_onset"] for r in report])
        summary("first clip's last word end (raw)", [r["a_end_raw"] - r["a_offset"] for r in report])
        summary("first clip's last word end (placed)", [r["a_end_placed"] - r["a_offset"] for r in report])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
