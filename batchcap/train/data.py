"""The training data of both fine-tunes: a manifest -> fetched (disk-cached), decoded examples -> train/val.

* :func:`load_examples`: a manifest -> ``(item, decoded)`` examples through :class:`~batchcap.inputs.Inputs`,
  a (disk-caching) :class:`~batchcap.fetch.Fetcher` and a decoder; rows that cannot be used (missing file,
  HTTP error, corrupt media, no reference, too long...) are counted, the first few logged, and skipped.
* :func:`split_examples`: a seeded train/validation split (by item, so the references of one image never
  land on both sides).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ..fetch import FetchConfig, Fetcher
from ..fsutil import atomic_write
from ..inputs import Inputs, InputSpec, is_url
from ..items import FETCH_ERROR, FatalError, Fetched, Item, ItemError

log = logging.getLogger(__name__)

NO_REFERENCE = "no_reference"
SHOWN_ERRORS = 5  # bad rows whose message is logged one by one; the rest are only counted


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
            try:
                os.makedirs(cache_dir, exist_ok=True)
            except OSError as exc:
                log.warning("cannot create the download cache %s (%s): downloads are not cached", cache_dir, exc)
                self.cache_dir = None

    def path(self, source: str) -> str | None:
        if not self.cache_dir or not is_url(source):
            return None
        return os.path.join(self.cache_dir, hashlib.sha256(source.encode("utf-8")).hexdigest()[:40])

    def fetch(self, item: Item) -> Fetched:
        """The cached bytes, else a fetch (cached when it worked). The cache never fails an item: an entry
        that cannot be read is fetched again, one that cannot be written is only logged. Concurrent fetches
        of one URL each write their own temporary file (atomic_write) and the last rename wins."""
        path = self.path(item.source) if item.data is None else None
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return Fetched(data=f.read())
            except OSError as exc:
                log.warning("cannot read the cached copy of %s (%s): fetching it again", item.source, exc)
        fetched = self.fetcher.fetch(item)
        if path and fetched.data is not None:
            try:
                atomic_write(path, fetched.data)
            except OSError as exc:
                log.warning("cannot cache %s in %s (%s): it will be fetched again next time", item.source,
                            self.cache_dir, exc)
        return fetched

    def forget(self, item: Item) -> None:
        """Drop ``item``'s cached bytes (they did not decode: an HTML page served with status 200, a cut
        download), so that the next run fetches it again instead of skipping it from the cache for ever."""
        path = self.path(item.source) if item.data is None else None
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)


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
            cached.forget(item)
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
    """(train, validation): a seeded random ``val_fraction`` of the items for validation, by source: rows
    of one picture or recording (a manifest with a row per caption, Flickr8k's layout) land on one side,
    and on the validation side they are one example with all their references.

    With a fraction above 0 and at least two sources, validation gets at least one and training keeps at
    least one.
    """
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(_source_key(e.item), []).append(i)
    keys = list(groups)
    if val_fraction <= 0 or len(keys) < 2:
        return list(examples), []
    n_val = min(len(keys) - 1, max(1, round(len(keys) * val_fraction)))
    random.Random(seed).shuffle(keys)
    val_keys = set(keys[:n_val])
    train = [e for e in examples if _source_key(e.item) not in val_keys]
    val = [_merged([examples[i] for i in groups[k]]) for k in groups if k in val_keys]
    return train, val


def _source_key(item: Item) -> str:
    """What one picture or recording is: its path or URL, or for bytes embedded in a manifest their hash (the
    record's ``path`` label often repeats: "image.png" on every row put the whole set on one side)."""
    if isinstance(item.data, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(item.data).hexdigest()
    return str(item.source or item.id)


def _merged(rows: list[Example]) -> Example:
    """One example of rows that share a source: the first's media, every row's references (once each)."""
    if len(rows) == 1:
        return rows[0]
    import dataclasses

    references = list(dict.fromkeys(r for e in rows for r in e.item.references))
    return Example(dataclasses.replace(rows[0].item, references=references), rows[0].data)


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
