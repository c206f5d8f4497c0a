"""Click options that the inference commands (cli.py) and the fine-tuning commands (train/cli.py) share."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import click

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NO_LIMIT = ("0", "none", "off", "unlimited")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def parse_size(text: str) -> int | None:
    """``2GiB``, ``512MB``, ``1.5g``, ``1000000`` -> bytes (KB/MB/GB powers of 1000, KiB/MiB/GiB of 1024);
    ``0``, ``none``, ``off``: None (no limit). ValueError for anything else."""
    value = str(text).strip().lower().replace("_", "").replace(" ", "")
    if value in _NO_LIMIT:
        return None
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"{text!r} is not a size (e.g. 2GiB, 512MB, 1000000; 0 or none for no limit)")
    try:
        size = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 2GiB, 512MB, 1000000; 0 or none for no limit)") from None
    if size < 0 or size != size or size == float("inf"):
        raise ValueError(f"{text!r} is not a size")
    return int(size) or None


class ByteSize(click.ParamType):
    """A size in bytes with an optional unit (see :func:`parse_size`); None for no limit."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


_SECONDS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_DURATION_HELP = "e.g. 14400, 90m, 11h, 1:30:00; none for no limit"


def parse_duration(text: str) -> float | None:
    """``14400``, ``90s``, ``30m`` / ``30min``, ``11h``, ``1.5h``, ``1:30:00`` or ``90:00`` -> seconds;
    ``0``, ``none``, ``off``: None (no limit). ValueError for anything else."""
    value = str(text).strip().lower().replace(" ", "")
    if value in _NO_LIMIT:
        return None
    try:
        if ":" in value:
            parts = [float(p) for p in value.split(":")]
            if len(parts) > 3 or any(p < 0 for p in parts):
                raise ValueError
            seconds = 0.0
            for part in parts:
                seconds = seconds * 60 + part
        else:
            number = value.rstrip(string.ascii_lowercase)
            unit = value[len(number):]
            if unit not in _SECONDS or not number:
                raise ValueError
            seconds = float(number) * _SECONDS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration ({_DURATION_HELP})") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{text!r} is not a duration ({_DURATION_HELP})")
    return seconds


class Duration(click.ParamType):
    """A duration in seconds with an optional unit or as H:MM:SS (see :func:`parse_duration`); None for none."""

    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | None:
        if value is None or isinstance(value, (int, float)):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def manifest_options(text: str = "reference text") -> list[Decorator]:
    return [
        click.option("--path-column", default=None, help="Manifest column with the path or URL."),
        click.option("--reference-column", "reference_columns", multiple=True,
                     help=f"Manifest column(s) with the {text} (repeat for several)."),
        click.option("--id-column", default=None, help="Manifest column with a stable item id."),
        click.option("--root", default=None, metavar="DIR", type=click.Path(exists=True, file_okay=False),
                     help="Read local files only inside DIR (after resolving symlinks and ..); other paths "
                          "become fetch_error rows. Use it for manifests you did not write."),
    ]


def http_options() -> list[Decorator]:
    return [
        click.option("--timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
                     help="HTTP read timeout, seconds."),
        click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
                     help="HTTP retries on connection errors, timeouts, 5xx and 429."),
        click.option("--fetch-deadline", type=click.FloatRange(0.1), default=None, metavar="SECONDS",
                     help="Longest one URL may take, retries and redirects included; a server that "
                          "drips its body is cut off there [default: 120 images, 600 audio]."),
        click.option("--block-private-addresses", is_flag=True,
                     help="Refuse URLs (and redirects) to hosts that resolve to loopback, private, link-local "
                          "(cloud metadata), multicast or reserved addresses. Use it for manifests you did not "
                          "write; proxy settings from the environment are then ignored."),
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
