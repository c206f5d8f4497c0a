"""``batchcap report``: one self-contained HTML page about a run (or two runs compared).

The page opens offline: its CSS, its small script and its charts (SVG) are inline, thumbnails are
embedded as downscaled JPEG data: URIs, and audio players link to the local files relatively. It
stays small for big runs: figures are computed over every row, but only ``rows`` rows are shown in
detail. Everything is rendered by Jinja2 templates with autoescaping, so text from the table
(captions, references, ids, error messages) is always escaped.

    from batchcap.report import build_report
    build_report("transcripts.parquet", "report.html", rows=50, group_by=["speaker"])
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from ..fsutil import atomic_write
from ..items import FatalError
from .data import Result, failure_groups, folders_of, header, load_result

log = logging.getLogger(__name__)

__all__ = ["build_report", "write_training_report", "default_report_path"]


def default_report_path(result_path: str) -> str:
    """``out.parquet`` -> ``out.report.html`` (beside the result)."""
    base, _ = os.path.splitext(result_path)
    return base + ".report.html"


def _check_not_data(out_html: str, inputs: Sequence[str | None]) -> None:
    """Refuse to write the page over a result given to the report, or over any file that is not an HTML
    page (``report out.parquet -o out.parquet`` replaced the table with the page)."""
    if not os.path.exists(out_html):
        return
    for path in inputs:
        if path and os.path.exists(path) and os.path.samefile(path, out_html):
            raise FatalError(f"{out_html} is the result the report reads: write the report to another file")
    try:
        with open(out_html, "rb") as f:
            head = f.read(1024).lstrip().lower()
    except OSError:
        return  # the write below says why
    if head and not head.startswith((b"<!doctype html", b"<html")):
        raise FatalError(f"{out_html} exists and is not an HTML page: write the report to another file")


def build_report(result: str, out_html: str | None = None, *, compare: str | None = None, rows: int = 50,
                 group_by: Sequence[str] = (), summary: dict[str, Any] | None = None,
                 compare_summary: dict[str, Any] | None = None, normalize: str | None = None,
                 title: str | None = None) -> str:
    """Write an HTML report of the result table ``result`` (parquet or CSV) to ``out_html``; return its path.

    ``summary``: the run's summary dict (default: ``RESULT.summary.json`` when present; the report also
    works from the table alone). ``compare``: a second result (e.g. after fine-tuning) to set against the
    first, rows matched by id. ``rows``: how many rows are shown in detail (the worst by WER / CIDEr-D,
    else the first). ``group_by``: carried columns to break figures down by, besides duration, language
    and folder. ``normalize``: the WER's normalizer when the summary does not name it.
    """
    started = time.time()
    out_html = out_html or default_report_path(result)
    report_dir = os.path.dirname(os.path.abspath(out_html))
    if not os.path.isdir(report_dir):
        raise FatalError(f"report folder does not exist: {report_dir}")
    _check_not_data(out_html, [result, compare])
    a = load_result(result, summary)
    b = load_result(compare, compare_summary) if compare else None
    if b is not None and b.kind != a.kind:
        raise FatalError(f"cannot compare an {a.kind} result ({a.name}) with an {b.kind} one ({b.name})")
    missing = [c for c in group_by if c not in a.columns]
    if missing:
        raise FatalError(f"--group-by: no column {', '.join(missing)} in {a.name} "
                         f"(columns: {', '.join(a.columns)})")
    context: dict[str, Any] = {"title": title or f"batchcap report: {a.name}" + (f" vs {b.name}" if b else ""),
                               "kind": a.kind, "rows_limit": rows}
    sides = [a] if b is None else [a, b]
    if a.kind == "audio":
        from . import audio
        from .compare import compare_audio

        scores = [audio.score_result(r, normalize) for r in sides]
        context["headers"] = [header(r, audio.metrics(r, s), report_dir) for r, s in zip(sides, scores)]
        if b is None:
            context["audio"] = audio.audio_context(a, scores[0], rows=rows, group_by=group_by, report_dir=report_dir)
        else:
            context["compare"] = compare_audio(a, scores[0], b, scores[1], rows=rows, report_dir=report_dir)
            fa, fb = _shared_folders(a, b)
            context["group_pairs"] = _paired_groups(audio.groups(a, scores[0], group_by, fa),
                                                    audio.groups(b, scores[1], group_by, fb), "wer")
    else:
        from . import images
        from .compare import compare_images

        context["headers"] = [header(r, images.metrics(r), report_dir) for r in sides]
        if b is None:
            context["images"] = images.images_context(a, rows=rows, group_by=group_by, report_dir=report_dir)
        else:
            context["compare"] = compare_images(a, b, rows=rows, report_dir=report_dir)
            fa, fb = _shared_folders(a, b)
            context["group_pairs"] = _paired_groups(images.groups(a, group_by, fa), images.groups(b, group_by, fb),
                                                    "cider_d")
    context["failures"] = [_failures(r) for r in sides]
    context["generated"] = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    from .render import render

    html = render("result.html.j2", context)
    _write(out_html, html)
    log.debug("report: %s (%.0f kB, %.1f s)", out_html, len(html.encode()) / 1024, time.time() - started)
    return out_html


def _failures(result: Result) -> dict[str, Any]:
    groups, more = failure_groups(result)
    failed = sum(g.count for g in groups)
    return {"name": result.name, "groups": groups, "more": more,
            "failed": sum(1 for s in result.col("status") if s != "ok"), "shown": failed}


def _shared_folders(a: Result, b: Result) -> tuple[list[str] | None, list[str] | None]:
    """Both results' folder labels, relative to the folder all their rows share (each result's own labels
    named one folder differently in A and in B, and a result of one folder had no folder table to pair);
    None when all rows of both are in one folder."""
    sa, sb = list(a.col("source")), list(b.col("source"))
    labels = folders_of(sa + sb)
    if len(set(labels)) < 2:
        return None, None
    return labels[:len(sa)], labels[len(sa):]


def _paired_groups(ga: list[dict[str, Any]], gb: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    """Group tables of two results merged by group name and key (for side-by-side figures): A's keys in A's
    order, then those only B has (a folder only B covers counts in B's figures, so it is listed too)."""
    by_name_b = {g["name"]: {r["key"]: r for r in g["rows"]} for g in gb}
    out = []
    for g in ga:
        rows_a = {r["key"]: r for r in g["rows"]}
        rows_b = by_name_b.get(g["name"], {})
        keys = list(rows_a) + [k for k in rows_b if k not in rows_a]
        rows = [{"key": k, "rows_a": rows_a.get(k, {}).get("rows", 0), "rows_b": rows_b.get(k, {}).get("rows", 0),
                 "a": rows_a.get(k, {}).get(value), "b": rows_b.get(k, {}).get(value)} for k in keys]
        out.append({"name": g["name"], "rows": rows, "value": value})
    return out


def write_training_report(out_dir: str, history: Sequence[dict[str, Any]],
                          samples: Sequence[dict[str, Any]] | None = None, *, title: str = "batchcap training",
                          info: dict[str, Any] | None = None,
                          losses: Sequence[str] = ("train_loss", "val_loss"), percent: Sequence[str] = ("wer",),
                          filename: str = "report.html", strict: bool = True) -> str | None:
    """``OUT_DIR/report.html`` for a fine-tuning run: loss and metric curves per epoch, the history table and a
    sample of validation predictions (``samples``: dicts with ``prediction`` and ``reference`` or
    ``references``, optionally ``normalized`` (the (reference, prediction) pair to align), ``image`` (a PIL
    image or a path), ``id``). Returns the path. ``strict`` False (the training commands): a failure is logged
    as a warning and None returned, so a finished training run never fails on its report."""
    from .render import render
    from .training import training_context

    path = os.path.join(out_dir, filename)
    try:
        context = training_context(history, samples or [], title=title, info=info or {}, losses=losses,
                                   percent=percent)
        _write(path, render("training.html.j2", context))
    except Exception as exc:
        if strict:
            raise
        log.warning("no %s: %s", path, exc)
        return None
    return path


def _write(path: str, html: str) -> None:
    """Atomically, readable like any file the user creates (the temp file behind it is private)."""
    atomic_write(path, html)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
