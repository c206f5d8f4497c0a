"""The images part of a report: caption scores, the thumbnail grid, thumbnails themselves."""

from __future__ import annotations

import base64
import io
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from ..images import DEFAULT_MAX_PIXELS, decode_image
from . import charts
from .data import OK, Result, fmt_num, folder_labels, group_rows, is_url, local_file, metric

log = logging.getLogger(__name__)

SCORE_COLUMNS = (("cider_d", "CIDEr-D"), ("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"))
EMBEDDED_RE = re.compile(r"^(?P<name>.+\.parquet):(?P<row>\d+)$")
THUMB_PX = 160


def metrics(result: Result) -> list[dict[str, Any]]:
    """Corpus BLEU-4 / ROUGE-L / CIDEr-D. ROUGE-L and CIDEr-D are means of the per-row column, as in
    pycocoevalcap; corpus BLEU-4 is not a mean of rows, so it comes from the summary or, without one, is
    recomputed from the table's captions and references."""
    figures = corpus_scores(result)
    if not figures:
        return []
    out = [metric(name, label, figures[name], fmt_num(figures[name]))
           for name, label in (("bleu_4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("cider_d", "CIDEr-D"))
           if figures.get(name) is not None]
    out.append(metric("scored_rows", "scored rows", figures["scored_rows"], f"{figures['scored_rows']:,}"))
    return out


def scored_rows(result: Result) -> list[int]:
    """The rows a corpus score covers: ``ok`` with references."""
    status, refs = result.col("status"), result.col("references")
    return [i for i in range(result.num_rows) if status[i] == OK and refs[i]]


def corpus_scores(result: Result, rows: Sequence[int] | None = None) -> dict[str, Any]:
    """Corpus BLEU-4 and the rows' mean ROUGE-L and CIDEr-D over the scored rows (of ``rows`` when given)."""
    refs = result.col("references")
    scored = scored_rows(result)
    if rows is not None:
        scored = sorted(set(scored) & set(rows))
    if not scored:
        return {}
    out: dict[str, Any] = {"scored_rows": len(scored)}
    for name in ("rouge_l", "cider_d"):
        values = [result.col(name)[i] for i in scored]
        values = [v for v in values if isinstance(v, (int, float))]
        out[name] = sum(values) / len(values) if values else None
    if result.summary.get("bleu_4") is not None and result.summary.get("scored_rows") == len(scored):
        out["bleu_4"] = float(result.summary["bleu_4"])
    else:  # not in the summary (none, or another run's): computed from the table
        from ..metrics.captions import caption_metrics, corpus_bleu

        captions = [result.col("caption")[i] or "" for i in scored]
        if out["cider_d"] is None or out["rouge_l"] is None:
            corpus, _ = caption_metrics(captions, [refs[i] for i in scored])
            out["bleu_4"] = corpus.get("bleu_4")
            out["rouge_l"], out["cider_d"] = corpus.get("rouge_l"), corpus.get("cider_d")
        else:  # the rows hold ROUGE-L and CIDEr-D: BLEU-4 alone
            out["bleu_4"] = corpus_bleu(captions, [refs[i] for i in scored])
    return out


def score_histogram(result: Result) -> charts.Chart | None:
    values = [v for v, s in zip(result.col("cider_d"), result.col("status")) if s == OK and isinstance(v, (int, float))]
    if not values:
        return None
    ticks = charts.nice_ticks(0, max(1.0, max(values)), 12)
    width = ticks[1] - ticks[0]
    bins = int(max(values) / width) + 1
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v / width)))] += 1
    labels = [f"{k * width:g}" for k in range(bins)]
    return charts.histogram(counts, labels, title="Images by CIDEr-D", xlabel="CIDEr-D (bin start)", width=860,
                            every=2)


def groups(result: Result, group_by: Sequence[str] = (), folders: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean per-row scores and failures by folder and by each ``group_by`` column (``folders``: the rows'
    folder labels, when they must match another result's)."""
    keyed: list[tuple[str, list[Any]]] = []
    labels = folder_labels(result, folders)
    if labels is not None:
        keyed.append(("folder", labels))
    for col in group_by:
        if col in result.columns:
            keyed.append((col, result.col(col)))
    tables = []
    status = result.col("status")
    cider = result.col("cider_d")
    for name, keys in keyed:
        rows = []
        for key, idx in sorted(group_rows(keys).items(), key=lambda kv: -len(kv[1])):
            scores = [cider[i] for i in idx if status[i] == OK and isinstance(cider[i], (int, float))]
            rows.append({"key": key, "rows": len(idx), "failed": sum(1 for i in idx if status[i] != OK),
                         "scored": len(scores), "cider_d": sum(scores) / len(scores) if scores else None})
        peak = max((r["cider_d"] for r in rows if r["cider_d"] is not None), default=0) or 1
        for r in rows:
            r["bar"] = 0 if r["cider_d"] is None else min(1.0, r["cider_d"] / peak)
        tables.append({"name": name, "rows": rows, "wide": max(len(r["key"]) for r in rows) > 18})
    return tables


def pick_rows(result: Result, n: int) -> tuple[list[int], str]:
    """Grid rows: the ``n`` lowest CIDEr-D (else the first ``n``) ok rows, then up to ``n`` failures."""
    status = result.col("status")
    cider = result.col("cider_d")
    ok = [i for i in range(result.num_rows) if status[i] == OK]
    scored = [i for i in ok if isinstance(cider[i], (int, float))]
    if scored:
        shown, how = sorted(scored, key=lambda i: (cider[i], i))[:n], "lowest CIDEr-D"
    else:
        shown, how = ok[:n], "first"
    failed = [i for i in range(result.num_rows) if status[i] != OK][:n]
    return shown + failed, how


def run_max_pixels(result: Result) -> int | None:
    """The ``--max-pixels`` the run used (its summary's options), None when the summary does not say."""
    value = (result.summary.get("options") or {}).get("max_pixels")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


class Thumbnails:
    """Downscaled JPEG data: URIs of local or embedded images (URLs are never fetched)."""

    def __init__(self, base_dir: str, size: int = THUMB_PX, quality: int = 70, max_pixels: int | None = None):
        self.base_dir = base_dir
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS  # the run's --max-pixels: what it refused is not decoded
        self.size = size
        self.quality = quality
        self._manifests: dict[str, Any] = {}

    def of(self, source: Any, row_id: Any) -> str | None:
        data = None
        path = local_file(source, self.base_dir)
        if path is None and not is_url(source):
            data = self._embedded(str(row_id or "")) or self._embedded(str(source or ""))
        if path is None and data is None:
            return None
        try:
            if path is not None:
                with open(path, "rb") as f:
                    data = f.read()
            # the picture the model saw (transparency on white, 16-bit and float samples scaled, EXIF
            # orientation, tifffile's TIFFs); a bomb the run refused is not decoded
            image = decode_image(data, max_pixels=self.max_pixels, draft=(self.size * 2, self.size * 2))
            image.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=self.quality, optimize=True)
        except Exception as exc:  # noqa: BLE001 - a thumbnail that fails is a missing picture, not an error
            log.debug("no thumbnail for %s: %s", source, exc)
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def _embedded(self, ref: str) -> bytes | None:
        """Bytes of ``manifest.parquet:N`` (a Hugging Face datasets layout manifest beside the result)."""
        match = EMBEDDED_RE.match(ref)
        if not match:
            return None
        path = local_file(match["name"], self.base_dir)
        if path is None:
            return None
        table = self._manifests.get(path)
        if table is None:
            try:
                import pyarrow.parquet as pq

                table = pq.ParquetFile(path)
            except Exception:  # noqa: BLE001
                return None
            self._manifests[path] = table
        return _row_bytes(table, int(match["row"]))


def _row_bytes(pf: Any, row: int) -> bytes | None:
    """The image bytes of one row of a parquet manifest, reading only its row group."""
    import pyarrow as pa

    offset = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < offset + n:
            group = pf.read_row_group(g)
            for name in group.column_names:
                col = group.column(name)
                if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
                    value = col[row - offset].as_py()
                    return value.get("bytes") if value else None
                if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                    return col[row - offset].as_py()
            return None
        offset += n
    return None


def card(result: Result, i: int, thumbs: Thumbnails) -> dict[str, Any]:
    source = result.col("source")[i]
    refs = result.col("references")[i] or []
    scores = [(name, label, result.col(name)[i]) for name, label in SCORE_COLUMNS if name in result.columns]
    w, h = result.col("width")[i], result.col("height")[i]
    return {
        "index": i,
        "id": result.col("id")[i],
        "source": source,
        "source_url": str(source) if is_url(source) else None,
        "local": local_file(source, result.base_dir) is not None,
        "thumb": thumbs.of(source, result.col("id")[i]),
        "caption": result.col("caption")[i],
        "references": refs[:5],
        "more_refs": max(0, len(refs) - 5),
        "scores": scores,
        "status": result.col("status")[i],
        "error": result.col("error")[i],
        "http_status": result.col("http_status")[i],
        "size": f"{w}×{h}" if w and h else None,
        "folder": os.path.basename(os.path.dirname(str(source))) if source else None,
    }


def images_context(result: Result, *, rows: int, group_by: Sequence[str], report_dir: str) -> dict[str, Any]:
    picked, how = pick_rows(result, rows)
    thumbs = Thumbnails(result.base_dir, max_pixels=run_max_pixels(result))
    cards = [card(result, i, thumbs) for i in picked]
    return {
        "histogram": score_histogram(result),
        "groups": groups(result, group_by),
        "cards": cards,
        "detail_how": how,
        "grid_statuses": sorted({c["status"] for c in cards}, key=lambda s: (s != OK, s)),
        "score_names": [(name, label) for name, label in SCORE_COLUMNS if name in result.columns],
    }
