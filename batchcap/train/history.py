"""Per-epoch history of a fine-tune: ``history.json``, ``history.csv`` and a loss plot ``loss.png``."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..fsutil import atomic_path, atomic_write

log = logging.getLogger(__name__)

HISTORY_JSON, HISTORY_CSV, HISTORY_PLOT = "history.json", "history.csv", "loss.png"


def write_history(out_dir: str, rows: Sequence[dict[str, Any]], *, losses: Sequence[str] = ("train_loss", "val_loss"),
                  metrics: Sequence[str] = (), title: str = "") -> None:
    """``history.json``, ``history.csv`` (one row per epoch) and ``loss.png`` (losses; metrics on a second
    panel) in ``out_dir``. The plot is skipped with a warning if matplotlib is missing."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, HISTORY_JSON), json.dumps(list(rows), indent=2))
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(out_dir, HISTORY_CSV), text.getvalue())
    if rows:
        plot_history(os.path.join(out_dir, HISTORY_PLOT), rows, losses=losses, metrics=metrics, title=title)


def read_history(out_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(out_dir, HISTORY_JSON)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return list(json.load(f))


def plot_history(path: str, rows: Sequence[dict[str, Any]], *, losses: Sequence[str], metrics: Sequence[str],
                 title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", os.path.basename(path))
        return
    shown_metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, 1 + bool(shown_metrics), figsize=(6 + 5 * bool(shown_metrics), 4), squeeze=False)
    panels = [(axes[0][0], losses, "loss")]
    if shown_metrics:
        panels.append((axes[0][1], shown_metrics, "metric"))
    for ax, keys, ylabel in panels:
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
