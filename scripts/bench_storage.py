#!/usr/bin/env python3
"""Images/s of batchcap's fetch + decode + preprocess, with the same images in three places.

The same ``--images`` (default 2,000) small real photos (crops of scikit-image's sample photos, resized
to 160-400 px and re-encoded as JPEG, 5-40 KB each) are read

- ``local``: from local files (a CSV manifest of paths);
- ``http``:  from a loopback HTTP server (``tests/httpserver.py``, a threaded Python server) by URL;
- ``s3``:    from a loopback S3 API (moto's standalone server, a threaded Python server, reached
  through s3fs with ``AWS_ENDPOINT_URL``) by ``s3://`` URL; ``s3-prefix`` walks the bucket prefix
  instead of reading a manifest.

Two measures per source:

- ``pipeline``: ``caption_images`` with a predictor that returns an empty caption (no model): listing or
  reading the manifest, fetching, decoding, the ViT image processor (224 px, the default of
  ``ViTImageProcessor``), batching, rows, the output file. What a GPU would be fed at most.
- ``fetch``: batchcap's Fetcher alone (64 threads, the images default of 4 x 16 workers): bytes only.

If ``fetch`` is well above ``pipeline`` for a source, the fetcher is not the bottleneck there. Both
servers run on this machine and use its CPU too (moto parses and signs every request in Python), so
the remote figures are a lower bound of what a real store gives the same client.

The images are cut into ``--rounds`` slices; every system runs on slice 1, then every system on slice 2,
... (order rotated each round), and the table gives each system's median images/s over the rounds
(a burst of load elsewhere moves one round, not the median) and its CPU seconds per image.

    python scripts/bench_storage.py                     # 2,000 images, 4 rounds
    python scripts/bench_storage.py --images 400 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "camera", "coins", "clock")


@dataclass
class Result:
    name: str
    rates: list[float] = field(default_factory=list)
    images: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def make_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs: random crops of the sample photos, resized, re-encoded."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(160, 401))
        crop = photo.crop((x, y, x + cw, y + ch))
        crop = crop.resize((side, max(16, int(side * ch / cw))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(70, 95)))
        out.append(buf.getvalue())
    return out


def processor_dir(path: Path) -> str:
    """A folder with only a ViT image processor (224 px): all the preprocessing needs, no weights."""
    if not (path / "preprocessor_config.json").exists():
        from transformers import ViTImageProcessor

        ViTImageProcessor().save_pretrained(str(path))
    return str(path)


class NoModel:
    """A predictor that predicts nothing: the pipeline without the model."""

    def predict(self, batch: list[Any]) -> list[Any]:
        from batchcap.predictions import Caption

        return [Caption("") for _ in batch]


def start_moto() -> tuple[subprocess.Popen, str]:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            requests.get(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def write_manifest(path: Path, sources: list[tuple[int, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for i, src in sources:
            w.writerow([f"i{i:05d}", src])
    return path


def run_pipeline(inputs: str, out: Path, model: str, batch: int) -> int:
    from batchcap.captioning import ImageOptions, image_job, image_spec
    from batchcap.job import run_pipeline as run
    from batchcap.output import read_table

    options = ImageOptions(model=model, batch_size=batch, quiet=True, overwrite=True, progress=False)
    spec = image_spec()
    job = image_job(options)
    run(inputs, str(out), options, spec, job, predictor=NoModel())
    rows = read_table(str(out)).to_pylist()
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} failed rows, e.g. {bad[0]['status']}: {bad[0]['error']}")
    return len(rows)


def run_fetch(sources: list[str]) -> int:
    from batchcap.fetch import FetchConfig, Fetcher
    from batchcap.items import Item

    items = [Item(i, str(i), s) for i, s in enumerate(sources)]
    with Fetcher(FetchConfig()) as fetcher, ThreadPoolExecutor(64) as pool:
        fetched = list(pool.map(fetcher.fetch, items))
    bad = [f for f in fetched if f.status != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} failed fetches, e.g. {bad[0].error}")
    return len(fetched)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from batchcap import storage
    from tests.httpserver import LoopbackServer

    blobs = make_images(args.images)
    sizes = sorted(len(b) for b in blobs)
    print(f"{len(blobs)} JPEGs, {sum(sizes) / 2**20:.1f} MiB, median {sizes[len(sizes) // 2] / 1024:.0f} KiB",
          file=sys.stderr)
    moto, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    storage.reset()
    server = LoopbackServer().start()
    results: dict[str, Result] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp_name:
            tmp = Path(tmp_name)
            os.environ["BATCHCAP_CACHE"] = str(tmp / "cache")
            model = processor_dir(tmp / "processor")
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            fs, _ = storage.filesystem(f"s3://{bucket}")
            fs.mkdir(bucket)
            per = -(-len(blobs) // args.rounds)
            plan: list[dict[str, Any]] = []
            for r in range(args.rounds):
                idx = list(range(r * per, min(len(blobs), (r + 1) * per)))
                folder = tmp / f"local{r}"
                folder.mkdir()
                local, http, s3 = [], [], []
                for i in idx:
                    name = f"{i:05d}.jpg"
                    (folder / name).write_bytes(blobs[i])
                    local.append((i, str(folder / name)))
                    http.append((i, server.add(f"/r{r}/{name}", blobs[i], content_type="image/jpeg")))
                    fs.pipe_file(f"{bucket}/r{r}/{name}", blobs[i])
                    s3.append((i, f"s3://{bucket}/r{r}/{name}"))
                plan.append({
                    "local": (str(write_manifest(tmp / f"local{r}.csv", local)), [s for _, s in local]),
                    "http": (str(write_manifest(tmp / f"http{r}.csv", http)), [s for _, s in http]),
                    "s3": (str(write_manifest(tmp / f"s3{r}.csv", s3)), [s for _, s in s3]),
                    "s3-prefix": (f"s3://{bucket}/r{r}", None),
                })
            systems = [f"{kind}-{source}" for source in ("local", "http", "s3", "s3-prefix")
                       for kind in ("pipeline", "fetch") if not (source == "s3-prefix" and kind == "fetch")]
            results = {s: Result(s) for s in systems}
            for r, round_plan in enumerate(plan):
                shift = r % len(systems)
                for name in systems[shift:] + systems[:shift]:
                    kind, source = name.split("-", 1)
                    inputs, sources = round_plan[source]
                    res = results[name]
                    if res.error:
                        continue
                    started, cpu = time.perf_counter(), time.process_time()
                    try:
                        n = run_pipeline(inputs, tmp / f"{name}.parquet", model, args.batch_size) \
                            if kind == "pipeline" else run_fetch(sources)
                    except Exception as exc:  # noqa: BLE001 - a system that fails is its row
                        res.error = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    wall = time.perf_counter() - started
                    res.rates.append(n / wall)
                    res.images += n
                    res.wall += wall
                    res.cpu += time.process_time() - cpu
                    print(f"  round {r + 1}/{args.rounds} {name}: {n} in {wall:.1f} s ({n / wall:.0f}/s, "
                          f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        server.stop()
        moto.terminate()
        moto.wait(timeout=10)

    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor())
    print(f"\nmachine: {cpu_name}, {os.cpu_count()} cores, load average at the end "
          f"{[round(x, 1) for x in os.getloadavg()]}; python {platform.python_version()}")
    print(f"{len(blobs)} JPEGs ({sum(sizes) / 2**20:.1f} MiB, median {sizes[len(sizes) // 2] / 1024:.0f} KiB) "
          f"in {args.rounds} rounds; pipeline = fetch + decode + ViT processor 224 px + rows + output, no model\n")
    print("| system | images | images/s (median of rounds) | images/s (all) | CPU s/image (this process) | notes |")
    print("|---|---|---|---|---|---|")
    for res in results.values():
        all_rate = res.images / res.wall if res.wall else None
        cpu = res.cpu / res.images if res.images else None
        print(f"| {res.name} | {res.images} | {res.median or 0:.0f} | {all_rate or 0:.0f} | "
              f"{cpu if cpu is not None else 0:.4f} | {'FAILED: ' + res.error if res.error else ''} |")
    if args.json:
        args.json.write_text(json.dumps({r.name: vars(r) | {"median": r.median} for r in results.values()},
                                        indent=2) + "\n")
    return 0 if all(not r.error for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
