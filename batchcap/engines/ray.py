"""``--engine ray``: the same job on Ray, for a cluster of GPUs (or many CPUs).

    driver:    items ─► chunks ─► Ray Data CPU stage ─► block refs ─► model replicas ─► rows ─► ResultStore
    CPU tasks: fetch + preprocess (the job's model-free preprocessor) ─► blocks in the object store
    replicas:  one model each, loaded ONCE for the whole run ─► predict ─► rows (the job's scorer)

What runs where:

- The **driver** reads the inputs lazily and sends them in chunks (at most ``CHUNK_ITEMS`` items or
  ``CHUNK_BYTES`` of embedded bytes), so it never holds the whole manifest; it writes rows with the
  same store as the local engine, and the job's scorer sums up at the end. It loads no model.
- **CPU tasks** (Ray Data ``map_batches``, one CPU each) fetch and preprocess items with the job's
  preprocessor: decoding and feature extraction, no model weights (the feature extractor or image
  processor is loaded once per worker process and run). A failed item becomes its row there.
- **Model replicas** are long-lived Ray actors (``--concurrency`` of them, ``--num-gpus-per-replica``
  each), created once per run: each loads the model once, however many chunks follow, and receives
  blocks of preprocessed items by reference (the data goes from the CPU task's node to the replica
  without passing through the driver), sorts each block by size and predicts it ``batch_size`` at a
  time; a batch the model fails on is redone one item at a time (``stages.predict_batch``).

Faults: replicas are restarted when their process dies (``MAX_RESTARTS``) and the block they held is
redone (``MAX_TASK_RETRIES``); the driver drops any second row of an item and sends items that came
back without a row once more, so no row is lost or duplicated. Row order: rows stream back in
completion order, but the store writes the final file in input order, as the local engine does.

Every Ray node needs batchcap (same version) and the model files (or hub access): nothing is shipped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..fetch import FetchConfig, Fetcher
from ..items import DECODE_ERROR, MODEL_ERROR, FatalError, Item, ItemError
from ..job import Job, JobOptions
from ..stages import Loaded, Preprocessor, Scorer, bare_row, load_item, make_row, predict_batch

log = logging.getLogger(__name__)

RAY_MISSING = "the ray engine needs Ray: pip install 'batchcap[ray]'"
CHUNK_ITEMS = 4096  # items per Ray Data CPU pipeline (the driver holds one chunk)
CHUNK_BYTES = 256 * 2**20  # ... or this much embedded media, whichever comes first
LOAD_THREADS = 4  # threads per CPU task fetching + decoding (overlaps HTTP waits)
MAX_RESTARTS = 3  # a replica whose process dies is restarted this often (bounded: a crash per item can't loop)
MAX_TASK_RETRIES = 3  # ... and the block it held redone
IN_FLIGHT_PER_REPLICA = 2  # blocks sent to a replica before its first comes back (bounds the object store)
MISSING_RETRIES = 1  # items of a chunk that came back without a row are sent again this often

Key = tuple[int, str]  # (input index, id): what identifies an item's row in the driver


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra has no ray.data)
    except ImportError as exc:
        raise FatalError(RAY_MISSING) from exc
    return ray


def _connect(ray: Any, options: JobOptions) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = options.ray_address or None
    try:
        ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FatalError(f"cannot connect to Ray at {address or 'a local instance'}: {exc}") from exc
    return True


def _quiet_ray_data(ray: Any, options: JobOptions) -> None:
    """batchcap shows its own progress: Ray Data's bars and per-operator logs only on request."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = bool(options.progress) and not options.quiet
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def stream_rows(items: Iterable[Item], job: Job, options: JobOptions, done: set[str],
                order: dict[str, int]) -> Iterator[dict[str, Any] | None]:
    """One row per item not in ``done``, None per item that is (as ``engines.local.stream_rows``)."""
    ray = _import_ray()
    started = _connect(ray, options)
    _quiet_ray_data(ray, options)
    run = uuid.uuid4().hex  # CPU workers cache their preprocessor under this name for the run
    log.info("ray engine: %d model replica(s), %g GPU each, chunks of %d items", options.concurrency,
             options.num_gpus_per_replica, CHUNK_ITEMS)
    replicas = _Replicas(ray, job, options)
    try:
        _check_gpus(ray, options, started)
        chunk: list[Item] = []
        size = 0
        for item in items:
            order[item.id] = item.index
            if item.id in done:
                yield None
                continue
            chunk.append(item)
            size += len(item.data or b"")
            if len(chunk) >= CHUNK_ITEMS or size >= CHUNK_BYTES:
                yield from _run_chunk(ray, chunk, job, options, run, replicas)
                chunk, size = [], 0
        if chunk:
            yield from _run_chunk(ray, chunk, job, options, run, replicas)
    finally:
        replicas.close()
        if started:
            ray.shutdown()


def _check_gpus(ray: Any, options: JobOptions, local: bool) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    need = options.num_gpus_per_replica
    if gpus and not need:
        log.warning("the Ray cluster has %g GPU(s) but replicas reserve none, so models run on CPU: "
                    "pass --num-gpus-per-replica 1 (or 0.5 for two replicas per GPU)", gpus)
    elif need and gpus < need:
        message = f"--num-gpus-per-replica {need:g}, but the Ray cluster has {gpus:g} GPU(s)"
        if local:  # nothing will add GPUs to the instance this run started: it would wait forever
            raise FatalError(f"{message} (a local Ray instance: use --num-gpus-per-replica 0 here, or "
                             "--ray-address of a cluster with GPUs)")
        log.warning("%s: the replicas wait until the cluster has GPUs (autoscaling)", message)


def _run_chunk(ray: Any, chunk: list[Item], job: Job, options: JobOptions, run: str,
               replicas: _Replicas) -> Iterator[dict[str, Any]]:
    pending: dict[Key, Item] = {(item.index, item.id): item for item in chunk}
    for attempt in range(MISSING_RETRIES + 1):
        if attempt:
            log.warning("%d item(s) came back from Ray without a row; sending them again", len(pending))
        for key, row in _pipeline(ray, list(pending.values()), job, options, run, replicas):
            if pending.pop(key, None) is None:  # a block done twice (a retried replica): keep the first row
                log.debug("dropping a second row for %s", key)
                continue
            yield row
        if not pending:
            return
    raise FatalError(f"{len(pending)} item(s) got no row from the Ray pipeline (e.g. {next(iter(pending))[1]}); "
                     "rows done so far are kept: run the same command again to resume")


def _pipeline(ray: Any, chunk: list[Item], job: Job, options: JobOptions, run: str,
              replicas: _Replicas) -> Iterator[tuple[Key, dict[str, Any]]]:
    """The chunk's CPU stage on Ray Data; its output blocks go to the replicas by reference."""
    batch_size = max(1, options.batch_size)
    window = batch_size * max(1, job.group)  # a replica sorts each block by size: blocks of a sorting window
    records = [{"index": item.index, "id": item.id, "item": pickle.dumps(item, protocol=5)} for item in chunk]
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), math.ceil(len(records) / window))))
    ds = ds.map_batches(_load_batch, fn_args=(run, job.preprocessor, job.scorer, options.fetch),
                        batch_size=window, batch_format="numpy", num_cpus=1)
    try:
        for bundle in ds.iter_internal_ref_bundles():
            for block_ref in bundle.block_refs:
                yield from replicas.submit(block_ref)
        yield from replicas.drain()
    except FatalError:
        raise
    except Exception as exc:
        raise _fatal(exc) from exc


class _Replicas:
    """The run's model replicas: Ray actors created on first use and kept for the whole run."""

    def __init__(self, ray: Any, job: Job, options: JobOptions):
        self.ray, self.job, self.options = ray, job, options
        self.actors: list[Any] = []
        self.in_flight: list[Any] = []
        self.next = 0
        self.loads: set[tuple[int, int]] = set()  # (pid, load time in ns) of every model load seen

    def _start(self) -> None:
        gpus = self.options.num_gpus_per_replica
        remote = self.ray.remote(_ModelReplica).options(
            num_cpus=0 if gpus else 1, num_gpus=gpus or 0, max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES)
        self.actors = [remote.remote(self.job, self.options.batch_size, gpus)
                       for _ in range(max(1, self.options.concurrency))]

    def submit(self, block_ref: Any) -> Iterator[tuple[Key, dict[str, Any]]]:
        if not self.actors:
            self._start()
        actor = self.actors[self.next % len(self.actors)]
        self.next += 1
        self.in_flight.append(actor.predict_block.remote(block_ref))
        while len(self.in_flight) >= IN_FLIGHT_PER_REPLICA * len(self.actors):
            yield from self._collect(1)

    def drain(self) -> Iterator[tuple[Key, dict[str, Any]]]:
        while self.in_flight:
            yield from self._collect(1)

    def _collect(self, n: int) -> Iterator[tuple[Key, dict[str, Any]]]:
        ready, self.in_flight = self.ray.wait(self.in_flight, num_returns=n)
        for ref in ready:
            result = self.ray.get(ref)
            self.loads.add(result["replica"])
            for index, item_id, payload in zip(result["index"], result["id"], result["row"]):
                yield (int(index), str(item_id)), pickle.loads(payload)

    def close(self) -> None:
        if self.actors:
            log.info("ray engine: %d model load(s) in %d replica(s) for the whole run", len(self.loads),
                     len(self.actors))
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self.in_flight = [], []


def _fatal(exc: BaseException) -> FatalError:
    """One line for a failed Ray pipeline: the FatalError inside it (e.g. a model that won't load) if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, FatalError) and str(current).strip():  # maybe a RayTaskError(FatalError): a traceback
            return FatalError(str(current).strip().splitlines()[-1].split("FatalError:", 1)[-1].strip())
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    text = str(exc).strip().splitlines()
    fatal = next((line for line in reversed(text) if "FatalError:" in line), None)
    if fatal:  # the error only survived as text (a remote traceback)
        return FatalError(fatal.split("FatalError:", 1)[1].strip())
    log.debug("ray pipeline failed", exc_info=exc)
    return FatalError(f"the Ray pipeline failed: {type(exc).__name__}: {text[-1] if text else ''}; "
                      "rows done so far are kept: run the same command again to resume")


# --- CPU stage: fetch + preprocess, no model -----------------------------------------------------

_WORKER_STATE: dict[str, tuple[Preprocessor, Fetcher, ThreadPoolExecutor]] = {}


def _worker_state(run: str, preprocessor: Preprocessor, fetch_config: FetchConfig
                  ) -> tuple[Preprocessor, Fetcher, ThreadPoolExecutor]:
    """This process's preprocessor, fetcher and threads for the run (kept from its first batch)."""
    state = _WORKER_STATE.get(run)
    if state is None:
        for _, fetcher, pool in _WORKER_STATE.values():  # an earlier run's
            fetcher.close()
            pool.shutdown(wait=False)
        _WORKER_STATE.clear()
        _quiet_worker()
        preprocessor.setup()
        state = (preprocessor, Fetcher(fetch_config),
                 ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="batchcap-ray-load"))
        _WORKER_STATE[run] = state
    return state


def _load_one(preprocessor: Preprocessor, scorer: Scorer, fetcher: Fetcher, item: Item) -> tuple[bool, float, bytes]:
    """(ready for the model, size, payload): the pickled Loaded, or the item's error row."""
    try:
        loaded = load_item(preprocessor, fetcher, item)
        if loaded.ok:
            try:
                return True, float(preprocessor.size(loaded.value)), pickle.dumps(loaded, protocol=5)
            except Exception as exc:  # a size() or pickling bug is this item's row, like a decode bug
                log.debug("preparing %s for the model failed", item.source, exc_info=True)
                loaded = Loaded(item, error=ItemError(DECODE_ERROR, f"{type(exc).__name__}: {exc}"),
                                http_status=loaded.http_status)
        return False, 0.0, pickle.dumps(make_row(scorer, loaded), protocol=5)
    except Exception as exc:  # even building the row failed: still one row for the item
        log.debug("loading %s failed", item.source, exc_info=True)
        return False, 0.0, pickle.dumps(bare_row(item, DECODE_ERROR, exc), protocol=5)


def _load_batch(batch: dict[str, np.ndarray], run: str, preprocessor: Preprocessor, scorer: Scorer,
                fetch_config: FetchConfig) -> dict[str, np.ndarray]:
    preprocessor, fetcher, pool = _worker_state(run, preprocessor, fetch_config)
    items = [pickle.loads(payload) for payload in batch["item"]]
    loaded = list(pool.map(functools.partial(_load_one, preprocessor, scorer, fetcher), items))
    return {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "id": np.asarray(batch["id"], dtype=object),
        "ready": np.array([r for r, _, _ in loaded], dtype=bool),
        "size": np.array([s for _, s, _ in loaded], dtype=np.float64),
        "payload": _objects([p for _, _, p in loaded]),
    }


# --- model replicas --------------------------------------------------------------------------------

class _ModelReplica:
    """One model for the whole run: blocks of preprocessed items in, rows out."""

    def __init__(self, job: Job, batch_size: int, gpus: float):
        _quiet_worker()
        if not gpus:  # Ray leaves every GPU visible to an actor that reserved none: don't pile onto GPU 0
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        started = time.time()
        self.job = job
        self.predictor = job.load_predictor()
        self.identity = (os.getpid(), time.time_ns())
        self.batch_size = batch_size
        log.info("model replica (pid %d) loaded in %.1f s", os.getpid(), time.time() - started)

    def predict_block(self, block: Any) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        batch = BlockAccessor.for_block(block).to_batch_format("numpy")
        rows: dict[int, bytes] = {}
        ready: list[tuple[int, float, Loaded]] = []
        for position, (is_ready, size, payload) in enumerate(zip(batch["ready"], batch["size"], batch["payload"])):
            if not is_ready:
                rows[position] = payload  # an error row from the CPU stage
                continue
            try:
                ready.append((position, float(size), pickle.loads(payload)))
            except Exception as exc:
                rows[position] = pickle.dumps(bare_row(_stub(batch, position), MODEL_ERROR, exc), protocol=5)
        ready.sort(key=lambda entry: entry[1])  # stable: ties keep input order
        for start in range(0, len(ready), self.batch_size):
            group = ready[start:start + self.batch_size]
            rows_out = predict_batch(self.predictor, self.job.scorer, [loaded for _, _, loaded in group])
            for (position, _, _), row in zip(group, rows_out):
                rows[position] = pickle.dumps(row, protocol=5)
        return {"index": [int(i) for i in batch["index"]], "id": [str(i) for i in batch["id"]],
                "row": [rows[p] for p in range(len(batch["payload"]))], "replica": self.identity}


def _quiet_worker() -> None:
    """No model-loading progress bars from every worker in the driver's log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _stub(batch: dict[str, np.ndarray], position: int) -> Item:
    return Item(int(batch["index"][position]), str(batch["id"][position]), "")
