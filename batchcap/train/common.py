"""What both fine-tuning commands share.

* :func:`load_examples`: a manifest -> ``(item, decoded)`` examples through :class:`~batchcap.inputs.Inputs`,
  a (disk-caching) :class:`~batchcap.fetch.Fetcher` and a decoder; rows that cannot be used (missing file,
  HTTP error, corrupt media, no reference, too long...) are counted, the first few logged, and skipped.
* :func:`split_examples`: a seeded train/validation split (by item, so the references of one image never
  land on both sides).
* :func:`write_history`: ``history.json``, ``history.csv`` and a PNG plot of the per-epoch numbers.
* Output-directory guard, atomic checkpoint directories, seeding, device / precision choice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ..fetch import FetchConfig, Fetcher
from ..inputs import Inputs, InputSpec, is_url
from ..items import FETCH_ERROR, FatalError, Fetched, Item, ItemError

log = logging.getLogger(__name__)

NO_REFERENCE = "no_reference"
SHOWN_ERRORS = 5  # bad rows whose message is logged one by one; the rest are only counted
HISTORY_JSON, HISTORY_CSV = "history.json", "history.csv"


# --- loading a manifest --------------------------------------------------------------------------


@dataclass
class Example:
    """One usable manifest row: the item (id, source, references) and its decoded media."""

    item: Item
    data: Any


@dataclass
class LoadReport:
    """What happened to the rows of one manifest."""

    name: str
    rows: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason (status) -> rows
    errors: list[str] = field(default_factory=list)  # the first SHOWN_ERRORS "id: message" lines

    def add_skip(self, item: Item, status: str, message: str) -> None:
        self.skipped[status] += 1
        if len(self.errors) < SHOWN_ERRORS:
            self.errors.append(f"{item.id}: {message}")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def log(self) -> None:
        if not self.n_skipped:
            log.info("%s: %d rows, all usable", self.name, self.rows)
            return
        reasons = ", ".join(f"{n} {status}" for status, n in self.skipped.most_common())
        log.warning("%s: skipped %d of %d rows (%s); first errors:", self.name, self.n_skipped, self.rows, reasons)
        for line in self.errors:
            log.warning("  %s", line)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped), "first_errors": self.errors}


class CachingFetcher:
    """A :class:`Fetcher` that keeps what it downloads in ``cache_dir`` (one file per URL, named by a hash
    of the URL), so a second epoch, a resumed run or another run on the same manifest fetches nothing.
    Local files and embedded bytes are read as they are (they are on disk already)."""

    def __init__(self, fetcher: Fetcher, cache_dir: str | None):
        self.fetcher = fetcher
        self.cache_dir = cache_dir
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def path(self, source: str) -> str | None:
        if not self.cache_dir or not is_url(source):
            return None
        return os.path.join(self.cache_dir, hashlib.sha256(source.encode("utf-8")).hexdigest()[:40])

    def fetch(self, item: Item) -> Fetched:
        path = self.path(item.source) if item.data is None else None
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return Fetched(data=f.read())
        fetched = self.fetcher.fetch(item)
        if path and fetched.data is not None:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(fetched.data)
            os.replace(tmp, path)
        return fetched


def load_examples(sources: str | Sequence[str], spec: InputSpec, decode: Callable[[Item, bytes], Any], *,
                  fetch: FetchConfig | None = None, cache_dir: str | None = None, workers: int = 8,
                  limit: int | None = None, require_references: bool = True,
                  name: str | None = None) -> tuple[list[Example], LoadReport]:
    """Fetch and decode every row of ``sources`` (manifests, files, directories) in input order.

    ``decode(item, data)`` returns the decoded media or raises :class:`ItemError`; such rows, rows whose
    fetch failed and (with ``require_references``) rows without a reference are skipped and reported.
    A source that cannot be read at all (missing manifest, unknown columns) is a :class:`FatalError`.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    inputs = Inputs(sources, spec)
    inputs.check()
    report = LoadReport(name or ", ".join(sources))
    fetcher = Fetcher(fetch or FetchConfig())
    cached = CachingFetcher(fetcher, cache_dir)

    def work(item: Item) -> Example | ItemError:
        if not item.source and item.data is None:
            return ItemError(FETCH_ERROR, "empty path in the manifest")
        if require_references and not any(r.strip() for r in item.references):
            return ItemError(NO_REFERENCE, "no reference text")
        fetched = cached.fetch(item)
        if fetched.data is None:
            return ItemError(fetched.status, fetched.error or "fetch failed")
        try:
            return Example(item, decode(item, fetched.data))
        except ItemError as exc:
            return exc

    items: Iterator[Item] = iter(inputs)
    if limit is not None:
        items = islice(items, limit)
    examples: list[Example] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for item, result in zip_items(items, pool, work, window=4 * max(1, workers)):
                report.rows += 1
                if isinstance(result, ItemError):
                    report.add_skip(item, result.status, result.message)
                else:
                    examples.append(result)
    finally:
        fetcher.close()
    report.kept = len(examples)
    report.log()
    return examples, report


def zip_items(items: Iterator[Item], pool: ThreadPoolExecutor, work: Callable[[Item], Any],
              window: int) -> Iterator[tuple[Item, Any]]:
    """``(item, work(item))`` in input order, at most ``window`` items in flight (a long manifest is never
    submitted all at once)."""
    pending: list[tuple[Item, Any]] = []
    for item in items:
        pending.append((item, pool.submit(work, item)))
        if len(pending) >= window:
            head, future = pending.pop(0)
            yield head, future.result()
    for item, future in pending:
        yield item, future.result()


def check_inputs(spec: InputSpec, manifest: str, val_manifest: str | None = None) -> None:
    """Fail early (before any model loads) on a manifest that is missing or whose columns are unknown."""
    Inputs([manifest], spec).check()
    if val_manifest:
        Inputs([val_manifest], spec).check()


def split_examples(examples: Sequence[Example], val_fraction: float,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random ``val_fraction`` of the items for validation.

    With a fraction above 0 and at least two items, validation gets at least one item and training keeps
    at least one.
    """
    n = len(examples)
    if val_fraction <= 0 or n < 2:
        return list(examples), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


def load_train_val(manifest: str, val_manifest: str | None, val_fraction: float, seed: int,
                   load: Callable[[str], tuple[list[Example], LoadReport]]) -> tuple[list[Example], list[Example],
                                                                                     dict[str, Any]]:
    """Training and validation examples: ``val_manifest`` when given, else a seeded split of ``manifest``."""
    examples, report = load(manifest)
    data_report: dict[str, Any] = {"train_manifest": report.as_dict()}
    if val_manifest:
        val, val_report = load(val_manifest)
        data_report["val_manifest"] = val_report.as_dict()
        train = examples
    else:
        train, val = split_examples(examples, val_fraction, seed)
    if not train:
        raise FatalError(f"{manifest}: no usable training rows ({report.n_skipped} skipped; see the log)")
    log.info("%d training items, %d validation items", len(train), len(val))
    data_report.update(train_items=len(train), val_items=len(val))
    return train, val, data_report


# --- history -------------------------------------------------------------------------------------


def write_history(out_dir: str, rows: Sequence[dict[str, Any]], *, losses: Sequence[str] = ("train_loss", "val_loss"),
                  metrics: Sequence[str] = (), title: str = "") -> None:
    """``history.json``, ``history.csv`` (one row per epoch) and ``loss.png`` (losses; metrics on a second
    panel) in ``out_dir``. The plot is skipped with a warning if matplotlib is missing."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, HISTORY_JSON), json.dumps(list(rows), indent=2))
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    tmp = os.path.join(out_dir, f".{HISTORY_CSV}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(out_dir, HISTORY_CSV))
    if rows:
        plot_history(os.path.join(out_dir, "loss.png"), rows, losses=losses, metrics=metrics, title=title)


def plot_history(path: str, rows: Sequence[dict[str, Any]], *, losses: Sequence[str], metrics: Sequence[str],
                 title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", os.path.basename(path))
        return
    shown_metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, 1 + bool(shown_metrics), figsize=(6 + 5 * bool(shown_metrics), 4), squeeze=False)
    panels = [(axes[0][0], losses, "loss")]
    if shown_metrics:
        panels.append((axes[0][1], shown_metrics, "metric"))
    for ax, keys, ylabel in panels:
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_history(out_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(out_dir, HISTORY_JSON)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return list(json.load(f))


# --- files ---------------------------------------------------------------------------------------


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``; an interruption leaves the old one or the new one."""
    old = f"{final_dir}.old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final_dir):
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if os.path.exists(old):
        shutil.rmtree(old)


def prepare_out_dir(out_dir: str, *, resume: bool, overwrite: bool, markers: Sequence[str]) -> None:
    """Create ``out_dir``; refuse to train into one that holds an earlier run unless --resume or --overwrite."""
    if resume and overwrite:
        raise FatalError("--resume and --overwrite exclude each other")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FatalError(f"output {out_dir} exists and is not a directory")
    found = [m for m in markers if os.path.exists(os.path.join(out_dir, m))]
    if found and overwrite:
        for marker in found:
            path = os.path.join(out_dir, marker)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif found and not resume:
        raise FatalError(f"{out_dir} already holds a training run ({', '.join(found)}): pass --resume to continue "
                         "it or --overwrite to start over")
    os.makedirs(out_dir, exist_ok=True)


# --- runtime -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


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
