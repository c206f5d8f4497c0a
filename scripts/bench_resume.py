"""Resume memory benchmark: peak RSS of ``ResultStore`` on an existing output of many rows.

Two phases, each in a fresh subprocess, for a parquet and a CSV output of ``--rows`` rows
(transcription-like rows: id, source, status, error, text, reference, language, figures, a carried
column and a list column):

- ``open``: what a rerun does first: lock, read the ids already done (``--retry-failed``: and statuses).
- ``finalize``: open, add ``--new`` rows as a resumed run would, then the final merge and write.

``--warm`` loads Arrow's libraries before the baseline (library code is some 100 MB of RSS by itself).

``--cli MODEL`` also measures the whole command a cron job would rerun: ``batchcap audio MANIFEST -o OUT
--model MODEL`` where every row of a ``--rows``-row manifest is already done (reading the manifest,
skipping every item, the final merge and the summary; the model is loaded too), against the same with a
1,000-row manifest: the peak RSS of the process, whole.

The figure is the peak RSS above the process's RSS once pyarrow/numpy are imported, so it is the
store's own memory. ``--pythonpath`` runs another checkout of batchcap (e.g. an older commit
extracted with ``git archive``) to compare.

    python scripts/bench_resume.py --rows 100000
    git archive ddcdd63 batchcap | tar -x -C /tmp/old && python scripts/bench_resume.py --pythonpath /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _row(i: int) -> dict[str, Any]:
    return {"id": f"utt{i:07d}", "source": f"/data/corpus/speaker{i % 13:02d}/utt{i:07d}.flac",
            "status": "ok" if i % 50 else "decode_error", "error": None if i % 50 else "not audio",
            "text": f"hello world this is utterance number {i} of the benchmark corpus", "language": "en",
            "duration_s": 3.0 + (i % 7) * 0.5, "reference": f"hello world this is utterance number {i}",
            "wer": (i % 10) / 10, "cer": (i % 5) / 20, "model": "whisper-tiny.en", "speaker": f"{i % 13:03d}",
            "tags": ["a", f"t{i % 3}"], "_order": i}


def make_output(path: str, rows: int) -> None:
    import pyarrow as pa

    from batchcap.output import ResultStore

    if os.path.exists(path):
        return
    with ResultStore(path, flush_rows=10_000) as store:
        for i in range(rows):
            store.add(_row(i))
        store.finalize({})
    assert pa is not None


def make_manifest(path: str, rows: int) -> None:
    """A manifest of the ids ``make_output`` writes (the files need not exist: every item is done)."""
    import csv

    if os.path.exists(path):
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "reference"])
        for i in range(rows):
            row = _row(i)
            writer.writerow([row["id"], row["source"], row["reference"]])


def cli_worker(path: str, manifest: str, model: str, pythonpath: str) -> dict[str, Any]:
    """Run the resume command to its end in a child; the child's peak RSS (this process only waits)."""
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "batchcap.cli", "audio", manifest, "-o", path, "--model", model,
                           "--id-column", "id", "--reference-column", "reference", "--quiet"],
                          env=env, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(done.stderr.strip()[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"phase": "cli", "format": os.path.splitext(path)[1][1:], "peak_rss_mb": round(peak, 1),
            "seconds": round(time.monotonic() - started, 2)}


def worker(phase: str, path: str, rows: int, new: int, warm: bool = False) -> dict[str, Any]:
    import numpy  # noqa: F401 - imported before the baseline, as every phase needs them
    import pyarrow.compute  # noqa: F401
    import pyarrow.csv  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from batchcap.output import ResultStore

    if warm:  # load every Arrow library either version may use, so the figure is the data's memory
        import io

        import pyarrow as pa

        tiny = pa.table({"id": ["a", "b"], "n": [1, 2]})
        buf = io.BytesIO()
        pyarrow.parquet.write_table(tiny, buf)
        pyarrow.parquet.read_table(pa.BufferReader(buf.getvalue()))
        tiny.group_by("id").aggregate([("n", "max")]).join(tiny, "id")
        pyarrow.compute.sort_indices(pyarrow.compute.index_in(tiny["id"], value_set=pa.array(["a"])))
        buf = io.BytesIO()
        pyarrow.csv.write_csv(tiny, buf)
        pyarrow.csv.read_csv(pa.BufferReader(buf.getvalue()))
    base = _rss_mb()
    started = time.monotonic()
    store = ResultStore(path, retry_failed=True)
    store.open()
    done = len(store.done)
    if phase == "finalize":
        for i in range(rows, rows + new):
            store.add(_row(i))
        store.finalize({f"utt{i:07d}": i for i in range(rows + new)})
    store.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"phase": phase, "warm": warm, "format": os.path.splitext(path)[1][1:], "rows": rows, "done_ids": done,
            "base_mb": round(base, 1), "peak_above_base_mb": round(peak - base, 1),
            "seconds": round(time.monotonic() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=100, help="rows a resumed run adds before the merge")
    parser.add_argument("--workdir", default=None, help="keeps the generated outputs between invocations")
    parser.add_argument("--pythonpath", default=ROOT, help="the batchcap checkout to measure")
    parser.add_argument("--json", default=None)
    parser.add_argument("--warm", action="store_true",
                        help="load Arrow's libraries (dataset, compute, CSV) before the baseline: data memory only")
    parser.add_argument("--cli", default=None, metavar="MODEL",
                        help="also time the whole resume command with this Whisper checkpoint (see above)")
    parser.add_argument("--worker", nargs=3, metavar=("PHASE", "PATH", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--cli-worker", nargs=2, metavar=("PATH", "MANIFEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cli_worker:
        print(json.dumps(cli_worker(*args.cli_worker, args.cli, args.pythonpath)))
        return
    if args.worker:
        phase, path, rows = args.worker
        print(json.dumps(worker(phase, path, int(rows), args.new, args.warm)))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-resume-")
    results = []
    for fmt in ("parquet", "csv"):
        source = os.path.join(workdir, f"existing-{args.rows}.{fmt}")
        # the existing output is always written by this checkout, so both versions read the same file
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                        f"from scripts.bench_resume import make_output; make_output({source!r}, {args.rows})"],
                       check=True)
        for phase in ("open", "finalize"):
            path = os.path.join(workdir, f"run-{phase}.{fmt}")
            _copy_output(source, path)
            env = dict(os.environ, PYTHONPATH=args.pythonpath)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--new", str(args.new),
                                  *(["--warm"] if args.warm else []), "--worker",
                                  phase, path, str(args.rows)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
                results.append({"phase": phase, "format": fmt, "rows": args.rows, "peak_above_base_mb": "failed",
                                "seconds": "-", "error": error})
                print(f"{fmt} {phase}: {error}", file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for rows in ([1000, args.rows] if args.cli else []):
            source = os.path.join(workdir, f"existing-{rows}.{fmt}")
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                            f"from scripts.bench_resume import make_output, make_manifest; "
                            f"make_output({source!r}, {rows}); "
                            f"make_manifest({os.path.join(workdir, f'manifest-{rows}.csv')!r}, {rows})"], check=True)
            path = os.path.join(workdir, f"run-cli.{fmt}")
            _copy_output(source, path)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--cli", args.cli, "--pythonpath",
                                  args.pythonpath, "--cli-worker", path, os.path.join(workdir, f"manifest-{rows}.csv")],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{fmt} cli {rows}: {out.stderr.strip()[-500:]}", file=sys.stderr)
                continue
            results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "rows": rows})
    print(f"{'format':8} {'phase':9} {'rows':>8} {'peak MB above base':>19} {'s':>6}")
    for r in results:
        figure = r.get("peak_above_base_mb", f"{r.get('peak_rss_mb')} (RSS)")
        print(f"{r['format']:8} {r['phase']:9} {r['rows']:>8} {figure:>19} {r['seconds']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _copy_output(source: str, path: str) -> None:
    """Copy an existing output (and its CSV schema file, if any) to ``path``."""
    for suffix in ("", ".schema.json"):
        src = source if not suffix else os.path.splitext(source)[0] + suffix
        dst = path if not suffix else os.path.splitext(path)[0] + suffix
        if os.path.exists(src):
            subprocess.run(["cp", src, dst], check=True)


if __name__ == "__main__":
    main()
