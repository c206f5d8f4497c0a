"""Click options that the inference commands (cli.py) and the fine-tuning commands (train/cli.py) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def manifest_options(text: str = "reference text") -> list[Decorator]:
    return [
        click.option("--path-column", default=None, help="Manifest column with the path or URL."),
        click.option("--reference-column", "reference_columns", multiple=True,
                     help=f"Manifest column(s) with the {text} (repeat for several)."),
        click.option("--id-column", default=None, help="Manifest column with a stable item id."),
    ]


def http_options() -> list[Decorator]:
    return [
        click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
                     help="HTTP read timeout, seconds."),
        click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
                     help="HTTP retries on connection errors, timeouts, 5xx and 429."),
    ]


def logging_options(quiet: str = "Errors only.") -> list[Decorator]:
    return [
        click.option("-q", "--quiet", is_flag=True, help=quiet),
        click.option("-v", "--verbose", count=True, help="More logging (-vv for debug)."),
    ]


def apply(fn: Callable[..., Any], decorators: list[Decorator]) -> Callable[..., Any]:
    """Decorate ``fn`` so that the options appear in ``--help`` in the order given."""
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn
