"""The one output writer: incremental part files, resume, a lock, an atomic final file.

Layout while a run is going (for ``-o out.parquet``)::

    out.parquet.lock         held (flock) by the running process
    out.parquet.parts/       part-<run>-<n>.parquet, each written to a temp name then renamed

Every ``flush_rows`` rows (or ``flush_seconds``) the buffered rows become one part file, so a
crash, Ctrl-C or ``kill -9`` loses at most the rows of the current buffer, which the next run
redoes. ``finalize`` merges the previous final file and all parts, keeps one row per id (the
newest), orders rows by input order, writes the result to a temp file beside the output and
renames it into place, then removes the parts. A rerun reads the ids already in the output and
in the parts and skips them.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

from .items import FatalError

log = logging.getLogger(__name__)

ORDER = "_order"  # hidden column: input position of the row in the run that wrote it


def output_format(path: str) -> str:
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".csv"):
        return "csv"
    raise FatalError(f"output {path}: use a .parquet or .csv file name")


class ResultStore:
    """Collects rows of one run into ``path``; one row per item id."""

    def __init__(self, path: str, *, overwrite: bool = False, retry_failed: bool = False,
                 flush_rows: int = 256, flush_seconds: float = 30.0):
        self.path = os.path.abspath(path)
        self.format = output_format(path)
        self.parts_dir = self.path + ".parts"
        self.lock_path = self.path + ".lock"
        self.overwrite = overwrite
        self.retry_failed = retry_failed
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._run = uuid.uuid4().hex[:8]
        self._parts = 0
        self._lock_fd: int | None = None
        self.done: set[str] = set()
        self.written = 0

    # --- lifecycle ----------------------------------------------------------------------------
    def open(self) -> None:
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise FatalError(f"output folder does not exist: {parent}")
        self._lock()
        if self.overwrite:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            if os.path.exists(self.path):
                os.remove(self.path)
        os.makedirs(self.parts_dir, exist_ok=True)
        self.done = self._done_ids()
        if self.done:
            log.info("resuming: %d items already done in %s", len(self.done), os.path.basename(self.path))

    def close(self) -> None:
        """Flush what is buffered and release the lock (the parts stay for a later run)."""
        self.flush()
        self._unlock()

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise FatalError(f"another batchcap run (pid {other}) is writing {self.path}; "
                             "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- resume -------------------------------------------------------------------------------
    def _existing_tables(self) -> list[Any]:
        import pyarrow as pa

        tables = []
        if os.path.exists(self.path):
            tables.append(read_table(self.path))
        if os.path.isdir(self.parts_dir):
            for name in sorted(os.listdir(self.parts_dir)):
                if name.endswith(".parquet"):
                    try:
                        tables.append(read_table(os.path.join(self.parts_dir, name)))
                    except (OSError, pa.ArrowInvalid) as exc:  # a part cut short by a crash
                        log.warning("ignoring unreadable part %s: %s", name, exc)
        return tables

    def _done_ids(self) -> set[str]:
        done: set[str] = set()
        for table in self._existing_tables():
            ids = table.column("id").to_pylist()
            if self.retry_failed and "status" in table.column_names:
                ids = [i for i, s in zip(ids, table.column("status").to_pylist()) if s == "ok"]
            done.update(str(i) for i in ids)
        return done

    # --- writing ------------------------------------------------------------------------------
    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        self.written += 1
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        import pyarrow.parquet as pq

        table = rows_to_table(self._buffer)
        name = f"part-{self._run}-{self._parts:06d}.parquet"
        tmp = os.path.join(self.parts_dir, f".{name}.tmp")
        pq.write_table(table, tmp)
        _fsync(tmp)
        os.replace(tmp, os.path.join(self.parts_dir, name))
        self._parts += 1
        self._buffer = []

    def finalize(self, order: dict[str, int] | None = None,
                 transform: Callable[[Any], Any] | None = None) -> Any:
        """Merge everything into the final file atomically; return the final table.

        ``order`` maps ids to their position in this run's input; rows of ids no longer in the
        input keep their old relative order after those. ``transform`` may rewrite the merged
        table before it is written (e.g. metrics that depend on the whole set). The merge runs in
        Arrow, so its memory is that of the table, not of Python rows.
        """
        import pyarrow as pa

        self.flush()
        tables = self._existing_tables()
        if not tables:
            table = pa.table({"id": pa.array([], pa.string())})
        else:
            table = pa.concat_tables(tables, promote_options="permissive")
        final = merge_rows(table, order or {})
        if transform is not None:
            final = transform(final)
        tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.{self._run}.tmp")
        write_table(final, tmp, self.format)
        _fsync(tmp)
        os.replace(tmp, self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return final


def merge_rows(table: Any, order: dict[str, int]) -> Any:
    """One row per id (the last one: later parts are newer), in input order, without ORDER."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("id").cast(pa.string())
    table = table.set_column(table.column_names.index("id"), "id", ids)
    seq = pa.table({"id": ids, "_seq": np.arange(table.num_rows)})
    last = seq.group_by("id", use_threads=False).aggregate([("_seq", "max")]).column("_seq_max")
    table = table.take(np.sort(last.to_numpy()))  # the newest row of each id, in write order
    ranks = pa.table({"id": pa.array(list(order), pa.string()),
                      "_rank": pa.array(list(order.values()), pa.int64())})
    position = pa.table({"id": table.column("id"), "_pos": np.arange(table.num_rows)})
    joined = position.join(ranks, "id", join_type="left outer").sort_by("_pos")
    # ids no longer in the input go after the others, keeping their relative order
    rank = pc.coalesce(joined.column("_rank"), pc.add(joined.column("_pos"), len(order)))
    table = table.take(pc.sort_indices(rank))
    if ORDER in table.column_names:
        table = table.drop_columns([ORDER])
    return table


def rows_to_table(rows: list[dict[str, Any]], like: Any = None) -> Any:
    """Rows as an Arrow table, column order of the first row, values that don't fit as text."""
    import pyarrow as pa

    columns: list[str] = []
    for row in rows:
        for c in row:
            if c not in columns:
                columns.append(c)
    if like is not None:
        columns = [c for c in like.column_names if c in columns and c != ORDER] + \
                  [c for c in columns if c not in like.column_names]
    arrays = {}
    for c in columns:
        values = [row.get(c) for row in rows]
        field_type = like.schema.field(c).type if like is not None and c in like.column_names else None
        try:
            arrays[c] = pa.array(values, type=field_type) if field_type is not None else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[c] = pa.array([None if v is None else _text(v) for v in values], pa.string())
    return pa.table(arrays)


def _text(value: Any) -> str:
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def read_table(path: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        # Read text columns as text: ids like "007" must stay "007".
        with open(path, newline="", encoding="utf-8") as f:
            names = next(csv.reader(f), [])
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in names if c in _TEXT_COLUMNS},
                                       strings_can_be_null=True)
        return pacsv.read_csv(path, convert_options=convert)
    return pq.read_table(path)


_TEXT_COLUMNS = {"id", "source", "text", "caption", "error", "reference", "language", "model", "status"}


def write_table(table: Any, path: str, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pq.write_table(table, path)
        return
    import pyarrow.csv as pacsv

    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_nested(col.type):  # lists / structs as JSON text in CSV
            col = pa.array([None if v is None else _text(v) for v in col.to_pylist()], pa.string())
        cols[name] = col
    pacsv.write_csv(pa.table(cols), path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_summary(path: str, summary: dict[str, Any]) -> str:
    """The run summary as JSON beside the output (``out.parquet`` -> ``out.summary.json``; a remote output's
    summary is an object beside it)."""
    from .fsutil import atomic_write

    base, _ = os.path.splitext(path)
    target = base + ".summary.json"
    atomic_write(target, json.dumps(summary, indent=2, default=str) + "\n")
    return target


# --- outputs in object storage (s3://, gs://, az://, hf://: batchcap/storage.py) -------------------

LOCK_REFRESH_S = 60.0  # a running writer rewrites its lock object this often ...
LOCK_STALE_S = 600.0  # ... so a lock not refreshed for this long belongs to a dead run and is taken over


def result_store(path: str, **options: Any) -> Any:
    """The store for ``path``: :class:`ResultStore` for a local file, :class:`RemoteResultStore` for a URL."""
    from . import storage

    return RemoteResultStore(path, **options) if storage.is_remote(path) else ResultStore(path, **options)


def cache_dir(url: str) -> str:
    """This machine's working folder for the remote output ``url`` ($BATCHCAP_CACHE, else ~/.cache/batchcap)."""
    import hashlib

    root = os.environ.get("BATCHCAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "batchcap")
    return os.path.join(root, "outputs", hashlib.sha256(url.encode()).hexdigest()[:20])


class RemoteResultStore:
    """``-o s3://bucket/out.parquet``: the same resume as a local output, with the data in the store.

    Layout in the store while a run is going::

        out.parquet.lock        the lock object (host, pid, run; rewritten every LOCK_REFRESH_S)
        out.parquet.parts/      part objects, each uploaded whole right after it is written locally

    At the end the final table is uploaded once (one PUT: readers see the old object or the new one)
    and the part objects are removed; the summary goes beside it (``out.summary.json``).

    A :class:`ResultStore` on a local working copy does the merging (``cache_dir(url)``): when a run
    starts, the copy is made to mirror the store (its final table and parts are downloaded, local
    parts the store does not have are dropped), so a run resumes from what the *store* holds, on any
    machine. The crash journal (``journal.py``) lives in the working copy's parts folder, so the
    protection against an item that kills the process works on the machine where the runs die.

    The lock: the object is created only if absent (a conditional write) where the store has one (S3,
    GCS, Azure, memory://). A lock of a run on this host whose process is gone, or one not refreshed
    for LOCK_STALE_S, is taken over with a warning. Where a store cannot write conditionally the lock
    only catches runs that start apart: keep one writer per output (a warning says so).
    """

    def __init__(self, url: str, *, overwrite: bool = False, retry_failed: bool = False,
                 flush_rows: int = 256, flush_seconds: float = 30.0, cache: str | None = None):
        from . import storage

        self.storage = storage
        self.path = url
        self.format = output_format(url)
        self.parts_url = url + ".parts"
        self.lock_url = url + ".lock"
        self.overwrite = overwrite
        folder = cache or cache_dir(url)
        os.makedirs(folder, exist_ok=True)
        self.local = ResultStore(os.path.join(folder, storage.basename(url) or "out." + self.format),
                                 overwrite=overwrite, retry_failed=retry_failed, flush_rows=flush_rows,
                                 flush_seconds=flush_seconds)
        self.parts_dir = self.local.parts_dir  # local: the journal's folder
        self._uploaded: set[str] = set()
        self._token = f"{uuid.uuid4().hex}"
        self._locked = False
        self._stop: Any = None
        self._heartbeat: Any = None

    def __getattr__(self, name: str) -> Any:  # done, written, counts ...: the local store's
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    # --- lifecycle ----------------------------------------------------------------------------
    def open(self) -> None:
        self._lock()
        try:
            if self.overwrite:
                for target in (self.path, *self._sidecars(self.path)):
                    self._call(self.storage.remove, target)
                self._call(self.storage.remove, self.parts_url, True)
            else:
                self._mirror()
            self.local.open()
        except BaseException:
            self._unlock()
            raise
        self._uploaded = set(self._remote_parts())

    def close(self) -> None:
        try:
            self.local.close()
            self._upload_parts()
        finally:
            self._unlock()

    def __enter__(self) -> RemoteResultStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ------------------------------------------------------------------------------
    def add(self, row: dict[str, Any]) -> None:
        self.local.add(row)
        if not getattr(self.local, "_buffer", None):  # the local store just wrote a part
            self._upload_parts()

    def flush(self) -> None:
        self.local.flush()
        self._upload_parts()

    def finalize(self, order: dict[str, int] | None = None, transform: Callable[[Any], Any] | None = None) -> Any:
        table = self.local.finalize(order, transform)
        self._call(self.storage.upload, self.local.path, self.path)  # one PUT: the final object appears whole
        for local in self._sidecars(self.local.path):
            if os.path.exists(local):
                self._call(self.storage.upload, local, self.storage.join(self.storage.parent(self.path),
                                                                       os.path.basename(local)))
        self._call(self.storage.remove, self.parts_url, True)
        self._uploaded = set()
        return table

    # --- the working copy -----------------------------------------------------------------------
    def _sidecars(self, path: str) -> list[str]:
        """Files that travel with the final table (a CSV's schema, where output.py writes one)."""
        schema = globals().get("schema_path")
        if self.format != "csv" or schema is None:
            return []
        if self.storage.is_remote(path):
            return [self.storage.join(self.storage.parent(path), os.path.basename(schema(self.storage.basename(path))))]
        return [schema(path)]

    def _remote_parts(self) -> list[str]:
        return [self.storage.basename(u) for u in self._call(lambda: list(self.storage.walk(self.parts_url)))
                if u.endswith(".parquet")]

    def _mirror(self) -> None:
        """Make the working copy hold what the store holds: its final table (and sidecars) and its parts."""
        local = self.local
        for remote, copy in ((self.path, local.path), *zip(self._sidecars(self.path), self._sidecars(local.path))):
            if self._call(self.storage.exists, remote):
                log.info("resuming from %s", remote)
                self._call(self.storage.download, remote, copy)
            elif os.path.exists(copy):
                os.remove(copy)
        remote_parts = set(self._remote_parts())
        os.makedirs(local.parts_dir, exist_ok=True)
        for name in os.listdir(local.parts_dir):
            if name.endswith(".parquet") and name not in remote_parts:
                os.remove(os.path.join(local.parts_dir, name))  # not in the store: its rows are done again
        for name in sorted(remote_parts - set(os.listdir(local.parts_dir))):
            self._call(self.storage.download, self.storage.join(self.parts_url, name),
                       os.path.join(local.parts_dir, name))

    def _upload_parts(self) -> None:
        try:
            names = os.listdir(self.local.parts_dir)
        except FileNotFoundError:
            return
        for name in sorted(names):
            if name.endswith(".parquet") and not name.startswith(".") and name not in self._uploaded:
                self._call(self.storage.upload, os.path.join(self.local.parts_dir, name),
                           self.storage.join(self.parts_url, name))
                self._uploaded.add(name)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self.storage.StorageError as exc:
            raise FatalError(exc.message) from None

    # --- the lock -----------------------------------------------------------------------------
    def _lock_record(self) -> bytes:
        import socket

        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run": self._token,
                           "refreshed": time.time()}).encode()

    def _lock(self) -> None:
        storage = self.storage
        for _ in range(3):
            try:
                created = storage.create_exclusive(self.lock_url, self._lock_record())
            except storage.NoConditionalWrite:
                log.warning("%s cannot create an object only if it is absent: the lock only catches runs that "
                            "start apart; run one writer per output", storage.scheme(self.path))
                created = not self._call(storage.exists, self.lock_url)
                if created:
                    self._call(storage.write_bytes, self.lock_url, self._lock_record())
            except storage.StorageError as exc:
                raise FatalError(f"cannot write the output lock: {exc.message}") from None
            if created and self._holder().get("run") == self._token:
                self._locked = True
                self._start_heartbeat()
                return
            if created:  # overwritten by another run in the same instant (a store without conditional writes)
                break
            holder = self._holder()
            if not self._stale(holder):
                break
            log.warning("taking over the lock %s of a run that is gone (%s, pid %s)", self.lock_url,
                        holder.get("host", "?"), holder.get("pid", "?"))
            self._call(storage.remove, self.lock_url)
        holder = self._holder()
        age = time.time() - float(holder.get("refreshed", time.time()))
        raise FatalError(f"another batchcap run ({holder.get('host', '?')}, pid {holder.get('pid', '?')}, lock "
                         f"refreshed {age:.0f} s ago) is writing {self.path}; wait for it to finish. If it is dead, "
                         f"remove {self.lock_url} (a lock not refreshed for {LOCK_STALE_S:.0f} s is taken over)")

    def _holder(self) -> dict[str, Any]:
        try:
            record = json.loads(self.storage.read_range(self.lock_url, 64 * 1024))
            return record if isinstance(record, dict) else {}
        except (self.storage.StorageError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        import socket

        if not holder:
            return True  # unreadable or removed meanwhile
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # a run on this machine that died (kill -9, OOM)
            except PermissionError:
                pass
            else:
                if holder["pid"] == os.getpid():
                    return False
        try:
            return time.time() - float(holder.get("refreshed", 0)) > LOCK_STALE_S
        except (TypeError, ValueError):
            return True

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(LOCK_REFRESH_S):
                try:
                    self.storage.write_bytes(self.lock_url, self._lock_record())
                except self.storage.StorageError as exc:
                    log.warning("cannot refresh the lock %s: %s", self.lock_url, exc.message)

        self._heartbeat = threading.Thread(target=beat, name="batchcap-lock", daemon=True)
        self._heartbeat.start()

    def _unlock(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._heartbeat.join(timeout=30)
            self._stop = self._heartbeat = None
        if self._locked:
            self._locked = False
            try:
                if self._holder().get("run") == self._token:
                    self.storage.remove(self.lock_url)
            except self.storage.StorageError as exc:
                log.warning("cannot remove the lock %s: %s", self.lock_url, exc.message)
