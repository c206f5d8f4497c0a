"""The page ``batchcap train images|audio`` write beside the model: curves, the history, predictions."""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from . import charts
from .align import align

SKIP = {"epoch", "step", "steps", "seconds", "best"}
LABELS = {"train_loss": "train loss", "val_loss": "validation loss", "wer": "WER", "cider_d": "CIDEr-D",
          "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L",
          "exact": "exact match"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_context(history: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *, title: str,
                     info: dict[str, Any], losses: Sequence[str], percent: Sequence[str]) -> dict[str, Any]:
    rows = [dict(r) for r in history]
    xs = [r.get("epoch", n + 1) for n, r in enumerate(rows)]
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    numeric = [k for k in keys if k not in SKIP and any(_number(r.get(k)) for r in rows)]
    metric_keys = [k for k in numeric if k not in losses]

    def series(names: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
        return {LABELS.get(k, k): [(x, r[k]) for x, r in zip(xs, rows) if _number(r.get(k))] for k in names}

    chart_list = []
    loss_keys = [k for k in losses if k in numeric]
    if loss_keys:
        chart_list.append(charts.line_chart(series(loss_keys), title="loss per epoch", ylabel="loss"))
    pct = [k for k in metric_keys if k in percent]
    unit = [k for k in metric_keys if k not in percent and all(0 <= r[k] <= 1 for r in rows if _number(r.get(k)))]
    other = [k for k in metric_keys if k not in pct and k not in unit]
    for k in pct:
        chart_list.append(charts.line_chart(series([k]), title=f"validation {LABELS.get(k, k)} per epoch",
                                            percent=True))
    for k in other:
        chart_list.append(charts.line_chart(series([k]), title=f"validation {LABELS.get(k, k)} per epoch"))
    if unit:
        chart_list.append(charts.line_chart(series(unit), title="validation scores per epoch", unit=True))
    best = [r.get("epoch") for r in rows if r.get("best")]
    table_keys = [k for k in keys if k != "best"]
    table = [[_cell(r.get(k), k in percent, 1 if k == "seconds" else 4) for k in table_keys] for r in rows]
    return {
        "title": title,
        "generated": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "charts": chart_list,
        "columns": [LABELS.get(k, k) for k in table_keys],
        "table": table,
        "best_epoch": best[-1] if best else None,
        "last": rows[-1] if rows else {},
        "epochs": len(rows),
        "info": [(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in info.items()],
        "samples": [_sample(s) for s in samples],
    }


def _cell(value: Any, percent: bool, digits: int = 4) -> str:
    if value is None:
        return ""
    if _number(value) and isinstance(value, float):
        return f"{100 * value:.2f}%" if percent else f"{value:.{digits}f}"
    return str(value)


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    refs = sample.get("references")
    if refs is None:
        refs = [sample["reference"]] if sample.get("reference") is not None else []
    prediction = str(sample.get("prediction") or "")
    tokens = None
    if sample.get("normalized"):
        ref_n, hyp_n = sample["normalized"]
        tokens = align(str(ref_n or ""), str(hyp_n or ""))
    return {"id": sample.get("id"), "prediction": prediction, "references": [str(r) for r in refs][:5],
            "tokens": tokens, "thumb": _thumb(sample.get("image")), "source": sample.get("source")}


def _thumb(image: Any, size: int = 160) -> str | None:
    if image is None:
        return None
    try:
        from PIL import Image

        img = image.copy() if isinstance(image, Image.Image) else Image.open(image)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=70)
    except Exception:  # noqa: BLE001 - no picture is fine
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
