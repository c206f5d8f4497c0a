"""Helpers the test modules share: run the CLI in-process, read a result table."""

from __future__ import annotations

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
