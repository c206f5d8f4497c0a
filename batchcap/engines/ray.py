"""``--engine ray``: the same job on Ray, for a cluster of GPUs (or many CPUs).

    driver:    items ─► windows (input order) ─► CPU tasks (a batch each) ─► refs ─► a replica ─► rows ─► ResultStore
    CPU tasks: fetch + preprocess (the job's model-free preprocessor) ─► loaded items in the object store
    replicas:  one model each, loaded ONCE for the whole run ─► sort the window by size ─► predict ─► rows

What runs where:

- The **driver** reads the inputs lazily and cuts the items not done yet into windows of
  ``batch_size * group`` input positions, as the local engine does (which also loads a partly done
  window's done items as batch partners; Ray does not, so a resumed Ray run may batch differently);
  it keeps a few windows in flight per replica, so it never holds the whole manifest. It writes rows
  with the same store as the local engine, and the job's scorer sums up at the end. It loads no model.
- **CPU tasks** (Ray tasks, one CPU each, ``batch_size`` items each, spread over the cluster) fetch
  and preprocess items with the job's preprocessor: decoding and feature extraction, no model
  weights (the feature extractor or image processor is loaded once per worker process). A failed item
  becomes its row there. Their results stay in the object store of the node that made them.
- **Model replicas** are long-lived Ray actors (``--concurrency`` of them, ``--num-gpus-per-replica``
  each), created once per run: each loads the model once, however many windows follow. A window goes
  to one replica as the references of its CPU tasks' results (the data goes from the CPU tasks' nodes
  to the replica without passing through the driver); the replica sorts the window by size and
  predicts it ``batch_size`` at a time (the local engine's batches, so the same rows); a batch the
  model fails on is redone one item at a time (``stages.predict_batch``). While a replica predicts one
  window the next one is preprocessed and queued, so the model does not wait between windows.
- **CPU threads**: Ray gives a worker one thread (``OMP_NUM_THREADS=1``); a replica without a GPU
  sets PyTorch's threads to its node's CPUs divided by the replicas on that node, as the local engine
  lets PyTorch use every core. Those cores are shared with the CPU tasks by design, so its OpenMP
  threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, unless the driver's environment sets it): a
  thread that spins for a core another process holds made the model several times slower on a
  loaded 2-core machine (20 clips of whisper-tiny.en: 83 s spinning, 13 s passive or one thread).

Faults: replicas are restarted when their process dies (``MAX_RESTARTS``) and the window they held is
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
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..fetch import FetchConfig, Fetcher
from ..items import DECODE_ERROR, MODEL_ERROR, FatalError, Item, ItemError
from ..job import Job, JobOptions
from ..stages import Loaded, Preprocessor, Scorer, bare_row, load_item, make_row, predict_batch

log = logging.getLogger(__name__)

RAY_MISSING = "the ray engine needs Ray: pip install 'batchcap[ray]'"
LOAD_THREADS = 4  # threads per CPU task fetching + decoding (overlaps HTTP waits)
MAX_RESTARTS = 3  # a replica whose process dies is restarted this often (bounded: a crash per item can't loop)
MAX_TASK_RETRIES = 3  # ... and the window it held redone
IN_FLIGHT_PER_REPLICA = 2  # windows sent to a replica and not yet back: one predicting, one ready behind it
MISSING_RETRIES = 1  # items of a window that came back without a row are sent again this often

Key = tuple[int, str]  # (input index, id): what identifies an item's row in the driver


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise FatalError(RAY_MISSING) from exc
    return ray


def _connect(ray: Any, options: JobOptions) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray."""
    if ray.is_initialized():
        return False
    address = options.ray_address or None
    import signal
    import threading

    own = signal.getsignal(signal.SIGTERM)
    try:  # a local instance this run starts (and stops) needs no dashboard: two processes fewer on the CPUs
        ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FatalError(f"cannot connect to Ray at {address or 'a local instance'}: {exc}") from exc
    if own is not None and threading.current_thread() is threading.main_thread():
        # ray.init installs its own SIGTERM handling in the driver (a dump, then SIGABRT: exit 134, not 143,
        # and no "Error: terminated" line); batchcap's handler flushes the rows and exits as documented
        signal.signal(signal.SIGTERM, own)
    return True


@dataclass
class _Window:
    """Consecutive items (input order) the replica sorts by size and cuts into batches, as the local engine."""

    items: list[Item]
    attempt: int = 0

    def keys(self) -> dict[Key, Item]:
        return {(item.index, item.id): item for item in self.items}


def stream_rows(items: Iterable[Item], job: Job, options: JobOptions, done: set[str],
                order: dict[str, int]) -> Iterator[dict[str, Any] | None]:
    """One row per item not in ``done``, None per item that is (as ``engines.local.stream_rows``)."""
    ray = _import_ray()
    started = _connect(ray, options)
    size = max(1, options.batch_size) * max(1, job.group)
    replicas: _Replicas | None = None
    try:
        _check_gpus(ray, options, started)
        window: list[Item] = []
        for item in items:
            order[item.id] = item.index
            if item.id in done:
                yield None
                continue
            if replicas is None:  # the models load while the first windows are read and preprocessed
                log.info("ray engine: %d model replica(s), %g GPU each, windows of %d items", options.concurrency,
                         options.num_gpus_per_replica, size)
                replicas = _Replicas(ray, job, options)
            # windows of input positions (Item.index // size), as the local engine cuts them
            if window and (item.index // size != window[0].index // size or len(window) >= size):
                yield from replicas.submit(_Window(window))
                window = []
            window.append(item)
        if window and replicas is not None:
            yield from replicas.submit(_Window(window))
        if replicas is not None:
            yield from replicas.drain()
    finally:
        if replicas is not None:
            replicas.close()
        if started:
            ray.shutdown()


def _check_gpus(ray: Any, options: JobOptions, local: bool) -> None:
    """Replicas the cluster can hold: GPUs for GPU replicas; for CPU replicas (one CPU each), a CPU left for
    the preprocessing tasks (replicas on every CPU of a local instance waited forever, without a word)."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    need = options.num_gpus_per_replica
    cpus = resources.get("CPU", 0)
    if not need and cpus and options.concurrency >= cpus:
        message = (f"--concurrency {options.concurrency} CPU replicas take all {cpus:g} CPU(s) of the Ray cluster, "
                   "leaving none for the tasks that read and decode the items")
        if local:
            raise FatalError(f"{message}: use --concurrency {max(1, int(cpus) - 1)} or fewer here")
        log.warning("%s: the run waits until the cluster has more (autoscaling)", message)
    if gpus and not need:
        log.warning("the Ray cluster has %g GPU(s) but replicas reserve none, so models run on CPU: "
                    "pass --num-gpus-per-replica 1 (or 0.5 for two replicas per GPU)", gpus)
    elif need and gpus < need:
        message = f"--num-gpus-per-replica {need:g}, but the Ray cluster has {gpus:g} GPU(s)"
        if local:  # nothing will add GPUs to the instance this run started: it would wait forever
            raise FatalError(f"{message} (a local Ray instance: use --num-gpus-per-replica 0 here, or "
                             "--ray-address of a cluster with GPUs)")
        log.warning("%s: the replicas wait until the cluster has GPUs (autoscaling)", message)


def accept_rows(window: _Window, rows: Iterable[tuple[Key, dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[Item]]:
    """A window's rows, each item's first only, and the items that came back without one."""
    pending = window.keys()
    kept = []
    for key, row in rows:
        if pending.pop(key, None) is None:  # a second row (a redone window) or a stranger: keep the first
            log.debug("dropping a second row for %s", key)
            continue
        kept.append(row)
    return kept, list(pending.values())


class _Replicas:
    """The run's model replicas (Ray actors kept for the whole run) and the windows in flight to them."""

    def __init__(self, ray: Any, job: Job, options: JobOptions):
        self.ray, self.job, self.options = ray, job, options
        self.batch = max(1, options.batch_size)
        gpus = options.num_gpus_per_replica
        count = max(1, options.concurrency)
        nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU")))
        share = 1 if gpus else math.ceil(count / nodes)  # CPU replicas spread evenly: this many per node
        extra: dict[str, Any] = {}
        if not gpus and "OMP_WAIT_POLICY" not in os.environ:  # set before the replica's process loads OpenMP
            extra["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
        remote = ray.remote(_ModelReplica).options(
            num_cpus=0 if gpus else 1, num_gpus=gpus or 0, max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES, scheduling_strategy="DEFAULT" if gpus else "SPREAD", **extra)
        self.actors = [remote.remote(job, options.batch_size, gpus, share) for _ in range(count)]
        run = uuid.uuid4().hex  # CPU workers keep their preprocessor under this name for the run
        self.context = ray.put((run, job.preprocessor, job.scorer, options.fetch))
        self.load = ray.remote(_load_part).options(num_cpus=1)
        self.in_flight: dict[Any, tuple[_Window, Any]] = {}  # result ref -> (window, actor)
        self.busy: dict[int, int] = {i: 0 for i in range(count)}
        self.retry: deque[_Window] = deque()
        self.loads: set[tuple[int, int]] = set()  # (pid, load time in ns) of every model load seen

    def submit(self, window: _Window) -> Iterator[dict[str, Any]]:
        """Send the window (its CPU tasks now; its replica gets it as soon as they are done), after
        making room; yields the rows of windows that came back meanwhile."""
        yield from self._make_room()
        self._send(window)

    def drain(self) -> Iterator[dict[str, Any]]:
        while self.in_flight or self.retry:
            if self.retry:
                yield from self._make_room()
                self._send(self.retry.popleft())
            else:
                yield from self._collect()

    def _make_room(self) -> Iterator[dict[str, Any]]:
        while len(self.in_flight) >= IN_FLIGHT_PER_REPLICA * len(self.actors):
            yield from self._collect()

    def _send(self, window: _Window) -> None:
        parts = [self.load.remote(window.items[start:start + self.batch], self.context)
                 for start in range(0, len(window.items), self.batch)]
        target = min(self.busy, key=lambda i: (self.busy[i], i))  # the replica with the fewest windows
        self.busy[target] += 1
        self.in_flight[self.actors[target].predict_window.remote(*parts)] = (window, target)

    def _collect(self) -> Iterator[dict[str, Any]]:
        try:
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1)
            results = [(ref, self.ray.get(ref)) for ref in ready]
        except FatalError:
            raise
        except Exception as exc:  # a model that won't load, a replica that died too often: one line
            raise _fatal(exc) from exc
        for ref, result in results:
            window, target = self.in_flight.pop(ref)
            self.busy[target] -= 1
            self.loads.add(result["replica"])
            rows, missing = accept_rows(window, result["rows"])
            yield from rows
            if missing:
                if window.attempt >= MISSING_RETRIES:
                    raise FatalError(f"{len(missing)} item(s) got no row from the Ray pipeline (e.g. "
                                     f"{missing[0].id}); rows done so far are kept: run the same command again "
                                     "to resume")
                log.warning("%d item(s) came back from Ray without a row; sending them again", len(missing))
                self.retry.append(_Window(missing, window.attempt + 1))

    def close(self) -> None:
        log.info("ray engine: %d model load(s) in %d replica(s) for the whole run", len(self.loads),
                 len(self.actors))
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self.in_flight = [], {}


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


# --- CPU tasks: fetch + preprocess, no model -----------------------------------------------------

_WORKER_STATE: dict[str, tuple[Preprocessor, Fetcher, ThreadPoolExecutor]] = {}

Part = list[tuple[Key, float, Any]]  # per item: its key, its size, and its Loaded (ready) or its row (failed: size -1)


def _worker_state(run: str, preprocessor: Preprocessor, fetch_config: FetchConfig
                  ) -> tuple[Preprocessor, Fetcher, ThreadPoolExecutor]:
    """This process's preprocessor, fetcher and threads for the run (kept from its first task)."""
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


def _load_one(preprocessor: Preprocessor, scorer: Scorer, fetcher: Fetcher, item: Item) -> tuple[Key, float, Any]:
    """(key, size, the Loaded ready for the model) or (key, -1, the item's row)."""
    key = (item.index, item.id)
    try:
        loaded = load_item(preprocessor, fetcher, item)
        if loaded.ok:
            try:
                return key, float(preprocessor.size(loaded.value)), loaded
            except Exception as exc:  # a size() bug is this item's row, like a decode bug
                log.debug("preparing %s for the model failed", item.source, exc_info=True)
                loaded = Loaded(item, error=ItemError(DECODE_ERROR, f"{type(exc).__name__}: {exc}"),
                                http_status=loaded.http_status)
        return key, -1.0, make_row(scorer, loaded)
    except Exception as exc:  # even building the row failed: still one row for the item
        log.debug("loading %s failed", item.source, exc_info=True)
        return key, -1.0, bare_row(item, DECODE_ERROR, exc)


def _load_part(items: list[Item], context: tuple[str, Preprocessor, Scorer, FetchConfig]) -> Part:
    """A Ray task: one batch of a window, fetched and preprocessed (the results travel as one object,
    numpy arrays out of band: no second pickling)."""
    run, preprocessor, scorer, fetch_config = context
    preprocessor, fetcher, pool = _worker_state(run, preprocessor, fetch_config)
    return list(pool.map(functools.partial(_load_one, preprocessor, scorer, fetcher), items))


# --- model replicas --------------------------------------------------------------------------------

class _ModelReplica:
    """One model for the whole run: windows of preprocessed items in, rows out."""

    def __init__(self, job: Job, batch_size: int, gpus: float, share: int = 1):
        _quiet_worker()
        if not gpus:  # Ray leaves every GPU visible to an actor that reserved none: don't pile onto GPU 0
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            _cpu_threads(share)
        started = time.time()
        self.job = job
        self.predictor = job.load_predictor()
        self.identity = (os.getpid(), time.time_ns())
        self.batch_size = max(1, batch_size)
        log.info("model replica (pid %d) loaded in %.1f s", os.getpid(), time.time() - started)

    def predict_window(self, *parts: Part) -> dict[str, Any]:
        rows: list[tuple[Key, dict[str, Any]]] = []
        ready: list[tuple[float, int, Key, Loaded]] = []
        for position, (key, size, value) in enumerate(entry for part in parts for entry in part):
            if size < 0:
                rows.append((key, value))  # an error row from the CPU task
            else:
                ready.append((size, position, key, value))
        ready.sort(key=lambda entry: (entry[0], entry[1]))  # by size; ties keep input order (as the local engine)
        starts = range(0, len(ready), self.batch_size)
        for start in (reversed(starts) if self.job.longest_first else starts):
            group = ready[start:start + self.batch_size]
            try:
                out = list(predict_batch(self.predictor, self.job.scorer, [loaded for _, _, _, loaded in group]))
            except FatalError:
                raise
            except Exception as exc:  # a scorer bug: still one row per item
                out = [bare_row(loaded.item, MODEL_ERROR, exc) for _, _, _, loaded in group]
            rows.extend((key, row) for (_, _, key, _), row in zip(group, out))
        return {"rows": rows, "replica": self.identity}


def _cpu_threads(share: int) -> None:
    """PyTorch threads for a replica without a GPU: its node's CPUs over the replicas there (Ray set 1)."""
    try:
        import ray
        import torch

        node = ray.get_runtime_context().get_node_id()
        cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("NodeID") == node), 0)
        threads = max(1, min(os.cpu_count() or 1, int(cpus or os.cpu_count() or 1)) // max(1, share))
        torch.set_num_threads(threads)
        log.debug("model replica: %d PyTorch thread(s)", threads)
    except Exception:  # noqa: BLE001 - a guess at speed only: Ray's default stays
        log.debug("could not set the replica's threads", exc_info=True)


def _quiet_worker() -> None:
    """No model-loading progress bars from every worker in the driver's log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
