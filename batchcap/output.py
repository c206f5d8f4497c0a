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
    """The run summary as JSON beside the output (``out.parquet`` -> ``out.summary.json``)."""
    base, _ = os.path.splitext(path)
    target = base + ".summary.json"
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, target)
    return target

