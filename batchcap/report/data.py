"""Reading a result table (and its summary) into columns, and the figures every kind of report shares."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from ..items import FatalError
from ..output import read_table, summary_path

log = logging.getLogger(__name__)

OK = "ok"
STATUS_ORDER = ("ok", "fetch_error", "decode_error", "empty", "model_error", "crashed")
AUDIO_MARKERS = ("text", "duration_s")
IMAGE_MARKERS = ("caption",)
# Columns a run writes itself; everything else in a table was carried from the manifest.
AUDIO_COLUMNS = {"id", "source", "text", "language", "duration_s", "status", "error", "model", "reference", "wer",
                 "cer", "decode", "no_speech_prob", "language_prob", "segments"}
IMAGE_COLUMNS = {"id", "source", "caption", "status", "error", "http_status", "width", "height", "model",
                 "references", "bleu_4", "rouge_l", "cider_d"}


class Columns(Mapping):
    """A table's columns as Python lists, each converted from Arrow when first read (a report of a big table
    never converts the columns it does not show, such as long ``segments`` lists)."""

    def __init__(self, table: Any, convert: dict[str, Callable[[Any], Any]] | None = None):
        self._table = table
        self._names = list(table.column_names)
        self._convert = convert or {}
        self._cache: dict[str, list[Any]] = {}

    def __getitem__(self, name: str) -> list[Any]:
        values = self._cache.get(name)
        if values is None:
            if name not in self._names:
                raise KeyError(name)
            values = self._table.column(name).to_pylist()
            if name in self._convert:
                values = [self._convert[name](v) for v in values]
            self._cache[name] = values
        return values

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


@dataclass
class Result:
    """One result table as columns (Python lists), its summary and where it lives."""

    path: str
    columns: Mapping[str, list[Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    kind: str = "audio"  # "audio" or "images"
    mtime: float = 0.0
    _nones: list[None] = field(default_factory=list, repr=False)

    @property
    def num_rows(self) -> int:
        return len(self.columns["id"])

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def col(self, name: str) -> list[Any]:
        """A column, or a column of None where the table has none."""
        if name in self.columns:
            return self.columns[name]
        if len(self._nones) != self.num_rows:
            self._nones = [None] * self.num_rows
        return self._nones

    def has(self, name: str) -> bool:
        return name in self.columns and any(v is not None for v in self.columns[name])

    @property
    def carried(self) -> list[str]:
        own = AUDIO_COLUMNS if self.kind == "audio" else IMAGE_COLUMNS
        return [c for c in self.columns if c not in own and not c.startswith("_")]


def load_result(path: str, summary: dict[str, Any] | None = None) -> Result:
    """Read ``path`` (parquet or CSV) and the summary JSON beside it (``summary`` given: that one instead)."""
    if not os.path.isfile(path):
        raise FatalError(f"no result file at {path}")
    try:
        table = read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds; one line for the user
        raise FatalError(f"cannot read {path} as a result table: {exc}") from None
    if "id" not in table.column_names or "status" not in table.column_names:
        raise FatalError(f"{path} is not a batchcap result table (no id / status columns)")
    if summary is None:
        summary = _read_summary(summary_path(path))
    kind = _kind(table.column_names, summary)
    convert: dict[str, Callable[[Any], Any]] = {"id": lambda v: None if v is None else str(v)}
    if kind == "images":
        convert["references"] = _as_list
    import pyarrow as pa

    for f in table.schema:  # a NaN or infinite score or duration (a table edited by hand) is no value
        if pa.types.is_floating(f.type):
            convert[f.name] = _finite
    columns = Columns(table, convert)
    return Result(os.path.abspath(path), columns, summary or {}, kind, os.path.getmtime(path))


def _finite(value: Any) -> Any:
    return value if value is None or math.isfinite(value) else None


def _read_summary(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable summary %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _kind(names: Sequence[str], summary: dict[str, Any] | None) -> str:
    if any(m in names for m in IMAGE_MARKERS) or "references" in names:
        return "images"
    if any(m in names for m in AUDIO_MARKERS):
        return "audio"
    if summary and ("images_this_run" in summary or "cider_d" in summary):
        return "images"
    return "audio"


def _as_list(value: Any) -> list[str]:
    """References as a list of strings (CSV tables hold them as JSON text)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                return [value]
            return [str(v) for v in parsed if v is not None]
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


# --- shared figures --------------------------------------------------------------------------------


def ordered_status_counts(statuses: Iterable[Any]) -> list[tuple[str, int]]:
    counts = Counter("?" if s is None else str(s) for s in statuses)
    known = [(s, counts[s]) for s in STATUS_ORDER if counts.get(s)]
    rest = sorted((s, n) for s, n in counts.items() if s not in STATUS_ORDER)
    return known + rest


@dataclass
class FailureGroup:
    status: str
    message: str
    count: int
    examples: list[str]


def failure_groups(result: Result, examples: int = 3, limit: int = 40) -> tuple[list[FailureGroup], int]:
    """Rows that are not ok, grouped by status and message (the row's own source replaced by ``<source>``
    so the same failure on different files is one group); the biggest ``limit`` groups and how many more."""
    groups: dict[tuple[str, str], FailureGroup] = {}
    for status, error, source, row_id in zip(result.col("status"), result.col("error"), result.col("source"),
                                             result.col("id")):
        if status == OK:
            continue
        message = str(error) if error else "(no message)"
        src = str(source or row_id or "")
        if src and len(src) > 3:
            message = message.replace(src, "<source>")
            base = os.path.basename(src)
            if len(base) > 3 and "." in base.strip("."):  # a file name, not a word ("image", "empty") of the message
                message = re.sub(rf"(?<![\w.]){re.escape(base)}(?![\w])", "<source>", message)
        key = (str(status), message)
        group = groups.get(key)
        if group is None:
            group = groups[key] = FailureGroup(str(status), message, 0, [])
        group.count += 1
        if len(group.examples) < examples:
            group.examples.append(src)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, g.status, g.message))
    return ordered[:limit], max(0, len(ordered) - limit)


def folder_labels(result: Result, folders: Sequence[str] | None = None) -> list[str] | None:
    """The rows' folder labels for a "by folder" table, None when there is none to show: ``folders`` as
    given (labels shared with another result, whose table has the rows of both), else the result's own
    labels where its rows span more than one folder."""
    if folders is not None:
        return list(folders)
    labels = folders_of(result.col("source"))
    return labels if len(set(labels)) > 1 else None


def folders_of(sources: Sequence[Any], width: int = 44) -> list[str]:
    """:func:`folder_of` for every source (computed once per distinct directory); labels longer than ``width``
    keep their first folder and last two (``speech-en/…/sounds/en_US``) unless that makes two alike."""
    common = common_folder(sources)
    cache: dict[str, str] = {}
    out = []
    for source in sources:
        key = os.path.dirname(str(source)) if source and "://" not in str(source)[:12] else None
        if key is None:
            out.append(folder_of(source, common))
            continue
        label = cache.get(key)
        if label is None:
            label = cache[key] = folder_of(source, common)
        out.append(label)
    labels = set(out)
    short = {label: _shorten(label, width) for label in labels}
    if len(set(short.values())) == len(labels):
        out = [short[label] for label in out]
    return out


def _shorten(label: str, width: int) -> str:
    parts = label.split("/")
    if len(label) <= width or len(parts) <= 3:
        return label
    return "/".join([parts[0], "…", *parts[-2:]])


def folder_of(source: Any, common: str) -> str:
    """A short folder label: the source's directory relative to the folder all sources share (that folder
    itself by its name); URLs: host/dir."""
    if not source:
        return "(none)"
    src = str(source)
    if "://" in src[:12]:
        parts = urlsplit(src)
        return parts.netloc + (os.path.dirname(parts.path) or "/")
    folder = os.path.dirname(src)
    if common and folder:
        rel = os.path.relpath(folder, common)
        return (os.path.basename(common) or common) if rel == "." else rel
    return folder or "."


def common_folder(sources: Sequence[Any]) -> str:
    local = list({os.path.dirname(str(s)) for s in sources if s and "://" not in str(s)[:12]})
    if not local:
        return ""
    try:
        return os.path.commonpath(local) if all(os.path.isabs(p) for p in local) or \
            not any(os.path.isabs(p) for p in local) else ""
    except ValueError:
        return ""


@dataclass
class Group:
    key: str
    rows: int
    scored: int
    value: float | None  # the group's figure (corpus WER, mean CIDEr-D, ...)
    extra: dict[str, Any] = field(default_factory=dict)


def group_rows(keys: Sequence[Any], limit: int = 30) -> dict[str, list[int]]:
    """Row indices per key, the ``limit`` most frequent keys (the rest under "(other)")."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        members["(none)" if key is None or key == "" else str(key)].append(i)
    if len(members) <= limit:
        return dict(members)
    ordered = sorted(members.items(), key=lambda kv: -len(kv[1]))
    kept = dict(ordered[:limit - 1])
    kept["(other)"] = [i for _, idx in ordered[limit - 1:] for i in idx]
    return kept


def local_file(source: Any, base_dir: str) -> str | None:
    """The absolute path of a local source (absolute, or relative to the result's folder or the working
    directory), or None for URLs and files that are not there."""
    if not source:
        return None
    src = str(source)
    if "://" in src[:12]:
        return None
    candidates = [src] if os.path.isabs(src) else [os.path.join(base_dir, src), os.path.abspath(src)]
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def relative_link(path: str, report_dir: str) -> str:
    """A relative URL from the report's folder to a local file (works when the folder is moved with it)."""
    rel = os.path.relpath(path, report_dir)
    return quote(rel.replace(os.sep, "/"))


def is_url(source: Any) -> bool:
    return bool(source) and str(source)[:8].lower().startswith(("http://", "https://"))


# --- header ----------------------------------------------------------------------------------------


def metric(key: str, label: str, value: Any, text: str) -> dict[str, Any]:
    """A headline figure: its text, and its exact value (in the page as ``data-value``)."""
    return {"key": key, "label": label, "value": value, "text": text}


def header(result: Result, metrics: list[dict[str, Any]], report_dir: str) -> dict[str, Any]:
    """What the top of a report says about one run."""
    s = result.summary
    command = s.get("command")
    if isinstance(command, (list, tuple)):
        command = shlex.join(str(a) for a in command)
    options = s.get("options") if isinstance(s.get("options"), dict) else {}
    models = Counter(m for m in result.col("model") if m)
    model = s.get("model") or (models.most_common(1)[0][0] if models else None)
    date = s.get("finished") or s.get("date")
    if not date:
        date = _dt.datetime.fromtimestamp(result.mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    figures: list[tuple[str, str]] = [("rows", f"{result.num_rows:,}")]
    if s.get("wall_time_s") is not None:
        figures.append(("wall time (last run)", fmt_seconds(float(s["wall_time_s"]))))
    if result.kind == "audio":
        ok_seconds = sum(d or 0.0 for d, st in zip(result.col("duration_s"), result.col("status")) if st == OK
                         and isinstance(d, (int, float)))
        figures.append(("audio", f"{ok_seconds / 3600:.2f} h" if ok_seconds >= 360 else f"{ok_seconds:.1f} s"))
        if s.get("rtfx_this_run"):
            figures.append(("RTFx (last run)", f"{float(s['rtfx_this_run']):.1f}"))
    else:
        if s.get("images_per_s_this_run"):
            figures.append(("images/s (last run)", f"{float(s['images_per_s_this_run']):.2f}"))
    if s.get("processed_this_run") is not None:
        figures.append(("processed / already done", f"{s['processed_this_run']:,} / "
                                                    f"{s.get('skipped_already_done', 0):,}"))
    return {
        "name": result.name,
        "path": result.path,
        "link": relative_link(result.path, report_dir),
        "kind": result.kind,
        "command": command,
        "options": sorted((str(k), _option_text(v)) for k, v in options.items()),
        "model": model,
        "other_models": [m for m, _ in models.most_common() if m != model][:5],
        "date": date,
        "statuses": ordered_status_counts(result.col("status")),
        "figures": figures,
        "metrics": metrics,
        "has_summary": bool(s),
    }


def _option_text(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
