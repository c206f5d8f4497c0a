"""The one output writer: incremental part files, resume, a lock, an atomic final file.

Layout while a run is going (for ``-o out.parquet``)::

    out.parquet.lock         held (flock) by the running process
    out.parquet.parts/       part-<seq>-<run>.parquet, each written to a temp name then renamed

Every ``flush_rows`` rows (or ``flush_seconds``) the buffered rows become one part file, so a
crash, Ctrl-C or ``kill -9`` loses at most the rows of the current buffer, which the next run
redoes. ``seq`` continues after the highest part already there, so the parts of several
interrupted runs sort oldest first. ``finalize`` merges the previous final file and all parts
into one schema, keeps one row per id (the newest), orders rows by input order, writes the
result atomically, then removes the parts. A rerun reads the ids (only that column, and
``status`` for ``--retry-failed``) already in the output and in the parts and skips them.

A CSV output is accompanied by ``out.schema.json``, the Arrow schema of the table it holds, so a
resume reads it back as written: text stays text (``007``), list columns come back as lists.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import fcntl
import io
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from .fsutil import atomic_path, atomic_write, longest_temp_name
from .items import FatalError, valid_values

log = logging.getLogger(__name__)

ORDER = "_order"  # hidden column: input position of the row in the run that wrote it
SCHEMA_FORMAT = "batchcap-csv-schema"

_PART = re.compile(r"^part-(\d{10})-([0-9a-zA-Z]+)\.parquet$")


def output_format(path: str) -> str:
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".csv"):
        return "csv"
    raise FatalError(f"output {path}: use a .parquet or .csv file name")


def schema_path(path: str) -> str:
    """Where the Arrow schema of a CSV output is kept (``out.csv`` -> ``out.schema.json``)."""
    return os.path.splitext(path)[0] + ".schema.json"


def _reason(exc: BaseException) -> str:
    """The errno text of an OSError ("No space left on device"), else its message's first line."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):  # pyarrow's IO errors carry the errno in their text only
        match = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
        code = int(match.group(1)) if match else None
    if code:
        return os.strerror(code)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def writing(target: str) -> Iterator[str]:
    """``atomic_path(target)``, with any OSError turned into one ``FatalError`` line naming ``target``."""
    try:
        with atomic_path(target) as tmp:
            yield tmp
    except FatalError:
        raise
    except OSError as exc:
        raise FatalError(f"cannot write {target}: {_reason(exc)}") from None


def check_output(path: str, *, unlocked: bool = True) -> None:
    """Whether a local output can be written at ``path``: its folder exists, the files beside it can be
    named and (``unlocked``) no other run holds its lock; a ``FatalError`` line if not (remote outputs:
    :func:`_check_remote_output`). Run before a model loads, so that a typo in ``-o`` or a run still going
    fails at once, and again when the store opens (there the store's own exclusive lock decides)."""
    from . import storage

    if storage.is_remote(path):
        _check_remote_output(path, unlocked)
        return
    path = os.path.abspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8 in the name: Arrow cannot open it (every rerun failed)
        raise FatalError(f"the output path {path.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8, "
                         "which Arrow cannot write: give the output (and its folder) a UTF-8 name") from None
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise FatalError(f"output folder is not a folder: {parent}")
        raise FatalError(f"output folder does not exist: {parent}")
    if os.path.isdir(path):  # a dataset folder (Spark, pyarrow) named like a table: never replaced
        raise FatalError(f"{path} is a folder, not a table file: name a file such as "
                         f"{os.path.join(path, 'results' + os.path.splitext(path)[1])}, or another name beside it")
    _check_sibling_names(path)
    _check_no_twin(path)
    if unlocked:
        _check_not_locked(path)


def _twins(path: str) -> list[str]:
    """The names of the other format's result beside ``path`` (``out.parquet`` -> ``out.csv``, ``out.CSV``)."""
    stem = os.path.splitext(path)[0]
    other = ".csv" if output_format(path) == "parquet" else ".parquet"
    return [stem + other, stem + other.upper()]


def _is_result(path: str) -> bool:
    """Whether ``path`` is a batchcap result table (id and status columns); anything else (an input manifest
    ``calls.csv`` beside ``-o calls.parquet``) shares no file with the run."""
    from . import storage

    try:
        names = _remote_columns(path) if storage.is_remote(path) else table_columns(path)
    except Exception:  # noqa: BLE001 - unreadable: not a result this run would collide with
        return False
    return "id" in names and "status" in names


def _check_no_twin(path: str, is_file: Callable[[str], bool] = os.path.isfile) -> None:
    """Stop when a result of the other format with the same name is there (finished, or its parts): the two
    would share one summary, report and subtitle folder, each run overwriting (or, for subtitle files, keeping)
    the other's. A file of that name that is not a result (the run's own input manifest) is no twin."""
    for twin in _twins(path):
        if os.path.isdir(twin + ".parts") or is_file(twin) and _is_result(twin):
            stem = os.path.basename(os.path.splitext(path)[0])
            raise FatalError(f"{twin} is another result with the name of {os.path.basename(path)}: the two would "
                             f"share {stem}.summary.json, {stem}.report.html and {stem}.subtitles; write to another "
                             "name, or move that one away")


_BUCKET_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def _check_remote_output(url: str, unlocked: bool) -> None:
    """A remote output's store answers (endpoint, credentials), its bucket exists and (``unlocked``) no live
    run holds its lock: checked before a model loads, as for a local output (these were found only when the
    store opened, after the model had loaded)."""
    from urllib.parse import urlsplit

    from . import storage

    try:
        found = storage.info(url)
        if found is not None and found.get("type") == "directory":
            raise FatalError(f"{url} is a folder (a prefix of objects) in the store, not a table: name a file "
                             f"inside it, such as {url.rstrip('/')}/results.parquet")
        if found is None and storage.scheme(url) in _BUCKET_SCHEMES:
            root = f"{storage.scheme(url)}://{urlsplit(url).netloc}"
            if storage.info(root) is None:
                raise FatalError(f"the output's bucket {root} does not exist (or these credentials cannot see it)")
        _check_no_twin(url, storage.is_file)
        if unlocked:  # no lock object: no holder, which counts as stale
            holder = RemoteResultStore.lock_holder(url + ".lock")
            if not RemoteResultStore.stale(holder):
                raise FatalError(_locked_message(url, holder))
    except storage.StorageError as exc:
        raise FatalError(f"cannot reach the output {url}: {exc.message}") from None


def _locked_message(url: str, holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("refreshed", time.time()))
    return (f"another batchcap run ({holder.get('host', '?')}, pid {holder.get('pid', '?')}, lock refreshed "
            f"{age:.0f} s ago) is writing {url}; wait for it to finish. If it is dead, remove {url}.lock (a lock "
            f"not refreshed for {LOCK_STALE_S:.0f} s is taken over)")


# each kind of run's own text column: a table holding the other's and not its own is the other kind's
KIND_COLUMNS = {"audio": "text", "images": "caption"}


def check_existing_output(path: str, kind: str | None = None) -> None:
    """Stop before a model loads when ``path`` exists and is not a result this run can resume: a table
    without id / status columns (some other file named by mistake, which the run would rewrite), or the
    other kind's results (``kind``: audio or images), local or in an object store. Absent files pass."""
    from . import storage

    if storage.is_remote(path):
        try:
            if not storage.is_file(path):
                return
            names = _remote_columns(path)
        except storage.StorageError as exc:
            raise FatalError(f"cannot read the existing output {path}: {exc.message}") from None
        except ValueError as exc:
            raise FatalError(f"cannot read the existing output {path} ({_reason(exc)}); "
                             "move it away or use --overwrite") from None
    elif not os.path.isfile(path):
        return
    else:
        names = _local_columns(path)
    _check_columns(path, names, kind)


def _local_columns(path: str) -> list[str]:
    try:
        return table_columns(path)
    except (OSError, ValueError) as exc:
        raise FatalError(f"cannot read the existing output {path} ({_reason(exc)}); "
                         "move it away or use --overwrite") from None


def _remote_columns(url: str) -> list[str]:
    """The column names of a table in an object store: a parquet footer, or a CSV's first line."""
    from . import storage

    if output_format(url) == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with storage.open_read(url) as f:
            try:
                return list(pq.read_schema(f).names)
            except pa.ArrowException as exc:
                raise ValueError(str(exc)) from None
    head = storage.read_range(url, 256 * 1024).decode("utf-8-sig", errors="replace")
    return next(csv.reader(io.StringIO(head)), [])


def _check_columns(path: str, names: list[str], kind: str | None) -> None:
    if "id" not in names or "status" not in names:
        raise FatalError(f"{path} exists and is not a batchcap result table (no id / status columns): "
                         "write to another file (--overwrite would replace it)")
    own = KIND_COLUMNS.get(kind or "")
    others = [k for k, column in KIND_COLUMNS.items() if k != kind and column in names]
    if own is not None and own not in names and others:
        raise FatalError(f"{path} holds the results of `batchcap {others[0]}`: write these to another file")


def table_columns(path: str) -> list[str]:
    """The column names of a local parquet or CSV table, without reading its rows."""
    if output_format(path) == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except pa.ArrowException as exc:
            raise ValueError(str(exc)) from None
    return _csv_header(path)


def _check_not_locked(path: str) -> None:
    """Stop before a model loads when another run holds ``path.lock``. A shared, non-blocking flock on a
    read-only descriptor: it creates nothing, and two runs checking at once do not block each other (the
    exclusive lock taken when the store opens still decides)."""
    try:
        fd = os.open(path + ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return  # absent (the usual case), or a link or unreadable: opening the store says what is wrong
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(path, fd) from None
    finally:
        os.close(fd)  # releases the shared lock


def _busy(path: str, lock_fd: int) -> FatalError:
    other = os.read(lock_fd, 64).decode(errors="replace").strip() or "?"
    return FatalError(f"another batchcap run (pid {other}) is writing {path}; wait for it to finish")


def _siblings(path: str) -> list[str]:
    """The files a run writing ``path`` keeps beside it: its lock, parts, CSV schema, summary and report."""
    from .report import default_report_path

    return [path + ".lock", path + ".parts", schema_path(path), summary_path(path), default_report_path(path)]


def _check_sibling_names(path: str) -> None:
    """Stop before any work when a file written beside ``path`` would have too long a name (the summary,
    the CSV schema, the report, a temporary name of any of them): found only at the end of a run, that
    error would recur on every rerun, and the table would never be finished."""
    base = os.path.basename(path)
    siblings = _siblings(path)
    longest = max((os.path.basename(p) for p in siblings), key=lambda n: len(n.encode("utf-8", "surrogateescape")))
    size = len(longest_temp_name(longest).encode("utf-8", "surrogateescape"))
    try:
        limit = os.pathconf(os.path.dirname(path), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if size > limit:
        raise FatalError(f"output name too long: {base!r} ({len(base.encode('utf-8', 'surrogateescape'))} bytes); "
                         f"the files written beside it (e.g. {longest!r} while it is written) need "
                         f"{size} of the {limit} bytes a file name may have here")


class ResultStore:
    """Collects rows of one run into ``path``; one row per item id.

    Besides the final table, a caller can tell this run's rows from the whole table's:
    ``counts_this_run`` (statuses of the rows added by this run) and, after ``finalize``,
    ``status_counts`` (statuses of every row of the final table); ``summary_counts()`` gives both.
    """

    def __init__(self, path: str, *, overwrite: bool = False, retry_failed: bool = False,
                 flush_rows: int = 256, flush_seconds: float = 30.0):
        self.path = os.path.abspath(path)
        self.format = output_format(path)
        self.parts_dir = self.path + ".parts"
        self.lock_path = self.path + ".lock"
        self.schema_path = schema_path(self.path)
        self.overwrite = overwrite
        self.retry_failed = retry_failed
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._run = uuid.uuid4().hex[:8]
        self._next_seq = 0
        self._lock_fd: int | None = None
        self._holds_parts = False  # whether the parts folder holds rows (of this run or an earlier one)
        self.done: set[str] = set()
        self.done_models: Counter = Counter()  # rows already written, by the model that made them
        self.written = 0
        self.counts_this_run: Counter = Counter()
        self.status_counts: Counter | None = None  # of the final table, set by finalize

    # --- lifecycle ----------------------------------------------------------------------------
    def open(self) -> None:
        check_output(self.path, unlocked=False)
        self._lock()
        try:
            if self.overwrite:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                for old in (self.path, self.schema_path if self.format == "csv" else None):
                    if old and os.path.exists(old):
                        _remove(old)
            self._remove_stale_temp_files()
            self._make_parts_dir()
            self._next_seq = max((seq for seq, _ in self._part_files() if seq >= 0), default=-1) + 1
            self._holds_parts = bool(self._part_files())
            self.done = self._done_ids()
        except BaseException:
            self._unlock()
            raise
        if self.done:
            log.info("resuming: %d items already done in %s", len(self.done), os.path.basename(self.path))

    def close(self) -> None:
        """Flush what is buffered and release the lock (the parts stay for a later run)."""
        try:
            self.flush()
        finally:
            self._unlock()

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remove_stale_temp_files(self) -> None:
        """Temp files of the final file or its schema left by a run killed while writing them (only a
        run holding the lock writes those, so none belongs to a live run)."""
        folder = os.path.dirname(self.path)
        prefixes = tuple(f".{os.path.basename(p)}." for p in (self.path, self.schema_path))
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefixes) and name.endswith(".tmp"):
                    log.debug("removing %s, left by an interrupted run", name)
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, name))

    def _make_parts_dir(self) -> None:
        try:
            os.makedirs(self.parts_dir, exist_ok=True)
        except OSError as exc:
            raise FatalError(f"cannot create {self.parts_dir}: {_reason(exc)}") from None

    # --- the lock -----------------------------------------------------------------------------
    def _lock(self) -> None:
        """flock ``path.lock``: never through a symlink, never a file with other names (a hard link),
        and always the file that is at that path once locked (a run that ends removes it)."""
        for _ in range(20):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NONBLOCK, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise FatalError(f"{self.lock_path} is a symbolic link; remove it "
                                     "(batchcap writes a plain lock file there)") from None
                raise FatalError(f"cannot create {self.lock_path}: {_reason(exc)}") from None
            try:
                if self._locked(fd):
                    self._lock_fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was removed or replaced between open and lock: lock the new one
        raise FatalError(f"cannot lock {self.lock_path}: it keeps being replaced")

    def _locked(self, fd: int) -> bool:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FatalError(f"{self.lock_path} is not a plain file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(self.path, fd) from None
        mine = os.fstat(fd)
        try:
            there = os.stat(self.lock_path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        if mine.st_nlink != 1:
            raise FatalError(f"{self.lock_path} has other names (a hard link); remove it "
                             "(batchcap writes a plain lock file there)")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as exc:
            raise FatalError(f"cannot write {self.lock_path}: {_reason(exc)}") from None
        return True

    def _unlock(self) -> None:
        """Remove the lock file while still holding it, then release it (closing the file). A run
        that opened the old file meanwhile sees, once it has locked it, that it is gone, and retries."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            mine = os.fstat(fd)
            there = os.stat(self.lock_path, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.lock_path)
        except OSError:
            pass
        finally:
            os.close(fd)

    # --- reading what is there ----------------------------------------------------------------
    def _part_files(self) -> list[tuple[int, str]]:
        """(seq, path) of the part files, oldest first; parts named by older versions (seq -1) first."""
        try:
            names = os.listdir(self.parts_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise FatalError(f"cannot read {self.parts_dir}: {_reason(exc)}") from None
        parts: list[tuple[int, int, str]] = []
        for name in names:
            if not name.endswith(".parquet") or name.startswith("."):
                continue
            path = os.path.join(self.parts_dir, name)
            match = _PART.match(name)
            if match:
                parts.append((int(match.group(1)), 0, path))
            else:
                with contextlib.suppress(OSError):
                    parts.append((-1, os.stat(path).st_mtime_ns, path))
        parts.sort()
        return [(seq, path) for seq, _, path in parts]

    def _read_part(self, path: str, columns: list[str] | None = None) -> Any:
        import pyarrow as pa

        try:
            return read_parquet(path, columns)
        except (OSError, pa.ArrowInvalid) as exc:  # a part cut short by a crash
            log.warning("ignoring unreadable part %s: %s", os.path.basename(path), exc)
            return None

    def _read_final(self, columns: list[str] | None = None, hint: Any = None) -> Any:
        import pyarrow as pa

        if not os.path.exists(self.path):
            return None
        try:
            return read_table(self.path, columns=columns, hint=hint)
        except (OSError, pa.ArrowInvalid, ValueError) as exc:
            raise FatalError(f"cannot read the existing output {self.path} ({_reason(exc)}); "
                             "move it away or use --overwrite") from None

    def _done_ids(self) -> set[str]:
        """Ids already written: only the id (and status) columns are read."""
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = ["id", "status", "model"] if self.retry_failed else ["id", "model"]
        done: set[str] = set()
        self.done_models = Counter()
        for table in self._written_tables(columns):
            if "id" not in table.column_names:
                continue
            if self.retry_failed and "status" in table.column_names:
                table = table.filter(pc.equal(table.column("status"), "ok").fill_null(False))
            done.update(str(i) for i in table.column("id").cast(pa.string()).to_pylist() if i is not None)
            if "model" in table.column_names:  # which model made them (a rerun may name another)
                for entry in pc.value_counts(table.column("model").cast(pa.string())).to_pylist():
                    self.done_models[entry["values"]] += entry["counts"]
        return done

    def written_rows(self, columns: list[str]) -> Iterator[dict[str, Any]]:
        """The rows already written (the final file's, then each part's, oldest first), with ``columns``
        (None where a file lacks one), one file's columns in memory at a time: what a resumed run's model
        may learn from (the languages heard so far)."""
        for table in self._written_tables(columns):
            names = table.column_names
            values = [table.column(c).to_pylist() if c in names else [None] * table.num_rows for c in columns]
            del table
            for row in zip(*values):
                yield dict(zip(columns, row))

    def _written_tables(self, columns: list[str]) -> Iterator[Any]:
        """``columns`` of the final file, then of each part (oldest first), read one file at a time."""
        final = self._read_final(columns)
        if final is not None:
            yield final
        del final
        for _, path in self._part_files():
            table = self._read_part(path, columns)
            if table is not None:
                yield table

    def _merged_table(self) -> Any:
        """The final file and every part as one table of one schema (oldest rows first)."""
        import pyarrow as pa

        parts = [t for t in (self._read_part(p) for _, p in self._part_files()) if t is not None]
        hint = unify_schemas([t.schema for t in parts]) if parts else None
        final = self._read_final(hint=hint)
        tables = ([final] if final is not None else []) + parts
        if not tables:  # nothing to do (an empty manifest): still a result table, which report and export read
            return pa.table({"id": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                             "error": pa.array([], pa.string())})
        return concat_unified(tables)

    # --- writing ------------------------------------------------------------------------------
    def add(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        self.written += 1
        self.counts_this_run[row.get("status")] += 1
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part file. Safe to call at any point of the main thread
        (a signal handler included): the buffer is taken before anything is written, so a flush
        that interrupts another writes only the rows the other one did not take."""
        self._last_flush = time.monotonic()
        if not self._buffer or self._lock_fd is None:  # nothing to write, or not open (or closed)
            return
        rows, self._buffer = self._buffer, []
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        try:
            import pyarrow.parquet as pq

            table = rows_to_table(rows)
            if not os.path.isdir(self.parts_dir):  # rows added after finalize removed it
                self._check_parts()
                self._make_parts_dir()
            self._holds_parts = True
            with writing(os.path.join(self.parts_dir, f"part-{seq:010d}-{self._run}.parquet")) as tmp:
                pq.write_table(table, tmp)
        except BaseException:
            self._buffer[:0] = rows  # not written: keep them for a later flush
            raise

    def finalize(self, order: dict[str, int] | None = None,
                 transform: Callable[[Any], Any] | None = None) -> Any:
        """Merge everything into the final file atomically; return the final table.

        ``order`` maps ids to their position in this run's input; rows of ids no longer in the
        input keep their old relative order after those. ``transform`` may rewrite the merged
        table before it is written (e.g. metrics that depend on the whole set). The merge runs in
        Arrow, so its memory is that of the table, not of Python rows.
        """
        self.flush()
        self._check_parts()
        final = merge_rows(self._merged_table(), order or {})
        if transform is not None:
            final = transform(final)
        if self.format == "csv":  # the schema first: it describes the old file as well as the new
            write_schema(self.schema_path, final.schema)
        with writing(self.path) as tmp:
            write_table(final, tmp, self.format)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self._holds_parts = False  # rows added after this start a parts folder afresh
        self.status_counts = count_statuses(final)
        return final

    def _check_parts(self) -> None:
        """Stop when the parts folder that holds rows of this output is gone (someone removed the output's
        folder during the run): the final table would lack those rows, with nothing said."""
        if self._holds_parts and not os.path.isdir(self.parts_dir):
            raise FatalError(f"{self.parts_dir} was removed while the run was writing to it: the rows it held "
                             "are lost; run the same command again to redo them")

    def summary_counts(self) -> dict[str, Any]:
        """Per-status counts of the whole final table and of this run's rows (call after finalize)."""
        return {
            "status_counts": dict(sorted((self.status_counts or Counter()).items())),
            "status_counts_this_run": dict(sorted((str(k), v) for k, v in self.counts_this_run.items())),
            "processed_this_run": sum(self.counts_this_run.values()),
        }


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise FatalError(f"cannot remove {path}: {_reason(exc)}") from None


def count_statuses(table: Any) -> Counter:
    """Rows per status of a table, counted in Arrow."""
    if table.num_rows == 0 or "status" not in table.column_names:
        return Counter()
    counts = table.column("status").value_counts()
    return Counter({str(v["values"]): int(v["counts"]) for v in counts.to_pylist()})


def merge_rows(table: Any, order: dict[str, int]) -> Any:
    """One row per id (the last one: later parts are newer), in input order, without ORDER.

    The row order is worked out on the id column alone (numpy and Arrow kernels, no query engine);
    the table is gathered once.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("id").cast(pa.string()).combine_chunks()
    codes = ids.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    _, first_from_end = np.unique(codes[::-1], return_index=True)
    last = np.sort(len(codes) - 1 - first_from_end)  # the newest row of each id, in write order
    kept = ids.take(last)
    keys = pa.array(list(order), pa.string())
    ranks = pa.array(list(order.values()), pa.int64())
    rank = pc.take(ranks, pc.index_in(kept, value_set=keys))
    # ids no longer in the input go after the others, keeping their relative order
    rank = pc.coalesce(rank, pa.array(np.arange(len(last), dtype=np.int64) + len(order)))
    rows = last[pc.sort_indices(rank).to_numpy()]
    table = table.set_column(table.column_names.index("id"), "id", ids)
    if ORDER in table.column_names:
        table = table.drop_columns([ORDER])
    return table.take(pa.array(rows, pa.int64()))


# --- one schema -------------------------------------------------------------------------------

def unify_types(types: list[Any]) -> Any:
    """One type that holds every value of ``types`` without loss: null fits anything, integers widen
    to int64, integers and floats to float64, anything else that disagrees becomes text."""
    import pyarrow as pa

    distinct: list[Any] = []
    for t in types:
        if not pa.types.is_null(t) and t not in distinct:
            distinct.append(t)
    if not distinct:
        return pa.null()
    if len(distinct) == 1:
        return distinct[0]
    if all(pa.types.is_integer(t) for t in distinct):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in distinct):
        return pa.float64()
    return pa.string()


def unify_schemas(schemas: list[Any]) -> Any:
    """Columns in order of first appearance, each of the type from :func:`unify_types`."""
    import pyarrow as pa

    names: list[str] = []
    for schema in schemas:
        names += [n for n in schema.names if n not in names]
    fields = []
    for name in names:
        types = [s.field(name).type for s in schemas if name in s.names]
        target = unify_types(types)
        if len({str(t) for t in types if not pa.types.is_null(t)}) > 1:
            log.debug("column %s is %s in different parts: stored as %s", name,
                      " / ".join(sorted({str(t) for t in types})), target)
        fields.append(pa.field(name, target))
    return pa.schema(fields)


def conform(table: Any, schema: Any) -> Any:
    """``table`` with the columns and types of ``schema`` (missing columns are null)."""
    import pyarrow as pa

    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(_cast(table.column(field.name), field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.table(columns, schema=schema)


def concat_unified(tables: list[Any]) -> Any:
    """Tables whose schemas may disagree, as one table of their unified schema."""
    import pyarrow as pa

    schema = unify_schemas([t.schema for t in tables])
    conformed = [conform(t, schema) for t in tables]
    try:
        return pa.concat_tables(conformed)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a cast that changed a type after all: make it text
        schema = pa.schema([pa.field(f.name, pa.string()) if len({str(t.schema.field(f.name).type)
                                                                   for t in conformed}) > 1 else f for f in schema])
        return pa.concat_tables([conform(t, schema) for t in conformed])


def _cast(column: Any, target: Any) -> Any:
    import pyarrow as pa

    if column.type == target:
        return column
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), target)
    if pa.types.is_string(target) and (pa.types.is_nested(column.type) or pa.types.is_binary(column.type)):
        return pa.array([None if v is None else _text(v) for v in column.to_pylist()], pa.string())
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        if pa.types.is_string(target):
            return pa.array([None if v is None else _text(v) for v in column.to_pylist()], pa.string())
        raise


def rows_to_table(rows: list[dict[str, Any]], like: Any = None) -> Any:
    """Rows as an Arrow table, column order of the first row, values that don't fit as text."""
    import pyarrow as pa

    columns: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for c in row:
            if c not in seen:
                seen.add(c)
                columns.append(c)
    if like is not None:
        columns = [c for c in like.column_names if c in seen and c != ORDER] + \
                  [c for c in columns if c not in like.column_names]
    arrays = {}
    for c in columns:
        values = [row.get(c) for row in rows]
        field_type = like.schema.field(c).type if like is not None and c in like.column_names else None
        try:
            arrays[c] = _array(values, field_type)
        except UnicodeEncodeError:  # lone surrogates: a file name that is not UTF-8, a JSON "\ud83d"
            values = [valid_values(v) for v in values]
            arrays[c] = _array(values, field_type)
    return pa.table(arrays)


def _array(values: list[Any], field_type: Any) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values, type=field_type) if field_type is not None else pa.array(values)
    except UnicodeEncodeError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # Arrow's errors included: mixed types
        log.debug("a column holds values of several types (%s): stored as text", exc)
        return pa.array([None if v is None else _text(v) for v in values], pa.string())


def _text(value: Any) -> str:
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


# --- files ------------------------------------------------------------------------------------

def read_table(path: str, columns: list[str] | None = None, hint: Any = None) -> Any:
    """A result table (parquet, or CSV written by batchcap) with the types it was written with.

    A CSV is read as text and converted to the types of its ``.schema.json``; columns the schema
    does not know take their type from ``hint`` (e.g. the parts of a run), else stay text, except
    for a CSV without any schema (written by an older batchcap), whose types are guessed.
    """
    if not path.lower().endswith(".csv"):
        return read_parquet(path, columns)
    schema = read_schema(schema_path(path))
    if schema is None and hint is None:
        return _read_csv_guessing(path, columns)
    return _read_csv_typed(path, columns, schema, hint)


def read_parquet(path: str, columns: list[str] | None = None) -> Any:
    """One parquet file (only ``columns`` that it has, when given), without pyarrow's dataset layer,
    whose libraries alone add some 50 MB to the process."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        if columns is not None:
            columns = [c for c in columns if c in f.schema_arrow.names]
        return f.read(columns=columns)


def _csv_header(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's "CSV UTF-8") is no name
        return next(csv.reader(f), [])


def _read_csv_text(path: str, columns: list[str] | None) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = _csv_header(path)
    wanted = [c for c in names if columns is None or c in columns]
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in names}, include_columns=wanted,
                                   strings_can_be_null=True, quoted_strings_can_be_null=False)
    return pacsv.read_csv(path, convert_options=convert)


def _read_csv_typed(path: str, columns: list[str] | None, schema: Any, hint: Any) -> Any:
    import pyarrow as pa

    table = _read_csv_text(path, columns)
    out = []
    for name in table.column_names:
        target = None
        if schema is not None and name in schema.names:
            target = schema.field(name).type
        elif hint is not None and name in hint.names:
            target = hint.field(name).type
        out.append(_from_text(name, table.column(name), target))
    return pa.table(out, names=table.column_names)


def _from_text(name: str, column: Any, target: Any) -> Any:
    """A CSV column read as text, as ``target`` (lists and structs are JSON); text when it won't fit."""
    import pyarrow as pa

    if target is None or pa.types.is_string(target):
        return column
    try:
        if pa.types.is_null(target):
            return pa.nulls(len(column)) if column.null_count == len(column) else column
        if pa.types.is_nested(target):
            return pa.array([None if v is None else json.loads(v) for v in column.to_pylist()], type=target)
        return column.cast(target)
    except (ValueError, TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        log.debug("CSV column %s does not read as %s (%s): kept as text", name, target, exc)
        return column


_TEXT_COLUMNS = {"id", "source", "text", "caption", "error", "reference", "language", "model", "status"}


def _read_csv_guessing(path: str, columns: list[str] | None) -> Any:
    """A CSV without a schema: the known text columns as text, the others' types guessed."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = _csv_header(path)
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in names if c in _TEXT_COLUMNS},
                                   include_columns=[c for c in names if columns is None or c in columns],
                                   strings_can_be_null=True)
    return pacsv.read_csv(path, convert_options=convert)


def read_schema(path: str) -> Any:
    """The Arrow schema kept in a ``.schema.json``; None when there is none or it is unreadable."""
    import pyarrow as pa

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != SCHEMA_FORMAT:
            return None
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["arrow_schema"])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowInvalid) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def write_schema(path: str, schema: Any) -> None:
    """The Arrow schema of a CSV output, beside it (readable: the columns' types; exact: Arrow IPC)."""
    data = {
        "format": SCHEMA_FORMAT,
        "version": 1,
        "columns": {f.name: str(f.type) for f in schema},
        "arrow_schema": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
    }
    _atomic_text(path, json.dumps(data, indent=2) + "\n")


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


def _atomic_text(path: str, text: str) -> None:
    try:
        atomic_write(path, text)
    except OSError as exc:
        raise FatalError(f"cannot write {path}: {_reason(exc)}") from None


def own_files(path: str) -> list[str]:
    """What a run writing ``path`` may write beside it (the table, its lock, parts, CSV schema, summary,
    report, and the default folder of subtitle files): not inputs when the output is put in an input
    folder."""
    from .subtitles import default_subtitle_dir

    return [path, *_siblings(path), default_subtitle_dir(path)]


@contextlib.contextmanager
def local_result(path: str) -> Iterator[str]:
    """A result table to read where it lives (export, report): a local path as it is; an object in a store
    copied, with its summary and CSV schema, into a temporary folder removed afterwards."""
    from . import storage

    if not storage.is_remote(path):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="batchcap-result-") as folder:
        local = os.path.join(folder, storage.basename(path))
        try:
            if not storage.is_file(path):
                raise FatalError(f"no result file at {path}")
            storage.download(path, local)
            for beside in (summary_path(path), schema_path(path)):
                if storage.is_file(beside):
                    storage.download(beside, os.path.join(folder, storage.basename(beside)))
        except storage.StorageError as exc:
            raise FatalError(f"cannot read {path}: {exc.message}") from None
        yield local


def summary_path(path: str) -> str:
    """Where the run summary of an output is kept (``out.parquet`` -> ``out.summary.json``)."""
    return os.path.splitext(path)[0] + ".summary.json"


def write_summary(path: str, summary: dict[str, Any]) -> str:
    """The run summary as JSON beside the output (``out.parquet`` -> ``out.summary.json``; a remote output's
    summary is an object beside it)."""
    target = summary_path(path)
    _atomic_text(target, json.dumps(summary, indent=2, default=str) + "\n")
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


def _pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``), None where there is none to read: containers that
    share a host name (``--network host``, a fixed ``hostname``) number their processes apart, so a lock's pid
    is looked up only by a process of the same namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


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
        self._lost: dict[str, Any] = {}  # the record of a run that took the lock over (heartbeat)
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
            if not self._lost:  # another run holds the output now: nothing more goes there
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
        if self._lost:
            raise FatalError(f"another run ({self._lost.get('host', '?')}, pid {self._lost.get('pid', '?')}) took "
                             f"over the lock of {self.path} while this one could not refresh it; this run stops "
                             "without writing there (its rows are redone by whichever run finishes the output)")
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

        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
                           "run": self._token, "refreshed": time.time()}).encode()

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
            if not self.stale(holder):
                break
            log.warning("taking over the lock %s of a run that is gone (%s, pid %s)", self.lock_url,
                        holder.get("host", "?"), holder.get("pid", "?"))
            self._call(storage.remove, self.lock_url)
        raise FatalError(_locked_message(self.path, self._holder()))

    def _holder(self) -> dict[str, Any]:
        return self.lock_holder(self.lock_url)

    @staticmethod
    def lock_holder(lock_url: str) -> dict[str, Any]:
        """The lock object's record (host, pid, run, refreshed), {} where it is gone or unreadable."""
        from . import storage

        try:
            record = json.loads(storage.read_range(lock_url, 64 * 1024))
            return record if isinstance(record, dict) else {}
        except (storage.StorageError, ValueError):
            return {}

    @staticmethod
    def stale(holder: dict[str, Any]) -> bool:
        """Whether the lock record ``holder`` belongs to a run that is gone (or is unreadable)."""
        import socket

        if not holder:
            return True  # unreadable or removed meanwhile
        if (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                and holder.get("pid_namespace") == _pid_namespace()):  # its pid means a process here
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
                    holder = self._holder()
                    if holder and holder.get("run") != self._token:  # taken over (refreshes failed too long):
                        self._lost = holder  # never overwrite the new holder's lock; the run stops (below)
                        log.error("the lock %s was taken over by another run (%s, pid %s)", self.lock_url,
                                  holder.get("host", "?"), holder.get("pid", "?"))
                        return
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
