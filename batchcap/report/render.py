"""The Jinja2 environment of the report templates (autoescaped, undefined names are errors)."""

from __future__ import annotations

import functools
from typing import Any

from .data import fmt_num, fmt_pct, fmt_seconds


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("batchcap.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = fmt_pct
    env.filters["num"] = fmt_num
    env.filters["secs"] = lambda v: "–" if v is None else fmt_seconds(float(v))
    env.filters["clip"] = lambda v, n=48: v if not isinstance(v, str) or len(v) <= n else v[:n - 1] + "…"
    env.filters["count"] = lambda v: "–" if v is None else f"{v:,}"
    env.filters["score"] = lambda v: "–" if not isinstance(v, (int, float)) else f"{v:.3f}"
    return env


def render(template: str, context: dict[str, Any]) -> str:
    return environment().get_template(template).render(**context)
