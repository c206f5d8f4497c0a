"""The preamble both fine-tunes run before their model loads, and the runtime helpers they share.

:func:`start_run` checks the options and the manifests (before anything slow), prepares OUT_DIR (the
--resume / --overwrite guard, a checkpoint swap a crash interrupted), seeds every generator and picks
device and precision; :meth:`TrainRun.load_data` then fetches, decodes and splits the manifest(s).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..inputs import InputSpec
from ..items import FatalError, Item
from ..models.common import resolve_device
from .checkpoints import prepare_out_dir, recover_dir
from .data import Example, check_inputs, load_examples, load_train_val
from .options import PRECISIONS, TrainOptions

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """One fine-tuning run after its preamble."""

    manifest: str
    out_dir: str
    options: TrainOptions
    spec: InputSpec
    device: Any
    precision: str  # fp32 | fp16 | bf16
    started: float = field(default_factory=time.time)

    def load_data(self, decode: Callable[[Item, bytes], Any], *, cache_dir: str | None = None
                  ) -> tuple[list[Example], list[Example], dict[str, Any]]:
        """(train, validation, data report): the manifest's usable rows, split, or --val-manifest's."""
        opts = self.options

        def load(path: str) -> Any:
            return load_examples(path, self.spec, decode, fetch=opts.fetch, cache_dir=cache_dir,
                                 workers=opts.workers, limit=opts.limit)

        return load_train_val(self.manifest, opts.val_manifest, opts.val_fraction, opts.seed, load)

    def elapsed(self) -> float:
        return time.time() - self.started


@dataclass
class FineTuneResult:
    """What a fine-tune returns; each adds how its best epoch was chosen."""

    out_dir: str
    history: list[dict[str, Any]]  # one row per epoch, as in history.json
    trainable_params: int
    total_params: int
    data: dict[str, Any]  # the data report of training.json (rows used and skipped, per manifest)
    wall_s: float


def start_run(manifest: str, out_dir: str, opts: TrainOptions, spec: InputSpec, *, markers: Sequence[str],
              checkpoints: Sequence[str] = ()) -> TrainRun:
    """Device and precision, manifests checked, OUT_DIR prepared (``checkpoints``: directories swapped by
    :func:`~batchcap.train.checkpoints.replace_dir`, recovered here), generators seeded."""
    started = time.time()
    device = resolve_device(opts.device)
    precision = resolve_train_precision(opts.precision, device)
    check_inputs(spec, manifest, opts.val_manifest)
    check_not_the_model(out_dir, opts)
    if opts.resume and not opts.overwrite:
        for name in checkpoints:
            recover_dir(os.path.join(out_dir, name))
    prepare_out_dir(out_dir, resume=opts.resume, overwrite=opts.overwrite, markers=markers)
    seed_everything(opts.seed)
    return TrainRun(manifest, out_dir, opts, spec, device, precision, started)


def check_not_the_model(out_dir: str, opts: TrainOptions) -> None:
    """Stop before OUT_DIR is touched when it is, or holds, a local model folder the run starts from
    (``--model``, ``--encoder``, ``--decoder``): ``--overwrite`` removed the model before loading it, and
    training writes over it."""
    out = os.path.realpath(out_dir)
    for option in ("model", "encoder", "decoder"):
        source = getattr(opts, option, None)
        if not source or not os.path.isdir(source):
            continue
        real = os.path.realpath(source)
        if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
            where = "is" if real == out else "holds"
            raise FatalError(f"output {out_dir} {where} the model the run starts from (--{option} {source}): "
                             "write the fine-tuned model to another folder")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_train_precision(spec: str, device: Any) -> str:
    """fp32, fp16 or bf16. ``auto``: bf16 on CUDA GPUs that have it, fp16 on older ones, fp32 elsewhere.
    Half precision is only used on CUDA (autocast; fp16 with a gradient scaler)."""
    import torch

    spec = (spec or "auto").lower()
    if spec not in PRECISIONS:
        raise FatalError(f"unknown precision {spec!r} (use {', '.join(PRECISIONS)})")
    if device.type != "cuda":
        if spec in ("fp16", "bf16"):
            raise FatalError(f"--precision {spec} needs a CUDA device; on {device.type} training runs in fp32")
        return "fp32"
    if spec == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if spec == "bf16" and not torch.cuda.is_bf16_supported():
        raise FatalError("--precision bf16: this GPU has no bfloat16 support (use fp16)")
    return spec


def autocast_dtype(precision: str) -> Any:
    """The dtype CUDA autocast runs in for a training precision (None: fp32, no autocast)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
