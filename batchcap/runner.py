"""The one streaming loop shared by every job.

    items ─► [fetch threads] ─► [decode threads] ─► window sorted by size ─► batches ─► model ─► rows ─► store

Fetch threads (waiting on the network or the disk, so there are many) and decode threads (CPU work:
decoding, resampling, preprocessing; ``workers`` of them) run while the model runs on the main
thread. At most two sorting windows of items are in flight or waiting, so memory does not grow
with the input's length. Every item gives exactly one row: failures of one item (fetch, decode,
model) become its row, and a batch the model fails on is retried one item at a time so one bad
item cannot take its neighbours down.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from .fetch import FetchConfig, Fetcher
from .items import DECODE_ERROR, FETCH_ERROR, MODEL_ERROR, OK, FatalError, Item, ItemError
from .output import ORDER, ResultStore, write_summary

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a job (audio, images) plugs into the runner."""

    kind: str  # "audio" / "images": names in logs and the summary
    reserved_columns: tuple[str, ...]  # output columns; carried manifest columns may not clash

    def load(self, item: Item, data: bytes) -> Any:
        """Decode and prepare one item (worker thread). Raise ItemError for a bad item."""

    def size(self, loaded: Any) -> float:
        """A cost measure used to group similar items in a batch (duration, pixels)."""

    def predict(self, batch: list[Any]) -> list[dict[str, Any]]:
        """Run the model on a batch (main thread); one dict of output fields per item."""

    def row(self, item: Item, loaded: Any | None, result: dict[str, Any] | None,
            error: ItemError | None) -> dict[str, Any]:
        """The output row of one item: its fields in order, without carried columns."""

    def summarize(self, table: Any) -> dict[str, Any]:
        """Figures for the summary from the final table (all rows, this run and earlier)."""

    # Optional: ``finalize_table(table) -> table`` rewrites the merged table before the final file is
    # written (per-row scores that depend on the whole set, such as CIDEr-D).


@dataclass
class RunConfig:
    batch_size: int = 16
    workers: int = 8  # decode threads
    fetch_workers: int | None = None  # fetch threads; None: 4 x workers
    group: int = 4  # items are sorted by size in windows of batch_size * group
    quiet: bool = False
    progress: bool | None = None  # a bar; None: when stderr is a terminal
    log_every: float = 30.0
    flush_rows: int = 256  # rows per part file (what a crash can cost at most)
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # None/"auto": a running cluster if there is one, else a local instance
    concurrency: int = 1  # ray: model replicas (actors)
    num_gpus_per_replica: float = 0.0  # ray: GPUs each replica reserves


@dataclass
class RunResult:
    output: str
    summary_path: str
    summary: dict[str, Any]
    counts: Counter = field(default_factory=Counter)  # statuses of the rows written by this run
    skipped: int = 0  # items already done by an earlier run

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.summary["status_counts"].items() if status != OK)


def run_job(items: Iterable[Item], task: Task, output: str, *, fetch: FetchConfig | None = None,
            config: RunConfig | None = None, overwrite: bool = False, retry_failed: bool = False,
            extra_summary: dict[str, Any] | None = None,
            task_factory: Callable[[], Task] | None = None) -> RunResult:
    """Process every item into ``output`` (resuming), then write the final file and summary.

    With ``config.engine == "ray"`` the stages run on Ray Data: ``task_factory`` builds the full
    task (model included) inside each replica, and ``task`` (which may hold no model) only
    summarizes in the driver.
    """
    config = config or RunConfig()
    started = time.time()
    store = ResultStore(output, overwrite=overwrite, retry_failed=retry_failed, flush_rows=config.flush_rows)
    order: dict[str, int] = {}
    counts: Counter = Counter()
    skipped = 0
    with store:
        fetcher = Fetcher(fetch)
        estimate = getattr(items, "estimate", None)
        progress = _Progress(task.kind, config, total=estimate() if callable(estimate) else None)
        if config.engine == "ray":
            from .engines.ray_engine import stream_rows_ray

            if task_factory is None:
                raise FatalError("the ray engine needs a task factory")
            rows = stream_rows_ray(items, task_factory, fetch or FetchConfig(), store.done, config, order)
        elif config.engine == "local":
            rows = _stream(items, task, fetcher, store.done, config, order)
        else:
            raise FatalError(f"unknown engine {config.engine!r} (use local or ray)")
        try:
            for row in rows:
                if row is None:
                    skipped += 1
                    progress.update(skipped=True)
                    continue
                counts[row["status"]] += 1
                store.add(row)
                progress.update(status=row["status"])
        finally:
            progress.close()
            fetcher.close()
        table = store.finalize(order, transform=getattr(task, "finalize_table", None))
    wall = time.time() - started
    status_counts = Counter(table.column("status").to_pylist()) if table.num_rows else Counter()
    summary: dict[str, Any] = {
        "output": store.path,
        "rows": table.num_rows,
        "status_counts": dict(sorted(status_counts.items())),
        "processed_this_run": sum(counts.values()),
        "skipped_already_done": skipped,
        "wall_time_s": round(wall, 3),
        "items_per_s": round(sum(counts.values()) / wall, 3) if wall > 0 else None,
    }
    stats = getattr(items, "stats", None)
    if stats is not None and getattr(stats, "skipped_files", 0):
        summary["skipped_files"] = stats.skipped_files  # files of other types in input directories
    summary.update(extra_summary or {})
    summary.update(task.summarize(table))
    summary_path = write_summary(store.path, summary)
    return RunResult(store.path, summary_path, summary, counts, skipped)


def _stream(items: Iterable[Item], task: Task, fetcher: Fetcher, done: set[str], config: RunConfig,
            order: dict[str, int]) -> Iterator[dict[str, Any] | None]:
    """Yield one row per item not yet done (None for each item skipped as done)."""
    batch_size = max(1, config.batch_size)
    window = batch_size * max(1, config.group)
    limit = window * 2  # loaded + loading items held at once
    source = iter(items)
    exhausted = False
    in_flight: deque[Future] = deque()
    ready: list[tuple[Item, Any, int | None]] = []

    loader = _Loader(task, fetcher, config)
    try:
        while True:
            while not exhausted and len(in_flight) + len(ready) < limit:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                order[item.id] = item.index
                if item.id in done:
                    yield None
                    continue
                in_flight.append(loader.submit(item))
            if not in_flight and not ready:
                return
            finished = [f for f in in_flight if f.done()]
            if not finished and in_flight and len(ready) < window:
                wait(list(in_flight), return_when=FIRST_COMPLETED)
                finished = [f for f in in_flight if f.done()]
            for fut in finished:
                in_flight.remove(fut)
                item, loaded, error, http_status = fut.result()
                if error is not None:
                    yield _row(task, item, None, None, error, http_status)
                else:
                    ready.append((item, loaded, http_status))
            if len(ready) >= window or (ready and exhausted and not in_flight):
                ready.sort(key=lambda entry: task.size(entry[1]))
                take, ready = ready[:window], ready[window:]
                for start in range(0, len(take), batch_size):
                    yield from _predict(task, take[start:start + batch_size])
    finally:  # on Ctrl-C or an error, don't wait for queued downloads
        loader.shutdown()


Loaded = tuple[Item, Any, "ItemError | None", "int | None"]


class _Loader:
    """Fetch in one thread pool, decode in another: a slow server never holds a decode thread, and
    decoding never holds up a download. Each item's future resolves to :func:`load_item`'s tuple."""

    def __init__(self, task: Task, fetcher: Fetcher, config: RunConfig):
        self.task, self.fetcher = task, fetcher
        workers = max(1, config.workers)
        fetchers = config.fetch_workers or 4 * workers
        self.fetch_pool = ThreadPoolExecutor(max(1, fetchers), thread_name_prefix="batchcap-fetch")
        self.decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="batchcap-decode")

    def submit(self, item: Item) -> Future:
        result: Future = Future()

        def fetched(fut: Future) -> None:
            try:
                outcome = fut.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                result.set_exception(exc)
                return
            if isinstance(outcome, tuple):  # the item failed before decoding
                result.set_result(outcome)
                return
            try:
                decoding = self.decode_pool.submit(decode_item, self.task, item, outcome)
            except RuntimeError as exc:  # the pool was shut down (Ctrl-C, an error elsewhere)
                result.set_exception(exc)
                return
            decoding.add_done_callback(lambda done: _settle(result, done))

        self.fetch_pool.submit(fetch_item, self.fetcher, item).add_done_callback(fetched)
        return result

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


def fetch_item(fetcher: Fetcher, item: Item) -> Any:
    """The item's bytes (a Fetched), or load_item's tuple when it failed already."""
    if item.data is None and not item.source:
        return item, None, ItemError(FETCH_ERROR, "the manifest row has no path or URL"), None
    fetched = fetcher.fetch(item)
    if fetched.status != OK or fetched.data is None:
        error = ItemError(fetched.status, fetched.error or "no data", fetched.http_status)
        return item, None, error, fetched.http_status
    return fetched


def decode_item(task: Task, item: Item, fetched: Any) -> Loaded:
    try:
        loaded = task.load(item, fetched.data)
    except ItemError as exc:
        return item, None, exc, fetched.http_status
    except Exception as exc:  # a decoder bug must not end the run: it is this item's row
        log.debug("load failed for %s", item.source, exc_info=True)
        return item, None, ItemError(DECODE_ERROR, f"{type(exc).__name__}: {exc}"), fetched.http_status
    return item, loaded, None, fetched.http_status


def load_item(task: Task, fetcher: Fetcher, item: Item) -> Loaded:
    """Fetch and decode one item: (item, loaded, error, http_status); never raises for the item's own faults."""
    outcome = fetch_item(fetcher, item)
    return outcome if isinstance(outcome, tuple) else decode_item(task, item, outcome)


def _predict(task: Task, batch: list[tuple[Item, Any, int | None]]) -> Iterator[dict[str, Any]]:
    try:
        results = task.predict([loaded for _, loaded, _ in batch])
    except (KeyboardInterrupt, FatalError):
        raise
    except Exception as exc:
        if len(batch) == 1:
            item, loaded, http_status = batch[0]
            log.debug("model failed on %s", item.source, exc_info=True)
            _free_accelerator_memory()
            yield _row(task, item, loaded, None, ItemError(MODEL_ERROR, f"{type(exc).__name__}: {exc}"),
                       http_status)
            return
        log.warning("batch of %d failed (%s: %s); retrying one at a time", len(batch), type(exc).__name__, exc)
        _free_accelerator_memory()
        for entry in batch:
            yield from _predict(task, [entry])
        return
    for (item, loaded, http_status), result in zip(batch, results):
        yield _row(task, item, loaded, result, None, http_status)


def _row(task: Task, item: Item, loaded: Any, result: dict[str, Any] | None, error: ItemError | None,
         http_status: int | None) -> dict[str, Any]:
    row = task.row(item, loaded, result, error)
    if "http_status" in row and row["http_status"] is None:
        row["http_status"] = http_status
    for key, value in item.extra.items():
        row.setdefault(key, value)
    row[ORDER] = item.index
    return row


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Progress:
    """A tqdm bar on a terminal, a log line every ``log_every`` seconds otherwise."""

    def __init__(self, kind: str, config: RunConfig, total: int | None = None):
        self.kind = kind
        self.config = config
        self.total = total
        self.counts: Counter = Counter()
        self.skipped = 0
        self.started = self.last_log = time.monotonic()
        show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
        self.bar = None
        if show_bar and not config.quiet:
            from tqdm import tqdm

            self.bar = tqdm(desc=kind, total=total, unit=" items", dynamic_ncols=True, file=sys.stderr)

    def update(self, status: str | None = None, skipped: bool = False) -> None:
        if skipped:
            self.skipped += 1
        else:
            self.counts[status] += 1
        if self.bar is not None:
            self.bar.update(1)
            failed = sum(n for s, n in self.counts.items() if s != OK)
            if failed or self.skipped:
                self.bar.set_postfix(failed=failed, skipped=self.skipped, refresh=False)
        elif not self.config.quiet and time.monotonic() - self.last_log >= self.config.log_every:
            self.last_log = time.monotonic()
            self._log()

    def _log(self) -> None:
        done = sum(self.counts.values())
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        failed = sum(n for s, n in self.counts.items() if s != OK)
        of = f" of ~{self.total}" if self.total else ""
        log.info("%s: %d processed (%d failed), %d already done%s, %.2f items/s", self.kind, done, failed,
                 self.skipped, of, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
