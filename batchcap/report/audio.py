"""The audio part of a report: WER figures, groups, the confusion lists and the worst rows."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from . import charts
from .align import Normalizers, Scores, align, score_rows
from .data import OK, Result, fmt_pct, folder_labels, group_rows, is_url, local_file, metric, relative_link

DURATION_BUCKETS = ((2, "< 2 s"), (5, "2–5 s"), (10, "5–10 s"), (20, "10–20 s"), (30, "20–30 s"),
                    (60, "30–60 s"), (300, "1–5 min"), (math.inf, "≥ 5 min"))
AUDIO_EXTENSIONS = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
                    ".opus": "audio/ogg", ".m4a": "audio/mp4", ".aac": "audio/aac", ".webm": "audio/webm"}


def duration_bucket(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)) or seconds != seconds:
        return None
    return next(label for limit, label in DURATION_BUCKETS if seconds < limit)


def score_result(result: Result, normalize: str | None = None) -> Scores:
    mode = normalize or result.summary.get("normalize") or "auto"
    model = result.summary.get("model") or next((m for m in result.col("model") if m), None)
    languages = result.col("language")
    if result.summary.get("task") == "translate":  # English text, whatever each recording's language
        languages = ["en"] * len(languages)
    return score_rows(result.col("status"), result.col("reference"), result.col("text"), languages,
                      Normalizers(mode, model))


def metrics(result: Result, scores: Scores) -> list[dict[str, Any]]:
    """Corpus WER / CER over every scored row (total errors / total reference words or characters)."""
    wer, cer, scored = scores.corpus()
    if not scored:
        return []
    out = [metric("wer", "WER", wer, fmt_pct(wer)), metric("cer", "CER", cer, fmt_pct(cer)),
           metric("scored_rows", "scored rows", scored, f"{scored:,}")]
    summary_wer = result.summary.get("wer")
    if summary_wer is not None and wer is not None and abs(summary_wer - wer) > 5e-5:
        out.append(metric("summary_wer", "WER in the summary (another normalizer?)", summary_wer,
                          fmt_pct(summary_wer)))
    return out


def wer_histogram(scores: Scores) -> charts.Chart | None:
    rates = [scores.wer(i) for i in range(len(scores.scored))]
    rates = [r for r in rates if r is not None]
    if not rates:
        return None
    labels = ["0"] + [f"{10 * k}–{10 * (k + 1)}" for k in range(10)] + ["> 100"]
    counts = [0] * len(labels)
    for r in rates:
        if r == 0:
            counts[0] += 1
        elif r > 1:
            counts[-1] += 1
        else:
            counts[1 + min(9, math.ceil(r * 10 - 1e-9) - 1)] += 1
    return charts.histogram(counts, labels, title="Rows by WER", xlabel="row WER (%)", width=860,
                            every=1)


def groups(result: Result, scores: Scores, group_by: Sequence[str] = (),
           folders: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """WER by duration bucket, language, folder and each ``group_by`` column (``folders``: the rows' folder
    labels, when they must match another result's)."""
    tables = []
    durations = result.col("duration_s")
    keyed: list[tuple[str, list[Any], bool]] = []
    if result.has("duration_s"):
        keyed.append(("duration", [duration_bucket(d) for d in durations], True))
    if result.has("language"):
        keyed.append(("language", result.col("language"), False))
    labels = folder_labels(result, folders)
    if labels is not None:
        keyed.append(("folder", labels, False))
    for col in group_by:
        if col in result.columns:
            keyed.append((col, result.col(col), False))
    for name, keys, natural in keyed:
        members = group_rows(keys)
        if natural:
            order = [label for _, label in DURATION_BUCKETS]
            items = sorted(members.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        else:
            items = sorted(members.items(), key=lambda kv: -len(kv[1]))
        rows = []
        for key, idx in items:
            wer, cer, scored = scores.corpus(idx)
            seconds = sum(durations[i] or 0.0 for i in idx if isinstance(durations[i], (int, float)))
            failed = sum(1 for i in idx if result.columns["status"][i] != OK)
            rows.append({"key": key, "rows": len(idx), "failed": failed, "scored": scored, "wer": wer,
                         "cer": cer, "minutes": seconds / 60})
        peak = max((r["wer"] for r in rows if r["wer"] is not None), default=0) or 1
        for r in rows:
            r["bar"] = 0 if r["wer"] is None else min(1.0, r["wer"] / max(peak, 1e-9))
        tables.append({"name": name, "rows": rows, "scored": any(r["scored"] for r in rows),
                       "wide": max(len(r["key"]) for r in rows) > 18})
    return tables


def confusions(scores: Scores, limit: int = 20) -> dict[str, Any]:
    return {
        "substitutions": [(r, h, n) for (r, h), n in scores.substitutions.most_common(limit)],
        "deletions": scores.deletions.most_common(limit),
        "insertions": scores.insertions.most_common(limit),
        "totals": (scores.sub_total, scores.del_total, scores.ins_total),
    }


def pick_rows(result: Result, scores: Scores, n: int) -> tuple[list[int], str]:
    """The rows shown in detail: the worst ``n`` by WER (then errors) when scored, else the first ``n``
    with a transcript."""
    scored = [i for i in range(result.num_rows) if scores.scored[i]]
    if scored:
        worst = sorted(scored, key=lambda i: (-(scores.wer(i) or 0), -scores.word_errors[i], i))
        return worst[:n], "worst"
    texts = result.col("text")
    return [i for i in range(result.num_rows) if texts[i] is not None][:n], "first"


def row_detail(result: Result, scores: Scores, i: int, report_dir: str) -> dict[str, Any]:
    """What one row of the detail list shows."""
    source = result.col("source")[i]
    player = player_for(source, result.base_dir, report_dir)
    tokens = align(scores.ref_norm[i] or "", scores.hyp_norm[i] or "") if scores.scored[i] else []
    carried = {c: result.columns[c][i] for c in result.carried if result.columns[c][i] not in (None, "")}
    return {
        "index": i,
        "id": result.col("id")[i],
        "source": source,
        "source_url": str(source) if is_url(source) else None,
        "duration": result.col("duration_s")[i],
        "language": result.col("language")[i],
        "status": result.col("status")[i],
        "wer": scores.wer(i),
        "errors": scores.word_errors[i] if scores.scored[i] else None,
        "ref_words": scores.ref_words[i] if scores.scored[i] else None,
        "reference": result.col("reference")[i],
        "text": result.col("text")[i],
        "decode": _decode_text(result.col("decode")[i]) if "decode" in result.columns else None,
        "tokens": tokens,
        "player": player,
        "carried": list(carried.items())[:6],
    }


def player_for(source: Any, base_dir: str, report_dir: str) -> dict[str, str] | None:
    """An ``<audio>`` source for a local file (a link relative to the report), None for URLs and missing files."""
    path = local_file(source, base_dir)
    if path is None:
        return None
    ext = os.path.splitext(path)[1].lower()
    return {"src": relative_link(path, report_dir), "type": AUDIO_EXTENSIONS.get(ext, "")}


def _decode_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return str(value)


def audio_context(result: Result, scores: Scores, *, rows: int, group_by: Sequence[str],
                  report_dir: str) -> dict[str, Any]:
    picked, how = pick_rows(result, scores, rows)
    return {
        "histogram": wer_histogram(scores),
        "groups": groups(result, scores, group_by),
        "confusions": confusions(scores),
        "detail": [row_detail(result, scores, i, report_dir) for i in picked],
        "detail_how": how,
        "has_decode": "decode" in result.columns,
        "has_reference": any(scores.scored),
    }
