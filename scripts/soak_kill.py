"""SIGKILL soak: runs of ``batchcap audio`` killed at random moments, then one to the end, must give
the rows of an uninterrupted run: one row per input, in input order, every status ok, the same text.

    python scripts/soak_kill.py                               # 200 clips, 10 kills per format
    python scripts/soak_kill.py --clips 50 --kills 3 --seed 7 --json soak.json

For 200 rows of ``~/.cache/batchcap-dev/speech-en/manifest.csv`` (real English speech) and a real
whisper-tiny.en checkpoint, in subprocesses (``python -m batchcap.cli audio MANIFEST -o OUT ...``):

1. one uninterrupted run: the reference transcripts, and how long loading and each item take;
2. for parquet and for CSV output: ``--kills`` runs each killed with SIGKILL (seeded), then one run to
   the end. A run is killed at a random moment between the model being loaded (the output lock
   appears) and the run's expected end (from the reference's rate and the items left); every third kill
   instead lands while a file is being written (a part file's or the final file's temp name appears);
3. checks: rows, duplicate ids, missing ids, input order, statuses, transcripts identical to the
   reference; a table on stdout (and ``--json``). The exit status is 1 if a check fails. ``isolated``
   counts the items the crash journal set aside before the last run (in flight when a run was killed:
   done one at a time, so out of the batch an uninterrupted run gives them, by design) and ``differ,
   not isolated`` the differing transcripts of the other items.

Correctness, not timing: it can run on a loaded machine. Parts are flushed every ``--flush-every``
rows so that kills find part files to cut.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = os.path.expanduser("~/.cache/batchcap-dev")


def make_manifest(source: str, path: str, clips: int) -> list[str]:
    """The first ``clips`` rows of ``source`` into ``path``; their ids (the paths) in input order."""
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(clips), reader)]
        fields = reader.fieldnames or ["path"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return [row["path"] for row in rows]


def command(manifest: str, out: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "batchcap.cli", "audio", manifest, "-o", out, "--model", args.model,
            "--flush-every", str(args.flush_every), "--quiet", *args.extra]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def temp_files(out: str) -> set[str]:
    """Temp names of part files and of the final file (a run writing them, or one killed while it did)."""
    found: set[str] = set()
    for folder in (out + ".parts", os.path.dirname(out)):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found.update(os.path.join(folder, name) for name in names if name.endswith(".tmp") and (
            folder != os.path.dirname(out) or name.startswith("." + os.path.basename(out) + ".")))
    return found


def holds_lock(out: str, pid: int) -> bool:
    """Whether process ``pid`` holds the output's lock (it writes its pid there once locked; the model
    is loaded before the store is opened). A killed run leaves its lock file behind, with its own pid."""
    try:
        with open(out + ".lock", encoding="utf-8") as f:
            return f.read().strip() == str(pid)
    except OSError:
        return False


def run_to_end(cmd: list[str]) -> tuple[float, float]:
    """Run to the end: (seconds until the output lock appeared (model loaded), total seconds)."""
    out = cmd[cmd.index("-o") + 1]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loaded = None
    while proc.poll() is None:
        if loaded is None and holds_lock(out, proc.pid):
            loaded = time.monotonic() - started
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"run failed ({proc.returncode}): {stderr[-2000:]}")
    total = time.monotonic() - started
    return (loaded if loaded is not None else total), total


def killed_run(cmd: list[str], delay: float, on_write: bool, timeout: float) -> dict[str, Any]:
    """Start a run; once the model is loaded, SIGKILL it after ``delay`` seconds, or (``on_write``) as soon
    as it writes a file. Returns what happened."""
    out = cmd[cmd.index("-o") + 1]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loaded = None
    how = "ended by itself"
    stale: set[str] = set()
    while proc.poll() is None:
        now = time.monotonic()
        if loaded is None and holds_lock(out, proc.pid):
            loaded = now
            stale = temp_files(out)  # left by earlier kills
        if loaded is not None:
            if on_write and temp_files(out) - stale:
                proc.send_signal(signal.SIGKILL)
                how = "killed while writing"
                break
            if not on_write and now - loaded >= delay:
                proc.send_signal(signal.SIGKILL)
                how = f"killed {delay:.1f} s after the model loaded"
                break
            if on_write and now - loaded >= timeout:
                proc.send_signal(signal.SIGKILL)
                how = "killed (no write seen)"
                break
        time.sleep(0.001 if on_write and loaded is not None else 0.01)
    _, stderr = proc.communicate()
    if how == "ended by itself" and proc.returncode not in (0, 3):
        raise SystemExit(f"run failed ({proc.returncode}): {stderr[-2000:]}")
    return {"how": how, "returncode": proc.returncode, "seconds": round(time.monotonic() - started, 1)}


def rows_of(path: str) -> list[dict[str, Any]]:
    sys.path.insert(0, ROOT)
    from batchcap.output import read_table

    return read_table(path).to_pylist()


def done_count(out: str) -> int:
    """Rows already written (final file and parts), as a rerun would count them."""
    sys.path.insert(0, ROOT)
    from batchcap.output import ResultStore

    store = ResultStore(out)
    try:
        return len(store._done_ids())
    except Exception:  # noqa: BLE001 - only an estimate for the next delay
        return 0


def suspects(out: str) -> set[str]:
    """Items the crash journal set aside (in flight when a run was killed): done alone, out of their batch."""
    try:
        with open(os.path.join(out + ".parts", "suspects.json"), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return set()
    deaths = record.get("deaths", record) if isinstance(record, dict) else {}
    return {str(k) for k, v in deaths.items() if isinstance(v, int) and v > 0}


def check(rows: list[dict[str, Any]], ids: list[str], reference: dict[str, str]) -> dict[str, Any]:
    got = [str(r["id"]) for r in rows]
    seen: set[str] = set()
    duplicates = sum(1 for i in got if i in seen or seen.add(i))  # type: ignore[func-returns-value]
    missing = len(set(ids) - set(got))
    position = {i: n for n, i in enumerate(ids)}
    order_ok = [position.get(i, -1) for i in got] == sorted(position.get(i, -1) for i in got) and got == ids
    identical = sum(1 for r in rows if reference.get(str(r["id"])) == r.get("text"))
    not_ok = sum(1 for r in rows if r.get("status") != "ok")
    differing = [(str(r["id"]), reference.get(str(r["id"])), r.get("text")) for r in rows
                 if reference.get(str(r["id"])) != r.get("text")]
    return {"rows": len(rows), "duplicates": duplicates, "missing": missing, "order_ok": order_ok,
            "not_ok": not_ok, "identical": identical, "differing": differing[:5],
            "all_differing": [d[0] for d in differing]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=os.path.join(DEV, "speech-en", "manifest.csv"))
    parser.add_argument("--model", default=os.path.join(DEV, "models", "whisper-tiny.en"))
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--formats", nargs="+", default=["parquet", "csv"])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--flush-every", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs="*", help="more batchcap audio options (after --)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="soak-kill-")
    os.makedirs(workdir, exist_ok=True)
    manifest = os.path.join(workdir, "manifest.csv")
    ids = make_manifest(args.manifest, manifest, args.clips)

    ref_out = os.path.join(workdir, "reference.parquet")
    load_s, total_s = run_to_end(command(manifest, ref_out, args))
    per_item = max(0.01, (total_s - load_s) / len(ids))
    reference_rows = rows_of(ref_out)
    reference = {str(r["id"]): r["text"] for r in reference_rows}
    print(f"reference: {len(reference_rows)} rows in {total_s:.1f} s (model loaded after {load_s:.1f} s, "
          f"{per_item:.2f} s per item)", flush=True)
    results = [{"format": "reference", "kills": 0, "wall_s": round(total_s, 1),
                **check(reference_rows, ids, reference)}]

    for fmt in args.formats:
        out = os.path.join(workdir, f"soak.{fmt}")
        cmd = command(manifest, out, args)
        started = time.monotonic()
        events = []
        for k in range(args.kills):
            left = len(ids) - done_count(out)
            expected = per_item * left + 2.0  # the final merge and summary
            on_write = k % 3 == 2
            delay = rng.uniform(0.0, expected)
            event = killed_run(cmd, delay, on_write, timeout=expected + 30)
            event["left_before"] = left
            events.append(event)
            print(f"{fmt} run {k + 1}: {left} items left, {event['how']} ({event['seconds']} s)", flush=True)
        isolated = suspects(out)
        _, last = run_to_end(cmd)
        wall = time.monotonic() - started
        result = {"format": fmt, "kills": sum(1 for e in events if e["how"].startswith("killed")),
                  "wall_s": round(wall, 1), "events": events, **check(rows_of(out), ids, reference)}
        result["isolated"] = len(isolated)
        result["differing_not_isolated"] = sum(1 for d in result["all_differing"] if d not in isolated)
        results.append(result)
        print(f"{fmt}: final run {last:.1f} s; {json.dumps({k: v for k, v in result.items() if k != 'events'})}",
              flush=True)

    print()
    print(f"{'format':10} {'kills':>5} {'rows':>5} {'dups':>5} {'missing':>7} {'order ok':>8} {'not ok':>6} "
          f"{'identical':>10} {'isolated':>8} {'differ, not isolated':>20} {'wall s':>7}")
    failed = False
    for r in results:
        print(f"{r['format']:10} {r['kills']:>5} {r['rows']:>5} {r['duplicates']:>5} {r['missing']:>7} "
              f"{str(r['order_ok']):>8} {r['not_ok']:>6} {r['identical']:>4}/{len(ids):<5} {r.get('isolated', 0):>8} "
              f"{r.get('differing_not_isolated', 0):>20} {r['wall_s']:>7}")
        failed |= bool(r["duplicates"] or r["missing"] or not r["order_ok"] or r["not_ok"] or r["rows"] != len(ids)
                       or r["identical"] != len(ids))
        for d in r["differing"]:
            print(f"    differs: {d[0]}: {d[1]!r} vs {d[2]!r}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
