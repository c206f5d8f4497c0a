"""Run a job into a result file: the engine streams rows, the store keeps them, the scorer sums up.

    items ─► engine (local | ray): fetch ─► preprocess ─► batch ─► predict ─► row ─► ResultStore ─► summary

Every item gives exactly one row. Rows are written in part files as they come (what a crash can
cost is one part); the final file holds one row per id, in input order, and the summary JSON sits
beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .items import CRASHED, EMPTY, OK, FatalError, Item, ItemError
from .job import Job, JobOptions
from .journal import CRASH_LIMIT, Journal
from .output import check_existing_output, check_output, result_store, write_summary
from .progress import Progress
from .stages import Loaded, Predictor, make_row

if TYPE_CHECKING:
    from .engines.local import InflightStats

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"#\d+$")  # a repeated id's number (inputs.Inputs: r1#2)

NOT_FAILURES = (OK, EMPTY)  # an empty recording is an answer (silence), not a failure


@dataclass
class RunResult:
    output: str
    summary_path: str
    summary: dict[str, Any]
    counts: Counter = field(default_factory=Counter)  # statuses of the rows written by this run
    skipped: int = 0  # items already done by an earlier run

    @property
    def failed(self) -> int:
        """Rows of the whole table that are neither ok nor empty (silence, a clip too short)."""
        return sum(n for status, n in self.summary["status_counts"].items() if status not in NOT_FAILURES)

    @property
    def failed_this_run(self) -> int:
        """Rows this run wrote that are neither ok nor empty, and input folders it could not read: what the
        exit code reports."""
        return (sum(n for status, n in self.counts.items() if status not in NOT_FAILURES)
                + len(self.summary.get("unreadable_folders") or []))


def run_job(items: Iterable[Item], job: Job, output: str, options: JobOptions | None = None, *,
            predictor: Predictor | None = None, extra_summary: dict[str, Any] | None = None) -> RunResult:
    """Process every item into ``output`` (resuming), then write the final file and summary.

    The local engine uses ``predictor`` or loads the job's own here; the Ray engine loads one in
    each replica.
    """
    options = options or JobOptions()
    options.check()  # the Python API's values, as the CLI's option types would (job.JobOptions.check)
    started = time.time()
    check_output(output)  # a bad -o fails now, not after the model has loaded
    if not options.overwrite:
        check_existing_output(output, job.kind)
    if options.engine == "local" and predictor is None:
        predictor = job.load_predictor()  # before the store: a model that won't load leaves nothing behind
    store = result_store(output, overwrite=options.overwrite, retry_failed=options.retry_failed,
                        flush_rows=options.flush_rows)
    order: dict[str, int] = {}
    counts: Counter = Counter()
    skipped = 0
    inflight = None
    if options.engine == "local":
        from .engines.local import InflightStats

        inflight = InflightStats()
    with store:  # the summary is written while the lock is held: a run starting next sees it, never clobbers it
        estimate = getattr(items, "estimate", None)
        progress = Progress(job.kind, total=estimate() if callable(estimate) else None, bar=options.progress,
                            quiet=options.quiet, log_every=options.log_every)
        journal = Journal(store.parts_dir) if options.engine == "local" else None
        _warn_of_other_models(store.done_models, options.model)
        if store.done and options.engine == "local" and getattr(predictor, "resume", None) is not None:
            # a model that learns from the run so far (audio: its languages) hears what earlier runs wrote
            predictor.resume(store.written_rows(["id", *predictor.resume_columns]))
        try:
            items = _same_repeats(items, store)
            for row in _rows(items, job, options, predictor, store.done, order, journal, inflight, store.flush):
                if row is None:
                    skipped += 1
                    progress.update(skipped=True)
                    continue
                counts[row["status"]] += 1
                job.scorer.observe(row)
                store.add(row)
                progress.update(status=row["status"])
        finally:
            progress.close()
            if journal is not None:
                journal.close()
        table = store.finalize(order, transform=job.scorer.finalize_table)
        wall = time.time() - started
        status_counts = Counter(table.column("status").to_pylist()) if table.num_rows else Counter()
        summary: dict[str, Any] = {
            "output": store.path,
            "rows": table.num_rows,
            "status_counts": dict(sorted(status_counts.items())),
            "processed_this_run": sum(counts.values()),
            "status_counts_this_run": dict(sorted((str(k), v) for k, v in counts.items())),  # what the exit code says
            "skipped_already_done": skipped,
            "wall_time_s": round(wall, 3),
            "items_per_s": round(sum(counts.values()) / wall, 3) if wall > 0 else None,
        }
        stats = getattr(items, "stats", None)
        if stats is not None and getattr(stats, "skipped_files", 0):
            summary["skipped_files"] = stats.skipped_files  # files of other types in input directories
            summary["skipped_extensions"] = dict(sorted(stats.skipped_extensions.items(), key=lambda kv: -kv[1]))
        if stats is not None and getattr(stats, "unreadable_folders", None):
            summary["unreadable_folders"] = list(stats.unreadable_folders)  # their files have no rows
        if stats is not None and getattr(stats, "repeated_ids", 0):
            summary["repeated_ids"] = stats.repeated_ids  # items numbered a#2, a#3 (inputs.Inputs._repeated)
        summary.update(extra_summary or {})
        summary.update(job.scorer.summarize(table, wall))
        if inflight is not None:
            summary["decoded_bytes_in_flight"] = inflight.record()
        if options.command:
            summary["command"] = list(options.command)
        summary["options"] = _options_record(options)
        if options.report:
            summary["report"] = _write_report(store.path, summary, getattr(store, "local", None))
        summary_path = write_summary(store.path, summary)
    return RunResult(store.path, summary_path, summary, counts, skipped)


def _options_record(options: JobOptions) -> dict[str, Any]:
    """The run's options as plain JSON values (for the summary and the report)."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if f.name == "command":
            continue
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {k: v for k, v in dataclasses.asdict(value).items() if isinstance(v, (str, int, float, bool))}
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            value = str(value)
        record[f.name] = value
    return record


def _write_report(output: str, summary: dict[str, Any], local: Any = None) -> str | None:
    """``OUT.report.html``; a report that cannot be built is a warning, never a failed run. ``local``: a
    remote output's working copy (output.RemoteResultStore): the page is built from it and uploaded."""
    from .report import build_report, default_report_path

    try:
        if local is not None:
            from . import storage

            return storage.upload(build_report(local.path, summary=summary), default_report_path(output))
        return build_report(output, summary=summary)
    except Exception as exc:  # noqa: BLE001 - the results are written; the page is a bonus
        log.warning("could not write the report: %s: %s", type(exc).__name__, exc)
        log.debug("report failed", exc_info=True)
        return None


def _warn_of_other_models(done_models: Counter, model: str) -> None:
    """Rows already written by another model than this run's (``-o`` kept, ``--model`` changed): they stay,
    and the table (and its corpus figures) will mix the two; say so once, with the way out."""
    others = {m: n for m, n in done_models.items() if m is not None and not _same_model(str(m), model)}
    if others:
        names = ", ".join(f"{n:,} by {m}" for m, n in sorted(others.items(), key=lambda kv: -kv[1])[:3])
        log.warning("rows already done were made by another model than %s (%s): they are kept, and the table's "
                    "figures mix the models; --overwrite, or another -o, does them all with %s", model, names, model)


def _same_model(a: str, b: str) -> bool:
    """Whether two spellings name one model: equal, one folder, or (a relative path given from another folder,
    which does not resolve here) folders of one name."""
    if a == b:
        return True
    try:
        if os.path.isdir(a) and os.path.isdir(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    if os.path.isdir(a) or os.path.isdir(b):
        return os.path.basename(os.path.normpath(a)) == os.path.basename(os.path.normpath(b))
    return False


def _same_repeats(items: Iterable[Item], store: Any) -> Iterable[Item]:
    """``items``, stopping the run where a repeated id now names another source than its done row.

    Repeated ids are numbered in input order (``r1``, ``r1#2``: ``inputs.Inputs``), so a row added or
    removed above them, or a reordered manifest, gives a number to another file: a resumed run would
    skip that file as done and do another twice. Done rows of a repeated id (the store holds ``r1#2``)
    are checked against the items' sources; a mismatch stops the run before anything is taken for done.
    """
    numbered = {i for i in store.done if _NUMBERED.search(i)}
    if not numbered:
        return items
    bases = {_NUMBERED.sub("", i) for i in numbered}
    group = numbered | (bases & store.done)
    sources = {row["id"]: row["source"] for row in store.written_rows(["id", "source"])
               if row["id"] in group and row["source"] is not None}

    def checked() -> Iterator[Item]:
        for item in items:
            was = sources.get(item.id)
            if was is not None and was != item.source:
                raise FatalError(
                    f"id {item.id!r} is {item.source} in the inputs but {was} in {store.path}: repeated ids are "
                    "numbered in input order, and the order changed since that run. Give every row its own id, "
                    "or start over with --overwrite")
            yield item

    return checked()


def _rows(items: Iterable[Item], job: Job, options: JobOptions, predictor: Predictor | None, done: set[str],
          order: dict[str, int], journal: Journal | None, inflight: InflightStats | None = None,
          flush: Callable[[], None] | None = None) -> Iterator[dict[str, Any] | None]:
    """The engine's rows, with crash-loop protection (see journal.py) where there is a journal:
    items in flight when earlier runs died are done alone after the others, or get a ``crashed``
    row after two such deaths."""
    if journal is None:
        yield from _engine_rows(items, job, options, predictor, done, order, inflight=inflight)
        return
    journal.open(reset=options.retry_failed or options.overwrite)
    alone: list[Item] = []
    crashed: list[Item] = []

    def admitted() -> Iterator[Item]:
        for item in items:
            deaths = journal.deaths(item.id) if item.id not in done else 0
            if deaths:
                order[item.id] = item.index
                (crashed if deaths >= CRASH_LIMIT else alone).append(item)
                continue
            yield item

    yield from _engine_rows(admitted(), job, options, predictor, done, order, journal, inflight)
    for item in crashed:
        message = (f"the process died {journal.deaths(item.id)} times while this item was being decoded or "
                   "transcribed (out of memory? a crash in a decoder? kill -9?); it was not tried again. Check "
                   "the file on its own; --retry-failed tries it once more")
        yield make_row(job.scorer, Loaded(item, error=ItemError(CRASHED, message)))
    if alone:
        log.warning("doing %d item(s) that were being processed when an earlier run died, one at a time",
                    len(alone))
    for item in alone:
        yield from _engine_rows([item], job, options, predictor, done, order, journal, inflight)
        if flush is not None:  # the consumer has stored its row: keep it, should the next one kill the run
            flush()


def _engine_rows(items: Iterable[Item], job: Job, options: JobOptions, predictor: Predictor | None,
                 done: set[str], order: dict[str, int], journal: Journal | None = None,
                 inflight: InflightStats | None = None) -> Iterator[dict[str, Any] | None]:
    if options.engine == "ray":
        from .engines import ray

        return ray.stream_rows(items, job, options, done, order)
    from .engines import local

    assert predictor is not None
    return local.stream_rows(items, job, predictor, options, done, order, watch=journal, stats=inflight)
