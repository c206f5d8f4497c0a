"""``--engine ray``: the same job on Ray Data, for a cluster of GPUs (or many CPUs).

    driver: items ─► chunks of CHUNK_ITEMS ─► Ray Data ─► rows ─► ResultStore (as with the local engine)
    Ray:    [CPU tasks: fetch + decode (task.load)] ─► [actor pool, one model per replica: predict] ─► rows

The driver reads the inputs lazily and sends them in chunks (at most ``CHUNK_ITEMS`` items or
``CHUNK_BYTES`` of embedded bytes), so it never holds the whole manifest; each chunk runs as one
Ray Data pipeline and its rows stream back as they are made. What the driver keeps for the whole
run is what the local engine keeps too: ``order`` (id -> input position) and the ``done`` ids of
earlier runs, O(number of items) small strings.

Items cross Ray as pickled :class:`~batchcap.items.Item` values (id, index, source, embedded
bytes, references, carried columns); decoded items as pickled ``task.load`` results (numpy
arrays inside); rows as pickled dicts. Pickling keeps Arrow out of the schema of carried columns
(which may mix types) while Ray still moves numpy buffers cheaply.

Per-item failures never fail a block: fetch/decode errors become rows in the CPU stage
(:func:`batchcap.runner.load_item`), and a batch the model fails on is retried one item at a
time in the replica (:func:`batchcap.runner._predict`). Model replicas are restarted when their
process dies (``max_restarts``) and the batch they held is redone (``max_task_retries``); a batch
whose result never reached the driver cannot have been written, and the driver drops any row of
an item it already yielded, so no row is lost or duplicated.

Row order: rows stream back in completion order, but ``ResultStore.finalize`` sorts the final
file by input position (``order``), so ``--engine ray`` writes the same rows in the same order as
``--engine local``. Only the part files written while the run goes are in completion order.

The CPU stage needs a task to call ``load`` (Whisper's log-mel features come from its feature
extractor), so each CPU worker process builds the task once (cached for the run) with the GPU
hidden and, when the factory is a ``functools.partial`` over an options dataclass with a
``device`` field (as ``batchcap.asr`` builds it), with ``device="cpu"``. That loads the model's
weights into CPU memory once per CPU worker process: a cost of the Task protocol having no
model-free ``load``.

GPUs: a replica reserves ``--num-gpus-per-replica`` GPUs (Ray then shows it only those); with 0 it
sees none and runs on CPU (Ray would otherwise leave every GPU visible, and each replica's
``device="auto"`` would pile onto GPU 0). Each replica also reserves one CPU, so on a CPU-only
machine ``--concurrency`` must stay below its core count to leave CPUs for decoding.

Every Ray node needs batchcap (same version) and the model files installed: nothing is shipped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pickle
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..fetch import FetchConfig, Fetcher
from ..items import DECODE_ERROR, MODEL_ERROR, FatalError, Item, ItemError
from ..runner import RunConfig, Task, _predict, _row, load_item

log = logging.getLogger(__name__)

RAY_MISSING = "the ray engine needs Ray: pip install 'batchcap[ray]'"
CHUNK_ITEMS = 4096  # items per Ray Data pipeline (the driver holds one chunk)
CHUNK_BYTES = 256 * 2**20  # ... or this much embedded media, whichever comes first
LOAD_THREADS = 4  # threads per CPU task fetching + decoding (overlaps HTTP waits)
MAX_RESTARTS = 3  # a replica whose process dies is restarted this often (bounded: a crash per item can't loop)
MAX_TASK_RETRIES = 3  # ... and the batch it held redone
MISSING_RETRIES = 1  # items of a chunk that came back without a row are sent again this often

Key = tuple[int, str]  # (input index, id): what identifies an item's row in the driver


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra has no ray.data)
    except ImportError as exc:
        raise FatalError(RAY_MISSING) from exc
    return ray


def _connect(ray: Any, config: RunConfig) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = config.ray_address or None
    try:
        ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FatalError(f"cannot connect to Ray at {address or 'a local instance'}: {exc}") from exc
    return True


def _quiet_ray_data(ray: Any, config: RunConfig) -> None:
    """batchcap shows its own progress: Ray Data's bars and per-operator logs only on request."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = bool(config.progress) and not config.quiet
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def stream_rows_ray(items: Iterable[Item], task_factory: Callable[[], Task], fetch_config: FetchConfig,
                    done: set[str], config: RunConfig, order: dict[str, int]) -> Iterator[dict[str, Any] | None]:
    """The Ray counterpart of ``runner._stream``: one row per item not in ``done``, None per item that is."""
    ray = _import_ray()
    started = _connect(ray, config)
    _quiet_ray_data(ray, config)
    run = uuid.uuid4().hex  # CPU workers cache their task under this name for the run
    log.info("ray engine: %d model replica(s), %g GPU each, chunks of %d items", config.concurrency,
             config.num_gpus_per_replica, CHUNK_ITEMS)
    try:
        _check_gpus(ray, config, started)
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
                yield from _run_chunk(ray, chunk, task_factory, fetch_config, config, run)
                chunk, size = [], 0
        if chunk:
            yield from _run_chunk(ray, chunk, task_factory, fetch_config, config, run)
    finally:
        if started:
            ray.shutdown()


def _check_gpus(ray: Any, config: RunConfig, local: bool) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    need = config.num_gpus_per_replica
    if gpus and not need:
        log.warning("the Ray cluster has %g GPU(s) but replicas reserve none, so models run on CPU: "
                    "pass --num-gpus-per-replica 1 (or 0.5 for two replicas per GPU)", gpus)
    elif need and gpus < need:
        message = f"--num-gpus-per-replica {need:g}, but the Ray cluster has {gpus:g} GPU(s)"
        if local:  # nothing will add GPUs to the instance this run started: it would wait forever
            raise FatalError(f"{message} (a local Ray instance: use --num-gpus-per-replica 0 here, or "
                             "--ray-address of a cluster with GPUs)")
        log.warning("%s: the replicas wait until the cluster has GPUs (autoscaling)", message)


def _run_chunk(ray: Any, chunk: list[Item], factory: Callable[[], Task], fetch_config: FetchConfig,
               config: RunConfig, run: str) -> Iterator[dict[str, Any]]:
    pending: dict[Key, Item] = {(item.index, item.id): item for item in chunk}
    for attempt in range(MISSING_RETRIES + 1):
        if attempt:
            log.warning("%d item(s) came back from Ray without a row; sending them again", len(pending))
        for key, row in _pipeline(ray, list(pending.values()), factory, fetch_config, config, run):
            if pending.pop(key, None) is None:  # a batch done twice (a retried replica): keep the first row
                log.debug("dropping a second row for %s", key)
                continue
            yield row
        if not pending:
            return
    raise FatalError(f"{len(pending)} item(s) got no row from the Ray pipeline (e.g. {next(iter(pending))[1]}); "
                     "rows done so far are kept: run the same command again to resume")


def _pipeline(ray: Any, chunk: list[Item], factory: Callable[[], Task], fetch_config: FetchConfig,
              config: RunConfig, run: str) -> Iterator[tuple[Key, dict[str, Any]]]:
    batch_size = max(1, config.batch_size)
    records = [{"index": item.index, "id": item.id, "item": pickle.dumps(item, protocol=5)} for item in chunk]
    blocks = max(1, min(len(records), math.ceil(len(records) / batch_size)))
    ds = ray.data.from_items(records, override_num_blocks=blocks)
    ds = ds.map_batches(_load_batch, fn_args=(run, factory, fetch_config), batch_size=batch_size,
                        batch_format="numpy", num_cpus=1)
    model_stage = dict(
        fn_constructor_args=(factory, batch_size, config.num_gpus_per_replica),
        batch_size=batch_size * max(1, config.group),  # sorted by size inside, predicted batch_size at a time
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, config.concurrency)),
        # a GPU replica gets Ray's default CPU share (num_cpus with num_gpus is "experimental" in Ray Data)
        num_cpus=None if config.num_gpus_per_replica else 1, num_gpus=config.num_gpus_per_replica or None)
    try:
        with warnings.catch_warnings():  # Ray >= 2.60 calls these "ray_remote_args" deprecated, with no successor yet
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(_ModelReplica, **model_stage, max_restarts=MAX_RESTARTS,
                                max_task_retries=MAX_TASK_RETRIES)
    except TypeError:  # a Ray without them: its defaults restart replicas without bound
        ds = ds.map_batches(_ModelReplica, **model_stage)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for index, item_id, payload in zip(batch["index"], batch["id"], batch["row"]):
                yield (int(index), str(item_id)), pickle.loads(payload)
    except FatalError:
        raise
    except Exception as exc:
        raise _fatal(exc) from exc


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


# --- CPU stage: fetch + decode ---------------------------------------------------------------

_WORKER_STATE: dict[str, tuple[Task, Fetcher, ThreadPoolExecutor]] = {}


def _cpu_factory(factory: Callable[[], Task]) -> Callable[[], Task]:
    """The factory with ``device="cpu"`` where it is a partial over an options dataclass (load needs no GPU)."""
    if not isinstance(factory, functools.partial):
        return factory

    def on_cpu(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and \
                any(f.name == "device" for f in dataclasses.fields(value)):
            return dataclasses.replace(value, device="cpu")
        return value

    args = tuple(on_cpu(a) for a in factory.args)
    keywords = {k: on_cpu(v) for k, v in factory.keywords.items()}
    return functools.partial(factory.func, *args, **keywords)


def _worker_state(run: str, factory: Callable[[], Task], fetch_config: FetchConfig
                  ) -> tuple[Task, Fetcher, ThreadPoolExecutor]:
    """This process's task, fetcher and threads for the run (built on its first batch)."""
    state = _WORKER_STATE.get(run)
    if state is None:
        for _, fetcher, pool in _WORKER_STATE.values():  # an earlier run's: free its model
            fetcher.close()
            pool.shutdown(wait=False)
        _WORKER_STATE.clear()
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Ray leaves a GPU visible to zero-GPU tasks; decoding needs none
        _quiet_worker()
        state = (_cpu_factory(factory)(), Fetcher(fetch_config),
                 ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="batchcap-ray-load"))
        _WORKER_STATE[run] = state
    return state


def _load_one(task: Task, fetcher: Fetcher, item: Item) -> tuple[bool, float, bytes]:
    """(ready for the model, size, payload): the pickled (item, loaded, http_status), or the item's error row."""
    try:
        item, loaded, error, http_status = load_item(task, fetcher, item)
        if error is None:
            try:
                return True, float(task.size(loaded)), pickle.dumps((item, loaded, http_status), protocol=5)
            except Exception as exc:  # a size() or pickling bug is this item's row, like a decode bug
                log.debug("preparing %s for the model failed", item.source, exc_info=True)
                error, loaded = ItemError(DECODE_ERROR, f"{type(exc).__name__}: {exc}"), None
        return False, 0.0, pickle.dumps(_row(task, item, None, None, error, http_status), protocol=5)
    except Exception as exc:  # even building the row failed: still one row for the item
        log.debug("loading %s failed", item.source, exc_info=True)
        return False, 0.0, pickle.dumps(_bare_row(item, DECODE_ERROR, exc), protocol=5)


def _load_batch(batch: dict[str, np.ndarray], run: str, factory: Callable[[], Task],
                fetch_config: FetchConfig) -> dict[str, np.ndarray]:
    task, fetcher, pool = _worker_state(run, factory, fetch_config)  # a model that won't load fails the run
    items = [pickle.loads(payload) for payload in batch["item"]]
    loaded = list(pool.map(functools.partial(_load_one, task, fetcher), items))
    return {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "id": np.asarray(batch["id"], dtype=object),
        "ready": np.array([r for r, _, _ in loaded], dtype=bool),
        "size": np.array([s for _, s, _ in loaded], dtype=np.float64),
        "payload": _objects([p for _, _, p in loaded]),
    }


# --- model stage: one replica per actor ---------------------------------------------------------

class _ModelReplica:
    """A model replica: builds the task (model included) once, then turns decoded items into rows."""

    def __init__(self, factory: Callable[[], Task], batch_size: int, gpus: float):
        _quiet_worker()
        if not gpus:  # Ray leaves every GPU visible to a replica that reserved none: don't pile onto GPU 0
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.task = factory()
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[int, bytes] = {}
        ready: list[tuple[int, float, tuple[Item, Any, int | None]]] = []
        for position, (is_ready, size, payload) in enumerate(zip(batch["ready"], batch["size"], batch["payload"])):
            if not is_ready:
                rows[position] = payload  # an error row from the CPU stage
                continue
            try:
                ready.append((position, float(size), pickle.loads(payload)))
            except Exception as exc:
                rows[position] = pickle.dumps(_bare_row(_stub(batch, position), MODEL_ERROR, exc), protocol=5)
        ready.sort(key=lambda entry: entry[1])
        for start in range(0, len(ready), self.batch_size):
            group = ready[start:start + self.batch_size]
            for (position, _, _), row in zip(group, _predict(self.task, [entry for _, _, entry in group])):
                rows[position] = pickle.dumps(row, protocol=5)
        positions = range(len(batch["payload"]))
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "id": np.asarray(batch["id"], dtype=object),
            "row": _objects([rows[p] for p in positions]),
        }


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


def _bare_row(item: Item, status: str, exc: BaseException) -> dict[str, Any]:
    """The least row for an item whose task could not make one (a bug): id, source, status, error, order."""
    from ..output import ORDER

    return {"id": item.id, "source": item.source, "status": status, "error": f"{type(exc).__name__}: {exc}",
            ORDER: item.index}
