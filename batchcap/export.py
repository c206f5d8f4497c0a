"""``batchcap export``: subtitle and text files from a finished result table."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import click

from .cli_common import CommandError, setup_logging
from .cli_options import apply, logging_options
from .items import EMPTY, OK, FatalError
from .subtitles import SubtitleOptions, SubtitleWriter, default_subtitle_dir, parse_formats, row_segments

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    rows: int
    exported: int  # rows with files written or kept
    skipped: int  # rows not ok, or without a transcript
    written: int  # files
    kept: int  # files already there (without overwrite)
    directory: str


def export_table(table_path: str, directory: str, formats: str | tuple[str, ...], *,
                 options: SubtitleOptions | None = None, overwrite: bool = False,
                 text_column: str = "text") -> ExportResult:
    """Write ``formats`` for every ok row of the result table at ``table_path`` into ``directory``."""
    from .output import read_table

    fmts = parse_formats(formats) if isinstance(formats, str) else parse_formats(list(formats))
    if not fmts:
        raise ValueError("no format given")
    if not os.path.exists(table_path):
        raise FileNotFoundError(f"{table_path}: no such file")
    import pyarrow as pa

    try:
        table = read_table(table_path)
    except pa.ArrowException as exc:
        raise ValueError(f"cannot read {table_path} as a result table: {exc}") from None
    if "id" not in table.column_names:
        raise ValueError(f"{table_path} has no id column: not a batchcap result table")
    if text_column not in table.column_names:  # every row was "skipped (not ok)", and an empty folder made
        kind = "an images result (captions)" if "caption" in table.column_names else "not a transcription result"
        raise ValueError(f"{table_path} has no {text_column} column: {kind}; export writes the subtitles and "
                         "text files of transcripts")
    writer = SubtitleWriter(directory, fmts, options, overwrite=overwrite)
    exported = skipped = 0
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            status = row.get("status", OK)
            if status != EMPTY and (status != OK or row.get(text_column) is None):
                skipped += 1
                continue
            writer.write(str(row["id"]), row.get(text_column) or "", row_segments(row), row.get("language"))
            exported += 1
    return ExportResult(table.num_rows, exported, skipped, writer.written, writer.kept, directory)


def _export_options(fn):  # noqa: ANN001, ANN202 - a decorator
    return apply(fn, [
        click.command(name="export"),
        click.argument("table", metavar="RESULT"),
        click.option("--format", "formats", default="srt", show_default=True,
                     help="Comma-separated: srt, vtt, txt, tsv, json, or all."),
        click.option("-o", "--output-dir", default=None, metavar="DIR",
                     help="Folder for the files [default: RESULT without extension + .subtitles]."),
        click.option("--max-line-width", type=click.IntRange(1), default=None,
                     help="Wrap subtitle lines at this many characters."),
        click.option("--max-line-count", type=click.IntRange(1), default=None,
                     help="Start a new cue after this many lines (with --max-line-width)."),
        click.option("--overwrite", is_flag=True, help="Rewrite files that already exist (default: keep them)."),
        *logging_options(),
    ])


@_export_options
def export(table: str, formats: str, output_dir: str | None, max_line_width: int | None,
           max_line_count: int | None, overwrite: bool, quiet: bool, verbose: int) -> None:
    """Write subtitles / text files for every ok row of a batchcap audio RESULT (.parquet or .csv).

    One file per row and format, named from the row's id (made safe for a file name); files that
    exist are kept unless --overwrite.
    """
    from .output import local_result

    setup_logging(verbose, quiet)
    directory = output_dir or default_subtitle_dir(table)  # a result in a bucket: its files beside it there
    try:
        with local_result(table) as local:  # a result in object storage is read from a copy
            result = export_table(local, directory, formats, overwrite=overwrite,
                                  options=SubtitleOptions(max_line_width, max_line_count))
    except (ValueError, FileNotFoundError, OSError, FatalError) as exc:
        raise CommandError(str(exc)) from None
    if not quiet:
        click.echo(f"{result.exported} of {result.rows} rows exported to {result.directory}: "
                   f"{result.written} files written, {result.kept} kept"
                   + (f", {result.skipped} rows skipped (not ok)" if result.skipped else ""))
