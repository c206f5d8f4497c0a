"""``batchcap train images|audio``: fine-tuning commands (a Click group the main CLI adds)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from ..cli_common import EXIT_INTERRUPTED, CommandError, setup_logging
from ..cli_options import apply, http_options, logging_options, manifest_options
from ..items import FatalError
from ..metrics.asr import NORMALIZER_MODES
from .options import (
    BEST_METRICS,
    LANGUAGE_COLUMN,
    LORA_SCOPES,
    PRECISIONS,
    AudioTrainOptions,
    ImageTrainOptions,
    TrainOptions,
)
from .options import default as _default

log = logging.getLogger("batchcap")

IMAGE_MAX_BYTES = 50 * 2**20  # the largest image file or download accepted
AUDIO_MAX_BYTES = 2 * 2**30
IMAGE_DEADLINE_S, AUDIO_DEADLINE_S = 120.0, 600.0  # whole-download deadlines, as for batchcap images / audio


def _d(name: str) -> Any:
    """The default of a shared option (TrainOptions), of an image / audio one (_i, _a): declared once, there."""
    return _default(TrainOptions, name)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    decorators = [
        click.argument("manifest", metavar="MANIFEST"),
        click.option("-o", "--output", "out_dir", required=True, metavar="OUT_DIR",
                     help="Directory for the trained model, checkpoints, history.json/.csv and loss.png."),
        click.option("--val-fraction", type=click.FloatRange(0, 0.9), default=_d("val_fraction"), show_default=True,
                     help="Share of MANIFEST's items held out for validation (seeded split; 0 = none)."),
        click.option("--val-manifest", default=None, metavar="FILE",
                     help="Validation manifest (instead of a split of MANIFEST)."),
        click.option("--batch-size", type=click.IntRange(1), default=_d("batch_size"), show_default=True),
        click.option("--grad-accum", type=click.IntRange(1), default=_d("grad_accum"), show_default=True,
                     help="Batches per optimizer step."),
        click.option("--device", default=_d("device"), show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=_d("precision"), show_default=True,
                     help="auto: bf16 (fp16 on older GPUs) mixed precision on CUDA, fp32 elsewhere."),
        click.option("--seed", type=int, default=_d("seed"), show_default=True),
        click.option("--resume", is_flag=True,
                     help="Continue the run in OUT_DIR from its last checkpoint (model, optimizer, epoch)."),
        click.option("--overwrite", is_flag=True, help="Delete an earlier run in OUT_DIR and start over."),
        click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N manifest rows."),
        click.option("--workers", type=click.IntRange(1), default=_d("workers"), show_default=True,
                     help="Threads fetching and decoding the manifest."),
        *manifest_options("target text"),
        *http_options(),
        *logging_options(),
    ]
    return apply(fn, decorators)


def _options(cls: type, cli: dict[str, Any], max_bytes: int, deadline: float) -> Any:
    """CLI option values -> an options dataclass: the one place where CLI names and field names differ."""
    from ..fetch import FetchConfig

    verbose, quiet = cli.pop("verbose"), cli.pop("quiet")
    _start(verbose, quiet)
    cli["fetch"] = FetchConfig(read_timeout=cli.pop("timeout"), retries=cli.pop("retries"), max_bytes=max_bytes,
                               deadline=cli.pop("fetch_deadline") or deadline,
                               block_private=cli.pop("block_private_addresses"), root=cli.pop("root"))
    cli["reference_columns"] = tuple(cli["reference_columns"])
    if "beam_size" in cli:
        cli["num_beams"] = cli.pop("beam_size")
    if "lora_targets" in cli:
        cli["lora_targets"] = tuple(t.strip() for t in cli["lora_targets"].split(",") if t.strip())
    if cls is AudioTrainOptions:
        cli["progress"] = verbose > 0 and not quiet
    return cls(**cli)


def _start(verbose: int, quiet: bool) -> None:
    setup_logging(verbose, quiet)
    if verbose < 1:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass


def _run(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except FatalError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        raise CommandError("interrupted: the last finished epoch is checkpointed; rerun with --resume to continue",
                           EXIT_INTERRUPTED) from None


def _report(result: Any) -> None:
    click.echo(f"trained {len(result.history)} epochs in {result.wall_s:.0f} s; "
               f"{result.trainable_params:,} of {result.total_params:,} parameters trained")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def train() -> None:
    """Fine-tune a captioning model (images) or Whisper (audio) on a manifest.

    MANIFEST: CSV / TSV / parquet / JSONL with a media path or URL column and a reference text column,
    the same layouts `batchcap images` / `batchcap audio` read. Rows that cannot be used (missing file,
    HTTP error, corrupt media, no reference) are reported and skipped. OUT_DIR then loads with
    `batchcap images --model OUT_DIR` / `batchcap audio --model OUT_DIR`.
    """


def _i(name: str) -> Any:
    return _default(ImageTrainOptions, name)


def _a(name: str) -> Any:
    return _default(AudioTrainOptions, name)


@train.command("images")
@_common
@click.option("--model", default=None,
              help="VisionEncoderDecoder checkpoint to fine-tune (hub id or directory) "
                   "[default: nlpconnect/vit-gpt2-image-captioning].")
@click.option("--encoder", default=None,
              help="Start from a fresh pair instead: a vision encoder (e.g. a ViT hub id or directory)...")
@click.option("--decoder", default=None,
              help="...and a text decoder with its tokenizer (e.g. GPT-2); cross-attention is added.")
@click.option("--unfreeze-last", type=click.IntRange(1), default=_i("unfreeze_last"), show_default=True,
              help="Train the top N transformer blocks of the text decoder (GPT-2: transformer.h.*, each with "
                   "self-attention, cross-attention to the image and MLP) plus the decoder's final layer norm "
                   "(ln_f). Frozen: the vision encoder, token/position embeddings and the LM head (tied to the "
                   "embeddings in GPT-2).")
@click.option("--train-all", is_flag=True, help="Fine-tune every parameter (overrides --unfreeze-last).")
@click.option("--max-length", type=click.IntRange(2), default=_i("max_length"), show_default=True,
              help="Caption length cap in tokens, EOS included (longer captions are cut).")
@click.option("--best-metric", type=click.Choice(BEST_METRICS), default=_i("best_metric"), show_default=True,
              help="How the kept epoch is picked: highest validation CIDEr-D (ties: lower val loss), or lowest "
                   "validation loss.")
@click.option("--epochs", type=click.IntRange(0), default=_i("epochs"), show_default=True,
              help="Passes over the training data (with --resume: the total, counting earlier epochs).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=_i("lr"), show_default=True,
              help="Adam learning rate.")
@click.option("--cache-dir", default=None,
              help="Where downloaded images are kept (one file per URL) [default: OUT_DIR/cache].")
def images(manifest: str, out_dir: str, **options: Any) -> None:
    """Fine-tune an image captioner (ViT + GPT-2 VisionEncoderDecoder) on MANIFEST.

    Several references of one image make one training example each. Adam; validation loss and caption
    metrics (BLEU, ROUGE-L, CIDEr-D of greedy captions) each epoch; the best epoch is saved in OUT_DIR,
    the last one (with the optimizer) in OUT_DIR/checkpoint-last for --resume.
    """
    quiet = options["quiet"]
    opts = _options(ImageTrainOptions, options, IMAGE_MAX_BYTES, IMAGE_DEADLINE_S)
    from .images import train_images

    result = _run(lambda: train_images(manifest, out_dir, opts))
    if not quiet:
        _report(result)
        last = result.history[-1] if result.history else {}
        if result.best_epoch is not None:
            click.echo(f"best epoch {result.best_epoch} by {result.best_metric}"
                       + (f" (last epoch: val_loss {last['val_loss']:.4f}, CIDEr-D {last['cider_d']:.3f})"
                          if last.get("cider_d") is not None else ""))
        click.echo(f"model: {out_dir} (batchcap images --model {out_dir})")


@train.command("audio")
@_common
@click.option("--model", default=_a("model"), show_default=True,
              help="Whisper checkpoint to fine-tune: a hub id or a local directory.")
@click.option("--language", default=None,
              help="Language of the recordings (e.g. en), for rows without a language of their own; a "
                   "multilingual checkpoint needs it unless every row has one.")
@click.option("--language-column", default=None, metavar="NAME",
              help=f"Manifest column with each row's language (mixed languages train together) "
                   f"[default: {LANGUAGE_COLUMN}, when the manifest has it].")
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default=_a("task"), show_default=True)
@click.option("--lora-r", type=click.IntRange(1), default=_a("lora_r"), show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=click.IntRange(1), default=_a("lora_alpha"), show_default=True,
              help="LoRA scaling numerator (the update is scaled by alpha / r).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1), default=_a("lora_dropout"), show_default=True)
@click.option("--lora-targets", default=",".join(_a("lora_targets")), show_default=True,
              help="Comma-separated module names LoRA adapts in encoder and decoder: any of q_proj, k_proj, "
                   "v_proj, out_proj, fc1, fc2, or all-linear for all six.")
@click.option("--lora-scope", type=click.Choice(LORA_SCOPES), default=_a("lora_scope"), show_default=True,
              help="Where LoRA goes: encoder and decoder, or the decoder only (the frozen encoder then needs no "
                   "backward pass: about 2x faster steps on a CPU).")
@click.option("--unfreeze-last", type=click.IntRange(0), default=_a("unfreeze_last"), show_default=True,
              help="Also train the top N decoder layers and the decoder's final layer norm in full (no LoRA "
                   "inside them; saved with the adapter, merged back).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward pass (less memory) [default: on for CUDA].")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=_a("epochs"), show_default=True,
              help="Passes over the training data (with --resume: the total, counting earlier epochs).")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=_a("lr"), show_default=True,
              help="Peak learning rate (AdamW, linear warmup and decay).")
@click.option("--warmup", type=click.FloatRange(0), default=_a("warmup"), show_default=True,
              help="Linear warmup: a fraction of the steps (< 1) or a number of steps.")
@click.option("--beam-size", type=click.IntRange(1), default=_a("num_beams"), show_default=True,
              help="Beams for the validation transcripts.")
@click.option("--normalize", type=click.Choice(list(NORMALIZER_MODES)), default=_a("normalize"),
              show_default=True, help="Text normalization before the validation WER (as in batchcap audio).")
def audio(manifest: str, out_dir: str, **options: Any) -> None:
    """LoRA-fine-tune Whisper on MANIFEST with Seq2SeqTrainer.

    Clips over 30 s are skipped. Validation WER (normalized, greedy decoding) each epoch picks the best
    epoch. OUT_DIR/adapter holds the LoRA adapter; OUT_DIR a merged plain Whisper checkpoint for
    `batchcap audio --model OUT_DIR`; OUT_DIR/checkpoints the Trainer checkpoints for --resume.
    """
    quiet = options["quiet"]
    opts = _options(AudioTrainOptions, options, AUDIO_MAX_BYTES, AUDIO_DEADLINE_S)
    from .audio import train_audio

    result = _run(lambda: train_audio(manifest, out_dir, opts))
    if not quiet:
        _report(result)
        if result.best_wer is not None:
            click.echo(f"best validation WER {result.best_wer:.2%}")
        click.echo(f"merged model: {out_dir} (batchcap audio --model {out_dir}); adapter: {out_dir}/adapter")
