"""``batchcap report RESULT [RESULT_B] -o report.html``."""

from __future__ import annotations

import os

import click

from ..cli_common import CommandError, setup_logging
from ..items import FatalError
from ..metrics.asr import NORMALIZER_MODES


@click.command()
@click.argument("result", type=click.Path(dir_okay=False))
@click.argument("result_b", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, metavar="FILE",
              help="HTML file to write [default: RESULT's name with .report.html].")
@click.option("--rows", type=click.IntRange(1), default=50, show_default=True,
              help="Rows shown in detail: the worst by WER / CIDEr-D (else the first), and differing rows.")
@click.option("--group-by", "group_by", multiple=True, metavar="COL",
              help="A carried column to break the figures down by (repeat for several); duration, language "
                   "and folder are always used.")
@click.option("--normalize", type=click.Choice(NORMALIZER_MODES), default=None,
              help="Text normalization for the WER when the summary does not say [default: the summary's, "
                   "else auto].")
@click.option("--title", default=None, help="Page title.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
def report(result: str, result_b: str | None, output: str | None, rows: int, group_by: tuple[str, ...],
           normalize: str | None, title: str | None, quiet: bool, verbose: int) -> None:
    """Write one self-contained HTML page about the result table RESULT (parquet or CSV).

    With RESULT_B (e.g. the same inputs after `batchcap train audio`), the two are compared: corpus
    figures side by side, and the rows whose text differs, matched by id. The page opens offline.
    """
    import contextlib
    import tempfile

    from .. import storage
    from ..output import local_result
    from . import build_report, default_report_path

    setup_logging(verbose, quiet)
    output = output or default_report_path(result)
    if not storage.is_remote(output):  # the page replaces the file by a rename: never a device, pipe or folder
        if output.endswith("/") or os.path.isdir(output):
            raise CommandError(f"cannot write {output}: it is a folder (give the report's file name)")
        if os.path.lexists(output) and not os.path.isfile(output):
            raise CommandError(f"cannot write {output}: not a regular file (a device, a pipe or a socket)")
    try:
        with contextlib.ExitStack() as stack:  # results in object storage are read from copies
            local_a = stack.enter_context(local_result(result))
            local_b = stack.enter_context(local_result(result_b)) if result_b else None
            page = output
            if storage.is_remote(output):  # written here, then put beside the result in the bucket
                page = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), storage.basename(output))
            path = build_report(local_a, page, compare=local_b, rows=rows, group_by=group_by, normalize=normalize,
                                title=title)  # a copy keeps its object's name, which the default title shows
            size = os.path.getsize(path)
            if page != output:
                storage.upload(page, output)
    except FatalError as exc:
        raise CommandError(str(exc)) from None
    except storage.StorageError as exc:
        raise CommandError(f"cannot write {output}: {exc.message}") from None
    if not quiet:
        click.echo(f"report: {output} ({size / 1024:,.0f} kB)")
