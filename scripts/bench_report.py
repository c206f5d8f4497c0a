"""Build time and size of ``batchcap report`` for big tables (measured, not a test).

    python scripts/bench_report.py --audio transcripts.parquet --images captions.parquet --rows 1000 100000

Each real result table is tiled up to N rows; every copy gets its own id, and its reference
and transcript a distinct suffix, so no normalized text repeats (the report caches normalized strings,
and repeats would flatter it). The audio report then runs Whisper's English normalizer on every row,
as the run's summary does. Prints one line per (kind, N): seconds to build, HTML size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tile(path: str, n: int, out: str, kind: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchcap.output import read_table

    rows = read_table(path).to_pylist()
    tiled = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        copy = i // len(rows)
        row["id"] = f"{row['id']}#{copy}"
        if kind == "audio" and row.get("reference"):
            row["reference"] = f"{row['reference']} item {i}"
            if row.get("text") is not None:
                row["text"] = f"{row['text']} item {i}"
        tiled.append(row)
    pq.write_table(pa.Table.from_pylist(tiled), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio")
    parser.add_argument("--images")
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000])
    args = parser.parse_args()
    from batchcap.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in (("audio", args.audio), ("images", args.images)):
            if not path:
                continue
            for n in args.rows:
                table = tile(path, n, os.path.join(tmp, f"{kind}-{n}.parquet"), kind)
                # the summary of the real run names the normalizer; the tiled table has none beside it
                html = os.path.join(tmp, f"{kind}-{n}.html")
                started = time.perf_counter()
                build_report(table, html, rows=50, normalize="auto")
                took = time.perf_counter() - started
                print(f"{kind:6s} {n:>7,} rows: {took:6.1f} s, {os.path.getsize(html) / 1024:6.0f} kB")


if __name__ == "__main__":
    main()
