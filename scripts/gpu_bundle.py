#!/usr/bin/env python3
"""Pack what ``scripts/gpu_checks.sh`` needs on a bare GPU machine into one folder (default ``.gpu/``).

The device tool sends the checkout and at most 64 MiB of carried paths per call, and the GPU machine
reaches no network. whisper-tiny.en is 151 MB in float32, so its weights travel rounded to bfloat16
(exact in fp16, the dtype the GPU runs use) with the two bytes of each value in separate streams:
the high byte (sign and exponent) compresses about 3x with xz, the low byte hardly at all. About 51 MB.

    python scripts/gpu_bundle.py --model ~/.cache/batchcap-dev/models/whisper-tiny.en \
        --manifest ~/.cache/batchcap-dev/speech-en/manifest.csv --limit 250 --wheels DIR
    # DIR: wheels of soundfile, cffi, pycparser, soxr, jiwer, rapidfuzz for the machine's Python 3.12
    # (pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...)
    # then: device run, carry [".gpu"], command "bash scripts/gpu_checks.sh"

On the machine: ``--unpack .gpu/model DEST`` rebuilds the checkpoint; ``--repeat`` and ``--join`` make
longer runs and long recordings from the clips.

A bundle over the limit (whisper-base packs to 97 MB: two calls with the clips) travels in parts, one
call each, while the machine stays warm (30 s between calls): ``--split 60`` writes
``.gpu-parts/part1..N``; call N carries ``.gpu-parts/partN`` and copies it to /tmp/keep/partN; the
last call runs ``python3 scripts/gpu_bundle.py --gather /tmp/keep/part* --out /tmp/bundle`` and then the checks with
``BUNDLE=/tmp/bundle``.
Clips are re-encoded as FLAC (lossless) with a manifest of relative paths.
"""

from __future__ import annotations

import argparse
import csv
import json
import lzma
import os
import shutil
import sys

MODEL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "normalizer.json")


def pack_model(src: str, dst: str) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src, "model.safetensors"))
    index, high, low = [], [], []
    for name, tensor in state.items():
        pairs = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
        low.append(pairs[:, 0].tobytes())
        high.append(pairs[:, 1].tobytes())
        index.append({"name": name, "shape": list(tensor.shape)})
    with open(os.path.join(dst, "index.json"), "w") as handle:
        json.dump(index, handle)
    for part, chunks in (("high.xz", high), ("low.xz", low)):
        with lzma.open(os.path.join(dst, part), "wb", preset=6) as handle:
            handle.write(b"".join(chunks))
    for name in MODEL_FILES:
        if os.path.exists(os.path.join(src, name)):
            with open(os.path.join(src, name), "rb") as fin, lzma.open(os.path.join(dst, name + ".xz"), "wb") as fout:
                fout.write(fin.read())


def unpack_model(src: str, dst: str) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "index.json")) as handle:
        index = json.load(handle)
    with lzma.open(os.path.join(src, "high.xz")) as handle:
        high = np.frombuffer(handle.read(), dtype=np.uint8)
    with lzma.open(os.path.join(src, "low.xz")) as handle:
        low = np.frombuffer(handle.read(), dtype=np.uint8)
    pairs = np.empty((len(low), 2), dtype=np.uint8)
    pairs[:, 0], pairs[:, 1] = low, high
    values = torch.from_numpy(pairs.reshape(-1).copy()).view(torch.bfloat16)
    state, at = {}, 0
    for entry in index:
        count = int(np.prod(entry["shape"])) if entry["shape"] else 1
        state[entry["name"]] = values[at:at + count].reshape(entry["shape"]).clone()
        at += count
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in MODEL_FILES:
        packed = os.path.join(src, name + ".xz")
        if os.path.exists(packed):
            with lzma.open(packed) as fin, open(os.path.join(dst, name), "wb") as fout:
                fout.write(fin.read())


def pack_speech(manifest: str, dst: str, limit: int) -> None:
    import soundfile as sf

    os.makedirs(os.path.join(dst, "clips"), exist_ok=True)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if limit:
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    out = []
    for number, row in enumerate(rows):
        audio, rate = sf.read(row["path"], dtype="int16")
        name = f"clips/{number:04d}.flac"
        sf.write(os.path.join(dst, name), audio, rate, format="FLAC")
        out.append({"path": name, "reference": row["reference"], "language": row.get("language", "")})
    with open(os.path.join(dst, "manifest.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "reference", "language"])
        writer.writeheader()
        writer.writerows(out)


def repeat_manifest(src: str, dst: str, times: int, limit: int = 0) -> None:
    """The manifest's rows ``times`` over, with absolute paths (a longer run of the same clips)."""
    with open(src, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[: limit or None]
    base = os.path.dirname(os.path.abspath(src))
    with open(dst, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for _ in range(times):
            writer.writerows(dict(r, path=os.path.join(base, r["path"])) for r in rows)


def join_long(src: str, dst: str, seconds: float, limit: int = 0) -> None:
    """Long recordings for ``scripts/bench_long.py``: the clips joined in manifest order with 0.6-1.8 s of
    silence between them, a new recording every ``seconds``, and a ``clips`` column of [start, end, text]."""
    import random

    import numpy as np
    import soundfile as sf

    os.makedirs(dst, exist_ok=True)
    with open(src, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[: limit or None]
    base, rng = os.path.dirname(os.path.abspath(src)), random.Random(0)
    paths = [os.path.join(base, row["path"]) for row in rows]
    left = sum(sf.info(p).duration for p in paths)  # a short remainder joins the last recording
    out: list[dict[str, str]] = []
    parts: list[object] = []
    clips: list[list[object]] = []
    at = 0.0
    for number, (row, path) in enumerate(zip(rows, paths)):
        audio, rate = sf.read(path, dtype="float32")
        gap = np.zeros(int(rng.uniform(0.6, 1.8) * rate), np.float32)
        parts += [audio, gap]
        clips.append([round(at, 3), round(at + len(audio) / rate, 3), row["reference"]])
        at += (len(audio) + len(gap)) / rate
        left -= len(audio) / rate
        if (at >= seconds and left >= seconds / 2) or number == len(rows) - 1:
            path = os.path.join(os.path.abspath(dst), f"long{len(out)}.wav")
            sf.write(path, np.concatenate(parts), rate, subtype="PCM_16")
            out.append({"path": path, "reference": " ".join(str(c[2]) for c in clips),
                        "language": row.get("language") or "en", "clips": json.dumps(clips)})
            parts, clips, at = [], [], 0.0
    with open(os.path.join(dst, "manifest.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "reference", "language", "clips"])
        writer.writeheader()
        writer.writerows(out)


def split_bundle(src: str, parts_root: str, max_mb: float) -> list[str]:
    """Cut a bundle too big for one call into folders of at most ``max_mb`` MB each (files cut into
    numbered pieces where needed), to be carried one call after another while the machine stays warm and
    put back together there with :func:`gather_bundle`. Returns the part folders."""
    limit = int(max_mb * 1e6)
    parts: list[str] = []
    room = 0
    for folder, _, names in sorted(os.walk(src)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            rel, size = os.path.relpath(path, src), os.path.getsize(path)
            offset = piece = 0
            with open(path, "rb") as handle:
                while piece == 0 or offset < size:
                    if room <= 0:
                        parts.append(os.path.join(parts_root, f"part{len(parts) + 1}"))
                        room = limit
                    chunk = handle.read(min(room, size - offset))
                    target = os.path.join(parts[-1], f"{rel}.piece{piece:03d}")
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as out:
                        out.write(chunk)
                    offset, room, piece = offset + len(chunk), room - max(len(chunk), 1), piece + 1
    return parts


def gather_bundle(parts: list[str], dest: str) -> None:
    """Put a split bundle back together: every ``NAME.pieceNNN`` of the part folders, in order, into NAME."""
    pieces: dict[str, list[tuple[int, str]]] = {}
    for part in parts:
        for folder, _, names in os.walk(part):
            for name in names:
                stem, _, number = name.rpartition(".piece")
                rel = os.path.relpath(os.path.join(folder, stem), part)
                pieces.setdefault(rel, []).append((int(number), os.path.join(folder, name)))
    for rel, found in pieces.items():
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        with open(os.path.join(dest, rel), "wb") as out:
            for _, path in sorted(found):
                with open(path, "rb") as handle:
                    shutil.copyfileobj(handle, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a transformers Whisper checkpoint directory to pack")
    parser.add_argument("--manifest", help="CSV with path,reference[,language] whose clips to pack")
    parser.add_argument("--limit", type=int, default=0, help="only N clips, spread over the manifest")
    parser.add_argument("--wheels", help="a folder of wheels to copy in")
    parser.add_argument("--out", default=".gpu")
    parser.add_argument("--unpack", nargs=2, metavar=("PACKED", "DEST"), help="rebuild a packed model")
    parser.add_argument("--repeat", nargs=3, metavar=("MANIFEST", "DEST", "N"), help="a manifest's rows N times")
    parser.add_argument("--split", type=float, metavar="MB",
                        help="also cut --out into OUT-parts/partN folders of at most MB each (see split_bundle)")
    parser.add_argument("--gather", nargs="+", metavar="PART", help="put split parts back together into --out")
    parser.add_argument("--join", nargs=3, metavar=("MANIFEST", "FOLDER", "SECONDS"),
                        help="long recordings of about SECONDS joined from the clips, with FOLDER/manifest.csv")
    args = parser.parse_args()
    if args.unpack:
        unpack_model(*args.unpack)
    if args.repeat:
        repeat_manifest(args.repeat[0], args.repeat[1], int(args.repeat[2]), args.limit)
    if args.join:
        join_long(args.join[0], args.join[1], float(args.join[2]), args.limit)
    if args.gather:
        gather_bundle(args.gather, args.out)
    if args.unpack or args.repeat or args.join or args.gather:
        return 0
    if args.model:
        pack_model(args.model, os.path.join(args.out, "model"))
    if args.manifest:
        pack_speech(args.manifest, os.path.join(args.out, "speech"), args.limit)
    if args.wheels:
        shutil.copytree(args.wheels, os.path.join(args.out, "wheels"), dirs_exist_ok=True)
    if args.split:
        for part in split_bundle(args.out, args.out.rstrip("/") + "-parts", args.split):
            print(part, sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(part) for f in fs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
