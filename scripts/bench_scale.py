"""Scale benchmark: the local engine's memory on big manifests, and ``--engine ray`` vs local speed.

1. Peak RSS of the local engine on manifests of 1,000 and 100,000 rows (by default). A fast stand-in
   transcriber (real decoding, real AudioScorer rows and WER scoring, no model) keeps it short: the
   figure is memory, not speed. Every row points at the same short wav under a unique id. Peak RSS
   is reported while rows stream (before the final merge) and overall: ``ResultStore.finalize``
   reads every row back to sort the final file by input order, which is O(rows) by design.
2. Items/s of ``--engine ray`` vs ``--engine local`` on the same clips in the same benchmark run,
   local then Ray, ``--runs`` times: by default the first 300 real English clips of the dev speech
   manifest with the real whisper-tiny.en (wall time, Ray's start-up included; whether both engines
   wrote the same texts). ``--random-model`` adds a tiny random Whisper on tones (it loops, so the
   hallucination guard's retries dominate both engines).
3. ``--many-items N``: N short synthetic items (0.5-1 s tones and noise, 16 files under N ids) through
   ``--engine ray`` with a tiny random Whisper: wall time, items/s, and the engine's count of model
   loads (one per replica, however many windows).

Each measurement runs in a fresh subprocess. Linux only (/proc); parts 2 and 3 need Ray.

    python scripts/bench_scale.py                      # parts 1 and 2, tables on stdout
    python scripts/bench_scale.py --rows --runs 2 --random-model          # part 2 only, both models
    python scripts/bench_scale.py --rows --ray-items 0 --many-items 10000  # part 3 only
    python scripts/bench_scale.py --rows 1000 200000 --ray-items 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

log = logging.getLogger("bench_scale")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Sampler(threading.Thread):
    """RSS every 20 ms; ``peak`` until ``stop_phase`` is called."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.02)

    def stop_phase(self) -> float:
        self.running = False
        self.peak = max(self.peak, _rss_mb())
        return self.peak


# --- part 1: memory ---------------------------------------------------------------------------

class _FakePrepared:
    __slots__ = ("duration_s",)

    def __init__(self, duration_s: float):
        self.duration_s = duration_s


class FakePreprocessor:
    """Real decoding (the audio job's decode_audio), no feature extractor."""

    def setup(self) -> None:
        pass

    def load(self, item: Any, data: bytes) -> _FakePrepared:
        from batchcap.audio import decode_audio

        return _FakePrepared(len(decode_audio(data)) / 16000)

    def size(self, loaded: _FakePrepared) -> float:
        return loaded.duration_s


class FakePredictor:
    def predict(self, batch: list[_FakePrepared]) -> list[Any]:
        from batchcap.predictions import Transcript

        return [Transcript("hello world", "en") for _ in batch]


def _write_manifest(path: str, rows: int, wav: str) -> None:
    with open(path, "w") as f:
        f.write("id,path,reference,speaker\n")
        for i in range(rows):
            f.write(f"utt{i:07d},{wav},hello world number {i % 97},spk{i % 13}\n")


def memory_worker(rows: int, workdir: str) -> dict[str, Any]:
    from batchcap.asr import AUDIO_COLUMNS, AudioOptions, AudioScorer
    from batchcap.inputs import Inputs, audio_spec
    from batchcap.job import Job
    from batchcap.output import ResultStore
    from batchcap.runner import run_job

    manifest = os.path.join(workdir, f"manifest-{rows}.csv")
    _write_manifest(manifest, rows, os.path.join(workdir, "clip.wav"))
    base = _rss_mb()
    sampler = _Sampler()
    phases: dict[str, float] = {}
    finalize = ResultStore.finalize

    def timed_finalize(self: ResultStore, *args: Any, **kwargs: Any) -> Any:
        phases["stream_peak_mb"] = sampler.stop_phase()
        phases["stream_s"] = time.monotonic() - started
        return finalize(self, *args, **kwargs)

    ResultStore.finalize = timed_finalize  # type: ignore[method-assign]
    spec = audio_spec()
    spec.reserved = AUDIO_COLUMNS
    options = AudioOptions(model="fake", batch_size=16, workers=4, quiet=True, overwrite=True)
    job = Job(FakePreprocessor(), AudioScorer(options), FakePredictor, group=16)
    started = time.monotonic()
    sampler.start()
    result = run_job(Inputs([manifest], spec), job, os.path.join(workdir, f"out-{rows}.parquet"), options)
    wall = time.monotonic() - started
    return {"rows": result.summary["rows"], "base_mb": round(base, 1),
            "stream_peak_mb": round(phases["stream_peak_mb"], 1), "peak_mb": round(_peak_mb(), 1),
            "stream_s": round(phases["stream_s"], 1), "wall_s": round(wall, 1),
            "items_per_s": round(rows / phases["stream_s"], 1)}


# --- part 2: ray vs local; part 3: many short items on Ray ------------------------------------

def speed_worker(engine: str, manifest: str, out: str, model: str, overrides: str) -> dict[str, Any]:
    """One run of ``transcribe`` on ``engine``: wall time, items/s, and the "N model load(s)" log line."""
    from batchcap.asr import transcribe

    stamps: list[float] = []
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    def timed(stream: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for row in stream(*args, **kwargs):
                if row is not None:
                    stamps.append(time.monotonic())
                yield row
        return wrapper

    if engine == "ray":
        from batchcap.engines import ray as module
    else:
        from batchcap.engines import local as module
    module.stream_rows = timed(module.stream_rows)
    engine_log = logging.getLogger("batchcap.engines")
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(Lines())
    started = time.monotonic()
    result = transcribe(manifest, out, model=model, engine=engine, batch_size=16, overwrite=True, quiet=True,
                        device="cpu", **json.loads(overrides))
    wall = time.monotonic() - started
    items = result.summary["rows"]
    loads = next((line for line in lines if "model load(s)" in line), None)
    return {"engine": engine, "items": items, "ok": result.summary["status_counts"].get("ok", 0),
            "wall_s": round(wall, 1), "items_per_s": round(items / wall, 2),
            "first_row_s": round(stamps[0] - started, 1) if stamps else None,
            "wer": result.summary.get("wer"), "model_loads": loads.split(":", 1)[1].strip() if loads else None}


def _texts(path: str) -> list[Any]:
    from batchcap.output import read_table

    return read_table(path).column("text").to_pylist()


def _speech_manifest(source: str, rows: int, workdir: str) -> str:
    """The first ``rows`` rows of a real speech manifest (path, reference, ...)."""
    out = os.path.join(workdir, f"speech-{rows}.csv")
    with open(source) as f_in, open(out, "w") as f_out:
        for n, line in enumerate(f_in):
            if n > rows:
                break
            f_out.write(line)
    return out


def _synthetic_manifest(workdir: str, items: int, clips: int) -> str:
    """``items`` rows over ``clips`` short tones and noises (0.5-1 s), each row its own id."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    paths = []
    for i in range(clips):
        seconds = 0.5 + 0.5 * i / max(1, clips - 1)
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t) if i % 2 else 0.1 * rng.standard_normal(len(t))
        paths.append(os.path.join(workdir, f"syn{i:02d}.wav"))
        sf.write(paths[-1], wave.astype(np.float32), 16000)
    manifest = os.path.join(workdir, f"synthetic-{items}.csv")
    with open(manifest, "w") as f:
        f.write("id,path\n")
        for i in range(items):
            f.write(f"item{i:06d},{paths[i % clips]}\n")
    return manifest


ENGINES = {"local": {}, "local+passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "ray": {}}  # name -> extra environment


def compare_engines(label: str, manifest: str, model: str, runs: int, workdir: str,
                    overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Local then Ray, ``runs`` times, each in a fresh process; items/s of each, the ratio, same texts?

    ``local+passive`` is the local engine with OpenMP's passive wait, as the Ray engine's CPU replicas
    run: the like-for-like comparison on a machine where other work takes the cores."""
    out = []
    for run in range(1, runs + 1):
        pair = {}
        for engine, env in ENGINES.items():
            log.info("%s: engine %s, run %d of %d ...", label, engine, run, runs)
            path = os.path.join(workdir, f"{label}-{engine}-{run}.parquet")
            args = ["--worker", "speed", engine.split("+")[0], manifest, path, model, json.dumps(overrides or {})]
            pair[engine] = _sub(args, env)
            pair[engine]["engine"] = engine
            log.info("%s", json.dumps(pair[engine]))  # as it comes: a long benchmark cut short keeps its figures
            pair[engine]["texts"] = _texts(path)
        texts = {engine: pair[engine].pop("texts") for engine in ENGINES}
        ray_rate = pair["ray"]["items_per_s"]
        for engine in ENGINES:
            out.append({"clips": label, "run": run, **pair[engine],
                        "ray/this": round(ray_rate / pair[engine]["items_per_s"], 3),
                        "same_texts_as_ray": texts[engine] == texts["ray"]})
    return out


# --- driver ------------------------------------------------------------------------------------

def _sub(args: list[str], extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               **(extra_env or {}))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max([len(c)] + [len(str(r.get(c))) for r in rows]) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r.get(c)).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1000, 100_000], help="manifest sizes for part 1")
    parser.add_argument("--ray-items", type=int, default=300, help="clips for part 2 (0: skip it)")
    parser.add_argument("--speech-manifest", default=os.path.expanduser("~/.cache/batchcap-dev/speech-en/manifest.csv"),
                        help="part 2: real clips (its first --ray-items rows)")
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/batchcap-dev/models/whisper-tiny.en"),
                        help="part 2: the model for the real clips")
    parser.add_argument("--runs", type=int, default=2, help="part 2: local-then-ray pairs")
    parser.add_argument("--random-model", action="store_true",
                        help="part 2: also a tiny random Whisper on tones (it loops: the guard's retries dominate)")
    parser.add_argument("--many-items", type=int, default=0, help="part 3: this many short items on Ray (0: skip)")
    parser.add_argument("--many-concurrency", type=int, default=1, help="part 3: model replicas")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.worker:  # a measurement in this fresh process; JSON on the last stdout line
        kind, *rest = args.worker
        logging.getLogger().setLevel(logging.WARNING)
        if kind == "memory":
            out = memory_worker(int(rest[0]), rest[1])
        else:
            out = speed_worker(*rest)
        print(json.dumps(out))
        return

    from tests.conftest import write_audio

    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as workdir:
        write_audio(os.path.join(workdir, "clip.wav"), 0.2)
        memory = []
        for rows in args.rows:
            log.info("local engine, %d manifest rows ...", rows)
            memory.append(_sub(["--worker", "memory", str(rows), workdir]))
        if memory:
            figures["memory"] = memory
            print("\nLocal engine memory (fake model, real decode + AudioScorer rows; RSS in MiB)")
            print(_table(memory, ["rows", "base_mb", "stream_peak_mb", "peak_mb", "stream_s", "wall_s",
                                  "items_per_s"]))

        speed = []
        if args.ray_items and args.speech_manifest and os.path.exists(args.speech_manifest):
            manifest = _speech_manifest(args.speech_manifest, args.ray_items, workdir)
            speed += compare_engines("real", manifest, args.model, args.runs, workdir)
        if args.ray_items and args.random_model:
            from tests.tiny_whisper import make_tiny_whisper

            tiny = make_tiny_whisper(os.path.join(workdir, "tiny-whisper"))
            manifest = os.path.join(workdir, f"tones-{args.ray_items}.csv")
            for i in range(8):
                write_audio(os.path.join(workdir, f"c{i}.wav"), 1.0 + 0.25 * i, freq=220 + 40 * i)
            with open(manifest, "w") as f:
                f.write("id,path\n")
                f.writelines(f"clip{i:05d},{os.path.join(workdir, f'c{i % 8}.wav')}\n" for i in range(args.ray_items))
            speed += compare_engines("random", manifest, tiny, args.runs, workdir)
        if speed:
            figures["speed"] = speed
            print(f"\nEngines on {args.ray_items} clips, batch 16, {os.cpu_count()} CPUs (real: {args.model} on "
                  f"{args.speech_manifest}; random: a tiny random Whisper on tones, the guard's retries on)")
            print(_table(speed, ["clips", "run", "engine", "items", "ok", "wall_s", "items_per_s", "first_row_s",
                                 "ray/this", "same_texts_as_ray", "wer"]))
        if args.many_items:
            from tests.tiny_whisper import make_tiny_whisper

            tiny = make_tiny_whisper(os.path.join(workdir, "tiny-whisper-many"), max_length=8)
            manifest = _synthetic_manifest(workdir, args.many_items, 16)
            log.info("ray engine, %d short synthetic items ...", args.many_items)
            many = _sub(["--worker", "speed", "ray", manifest, os.path.join(workdir, "many.parquet"), tiny,
                         json.dumps({"fallback": False, "concurrency": args.many_concurrency})])
            figures["many"] = many
            log.info("%s", json.dumps(many))
            print(f"\n--engine ray, {args.many_items} synthetic items (0.5-1 s tones and noise), a tiny random "
                  f"Whisper (no fallback), batch 16, --concurrency {args.many_concurrency}")
            print(_table([many], ["engine", "items", "ok", "wall_s", "items_per_s", "first_row_s", "model_loads"]))
    figures["load_avg_at_end"] = os.getloadavg()[0]
    print(f"\nload average: {figures['load_avg_at_start']:.1f} at start, {figures['load_avg_at_end']:.1f} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
