"""Helpers the test modules share: run the CLI in-process, read a result table, catch transformers' warnings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from click.testing import CliRunner

from batchcap.cli import main
from batchcap.output import read_table


def run_cli(*args: object, raise_errors: bool = False) -> tuple[int, str]:
    """Run ``batchcap ARGS`` in-process: (exit code, stdout + stderr). ``raise_errors`` re-raises an
    exception that is not a clean exit (a bug), so a test sees its traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if raise_errors and result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def rows_of(path: object) -> list[dict]:
    return read_table(str(path)).to_pylist()


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """The warnings transformers logs within, as a library user sees them (its logger at WARNING: the CLI,
    and so other tests, quiet it), and as in a fresh process (its once-per-process warnings forgotten)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logging.Logger.warning_once.cache_clear()
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
