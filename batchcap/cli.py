"""The ``batchcap`` command: a thin Click layer over the library.

Exit codes: 0 every item ok; 3 the run finished but some items failed (their rows are written);
1 the run could not be done (bad input, model that won't load, ...); 2 usage error; 130 interrupted.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .asr import AudioOptions
from .captioning import ImageOptions
from .cli_common import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_OK, CommandError, guarded_run, setup_logging
from .cli_options import ByteSize, Duration, apply, http_options, logging_options, manifest_options
from .fetch import FetchConfig
from .job import ENGINES, JobOptions
from .memory import torch_huge_pages
from .metrics.asr import NORMALIZER_MODES

log = logging.getLogger("batchcap")


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option given as '' (an unset shell variable, say) is an error, not the default."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty")
    return value


def job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every inference job shares: inputs, output, model runtime, fetching, resume."""
    decorators = [
        click.argument("inputs", nargs=-1, required=True, metavar="INPUT..."),
        click.option("-o", "--output", default=None, metavar="FILE", callback=_not_empty,
                     help="Result file, .parquet or .csv (format from the extension)."),
        click.option("--device", default=JobOptions.device, show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--dtype", default=JobOptions.dtype, show_default=True,
                     help="auto (float16 on CUDA; on CPUs with native bfloat16, float32 weights with bfloat16 "
                     "autocast; float32 elsewhere), float32, float16 or bfloat16."),
        click.option("--batch-size", type=click.IntRange(1), default=JobOptions.batch_size, show_default=True),
        click.option("--beam-size", type=click.IntRange(1), default=JobOptions.num_beams, show_default=True,
                     help="Beams for generation (1 = greedy)."),
        click.option("--max-new-tokens", type=click.IntRange(1), default=None,
                     help="Cap on generated tokens per item."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Threads decoding and preprocessing while the model runs [default: 4 audio, 16 images]."),
        click.option("--fetch-workers", type=click.IntRange(1), default=None,
                     help="Threads reading files and downloading URLs [default: 4 x --workers]."),
        click.option("--per-host", type=click.IntRange(1), default=FetchConfig.per_host, show_default=True,
                     help="Most concurrent HTTP requests to one host."),
        *manifest_options(),
        *http_options(),
        click.option("--max-bytes", type=click.IntRange(1), default=None,
                     help="Largest file or download accepted, in bytes."),
        click.option("--max-inflight-bytes", type=ByteSize(), default="2GiB", show_default=True,
                     help="Most memory the decoded items waiting for the model may take (audio samples, features, "
                          "pixels), e.g. 512MB or 4GiB; 0 or none: no limit. Over it, decoding ahead waits and "
                          "some items are decoded twice; batches stay the same, and an item larger than this "
                          "still runs, alone. Local engine only."),
        click.option("--overwrite", is_flag=True, help="Start over instead of resuming from OUTPUT."),
        click.option("--report", is_flag=True,
                     help="Also write OUT.report.html, the run as a page to look at (see batchcap report)."),
        click.option("--retry-failed", is_flag=True, help="Redo items whose earlier row is not ok."),
        click.option("--flush-every", type=click.IntRange(1), default=JobOptions.flush_rows, show_default=True,
                     help="Rows per part file: the most a crash can cost."),
        click.option("--engine", type=click.Choice(list(ENGINES)), default=JobOptions.engine, show_default=True,
                     help="Run here, or on Ray (pip install 'batchcap[ray]')."),
        click.option("--ray-address", default=None,
                     help="Ray cluster address (default: a running cluster, else a local instance)."),
        click.option("--concurrency", type=click.IntRange(1), default=JobOptions.concurrency, show_default=True,
                     help="Ray engine: model replicas."),
        click.option("--num-gpus-per-replica", type=click.FloatRange(0), default=JobOptions.num_gpus_per_replica,
                     show_default=True,
                     help="Ray engine: GPUs each model replica reserves."),
        *logging_options("No progress, no summary; errors only."),
    ]
    return apply(fn, decorators)


def _fetch_config(default_max_bytes: int, timeout: float, retries: int, max_bytes: int | None,
                  per_host: int, default_deadline: float = 120.0, fetch_deadline: float | None = None,
                  block_private_addresses: bool = False, root: str | None = None) -> Any:
    from .fetch import FetchConfig

    return FetchConfig(read_timeout=timeout, retries=retries, max_bytes=max_bytes or default_max_bytes,
                       per_host=per_host, deadline=fetch_deadline or default_deadline,
                       block_private=block_private_addresses, root=root)


def _run(job: Callable[[], Any], quiet: bool) -> None:
    """Run a job, report its summary, exit with the code a scheduler can act on."""
    with guarded_run("rows done so far are kept; run the same command again to resume"):
        result = job()
    if not quiet:
        lines = summary_lines(result.summary) + [f"summary: {result.summary_path}"]
        if result.summary.get("report"):
            lines.append(f"report: {result.summary['report']}")
        try:
            for line in lines:
                click.echo(line)
            sys.stdout.flush()
        except BrokenPipeError:  # `batchcap ... | head`: the run is done, its code says how it went
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    click.get_current_context().exit(EXIT_ITEMS_FAILED if result.failed_this_run else EXIT_OK)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    counts = summary["status_counts"]
    parts = ", ".join(f"{n} {status}" for status, n in counts.items()) or "nothing to do"
    lines = [f"wrote {summary['rows']} rows to {summary['output']} ({parts})"]
    lines.append(f"this run: {summary['processed_this_run']} processed, {summary['skipped_already_done']} "
                 f"already done, {summary['wall_time_s']:.1f} s")
    skipped = summary.get("skipped_files") or 0
    if skipped:  # a folder of the wrong kind of files says so, not only "nothing to do"
        kinds = list((summary.get("skipped_extensions") or {}).items())
        detail = ", ".join(f"{n} {ext}" for ext, n in kinds[:5]) + (", ..." if len(kinds) > 5 else "")
        lines.append(f"skipped {skipped} file{'s' if skipped != 1 else ''} of other types in the input folders"
                     + (f" ({detail})" if detail else ""))
    unreadable = summary.get("unreadable_folders") or []
    if unreadable:  # files that have no row: the run exits 3
        more = ", ..." if len(unreadable) > 3 else ""
        lines.append(f"could not read {len(unreadable)} input folder{'s' if len(unreadable) != 1 else ''} "
                     f"(their files have no rows): {', '.join(unreadable[:3])}{more}")
    if summary.get("audio_hours") is not None:
        rtfx = summary.get("rtfx_this_run")
        lines.append(f"audio: {summary['audio_hours']:.3f} h" + (f", RTFx {rtfx:.1f} this run" if rtfx else ""))
    if summary.get("decode_counts"):
        lines.append("decode: " + ", ".join(f"{n} {kind}" for kind, n in summary["decode_counts"].items()))
    if summary.get("wer") is not None:
        cer = summary.get("cer")
        lines.append(f"WER {summary['wer']:.2%}" + (f", CER {cer:.2%}" if cer is not None else "")
                     + f" over {summary['scored_rows']} rows with references")
    by_language = summary.get("wer_by_language") or {}
    if by_language:
        shown = [f"{lang} {v['wer']:.2%} ({v['scored_rows']})" for lang, v in list(by_language.items())[:8]
                 if v.get("wer") is not None]
        more = len(by_language) - 8
        lines.append("WER by language: " + ", ".join(shown) + (f", {more} more in the summary" if more > 0 else ""))
    for name in ("bleu_4", "rouge_l", "cider_d"):
        if summary.get(name) is not None:
            lines.append(f"{name.upper().replace('_', '-')} {summary[name]:.4f}")
    return lines


class _Batchcap(click.Group):
    """The ``batchcap`` group; it remembers the command line it was given (for summaries and reports)."""

    def main(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        _ARGV[:] = ["batchcap", *(sys.argv[1:] if args is None else [str(a) for a in args])]
        torch_huge_pages()  # before any command imports torch (memory.py)
        return super().main(args, *more, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C before a command's guarded run (its imports): 130, not click's 1
            raise CommandError("interrupted", EXIT_INTERRUPTED) from None


_ARGV: list[str] = []


@click.group(cls=_Batchcap, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchcap")
def main() -> None:
    """Caption images and transcribe recordings in batches, into parquet or CSV tables.

    Exit codes: 0 all items ok, 3 some items failed (rows written), 1 fatal error,
    2 usage error, 130 interrupted (rerun to resume).
    """


@main.command()
@job_options
@click.option("--model", default=AudioOptions.model, show_default=True,
              help="Whisper checkpoint: a Hugging Face hub id or a local directory.")
@click.option("--language", default=None,
              help="Spoken language of every recording (e.g. es), or the candidates detection picks from "
                   "(e.g. es,en). Multilingual models detect it per recording when absent.")
@click.option("--language-column", default=None,
              help="Manifest column with each recording's language (it wins over --language) "
                   "[default: language, lang or locale when present].")
@click.option("--run-languages/--no-run-languages", default=AudioOptions.run_languages, show_default=True,
              help="A recording whose detected language stays unsure (a clip of a second or two, often) leans on "
                   "the languages the run's other recordings were surely detected in; off, it keeps its own "
                   "most likely language whatever the run speaks.")
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default=AudioOptions.task, show_default=True)
@click.option("--normalize", type=click.Choice(list(NORMALIZER_MODES)), default=AudioOptions.normalize,
              show_default=True,
              help="Text normalization before WER: auto is Whisper's English normalizer for English and "
                   "'language' for others (Whisper's basic normalizer, numbers spelled in the row's language, "
                   "languages written without spaces scored by character); or whisper, basic, none.")
@click.option("--full-window", is_flag=True,
              help="Run Whisper's encoder over its whole 30 s window for every clip, exactly as transformers "
                   "and openai-whisper do (slower). By default a clip's encoder computes the clip plus "
                   "--window-margin seconds and takes the rest of the window from a cached silent one.")
@click.option("--window-margin", type=click.FloatRange(0.1, 30), default=AudioOptions.window_margin_s,
              show_default=True,
              help="Seconds of padding after each clip that the encoder computes (without --full-window).")
@click.option("--no-timestamps", is_flag=True,
              help="Decode without Whisper's timestamp tokens (a little faster): each clip, and each window of a "
                   "long recording, is then one segment. By default segments carry Whisper's own times.")
@click.option("--word-timestamps", is_flag=True,
              help="Give each segment its words with start, end and probability (cross-attention alignment, "
                   "as openai-whisper's word_timestamps; one more decoder pass per batch).")
@click.option("--no-fallback", is_flag=True,
              help="Do not redo suspect transcripts (full window, then temperatures 0.2-1.0); only flag them "
                   "(decode = unresolved).")
@click.option("--compression-ratio-threshold", type=click.FloatRange(0),
              default=AudioOptions.compression_ratio_threshold, show_default=True,
              help="A transcript whose text compresses better than this (zlib) is suspect: a loop.")
@click.option("--logprob-threshold", type=float, default=AudioOptions.logprob_threshold, show_default=True,
              help="A transcript whose mean token log-probability is below this is suspect.")
@click.option("--no-speech-threshold", type=click.FloatRange(0, 1), default=AudioOptions.no_speech_threshold,
              show_default=True,
              help="Above this no-speech probability, an unconfident transcript is dropped (decode = no_speech).")
@click.option("--min-duration", type=click.FloatRange(0), default=AudioOptions.min_duration, show_default=True,
              help="Clips shorter than this (seconds) get status 'empty'.")
@click.option("--silence-threshold", type=float, default=AudioOptions.silence_dbfs, show_default=True,
              help="Clips whose peak is below this (dBFS) get status 'empty'.")
@click.option("--max-duration", "max_duration_s", type=Duration(),
              default=f"{AudioOptions.max_duration_s / 3600:g}h", show_default=True,
              help="Longer recordings are a decode_error, found from the header before decoding and enforced "
                   "while decoding (a tiny FLAC or Opus file can hold hours): seconds, 90m, 11h, 1:30:00, or "
                   "none. A recording's samples take about 230 MB an hour.")
@click.option("--long-form", type=click.Choice(["batched", "sequential"]), default=AudioOptions.long_form,
              show_default=True,
              help="Recordings over 30 s: cut at pauses into windows of at most 24 s batched with the other clips, or "
                   "transformers' sequential decoding (30 s windows one after another).")
@click.option("--vad", type=click.Choice(["energy", "silero"]), default=AudioOptions.vad, show_default=True,
              help="How --long-form batched finds pauses: frame energy, or Silero VAD "
                   "(pip install faster-whisper onnxruntime).")
@click.option("--write", "write", default=None, metavar="FORMATS",
              help="Also write one file per recording: comma-separated srt, vtt, txt, tsv, json, or all.")
@click.option("--write-dir", default=None, metavar="DIR",
              help="Folder for --write files [default: OUTPUT without extension + .subtitles].")
@click.option("--max-line-width", type=click.IntRange(1), default=None,
              help="--write srt/vtt: wrap lines at this many characters.")
@click.option("--max-line-count", type=click.IntRange(1), default=None,
              help="--write srt/vtt: start a new cue after this many lines (with --max-line-width).")
def audio(inputs: tuple[str, ...], output: str | None, full_window: bool, window_margin: float,
          silence_threshold: float, no_fallback: bool, no_timestamps: bool, **options: Any) -> None:
    """Transcribe every recording of INPUT... with Whisper.

    INPUT: directories (searched recursively for audio files), audio files, http(s) URLs, or
    CSV / TSV / parquet / JSONL manifests with a path or URL column and optional reference
    transcripts (WER and CER are then reported). Rerunning the same command resumes.
    """
    from .asr import transcribe

    opts = AudioOptions(full_window=full_window, window_margin_s=window_margin, silence_dbfs=silence_threshold,
                        fallback=not no_fallback, timestamps=not no_timestamps,
                        **_job_options(options, default_max_bytes=2 * 2**30, default_workers=4,
                                       default_deadline=600.0))
    _run(functools.partial(transcribe, list(inputs), output or "transcripts.parquet", options=opts), opts.quiet)


@main.command()
@job_options
@click.option("--model", default=ImageOptions.model, show_default=True,
              help="Image-to-text checkpoint (ViT+GPT-2, BLIP, GIT): a hub id or a local directory.")
@click.option("--prompt", default=None, help="Text the caption starts from (conditional models: BLIP, GIT).")
@click.option("--max-pixels", type=click.IntRange(1), default=ImageOptions.max_pixels, show_default=True,
              help="Larger images are refused before decoding (decompression-bomb guard).")
@click.option("--url-column", "url_column", default=None, help="Manifest column with the URL or path.")
def images(inputs: tuple[str, ...], output: str | None, url_column: str | None, **options: Any) -> None:
    """Caption every image of INPUT... with an image-to-text model.

    INPUT: directories (searched recursively for jpg, png, webp, gif, bmp, tiff), image files,
    http(s) URLs, or CSV / TSV / parquet / JSONL manifests with a URL or path column and
    optional reference captions (BLEU-4, ROUGE-L and CIDEr-D are then reported). Rerunning the
    same command resumes.
    """
    from .captioning import caption_images

    if url_column:
        options["path_column"] = url_column
    if options["max_new_tokens"] is None:
        options["max_new_tokens"] = ImageOptions.max_new_tokens
    opts = ImageOptions(**_job_options(options, default_max_bytes=50 * 2**20, default_workers=16))
    _run(functools.partial(caption_images, list(inputs), output or "captions.parquet", options=opts), opts.quiet)


def _job_options(cli: dict[str, Any], default_max_bytes: int, default_workers: int,
                 default_deadline: float = 120.0) -> dict[str, Any]:
    """CLI option values -> option-dataclass fields (the names differ where the CLI follows habit)."""
    setup_logging(cli.pop("verbose"), cli["quiet"])
    cli["fetch"] = _fetch_config(default_max_bytes, cli.pop("timeout"), cli.pop("retries"), cli.pop("max_bytes"),
                                 cli.pop("per_host"), default_deadline, cli.pop("fetch_deadline"),
                                 cli.pop("block_private_addresses"), cli.pop("root"))
    cli["num_beams"] = cli.pop("beam_size")
    cli["flush_rows"] = cli.pop("flush_every")
    cli["workers"] = cli["workers"] or default_workers
    cli["reference_columns"] = tuple(cli["reference_columns"])
    cli["command"] = list(_ARGV) or None
    return cli


from .export import export  # noqa: E402
from .train.cli import train  # noqa: E402

main.add_command(train)
from .report.cli import report  # noqa: E402

main.add_command(report)
main.add_command(export)


if __name__ == "__main__":  # pragma: no cover
    main()
