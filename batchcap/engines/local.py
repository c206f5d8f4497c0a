"""The local engine: fetch threads, decode threads and the model in this process.

    items ─► [fetch threads] ─► [decode threads] ─► window (input order) ─► sorted by size ─► batches ─► model ─► rows

Fetch threads (waiting on the network or the disk, so there are many) and decode threads (CPU work:
decoding, resampling, preprocessing) run while the model runs on the main thread. Items are taken in
windows of ``batch_size * group`` input positions; a window is sorted by size (stably, so ties keep
input order) and cut into batches once all its items are loaded. Batches therefore depend on the input
alone, never on which thread finished first, nor on where an earlier run stopped: a window that an
earlier run partly did is loaded whole, its done items only to form the same batches as then (a batch
of done items is skipped, a done item's row in a batch that runs is dropped). The same input gives the
same batches and so the same rows, resumed or not. At most two windows are loading or waiting.

**The byte budget** (``JobOptions.max_inflight_bytes``) bounds the decoded items held in memory: every
decoded value (samples, features, pixels: :func:`batchcap.memory.decoded_nbytes`) counts from the end
of its decoding until its batch has been through the model. It changes when items are decoded, never
which items form a batch:

- an item of the next window is decoded ahead only while the budget has room for it (judged from the
  sizes of recent items); otherwise it waits, fetched, until the model frees memory;
- an item of the window being batched is always decoded, since its size is needed to sort the window;
  a value that does not fit is dropped, keeping only its size, and decoded again when its batch comes;
- before a batch runs, values needed furthest in the future are dropped until the batch fits; a batch
  bigger than the whole budget (one huge item) runs anyway, alone with nothing else held, so a run
  never deadlocks.

So at most ``max(budget, the largest batch)`` decoded bytes are held (see :class:`InflightStats`), at
the price of decoding some items twice when a window does not fit. Decoding threads hold their
item's data while they work, outside the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..fetch import Fetcher
from ..items import Fetched, Item
from ..job import Job, JobOptions
from ..memory import decoded_nbytes, tune_malloc
from ..stages import Loaded, Predictor, fetch_item, make_row, predict_batch, preprocess_item

log = logging.getLogger(__name__)

RECENT_SIZES = 32  # decoded sizes remembered to judge whether one more item fits ahead of need


class Watch(Protocol):
    """Told when an item starts and stops being dangerous to the process: decoding, or in the model."""

    def enter(self, item_id: str) -> None: ...

    def leave(self, item_id: str) -> None: ...


class _NoWatch:
    def enter(self, item_id: str) -> None:
        pass

    def leave(self, item_id: str) -> None:
        pass


@dataclass
class InflightStats:
    """The engine's account of decoded bytes held (waiting for the model or in it), for the summary,
    logs, tests and benchmarks. ``peak_bytes`` counts what the budget counts, reservations included."""

    budget_bytes: int | None = None
    peak_bytes: int = 0
    peak_items: int = 0
    decoded: int = 0  # decodes that gave a value
    dropped: int = 0  # values dropped to keep within the budget (each decoded again later)
    redecoded: int = 0

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stream_rows(items: Iterable[Item], job: Job, predictor: Predictor, options: JobOptions, done: set[str],
                order: dict[str, int], watch: Watch | None = None,
                stats: InflightStats | None = None) -> Iterator[dict[str, Any] | None]:
    """Yield one row per item not yet done (None for each item skipped as done). ``watch`` (the crash
    journal) hears which items are being decoded or predicted at any moment; ``stats`` (if given) gets
    the account of decoded bytes in flight. A batch of done items is skipped; a predictor with a
    ``skipped`` method is told of it where it would have run (a model that learns from the run so far,
    as Whisper's run languages do, hears again what it heard then)."""
    watch = watch or _NoWatch()
    stats = stats if stats is not None else InflightStats()
    limit = options.max_inflight_bytes if options.max_inflight_bytes and options.max_inflight_bytes > 0 else None
    stats.budget_bytes = limit
    tune_malloc()  # before the thread pools start: see memory.py
    batch_size = max(1, options.batch_size)
    window = batch_size * max(1, job.group)
    windows = _windows(items, window)
    pending: deque[list[_Slot]] = deque()  # windows being loaded, in input order
    submitted = 0  # windows handed to the loader
    job.preprocessor.setup()
    fetcher = Fetcher(options.fetch)
    budget = _Budget(limit, stats)
    loader = _Loader(job, fetcher, options, watch, budget)
    try:
        while True:
            while len(pending) < 2:
                group = next(windows, None)
                if group is None:
                    break
                for item in group:
                    order[item.id] = item.index
                todo = sum(1 for item in group if item.id not in done)
                for _ in range(len(group) - todo):
                    yield None
                if todo:  # done items come too: their sizes and batch partners make the batches (no rows)
                    pending.append([loader.submit(item, submitted, partner=item.id in done) for item in group])
                    submitted += 1
            if not pending:
                return
            take = pending.popleft()
            loader.need(take[0].window)
            ready: list[_Slot] = []
            for slot in take:  # in input order: the window does not depend on thread timing
                loaded = slot.result()
                if loaded.ok:
                    ready.append(slot)
                else:
                    slot.loaded = None
                    if not slot.partner:
                        yield make_row(job.scorer, loaded)
            ready.sort(key=lambda s: s.key)  # sizes of the first decoding: the same whatever the budget
            batches = [ready[start:start + batch_size] for start in range(0, len(ready), batch_size)]
            if job.longest_first:
                batches.reverse()
            del ready, take
            for number, batch in enumerate(batches):
                batches[number] = []
                if all(slot.partner for slot in batch):  # done by an earlier run
                    if hasattr(predictor, "skipped"):
                        predictor.skipped([slot.item.id for slot in batch])
                    loader.release(batch)
                    continue
                if any(not slot.held for slot in batch):
                    later = [slot for group in reversed(pending) for slot in reversed(group) if slot.settled()]
                    later += [slot for waiting in reversed(batches[number + 1:]) for slot in reversed(waiting)]
                    for slot in loader.redecode(batch, later):
                        loaded, slot.loaded = slot.loaded, None
                        if not slot.partner:
                            yield make_row(job.scorer, loaded)
                    batch = [slot for slot in batch if slot.loaded is not None]
                    if all(slot.partner for slot in batch):  # what is left of it was done already
                        loader.release(batch)
                        continue
                partners = {slot.item.id for slot in batch if slot.partner}
                entries = [slot.take() for slot in batch]
                for entry in entries:
                    watch.enter(entry.item.id)
                for row in predict_batch(predictor, job.scorer, entries):
                    watch.leave(row["id"])
                    if row["id"] not in partners:
                        yield row
                del entries
                loader.release(batch)
    finally:  # on Ctrl-C or an error, don't wait for queued downloads, nor for those under way
        fetcher.cancel()
        loader.shutdown()
        fetcher.close()
        log.debug("decoded bytes in flight: peak %s in %d item(s), budget %s; %d value(s) dropped and decoded "
                  "again", f"{stats.peak_bytes:,}", stats.peak_items,
                  f"{limit:,}" if limit else "none", stats.dropped)


def _windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """The input in windows of ``size`` input positions (``Item.index // size``), done items included, so
    a window holds the same items whether an earlier run did some of them or not."""
    group: list[Item] = []
    key = None
    for item in items:
        if group and (item.index // size != key or len(group) >= size):
            yield group
            group = []
        key = item.index // size
        group.append(item)
    if group:
        yield group


class _Slot:
    """One item on its way to the model. Written by the loading threads until ``future`` resolves, then
    only by the main thread."""

    __slots__ = ("item", "window", "partner", "future", "loaded", "nbytes", "key", "held")

    def __init__(self, item: Item, window: int, partner: bool = False):
        self.item = item
        self.window = window
        self.partner = partner  # done by an earlier run: loaded and batched as then, its row not kept
        self.future: Future = Future()
        self.loaded: Loaded | None = None  # its value is None while not held
        self.nbytes = 0  # decoded size, known after the first decoding
        self.key = 0.0  # the preprocessor's size: the sort key
        self.held = False  # the value is in memory and counted by the budget

    def settled(self) -> bool:
        return self.future.done() and not self.future.cancelled() and self.future.exception() is None and self.held

    def result(self) -> Loaded:
        self.future.result()
        assert self.loaded is not None
        return self.loaded

    def take(self) -> Loaded:
        assert self.loaded is not None and self.held
        return self.loaded


class _Budget:
    """Decoded bytes held, against the limit (None: no limit, only the account)."""

    def __init__(self, limit: int | None, stats: InflightStats):
        self.limit = limit
        self.stats = stats
        self.held = 0
        self.items = 0
        self._lock = threading.Lock()
        self._recent: deque[int] = deque(maxlen=RECENT_SIZES)

    def _add(self, nbytes: int, items: int) -> None:
        self.held += nbytes
        self.items += items
        if self.held > self.stats.peak_bytes:
            self.stats.peak_bytes = self.held
        self.stats.peak_items = max(self.stats.peak_items, self.items)

    def offer(self, nbytes: int) -> bool:
        """Hold a value just decoded if it fits, or if nothing else is held (one item always runs)."""
        with self._lock:
            self._recent.append(nbytes)
            if self.limit is not None and self.held > 0 and self.held + nbytes > self.limit:
                return False
            self._add(nbytes, 1)
            return True

    def reserve(self, nbytes: int, items: int, evictable: list[_Slot]) -> list[_Slot]:
        """Count values about to be decoded again for a batch that runs now, after making room for them
        from ``evictable`` (in that order); return the slots whose values the caller must drop. The batch
        is counted even where it does not fit: it runs, with nothing else held."""
        evicted: list[_Slot] = []
        with self._lock:
            for slot in evictable:
                if self.limit is None or self.held + nbytes <= self.limit:
                    break
                if slot.held:
                    self.held -= slot.nbytes
                    self.items -= 1
                    self.stats.dropped += 1
                    evicted.append(slot)
            self._add(nbytes, items)
        return evicted

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def settle(self, reserved: int, nbytes: int) -> None:
        """A reserved value was decoded again with ``nbytes`` (the same, unless the input changed)."""
        with self._lock:
            self._add(nbytes - reserved, 0)

    def release(self, nbytes: int, items: int = 1) -> None:
        with self._lock:
            self.held -= nbytes
            self.items -= items

    def room(self, running: int) -> bool:
        """Whether one more item may be decoded ahead of need: the values held, those being decoded and
        this one, each judged as large as the largest recent one, fit."""
        with self._lock:
            if self.limit is None:
                return True
            if not self._recent:
                return running == 0 and self.held == 0
            return self.held + (running + 1) * max(self._recent) <= self.limit


class _Loader:
    """Fetch in one thread pool, decode in another: a slow server never holds a decode thread, and
    decoding never holds up a download. Items of the window being batched are decoded as soon as they
    are fetched; later ones when the budget has room (see the module's docstring)."""

    def __init__(self, job: Job, fetcher: Fetcher, options: JobOptions, watch: Watch, budget: _Budget):
        self.preprocessor, self.fetcher, self.watch, self.budget = job.preprocessor, fetcher, watch, budget
        workers = max(1, options.workers)
        fetchers = options.fetch_workers or 4 * workers
        self.fetch_pool = ThreadPoolExecutor(max(1, fetchers), thread_name_prefix="batchcap-fetch")
        self.decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="batchcap-decode")
        self._lock = threading.Lock()
        self._needed = -1  # windows up to this one are decoded without waiting for room
        self._waiting: list[tuple[_Slot, Fetched]] = []  # fetched, waiting for room in the budget
        self._running = 0  # decodings under way

    # --- the first decoding of each item ------------------------------------------------------------
    def submit(self, item: Item, window: int, partner: bool = False) -> _Slot:
        slot = _Slot(item, window, partner)
        self._fetch(slot, slot.future, again=False)
        return slot

    def need(self, window: int) -> None:
        """The main thread now waits for the items of ``window``: decode them whatever the budget."""
        with self._lock:
            self._needed = max(self._needed, window)
        self._pump()

    def _fetch(self, slot: _Slot, result: Future, again: bool) -> None:
        def fetched(fut: Future) -> None:
            try:
                outcome: Fetched | Loaded = fut.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                _fail(result, exc)
                return
            if isinstance(outcome, Loaded):  # the item failed before decoding
                self._settle_failed(slot, outcome, again)
                _succeed(result)
                return
            with self._lock:
                if not again and slot.window > self._needed and not self.budget.room(self._running):
                    self._waiting.append((slot, outcome))
                    return
                self._running += 1
            self._decode(slot, outcome, result, again)

        try:
            self.fetch_pool.submit(fetch_item, self.fetcher, slot.item).add_done_callback(fetched)
        except RuntimeError as exc:  # the pool was shut down (Ctrl-C, an error elsewhere)
            _fail(result, exc)

    def _pump(self) -> None:
        """Start the waiting decodings that are needed now or fit, in input order."""
        starts: list[tuple[_Slot, Fetched]] = []
        with self._lock:
            self._waiting.sort(key=lambda waiting: waiting[0].item.index)
            keep: list[tuple[_Slot, Fetched]] = []
            for slot, fetched in self._waiting:
                if slot.window <= self._needed or self.budget.room(self._running):
                    self._running += 1
                    starts.append((slot, fetched))
                else:
                    keep.append((slot, fetched))
            self._waiting = keep
        for slot, fetched in starts:
            self._decode(slot, fetched, slot.future, again=False)

    def _decode(self, slot: _Slot, fetched: Fetched, result: Future, again: bool) -> None:
        try:
            decoding = self.decode_pool.submit(self._preprocess, slot, fetched, again)
        except RuntimeError as exc:  # the pool was shut down
            with self._lock:
                self._running -= 1
            _fail(result, exc)
            return

        def decoded(fut: Future) -> None:
            with self._lock:
                self._running -= 1
            if fut.cancelled():
                result.cancel()
            elif fut.exception() is not None:
                _fail(result, fut.exception())
            else:
                _succeed(result)
            self._pump()

        decoding.add_done_callback(decoded)

    def _preprocess(self, slot: _Slot, fetched: Fetched, again: bool) -> None:
        item = slot.item
        self.watch.enter(item.id)
        loaded = preprocess_item(self.preprocessor, item, fetched)
        self.watch.leave(item.id)  # not reached when the decoder takes the process down
        del fetched
        if not loaded.ok:
            self._settle_failed(slot, loaded, again)
            return
        nbytes = decoded_nbytes(loaded.value)
        if again:  # its room was reserved by the main thread: it is held whatever the limit
            self.budget.settle(slot.nbytes, nbytes)
            self.budget.count("redecoded")
        else:
            slot.key = self.preprocessor.size(loaded.value)
            if not self.budget.offer(nbytes):
                self.budget.count("dropped")
                loaded = dataclasses.replace(loaded, value=None)
                log.debug("%s: %s decoded bytes do not fit the budget now; decoded again for its batch",
                          item.source, f"{nbytes:,}")
        self.budget.count("decoded")
        slot.nbytes = nbytes
        slot.held = loaded.value is not None
        slot.loaded = loaded

    def _settle_failed(self, slot: _Slot, loaded: Loaded, again: bool) -> None:
        if again:  # the item changed since its first decoding (a file rewritten, a flaky server)
            self.budget.release(slot.nbytes)
        slot.loaded, slot.held, slot.nbytes = loaded, False, 0

    # --- batches --------------------------------------------------------------------------------------
    def redecode(self, batch: list[_Slot], later: list[_Slot]) -> list[_Slot]:
        """Decode again the items of ``batch`` whose values were dropped; first drop the values of
        ``later`` (those needed last first) until they fit. Return the items that failed this time."""
        missing = [slot for slot in batch if not slot.held]
        need = sum(slot.nbytes for slot in missing)
        for slot in self.budget.reserve(need, len(missing), later):
            assert slot.loaded is not None
            slot.loaded, slot.held = dataclasses.replace(slot.loaded, value=None), False
        log.debug("decoding %d item(s) again for their batch (%s bytes)", len(missing), f"{need:,}")
        futures = []
        for slot in missing:
            future: Future = Future()
            self._fetch(slot, future, again=True)
            futures.append(future)
        for future in futures:
            future.result()
        return [slot for slot in missing if slot.loaded is None or not slot.loaded.ok]

    def release(self, batch: list[_Slot]) -> None:
        """The batch's rows are out: its values leave memory and the budget."""
        freed = 0
        for slot in batch:
            if slot.held:
                freed += 1
                self.budget.release(slot.nbytes)
            slot.loaded, slot.held = None, False
        if freed:
            self._pump()

    def shutdown(self) -> None:
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for slot, _ in waiting:
            slot.future.cancel()


def _succeed(future: Future) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
