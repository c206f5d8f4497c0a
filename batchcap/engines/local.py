"""The local engine: fetch threads, decode threads and the model in this process.

    items ─► [fetch threads] ─► [decode threads] ─► window (input order) ─► sorted by size ─► batches ─► model ─► rows

Fetch threads (waiting on the network or the disk, so there are many) and decode threads (CPU work:
decoding, resampling, preprocessing) run while the model runs on the main thread. Items are taken in
windows of ``batch_size * group`` consecutive items (of those not done yet); a window is sorted by
size (stably, so ties keep input order) and cut into batches once all its items are loaded. Batches
therefore depend on the input alone, never on which thread finished first: the same input gives the
same batches and so the same rows. At most two windows are loading or waiting, so memory does not
grow with the input's length.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from ..fetch import Fetcher
from ..items import Fetched, Item
from ..job import Job, JobOptions
from ..memory import tune_malloc
from ..stages import Loaded, Predictor, fetch_item, make_row, predict_batch, preprocess_item

log = logging.getLogger(__name__)


class Watch(Protocol):
    """Told when an item starts and stops being dangerous to the process: decoding, or in the model."""

    def enter(self, item_id: str) -> None: ...

    def leave(self, item_id: str) -> None: ...


class _NoWatch:
    def enter(self, item_id: str) -> None:
        pass

    def leave(self, item_id: str) -> None:
        pass


def stream_rows(items: Iterable[Item], job: Job, predictor: Predictor, options: JobOptions, done: set[str],
                order: dict[str, int], watch: Watch | None = None) -> Iterator[dict[str, Any] | None]:
    """Yield one row per item not yet done (None for each item skipped as done). ``watch`` (the crash
    journal) hears which items are being decoded or predicted at any moment."""
    watch = watch or _NoWatch()
    tune_malloc()  # before the thread pools start: see memory.py
    batch_size = max(1, options.batch_size)
    window = batch_size * max(1, job.group)
    source = iter(items)
    exhausted = False
    pending: deque[Future] = deque()  # in input order
    job.preprocessor.setup()
    fetcher = Fetcher(options.fetch)
    loader = _Loader(job, fetcher, options, watch)
    try:
        while True:
            while not exhausted and len(pending) < 2 * window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                order[item.id] = item.index
                if item.id in done:
                    yield None
                    continue
                pending.append(loader.submit(item))
            if not pending:
                return
            take = [pending.popleft() for _ in range(min(window, len(pending)))]
            ready: list[Loaded] = []
            for future in take:  # in input order: the window does not depend on thread timing
                loaded = future.result()
                if loaded.ok:
                    ready.append(loaded)
                else:
                    yield make_row(job.scorer, loaded)
            ready.sort(key=lambda entry: job.preprocessor.size(entry.value))
            for start in range(0, len(ready), batch_size):
                batch = ready[start:start + batch_size]
                for entry in batch:
                    watch.enter(entry.item.id)
                for row in predict_batch(predictor, job.scorer, batch):
                    watch.leave(row["id"])
                    yield row
    finally:  # on Ctrl-C or an error, don't wait for queued downloads
        loader.shutdown()
        fetcher.close()


class _Loader:
    """Fetch in one thread pool, preprocess in another: a slow server never holds a decode thread, and
    decoding never holds up a download. Each item's future resolves to its :class:`Loaded`."""

    def __init__(self, job: Job, fetcher: Fetcher, options: JobOptions, watch: Watch):
        self.preprocessor, self.fetcher, self.watch = job.preprocessor, fetcher, watch
        workers = max(1, options.workers)
        fetchers = options.fetch_workers or 4 * workers
        self.fetch_pool = ThreadPoolExecutor(max(1, fetchers), thread_name_prefix="batchcap-fetch")
        self.decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="batchcap-decode")

    def submit(self, item: Item) -> Future:
        result: Future = Future()

        def fetched(fut: Future) -> None:
            try:
                outcome: Fetched | Loaded = fut.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                result.set_exception(exc)
                return
            if isinstance(outcome, Loaded):  # the item failed before decoding
                result.set_result(outcome)
                return
            try:
                decoding = self.decode_pool.submit(self._preprocess, item, outcome)
            except RuntimeError as exc:  # the pool was shut down (Ctrl-C, an error elsewhere)
                result.set_exception(exc)
                return
            decoding.add_done_callback(lambda finished: _settle(result, finished))

        self.fetch_pool.submit(fetch_item, self.fetcher, item).add_done_callback(fetched)
        return result

    def _preprocess(self, item: Item, fetched: Fetched) -> Loaded:
        self.watch.enter(item.id)
        loaded = preprocess_item(self.preprocessor, item, fetched)
        self.watch.leave(item.id)  # not reached when the decoder takes the process down
        return loaded

    def shutdown(self) -> None:
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


def _settle(target: Future, source: Future) -> None:
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
