"""Chart geometry for the report's inline SVG: the numbers here, the markup in ``templates/macros.html.j2``.

No plotting library: a histogram, grouped horizontal bars and line charts are a few rectangles and
polylines, and computing them here keeps the report free of any script or font it would have to fetch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (about ``count`` of them)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def tick_label(value: float, percent: bool = False) -> str:
    if percent:
        return f"{100 * value:.0f}%" if abs(100 * value - round(100 * value)) < 1e-9 else f"{100 * value:.1f}%"
    if value == int(value) and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.3g}"


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    label: str
    title: str
    color: str = PALETTE[0]


@dataclass
class Tick:
    pos: float
    label: str


@dataclass
class Chart:
    width: int
    height: int
    title: str
    bars: list[Bar] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)  # {"name", "color", "points", "dots": [(x, y, title)]}
    xticks: list[Tick] = field(default_factory=list)
    yticks: list[Tick] = field(default_factory=list)
    xlabel: str = ""
    ylabel: str = ""
    left: int = 48
    top: int = 12
    plot_w: int = 0
    plot_h: int = 0
    legend: list[tuple[str, str]] = field(default_factory=list)


def histogram(counts: Sequence[int], labels: Sequence[str], *, title: str, xlabel: str, ylabel: str = "rows",
              width: int = 640, height: int = 220, every: int = 1) -> Chart:
    """Vertical bars, one per bin; ``labels`` name the bins (every ``every``-th is printed on the axis)."""
    left, top, bottom, right = 52, 14, 40, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts) if counts else 0
    ticks = nice_ticks(0, max(peak, 1), 4, integer=True) if peak >= 4 else list(range(0, max(peak, 1) + 1))
    ymax = ticks[-1]
    n = max(1, len(counts))
    slot = plot_w / n
    chart = Chart(width, height, title, xlabel=xlabel, ylabel=ylabel, left=left, top=top, plot_w=plot_w,
                  plot_h=plot_h)
    for i, (count, label) in enumerate(zip(counts, labels)):
        h = plot_h * count / ymax if ymax else 0
        chart.bars.append(Bar(left + i * slot + 1, top + plot_h - h, max(slot - 2, 1), h, label,
                              f"{label}: {count:,} rows"))
        if i % every == 0:
            chart.xticks.append(Tick(left + (i + 0.5) * slot, label))
    chart.yticks = [Tick(top + plot_h - plot_h * t / ymax, tick_label(t)) for t in ticks]
    return chart


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str, xlabel: str = "epoch",
               ylabel: str = "", width: int = 520, height: int = 260, percent: bool = False,
               unit: bool = False) -> Chart:
    """One polyline with dots per series; shared axes from the data's range (``unit``: 0 to 1)."""
    left, top, bottom, right = 56, 14, 40, 14
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [p for pts in series.values() for p in pts if _finite(p[1])]
    chart = Chart(width, height, title, xlabel=xlabel, ylabel=ylabel, left=left, top=top, plot_w=plot_w,
                  plot_h=plot_h)
    if not points:
        return chart
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 0.05
    yt = nice_ticks(y_lo - pad if y_lo - pad < 0 <= y_lo else y_lo - pad, y_hi + pad, 4)
    if unit:
        yt = [0.0, 0.25, 0.5, 0.75, 1.0]
    if y_lo >= 0 and yt[0] < 0:
        yt = [t for t in yt if t >= 0] or [0.0]
        if yt[0] > 0:
            yt.insert(0, 0.0)
    y0, y1 = yt[0], yt[-1]

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return top + plot_h - plot_h * (y - y0) / ((y1 - y0) or 1)

    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in pts if _finite(y)]
        if not good:
            continue
        coords = [(round(px(x), 1), round(py(y), 1)) for x, y in good]
        chart.lines.append({
            "name": name, "color": color,
            "points": " ".join(f"{x},{y}" for x, y in coords),
            "dots": [(cx, cy, f"{name} at {xlabel} {_short(x)}: {tick_label(y, percent) if percent else _short(y)}")
                     for (cx, cy), (x, y) in zip(coords, good)],
        })
        chart.legend.append((name, color))
    chart.yticks = [Tick(py(t), tick_label(t, percent)) for t in yt]
    xt = nice_ticks(x_lo, x_hi, 6) if x_hi - x_lo > 6 else sorted(set(xs))
    chart.xticks = [Tick(px(t), _short(t)) for t in xt if x_lo <= t <= x_hi]
    return chart


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: float) -> str:
    return f"{int(value)}" if value == int(value) else f"{value:.4g}"
