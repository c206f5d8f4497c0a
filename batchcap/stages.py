"""The stages of a run, public so that every engine drives the same ones.

    item ─► fetch_item ─► preprocess_item ─► (batch) ─► predict_batch ─► make_row ─► store

A job is three parts (see :class:`batchcap.job.Job`):

- a **preprocessor**, model-free and picklable: ``load(item, data)`` decodes and prepares one item
  (worker threads, Ray CPU tasks), ``size(loaded)`` orders items within a sorting window;
- a **predictor**, the model: ``predict(batch) -> list[prediction]`` (main thread, Ray replicas);
- a **scorer**, model-free: ``row(item, loaded, prediction, error)`` builds an item's row,
  ``observe(row)`` sees each row this run writes, ``finalize_table(table)`` rewrites the merged
  table (scores over the whole set), ``summarize(table, wall_time_s)`` gives the summary's figures.

Each stage turns an item's own failure into that item's row (an :class:`ItemError`); only
``FatalError`` and ``KeyboardInterrupt`` end a run.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .fetch import Fetcher
from .items import DECODE_ERROR, FETCH_ERROR, MODEL_ERROR, FatalError, Fetched, Item, ItemError
from .memory import release_free_heap
from .output import ORDER

log = logging.getLogger(__name__)


class Preprocessor(Protocol):
    """Model-free preparation of one item (decode, validate, features). Must be picklable."""

    def setup(self) -> None:
        """Load what ``load`` needs (e.g. a feature extractor), once per process, before threads use it."""

    def load(self, item: Item, data: bytes) -> Any:
        """Decode and prepare one item. Raise ItemError for a bad item."""

    def size(self, loaded: Any) -> float:
        """A cost measure used to group similar items in a batch (duration, pixels)."""


class ModelFreePreprocessor:
    """A preprocessor whose one heavy part (a feature extractor, an image processor: no weights) is
    loaded once per process, by ``setup`` or on first use, and not pickled (it loads again where the
    preprocessor is sent). Subclasses define ``load_features``."""

    def __init__(self, options: Any):
        self.options = options
        self._features: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])

    def load_features(self) -> Any:
        raise NotImplementedError

    def setup(self) -> None:
        _ = self.features

    @property
    def features(self) -> Any:
        if self._features is None:
            with self._lock:  # decode threads may ask at once; transformers' lazy imports are not thread-safe
                if self._features is None:
                    self._features = self.load_features()
        return self._features


class Predictor(Protocol):
    """The model: one prediction per loaded item, in order."""

    def predict(self, batch: list[Any]) -> list[Any]:
        ...


class Scorer(Protocol):
    """Rows, the final table's whole-set scores and the summary's figures: no model needed."""

    kind: str  # "audio" / "images": names in logs and the summary
    reserved_columns: tuple[str, ...]  # output columns; carried manifest columns may not clash

    def row(self, item: Item, loaded: Any | None, prediction: Any | None, error: ItemError | None) -> dict[str, Any]:
        """The output row of one item: its fields in order, without carried columns."""

    def finalize_table(self, table: Any) -> Any:
        """The merged table before it is written (e.g. per-row CIDEr-D over the whole set)."""

    def observe(self, row: dict[str, Any]) -> None:
        """Called with every row this run writes (in the driver, whatever the engine)."""

    def summarize(self, table: Any, wall_time_s: float) -> dict[str, Any]:
        """Figures for the summary from the final table (all rows, this run and earlier) and what
        ``observe`` saw of this run."""


@dataclass
class Loaded:
    """An item after fetch + preprocess: ready for the model, or failed with ``error``."""

    item: Item
    value: Any = None
    error: ItemError | None = None
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fetch_item(fetcher: Fetcher, item: Item) -> Fetched | Loaded:
    """The item's bytes, or its failed :class:`Loaded` when there are none."""
    if item.data is None and not item.source and not item.error:  # (an item's own error is the fetcher's to give)
        return Loaded(item, error=ItemError(FETCH_ERROR, "the manifest row has no path or URL"))
    fetched = fetcher.fetch(item)
    if fetched.status != "ok" or fetched.data is None:
        error = ItemError(fetched.status, fetched.error or "no data", fetched.http_status)
        return Loaded(item, error=error, http_status=fetched.http_status)
    return fetched


def preprocess_item(preprocessor: Preprocessor, item: Item, fetched: Fetched) -> Loaded:
    """Decode and prepare fetched bytes; a decoder's failure (even a bug) is the item's row."""
    try:
        return Loaded(item, preprocessor.load(item, fetched.data), None, fetched.http_status)
    except ItemError as exc:
        return Loaded(item, error=exc, http_status=fetched.http_status)
    except FatalError:
        raise
    except Exception as exc:  # a decoder bug must not end the run: it is this item's row
        log.debug("load failed for %s", item.source, exc_info=True)
        return Loaded(item, error=ItemError(DECODE_ERROR, f"{type(exc).__name__}: {exc}"),
                      http_status=fetched.http_status)


def load_item(preprocessor: Preprocessor, fetcher: Fetcher, item: Item) -> Loaded:
    """Fetch and preprocess one item; never raises for the item's own faults."""
    outcome = fetch_item(fetcher, item)
    return outcome if isinstance(outcome, Loaded) else preprocess_item(preprocessor, item, outcome)


def predict_batch(predictor: Predictor, scorer: Scorer, batch: list[Loaded]) -> Iterator[dict[str, Any]]:
    """Rows of a batch of loaded items; a batch the model fails on is redone one item at a time,
    so one bad item cannot take its neighbours down."""
    try:
        predictions = predictor.predict([entry.value for entry in batch])
    except (KeyboardInterrupt, FatalError):
        raise
    except Exception as exc:
        free_accelerator_memory()
        if len(batch) == 1:
            log.debug("model failed on %s", batch[0].item.source, exc_info=True)
            failed = Loaded(batch[0].item, batch[0].value, ItemError(MODEL_ERROR, f"{type(exc).__name__}: {exc}"),
                            batch[0].http_status)
            yield make_row(scorer, failed)
            return
        log.warning("batch of %d failed (%s: %s); retrying one at a time", len(batch), type(exc).__name__, exc)
        for entry in batch:
            yield from predict_batch(predictor, scorer, [entry])
        return
    release_free_heap()  # what the model freed, back to the kernel before the next batch (memory.py)
    for entry, prediction in zip(batch, predictions):
        yield make_row(scorer, entry, prediction)


def make_row(scorer: Scorer, loaded: Loaded, prediction: Any | None = None) -> dict[str, Any]:
    """The item's full row: the scorer's fields, the fetch's HTTP status, carried columns, input order."""
    row = scorer.row(loaded.item, loaded.value, prediction, loaded.error)
    if "http_status" in row and row["http_status"] is None:
        row["http_status"] = loaded.http_status
    for key, value in loaded.item.extra.items():
        row.setdefault(key, value)
    row[ORDER] = loaded.item.index
    return row


def bare_row(item: Item, status: str, exc: BaseException) -> dict[str, Any]:
    """The least row for an item whose scorer could not make one (a bug): id, source, status, error, order."""
    return {"id": item.id, "source": item.source, "status": status, "error": f"{type(exc).__name__}: {exc}",
            ORDER: item.index}


def free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
