#!/usr/bin/env python3
"""Where batchcap's transcription time goes: one warm-up pass, then one pass under torch.profiler
(``--first``: the first pass itself, to see what a fresh process pays once: on an H200 the first pass
over 250 clips took 3.8 s against 1.6 s warm).

Prints the wall time, the time the GPU was busy with kernels (CUDA only: the rest is the host
launching, waiting or doing Python), and the operators with the most self time.

    python scripts/profile_asr.py --model ~/.cache/batchcap-dev/models/whisper-tiny.en \
        --manifest ~/.cache/batchcap-dev/speech-en/manifest.csv --limit 64 --device cpu
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--manifest", required=True, help="CSV with a path column (relative to the CSV)")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--first", action="store_true", help="profile the first pass, not a warm one")
    parser.add_argument("--shapes", action="store_true", help="also list the operators by input shapes")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from batchcap.asr import AudioOptions, load_transcriber, transcribe

    base = os.path.dirname(os.path.abspath(args.manifest))
    with open(args.manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows = rows[: args.limit] if args.limit else rows
    options = AudioOptions(model=args.model, device=args.device, batch_size=args.batch_size, quiet=True,
                           overwrite=True, language="en")
    transcriber = load_transcriber(options)
    cuda = transcriber.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "m.csv")
        with open(manifest, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path"])
            writer.writerows([os.path.join(base, r["path"])] for r in rows)

        def once() -> float:
            start = time.perf_counter()
            transcribe(manifest, os.path.join(tmp, "out.parquet"), options=options, transcriber=transcriber)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        if not args.first:
            print(f"warm-up pass: {once():.2f} s for {len(rows)} clips")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=args.shapes) as prof:
            wall = once()
    averages = prof.key_averages()
    print(f"profiled pass ({'first' if args.first else 'warm'}): {wall:.2f} s wall")
    if cuda:
        busy = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e6
        print(f"GPU kernels: {busy:.2f} s ({100 * busy / wall:.0f} % of the wall time)")
        print(averages.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.shapes:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
                             max_shapes_column_width=80))
    return 0


if __name__ == "__main__":
    sys.exit(main())
