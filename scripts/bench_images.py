#!/usr/bin/env python3
"""Images/s of batchcap's captioning against the "seed" loop and the transformers pipeline.

No pretrained captioner can be downloaded here, so the model is the real architecture with RANDOM
weights: a ViT-base encoder (ViTConfig defaults: 224 px, patch 16, 12 layers, 768 wide) and a GPT-2
decoder (GPT2Config defaults + cross-attention, 50257 tokens) in a VisionEncoderDecoder, with a
ViTImageProcessor and a 50257-entry word-level tokenizer, all built offline and saved like a real
checkpoint (cached in ~/.cache/batchcap-dev/bench-vit-gpt2). Every system is forced to exactly 16
new tokens (min_new_tokens = max_new_tokens = 16), so the comparison is about compute, not about
when a random model happens to emit EOS.

    python scripts/bench_images.py                       # everything, on the CPU
    python scripts/bench_images.py --images 32 --seed-images 16 --systems seed-loop-greedy batchcap
    python scripts/bench_images.py --systems batchcap-bf16 --batch-size 8 16     # which batch size is faster
    python scripts/bench_images.py --device cuda --json bench.json

Systems (``--systems`` takes names or prefixes of names):

- ``seed-loop-beam4`` / ``seed-loop-greedy``: one image at a time, fp32 (the model card's way):
  ``Image.open(p).convert("RGB")``, ``processor(images=img)``, ``model.generate``, ``tokenizer.decode``.
- ``pipeline-stock``: ``transformers.pipeline("image-to-text", model=DIR)`` exactly as in 4.x; it fails
  in transformers 5.x (see :func:`_pipeline_class`), the table shows how.
- ``pipeline-b8-greedy`` / ``pipeline-b8-beam4``: the patched pipeline, ``batch_size=8``.
- ``batchcap-fp32-*`` and ``batchcap-bf16-*`` (``--dtype auto``: bf16 autocast on a CPU with native
  bf16, fp16 weights on CUDA, then named ``batchcap-fp16-*``) through ``batchcap.caption_images``.
- ``stockcache-fp32-beam4`` / ``stockcache-bf16-beam4``: batchcap with transformers' own beam search
  cache (``share_cross_attention=False``), to show what sharing the cross-attention K/V saves.
- ``bf16w-greedy`` / ``bf16w-beam4`` (CPU only): batchcap with bf16 weights instead of fp32 weights +
  bf16 autocast (see :func:`load_bf16_weights`).
- ``url-local`` / ``url-http`` / ``fetch-only``: ``--url-images`` items (the photos cycled) from local
  files and from a loopback HTTP server answering each request after ``--latency`` seconds, through
  ``caption_images`` with the auto dtype, greedy; ``fetch-only`` is batchcap's Fetcher alone (64 threads, the
  images default: 4 x 16 workers).
- ``url-local-nomodel`` / ``url-http-nomodel``: the same without the model (real preprocessing, an empty
  caption): what fetching, decoding and preprocessing sustain on this machine, the ceiling a GPU sees.

images/s = images / wall seconds, where the wall time covers reading and decoding the files, the
preprocessing, generation and decoding the tokens (for batchcap also listing the inputs and writing the
output), but not loading the model (the "load s" column; systems that differ only in generate's
arguments share one loaded model). No system gets a warm-up run.

The CPU may be shared with other work whose load comes and goes, so the images are cut into
``--rounds`` slices and every system runs on slice 1, then every system on slice 2, ... (in an order
rotated each round), and the speed-ups use each system's median images/s over the rounds: a burst
of load elsewhere during one round then moves no ratio much (the "all" column is images / total
wall). batchcap pays its per-run costs (listing, output files) once per round.
"CPU s/image" is this process's CPU time (all its threads) per image: less sensitive to what else
the machine runs than the wall time, it is the cost to compare when the load swings a lot.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEV_CACHE = Path("~/.cache/batchcap-dev").expanduser()
DEFAULT_MODEL = DEV_CACHE / "bench-vit-gpt2"
MODEL_MARK = "bench-model.json"  # written last: a directory without it is an interrupted build
EOS_TOKEN = "<|endoftext|>"
VOCAB = 50257  # GPT-2's, EOS last (id 50256) as in GPT-2
NEW_TOKENS = 16
REFERENCE = "seed-loop-beam4"


@dataclass
class Outcome:
    system: str
    beams: int
    batch: int
    ok: bool = False
    error: str | None = None
    images: int = 0
    load_s: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None  # this process's CPU time (all threads) while the system ran
    captions: dict[int, str] = field(default_factory=dict)  # by image (or URL item) index
    round_rates: list[float] = field(default_factory=list)  # images/s of each round
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.wall_s if self.ok and self.wall_s else None

    @property
    def median_rate(self) -> float | None:
        """The median of the rounds' images/s: what the speed-ups use (a burst of load elsewhere hits one round)."""
        return statistics.median(self.round_rates) if self.ok and self.round_rates else None

    @property
    def cpu_per_image(self) -> float | None:
        return self.cpu_s / self.images if self.ok and self.cpu_s is not None and self.images else None


# ------------------------------------------------------------------------------------------------------
# the model and the images
# ------------------------------------------------------------------------------------------------------

def _image_processor_class() -> Any:
    try:  # transformers >= 5.2x: the PIL backend, which needs no torchvision (ViTImageProcessor falls back to it)
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        return ViTImageProcessorPil
    except ImportError:
        from transformers import ViTImageProcessor

        return ViTImageProcessor


def build_model(path: Path, seed: int = 0) -> Path:
    """Save a random ViT-base + GPT-2 VisionEncoderDecoder, its image processor and tokenizer to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    if (path / MODEL_MARK).is_file():
        return path
    started = time.perf_counter()
    print(f"building the random ViT-base + GPT-2 captioner in {path} (once)", file=sys.stderr)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab[EOS_TOKEN] = VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                        pad_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    eos = tokenizer.eos_token_id
    assert len(tokenizer) == VOCAB and eos == VOCAB - 1, (len(tokenizer), eos)

    decoder = GPT2Config(add_cross_attention=True, is_decoder=True, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    gen = model.generation_config
    gen.decoder_start_token_id = gen.bos_token_id = gen.eos_token_id = gen.pad_token_id = eos

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    _image_processor_class()().save_pretrained(tmp)  # defaults: 224x224, bilinear, mean = std = 0.5
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    (tmp / MODEL_MARK).write_text(json.dumps({"params": params, "seed": seed, "vocab": VOCAB}) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    print(f"built ({params / 1e6:.1f} M parameters) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def _photos() -> list[tuple[str, Any]]:
    """Real photos shipped with scikit-image and matplotlib (nothing downloaded)."""
    import numpy as np
    import skimage.data as data
    from PIL import Image

    photos: list[tuple[str, Any]] = []
    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket", "cat", "coins", "moon", "clock",
                 "immunohistochemistry", "hubble_deep_field", "retina", "grass", "gravel", "brick", "page",
                 "stereo_motorcycle"):
        try:
            array = getattr(data, name)()
        except Exception as exc:  # noqa: BLE001 - some need pooch or a download: skip them
            print(f"skipping skimage.data.{name}: {type(exc).__name__}", file=sys.stderr)
            continue
        arrays = array if isinstance(array, tuple) else (array,)
        for i, a in enumerate(arrays[:2]):
            a = np.asarray(a)
            if a.dtype == np.uint8 and a.ndim in (2, 3):
                photos.append((f"{name}{i or ''}", Image.fromarray(a)))
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            photos.append(("grace_hopper", Image.open(handle).convert("RGB")))
    except Exception as exc:  # noqa: BLE001
        print(f"skipping matplotlib's grace_hopper.jpg: {type(exc).__name__}", file=sys.stderr)
    if not photos:
        raise SystemExit("no sample photos found (scikit-image / matplotlib)")
    return photos


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` distinct JPEGs: the photos cycled, each round with other crops / flips."""
    import random

    from PIL import ImageOps

    photos = _photos()
    rng = random.Random(0)
    paths = []
    for i in range(count):
        name, image = photos[i % len(photos)]
        variant = i // len(photos)
        if variant:
            w, h = image.size
            scale = rng.uniform(0.6, 0.9)
            cw, ch = int(w * scale), int(h * scale)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            image = image.crop((x, y, x + cw, y + ch))
            if variant % 2:
                image = ImageOps.mirror(image)
        mode = image.mode if image.mode in ("L", "RGB") else "RGB"
        path = folder / f"{i:04d}_{name}_v{variant}.jpg"
        image.convert(mode).save(path, quality=90)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------
# systems: each is loaded once, then run on every round's slice of the images
# ------------------------------------------------------------------------------------------------------

@dataclass
class System:
    name: str
    kind: str  # seed | pipeline-stock | pipeline | batchcap | stock-cache | bf16w | url-local | url-http | fetch
    beams: int = 1
    dtype: str = "auto"
    batch: int = 1
    no_model: bool = False  # real preprocessing, no generate: what the input path alone sustains
    state: Any = None


@dataclass
class Context:
    args: argparse.Namespace
    rounds: list[list[tuple[int, Path]]]  # (image index, path) of each round's images
    dirs: list[Path]  # each round's images, in a folder of their own (batchcap's input)
    tmp: Path
    url: Any = None  # _UrlSetup
    cache: dict[str, tuple[Any, str]] = field(default_factory=dict)  # key -> (object, system that loaded it)

    def shared(self, key: str, system: System, loader: Any, out: Outcome) -> Any:
        """One model for the systems that differ only in generate's arguments; its load time goes to the first."""
        if key in self.cache:
            obj, first = self.cache[key]
            out.notes.append(f"model shared with {first}")
            return obj
        started = time.perf_counter()
        obj = loader()
        out.load_s = time.perf_counter() - started
        self.cache[key] = (obj, system.name)
        return obj


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _generate_kwargs(beams: int) -> dict[str, int]:
    return {"num_beams": beams, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}


# --- the seed's loop -----------------------------------------------------------------------------------

def load_seed(ctx: Context, system: System, out: Outcome) -> Any:
    """The model card's way: a plain fp32 VisionEncoderDecoderModel, its image processor and tokenizer."""
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    def load() -> tuple[Any, Any, Any]:
        model = VisionEncoderDecoderModel.from_pretrained(ctx.args.model).to(ctx.args.device).eval()
        return model, _image_processor_class().from_pretrained(ctx.args.model), \
            AutoTokenizer.from_pretrained(ctx.args.model)

    out.notes.append("fp32, one image at a time")
    if ctx.args.seed_images and ctx.args.seed_images < ctx.args.images:
        out.notes.append(f"{ctx.args.seed_images} of the {ctx.args.images} images")
    return ctx.shared("seed", system, load, out)


def run_seed(ctx: Context, system: System, r: int) -> dict[int, str]:
    from PIL import Image

    model, processor, tokenizer = system.state
    items = ctx.rounds[r]
    if ctx.args.seed_images:
        items = items[:-(-ctx.args.seed_images // len(ctx.rounds))]
    captions = {}
    for index, path in items:
        image = Image.open(path).convert("RGB")
        pixel_values = processor(images=image, return_tensors="pt").pixel_values.to(ctx.args.device)
        ids = model.generate(pixel_values, **_generate_kwargs(system.beams))
        captions[index] = tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    return captions


# --- the transformers pipeline -------------------------------------------------------------------------

_PIPELINE_CLASS: Any = None


def _pipeline_class() -> Any:
    """transformers 4.x's ``ImageToTextPipeline``, which transformers 5.x removed: the user's patch.

    What fails in transformers 5.x: ``pipeline("image-to-text", model=DIR)`` logs that the task was
    replaced and builds an ``image-text-to-text`` pipeline instead (pipelines/__init__.py,
    ``_resolve_deprecated_task``). That pipeline loads ``AutoProcessor`` (``_load_processor = True``),
    which for a ViT + GPT-2 VisionEncoderDecoder directory (no processor class) returns just the
    tokenizer, so ``pipeline()`` raises ``TypeError: Processor was loaded, but it is not an instance of
    ProcessorMixin``. Even given a processor it could not caption: ``ImageTextToTextPipeline.__call__``
    wants text with the images ("You must provide text for this pipeline") and its preprocess calls
    ``processor(images=..., text=...)``, which no VisionEncoderDecoder processor exists for. The
    ``ImageToTextPipeline`` class and ``pipelines/image_to_text.py`` are gone.

    The patch: this port of the 4.x class (image processor -> ``generate`` -> ``tokenizer.decode``),
    instantiated directly with the model, tokenizer and image processor; batching (DataLoader,
    ``pad_collate_fn``) is the stock ``Pipeline`` machinery.
    """
    global _PIPELINE_CLASS
    if _PIPELINE_CLASS is not None:
        return _PIPELINE_CLASS
    from transformers import Pipeline
    from transformers.image_utils import load_image

    class ImageToTextPipeline(Pipeline):
        _load_processor = False
        _load_image_processor = True
        _load_feature_extractor = False
        _load_tokenizer = True
        _pipeline_calls_generate = True

        def _sanitize_parameters(self, max_new_tokens=None, generate_kwargs=None, timeout=None):
            preprocess_params = {} if timeout is None else {"timeout": timeout}
            forward_params: dict[str, Any] = {}
            if generate_kwargs is not None or max_new_tokens is not None:
                forward_params["generate_kwargs"] = dict(generate_kwargs or {})
                if max_new_tokens is not None:
                    forward_params["generate_kwargs"]["max_new_tokens"] = max_new_tokens
            return preprocess_params, forward_params, {}

        def preprocess(self, image, timeout=None):
            image = load_image(image, timeout=timeout)  # PIL open + convert("RGB"), as in 4.x
            return self.image_processor(images=image, return_tensors="pt").to(self.dtype)

        def _forward(self, model_inputs, generate_kwargs=None):
            generate_kwargs = dict(generate_kwargs or {})
            if hasattr(self, "_prepare_generate_kwargs"):  # transformers >= 5.2x: the user's args + its defaults
                generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
            inputs = model_inputs.pop(self.model.main_input_name)
            return self.model.generate(inputs, **model_inputs, **generate_kwargs)

        def postprocess(self, model_outputs):
            return [{"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True)} for ids in model_outputs]

    _PIPELINE_CLASS = ImageToTextPipeline
    return ImageToTextPipeline


def _pipeline_dtype(device: str) -> Any:
    import torch

    return torch.float16 if device == "cuda" else torch.float32


def load_pipeline_stock(ctx: Context, system: System, out: Outcome) -> Any:
    """The 4.x way, unpatched: fails on transformers 5.x (the table shows the error)."""
    from transformers import pipeline

    started = time.perf_counter()
    pipe = pipeline("image-to-text", model=str(ctx.args.model), device=ctx.args.device,
                    dtype=_pipeline_dtype(ctx.args.device))
    out.load_s = time.perf_counter() - started
    return pipe


def load_pipeline(ctx: Context, system: System, out: Outcome) -> Any:
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    dtype = _pipeline_dtype(ctx.args.device)

    def load() -> Any:
        model = VisionEncoderDecoderModel.from_pretrained(ctx.args.model, dtype=dtype)
        return _pipeline_class()(model=model, tokenizer=AutoTokenizer.from_pretrained(ctx.args.model),
                                 image_processor=_image_processor_class().from_pretrained(ctx.args.model),
                                 device=ctx.args.device)

    out.notes.append(str(dtype).removeprefix("torch.") + ", patched ImageToTextPipeline")
    return ctx.shared("pipeline", system, load, out)


def run_pipeline(ctx: Context, system: System, r: int) -> dict[int, str]:
    items = ctx.rounds[r]
    results = system.state([str(p) for _, p in items], batch_size=system.batch,
                           generate_kwargs=_generate_kwargs(system.beams))
    return {index: res[0]["generated_text"].strip() for (index, _), res in zip(items, results)}


# --- batchcap ------------------------------------------------------------------------------------------

class _NoModel:
    """A captioner that preprocesses like the real one and generates nothing."""

    def __init__(self, captioner: Any):
        self.name, self.prepare = captioner.name, captioner.prepare

    @staticmethod
    def caption_prepared(prepared: list[Any]) -> list[str]:
        return [""] * len(prepared)


def _options(ctx: Context, system: System) -> Any:
    from batchcap.captioning import ImageOptions

    return ImageOptions(model=str(ctx.args.model), device=ctx.args.device, dtype=system.dtype,
                        num_beams=system.beams, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS,
                        batch_size=system.batch, quiet=True, overwrite=True)


def load_batchcap(ctx: Context, system: System, out: Outcome) -> Any:
    """batchcap's Captioner, one per dtype (the systems of one dtype differ only in num_beams)."""
    from batchcap.captioning import load_captioner

    captioner = ctx.shared(f"captioner-{system.dtype}", system, lambda: load_captioner(_options(ctx, system)), out)
    precision = str(captioner.dtype).removeprefix("torch.")
    out.notes.insert(0, precision + (" + bf16 autocast" if captioner.autocast is not None else ""))
    if system.kind == "url-http":
        out.notes.append(f"loopback HTTP, {ctx.args.latency * 1000:.0f} ms per request")
    if system.no_model:
        out.notes.append("no model: fetch, decode and preprocess only")
        return _NoModel(captioner)
    return captioner


def _caption(ctx: Context, system: System, inputs: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from batchcap import caption_images

    captioner = system.state
    captioner.num_beams = system.beams
    output = ctx.tmp / f"{system.name}.parquet"
    caption_images(str(inputs), str(output), options=_options(ctx, system), captioner=captioner)
    rows = pq.read_table(output).to_pylist()
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} failed rows, e.g. {failed[0].get('status')}: {failed[0].get('error')}")
    return rows


def run_batchcap(ctx: Context, system: System, r: int) -> dict[int, str]:
    index = {p.name: i for i, p in ctx.rounds[r]}
    return {index[os.path.basename(row["source"])]: row["caption"] or ""
            for row in _caption(ctx, system, ctx.dirs[r])}


# --- variants: transformers' own beam cache, bf16 weights ----------------------------------------------

def load_stock_cache(ctx: Context, system: System, out: Outcome) -> Any:
    """batchcap with ``share_cross_attention=False``: generate's own beam search cache, which projects
    the encoder states for every beam and copies the cross-attention K/V after every step."""
    from batchcap.captioning import load_captioner

    captioner = ctx.shared(f"stock-cache-{system.dtype}", system, lambda: load_captioner(_options(ctx, system)), out)
    captioner.share_cross_attention = False
    out.notes.insert(0, str(captioner.dtype).removeprefix("torch.")
                     + (" + bf16 autocast" if captioner.autocast is not None else ""))
    out.notes.append("transformers' beam cache (share_cross_attention=False)")
    return captioner


def load_bf16_weights(ctx: Context, system: System, out: Outcome) -> Any:
    """bf16 weights instead of fp32 weights + bf16 autocast (CPU): no per-op casts, half the bytes per
    decode step, but norms and softmax in bf16 too. A candidate for ``--dtype auto`` on CPUs."""
    import torch

    from batchcap.captioning import load_captioner

    def load() -> Any:
        captioner = load_captioner(_options(ctx, system))
        captioner.model.to(torch.bfloat16)
        captioner.dtype, captioner.autocast = torch.bfloat16, None
        return captioner

    captioner = ctx.shared("bf16-weights", system, load, out)
    out.notes.insert(0, "bfloat16 weights")
    return captioner


# --- URLs ----------------------------------------------------------------------------------------------

class _UrlSetup:
    """``--url-images`` items (the photos cycled), in a local and a URL manifest per round, and the server."""

    def __init__(self, ctx: Context):
        from tests.httpserver import LoopbackServer

        args = ctx.args
        self.server = LoopbackServer().start()
        self.server.latency = args.latency
        photos = [p for chunk in ctx.rounds for _, p in chunk]
        blobs = [p.read_bytes() for p in photos]
        per_round = -(-args.url_images // len(ctx.rounds))
        self.local: list[Path] = []
        self.remote: list[Path] = []
        self.urls: list[list[tuple[int, str]]] = []
        for r in range(len(ctx.rounds)):
            local, remote = ctx.tmp / f"local{r}.csv", ctx.tmp / f"urls{r}.csv"
            urls = []
            with open(local, "w", newline="") as lh, open(remote, "w", newline="") as rh:
                lw, rw = csv.writer(lh), csv.writer(rh)
                lw.writerow(["id", "path"])
                rw.writerow(["id", "url"])
                for i in range(r * per_round, min(args.url_images, (r + 1) * per_round)):
                    k = i % len(photos)
                    url = self.server.add(f"/img/{i:05d}.jpg", blobs[k], content_type="image/jpeg")
                    urls.append((i, url))
                    lw.writerow([f"u{i:05d}", str(photos[k])])
                    rw.writerow([f"u{i:05d}", url])
            self.local.append(local)
            self.remote.append(remote)
            self.urls.append(urls)

    def close(self) -> None:
        self.server.stop()


def _url_setup(ctx: Context) -> _UrlSetup:
    if ctx.url is None:
        ctx.url = _UrlSetup(ctx)
    return ctx.url


def load_url(ctx: Context, system: System, out: Outcome) -> Any:
    _url_setup(ctx)
    return load_batchcap(ctx, system, out)


def run_url(ctx: Context, system: System, r: int) -> dict[int, str]:
    manifest = ctx.url.remote[r] if system.kind == "url-http" else ctx.url.local[r]
    return {int(row["id"][1:]): row["caption"] or "" for row in _caption(ctx, system, manifest)}


def load_fetch(ctx: Context, system: System, out: Outcome) -> Any:
    from batchcap.fetch import FetchConfig, Fetcher

    _url_setup(ctx)
    out.load_s = 0.0
    out.notes.append(f"Fetcher alone, 64 threads, {ctx.args.latency * 1000:.0f} ms per request")
    return Fetcher(FetchConfig())


def run_fetch(ctx: Context, system: System, r: int) -> dict[int, str]:
    from batchcap.items import Item

    items = [Item(index=i, id=f"u{i:05d}", source=url) for i, url in ctx.url.urls[r]]
    with ThreadPoolExecutor(64) as pool:
        fetched = list(pool.map(system.state.fetch, items))
    bad = [f for f in fetched if f.status != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} failed fetches, e.g. {bad[0].error}")
    return {item.index: "" for item in items}


LOADERS = {"seed": load_seed, "pipeline-stock": load_pipeline_stock, "pipeline": load_pipeline,
           "batchcap": load_batchcap, "stock-cache": load_stock_cache, "bf16w": load_bf16_weights,
           "url-local": load_url, "url-http": load_url,
           "fetch": load_fetch}
RUNNERS = {"seed": run_seed, "pipeline": run_pipeline, "batchcap": run_batchcap, "stock-cache": run_batchcap,
           "bf16w": run_batchcap,
           "url-local": run_url, "url-http": run_url, "fetch": run_fetch}


def all_systems(args: argparse.Namespace) -> list[System]:
    auto = "fp16" if args.device == "cuda" else "bf16"
    systems = [System("seed-loop-beam4", "seed", 4), System("seed-loop-greedy", "seed", 1),
               System("pipeline-stock", "pipeline-stock", 1, batch=args.pipeline_batch)]
    systems += [System(f"pipeline-b{args.pipeline_batch}-{_beam_name(b)}", "pipeline", b, batch=args.pipeline_batch)
                for b in (1, 4)]
    sizes = args.batch_size
    for dtype, label in (("float32", "fp32"), ("auto", auto)):
        for beams in (1, 4):
            for size in sizes:
                suffix = f"-b{size}" if len(sizes) > 1 else ""
                systems.append(System(f"batchcap-{label}-{_beam_name(beams)}{suffix}", "batchcap", beams, dtype,
                                      size))
    for dtype, label in (("float32", "fp32"), ("auto", auto)):
        systems.append(System(f"stockcache-{label}-beam4", "stock-cache", 4, dtype, sizes[-1]))
    if args.device == "cpu":  # on CUDA, auto already means fp16 weights
        systems += [System(f"bf16w-{_beam_name(b)}", "bf16w", b, "float32", sizes[-1]) for b in (1, 4)]
    systems += [System("url-local", "url-local", 1, "auto", sizes[-1]),
                System("url-http", "url-http", 1, "auto", sizes[-1]),
                System("url-local-nomodel", "url-local", 1, "auto", sizes[-1], no_model=True),
                System("url-http-nomodel", "url-http", 1, "auto", sizes[-1], no_model=True),
                System("fetch-only", "fetch", 0, batch=0)]
    return systems


def _beam_name(beams: int) -> str:
    return "greedy" if beams == 1 else f"beam{beams}"


def select(systems: list[System], wanted: list[str] | None) -> list[System]:
    if not wanted:
        return systems
    unknown = [w for w in wanted if not any(s.name.startswith(w) for s in systems)]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {', '.join(s.name for s in systems)}")
    return [s for s in systems if any(s.name.startswith(w) for w in wanted)]


def bench(ctx: Context, systems: list[System]) -> list[Outcome]:
    """Load every system, then run them round by round, each round in another (rotated) order."""
    outcomes = {s.name: Outcome(s.name, s.beams, s.batch, wall_s=0.0, cpu_s=0.0) for s in systems}
    live = []
    for system in systems:
        out = outcomes[system.name]
        print(f"loading {system.name} ...", file=sys.stderr, flush=True)
        try:
            system.state = LOADERS[system.kind](ctx, system, out)
            live.append(system)
        except Exception as exc:  # noqa: BLE001 - a system that fails is its row
            _failed(out, exc)
    for r in range(len(ctx.rounds)):
        shift = r % len(live) if live else 0
        for system in live[shift:] + live[:shift]:
            out = outcomes[system.name]
            if out.error:
                continue
            started, cpu = time.perf_counter(), time.process_time()
            try:
                captions = RUNNERS[system.kind](ctx, system, r)
                _sync(ctx.args.device)
            except Exception as exc:  # noqa: BLE001
                _failed(out, exc)
                continue
            wall = time.perf_counter() - started
            out.wall_s += wall
            out.cpu_s += time.process_time() - cpu
            out.round_rates.append(len(captions) / wall)
            out.images += len(captions)
            out.captions.update(captions)
            print(f"  round {r + 1}/{len(ctx.rounds)} {system.name}: {len(captions)} images in {wall:.1f} s "
                  f"({len(captions) / wall:.3f}/s, load avg {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    for out in outcomes.values():
        out.ok = out.error is None and out.images > 0
    return list(outcomes.values())


def _failed(out: Outcome, exc: BaseException) -> None:
    traceback.print_exc()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    out.error = f"{type(exc).__name__}: {first.split('. Please')[0]}"[:300]


# ------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------

def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "cpu_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def agreement(a: Outcome, b: Outcome, tokenizer: Any) -> dict[str, Any]:
    """Position-by-position token agreement and identical-caption fraction over the images both captioned.

    The captions are re-tokenized: lossless with the bench's word-level vocabulary (16 tokens each).
    """
    common = sorted(set(a.captions) & set(b.captions))
    same_tokens = total = same = 0
    for i in common:
        x, y = a.captions[i], b.captions[i]
        tx, ty = (tokenizer(t, add_special_tokens=False).input_ids for t in (x, y))
        total += max(len(tx), len(ty))
        same_tokens += sum(p == q for p, q in zip(tx, ty))
        same += x == y
    return {"a": a.system, "b": b.system, "images": len(common),
            "token_agreement": same_tokens / total if total else None,
            "identical_captions": same / len(common) if common else None}


def agreements(outcomes: list[Outcome], tokenizer: Any) -> list[dict[str, Any]]:
    ok = {o.system: o for o in outcomes if o.ok}
    pairs = []
    for name in ok:  # reduced precision vs fp32 at the same beams and batch
        if name.startswith("batchcap-") and not name.startswith("batchcap-fp32-"):
            pairs.append(("batchcap-fp32-" + name.split("-", 2)[2], name))
    for name in ok:  # the shared cross-attention must not change a caption; bf16 weights are compared with fp32
        if name.startswith("bf16w-"):
            pairs.append(("batchcap-fp32-" + name.removeprefix("bf16w-"), name))
        elif name.startswith("stockcache-"):
            pairs.append(("batchcap-" + name.removeprefix("stockcache-"), name))
    for beams in ("greedy", "beam4"):  # batchcap and the pipeline compute what the seed loop does
        ref = f"seed-loop-{beams}"
        pairs += [(ref, n) for n in ok if n.startswith(("batchcap-fp32-", "pipeline-b")) and f"-{beams}" in n]
    return [agreement(ok[a], ok[b], tokenizer) for a, b in pairs if a in ok and b in ok]


def _fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def table(outcomes: list[Outcome]) -> str:
    ref = next((o for o in outcomes if o.system == REFERENCE and o.ok), None)
    pipes = {o.beams: o for o in outcomes if o.system.startswith("pipeline-b") and o.ok}
    lines = ["| system | beams | batch | images | images/s (median of rounds) | images/s (all) | vs seed-loop-beam4 "
             "| vs pipeline, same beams | CPU s/image | load s | notes |", "|---" * 11 + "|"]
    for o in outcomes:
        rate = o.median_rate
        vs_ref = rate / ref.median_rate if rate and ref else None
        model_run = o.system.startswith(("batchcap", "pipeline", "seed", "stockcache", "bf16w"))
        pipe = pipes.get(o.beams) if model_run else None
        vs_pipe = rate / pipe.median_rate if rate and pipe else None
        notes = "; ".join(o.notes) if o.ok else f"FAILED: {o.error}"
        lines.append(f"| {o.system} | {o.beams or '-'} | {o.batch or '-'} | {o.images} | {_fmt(rate)} | "
                     f"{_fmt(o.images_per_s)} | {_fmt(vs_ref, 2, 'x')} | {_fmt(vs_pipe, 2, 'x')} | "
                     f"{_fmt(o.cpu_per_image, 2)} | {_fmt(o.load_s, 1)} | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=64, help="distinct photos to caption (default 64)")
    parser.add_argument("--seed-images", type=int, default=0,
                        help="the seed loops caption only N of them (spread over the rounds; default: all)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="slices of the images; every system runs on each slice in turn (default 4)")
    parser.add_argument("--systems", nargs="+", help="names or name prefixes (default: all)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16],
                        help="batchcap's batch size; several values give one system each (default 16)")
    parser.add_argument("--pipeline-batch", type=int, default=8, help="the pipeline's batch_size (default 8)")
    parser.add_argument("--url-images", type=int, default=256, help="items of the URL runs (photos cycled)")
    parser.add_argument("--latency", type=float, default=0.05, help="loopback server latency per request, s")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="a VisionEncoderDecoder directory (default: the random one, built once and cached)")
    parser.add_argument("--json", type=Path, help="write every figure and caption here")
    args = parser.parse_args(argv)
    args.rounds = max(1, min(args.rounds, args.images))

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here")
    systems = select(all_systems(args), args.systems)
    if args.model == DEFAULT_MODEL:
        build_model(args.model)
    info = machine(args.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = make_images(folder, args.images)
        per_round = -(-len(paths) // args.rounds)
        rounds, dirs = [], []
        for r in range(args.rounds):
            chunk = list(enumerate(paths))[r * per_round:(r + 1) * per_round]
            folder_r = Path(tmp) / f"round{r}"
            folder_r.mkdir()
            for _, p in chunk:
                os.link(p, folder_r / p.name)
            rounds.append([(i, folder_r / p.name) for i, p in chunk])
            dirs.append(folder_r)
        ctx = Context(args, rounds, dirs, Path(tmp))
        started = time.perf_counter()
        try:
            outcomes = bench(ctx, systems)
        finally:
            if ctx.url is not None:
                ctx.url.close()
        total = time.perf_counter() - started

    from transformers import AutoTokenizer

    agreed = agreements(outcomes, AutoTokenizer.from_pretrained(args.model))
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads"
          f"{', native bf16' if info['cpu_bf16'] else ''}), GPU {info['gpu'] or 'none'}, device {args.device}, "
          f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']}; "
          f"load average {info.get('load_avg')} at start, {info['load_avg_end']} at the end")
    print(f"model: {args.model}, {NEW_TOKENS} new tokens forced; {args.images} photos in {args.rounds} rounds "
          f"(each round runs every system on its slice, in rotated order); whole bench {total:.0f} s")
    print()
    print(table(outcomes))
    if agreed:
        print()
        print("agreement (random weights: near-tied logits make this only a rough proxy for a trained model)")
        print()
        print("| a | b | images | same token at same position | identical captions |")
        print("|---|---|---|---|---|")
        for a in agreed:
            print(f"| {a['a']} | {a['b']} | {a['images']} | {_fmt(a['token_agreement'] * 100, 1, '%')} | "
                  f"{_fmt(a['identical_captions'] * 100, 1, '%')} |")
    if any(s.kind == "pipeline" for s in systems):
        print()
        print("pipeline patch: transformers 5.x redirects task 'image-to-text' to 'image-text-to-text', which loads "
              "AutoProcessor (a ViT+GPT-2 dir has no processor: TypeError 'Processor was loaded, but it is not an "
              "instance of ProcessorMixin') and wants text with every image; the pipeline-b* rows use 4.x's "
              "ImageToTextPipeline, ported into this script and instantiated directly with model, tokenizer and "
              "image_processor (stock Pipeline batching).")
    if args.json:
        payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "whole_bench_s": total,
                   "outcomes": [dict(asdict(o), images_per_s=o.images_per_s, median_images_per_s=o.median_rate)
                                for o in outcomes],
                   "agreement": agreed}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(o.ok or o.system == "pipeline-stock" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
