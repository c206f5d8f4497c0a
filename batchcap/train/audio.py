"""``batchcap train audio``: LoRA fine-tuning of Whisper with ``Seq2SeqTrainer``.

* Data: audio path/URL + reference columns (``audio_spec``), decoded to 16 kHz mono; clips over Whisper's
  30 s window and references longer than its 448-token decoder are skipped with a reason.
* Labels: ``<|lang|><|task|><|notimestamps|> text<|endoftext|>`` (English-only checkpoints: no language or
  task token), the prefix taken from the checkpoint's generation_config (what ``generate`` forces at
  inference); ``<|startoftranscript|>`` is not in the labels because the model prepends
  ``decoder_start_token_id`` itself when it shifts them right; padding is -100.
* Model: LoRA (peft) on ``lora_targets`` of encoder and decoder; with ``unfreeze_last`` N, the top N decoder
  layers and the decoder's final layer norm are trained in full instead (peft ``modules_to_save``: saved
  with the adapter, merged back; LoRA skips the modules inside them).
* Precision: weights stay float32 (LayerNorms, the output head ``proj_out`` and every trainable weight
  included); on CUDA, fp16 or bf16 autocast does the matmuls (fp16 with the Trainer's gradient scaler) and
  autocast keeps norms, softmax and the loss in float32. Validation ``generate`` runs under the same
  autocast (the Trainer only autocasts ``forward``).
* Gradient checkpointing uses the non-reentrant ``torch.utils.checkpoint``: with the reentrant one, a
  checkpointed block whose inputs do not require grad (frozen embeddings / conv stem under LoRA) returns
  outputs without grad and the LoRA weights inside it never train (the classic peft pitfall that
  ``enable_input_require_grads`` papers over for the decoder only).
* Best model: lowest normalized WER on the validation set (greedy ``generate`` each epoch);
  ``load_best_model_at_end``. OUT_DIR/adapter holds the adapter, OUT_DIR a merged plain Whisper checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE, decode_audio
from ..fetch import FetchConfig
from ..inputs import audio_spec
from ..items import FatalError, Item, ItemError
from ..job import apply_overrides
from ..metrics import ErrorRate, get_normalizer, load_english_spelling, wer_counts
from ..models.common import load_error_message, resolve_device
from ..report import write_training_report
from .common import (
    Example,
    atomic_write_text,
    check_inputs,
    count_parameters,
    load_examples,
    load_train_val,
    prepare_out_dir,
    resolve_train_precision,
    seed_everything,
    write_history,
)

log = logging.getLogger(__name__)

DEFAULT_AUDIO_MODEL = "openai/whisper-small"
MAX_SECONDS = 30.0
TOO_LONG = "too_long"
LABEL_TOO_LONG = "label_too_long"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
INFO_FILE = "training.json"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_SCOPES = ("all", "decoder")


@dataclass
class AudioTrainOptions:
    model: str = DEFAULT_AUDIO_MODEL
    language: str | None = None  # required for multilingual checkpoints
    task: str = "transcribe"
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_targets: Sequence[str] = ("q_proj", "v_proj")
    lora_scope: str = "all"  # all: encoder and decoder; decoder: decoder only (no backward through the encoder)
    unfreeze_last: int = 0  # top decoder layers trained in full
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 1e-3
    warmup: float = 0.1  # < 1: fraction of the steps; >= 1: steps
    weight_decay: float = 0.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    num_beams: int = 1  # validation decoding
    normalize: str = "auto"
    val_fraction: float = 0.1
    val_manifest: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 8
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = False  # transformers' progress bars
    path_column: str | None = None
    reference_columns: Sequence[str] = ()
    id_column: str | None = None
    fetch: FetchConfig = field(default_factory=lambda: FetchConfig(max_bytes=2 * 2**30))


@dataclass
class AudioTrainResult:
    out_dir: str
    history: list[dict[str, Any]]
    best_wer: float | None
    best_checkpoint: str | None
    trainable_params: int
    total_params: int
    data: dict[str, Any]
    wall_s: float


# --- model and labels --------------------------------------------------------------------------


def _language_code(language: str) -> str:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    lang = language.strip().lower()
    return TO_LANGUAGE_CODE.get(lang, lang)


@dataclass
class WhisperSetup:
    """What labels and generation need to agree on."""

    multilingual: bool
    language: str | None  # language code (multilingual checkpoints)
    task: str
    prefix: list[int]  # decoder prompt: <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>
    eos: int
    max_target_positions: int


def whisper_setup(model: Any, tokenizer: Any, language: str | None, task: str, name: str) -> WhisperSetup:
    gen = model.generation_config
    multilingual = bool(getattr(gen, "is_multilingual", False)) and bool(getattr(gen, "lang_to_id", None))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else tokenizer.eos_token_id
    prefix = [gen.decoder_start_token_id]
    code = None
    if multilingual:
        if not language:
            raise FatalError(f"{name} is multilingual: say which language the recordings are in with --language "
                             "(e.g. --language en)")
        code = _language_code(language)
        token = f"<|{code}|>"
        if token not in gen.lang_to_id:
            raise FatalError(f"{name} does not know language {language!r} (no {token} in its generation config)")
        task_to_id = getattr(gen, "task_to_id", None) or {}
        if task not in task_to_id:
            raise FatalError(f"{name} has no task {task!r}")
        prefix += [gen.lang_to_id[token], task_to_id[task]]
        tokenizer.set_prefix_tokens(language=code, task=task, predict_timestamps=False)
    else:
        if language and _language_code(language) != "en":
            raise FatalError(f"{name} is an English-only model; it cannot be trained for --language {language}")
        if task != "transcribe":
            raise FatalError(f"{name} is an English-only model; it cannot --task {task}")
        tokenizer.set_prefix_tokens(predict_timestamps=False)
    no_ts = getattr(gen, "no_timestamps_token_id", None)
    if no_ts is None:
        no_ts = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    prefix.append(no_ts)
    return WhisperSetup(multilingual, code, task, prefix, eos, model.config.max_target_positions)


def make_labels(text: str, tokenizer: Any, setup: WhisperSetup) -> list[int]:
    """Prefix (without <|startoftranscript|>) + text tokens + <|endoftext|>. The text gets the leading space
    Whisper's own transcripts start with."""
    ids = tokenizer(" " + " ".join(text.split()), add_special_tokens=False).input_ids
    return [*setup.prefix[1:], *ids, setup.eos]


def finalize_generation_config(model: Any, setup: WhisperSetup) -> None:
    """No forced_decoder_ids (v5 ``generate`` ignores or fights them); language/task as fields instead."""
    gen = model.generation_config
    gen.forced_decoder_ids = None
    if getattr(model.config, "forced_decoder_ids", None) is not None:
        model.config.forced_decoder_ids = None
    if setup.multilingual:
        gen.language = setup.language
        gen.task = setup.task
    gen.return_timestamps = False


def _load_base(model_name: str, dtype: Any = None) -> Any:
    from transformers import WhisperForConditionalGeneration

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return WhisperForConditionalGeneration.from_pretrained(model_name, **kwargs)


def load_whisper(model_name: str) -> tuple[Any, Any, Any]:
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    try:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(model_name)
        tokenizer = WhisperTokenizerFast.from_pretrained(model_name)
        import torch

        model = _load_base(model_name, torch.float32)
    except Exception as exc:
        raise FatalError(load_error_message(model_name, exc)) from exc
    return model, feature_extractor, tokenizer


def apply_lora(model: Any, opts: AudioTrainOptions) -> Any:
    """peft LoRA on ``opts.lora_targets``; the top ``opts.unfreeze_last`` decoder layers trained in full."""
    import torch
    from peft import LoraConfig, get_peft_model

    layers = model.model.decoder.layers
    if opts.unfreeze_last > len(layers):
        raise FatalError(f"--unfreeze-last {opts.unfreeze_last}: the decoder has only {len(layers)} layers")
    targets = [t.strip() for t in opts.lora_targets if t.strip()]
    if targets == ["all-linear"]:
        targets = list(ALL_LINEAR)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise FatalError(f"--lora-targets: no module named {', '.join(unknown)} in this Whisper (modules are e.g. "
                         f"{', '.join(ALL_LINEAR)})")
    if opts.lora_scope not in LORA_SCOPES:
        raise FatalError(f"unknown --lora-scope {opts.lora_scope!r} (use {', '.join(LORA_SCOPES)})")
    keep = [f"model.decoder.layers.{i}" for i in range(len(layers) - opts.unfreeze_last, len(layers))]
    if keep:
        keep.append("model.decoder.layer_norm")  # the final norm in front of the output head, as for images
    # Full module names (peft matches them exactly), leaving out what is trained in full: peft >= 0.17 skips
    # modules inside modules_to_save itself, older releases would put LoRA inside them.
    prefix = "model.decoder." if opts.lora_scope == "decoder" else "model."
    targets = [n for n, m in model.named_modules() if n.startswith(prefix) and n.rsplit(".", 1)[-1] in targets
               and isinstance(m, torch.nn.Linear) and not n.startswith(tuple(f"{k}." for k in keep))]
    if not targets:
        raise FatalError("no module left for LoRA: --unfreeze-last covers the whole decoder and --lora-scope is "
                         "decoder")
    config = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=targets, modules_to_save=keep or None, bias="none")
    return get_peft_model(model, config)


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing (see the module docstring: LoRA needs it), no KV cache.

    transformers >= 5.2x calls it ``activation_checkpointing_enable``; earlier 5.x ``gradient_checkpointing_enable``.
    """
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _warmup_args(cls: Any, warmup: float) -> dict[str, Any]:
    """``warmup_steps`` takes a fraction (< 1) in recent transformers; older ones have ``warmup_ratio`` for that."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    if warmup < 1 and "warmup_ratio" in fields:
        return {"warmup_ratio": warmup}
    return {"warmup_steps": warmup if warmup < 1 else int(warmup)}


# --- data --------------------------------------------------------------------------------------


class SpeechDataset:
    """Decoded clips and their label ids; log-mel features are computed per access (30 s window)."""

    def __init__(self, examples: Sequence[Example], labels: Sequence[list[int]], feature_extractor: Any):
        self.samples = [e.data for e in examples]
        self.labels = list(labels)
        self.feature_extractor = feature_extractor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats = self.feature_extractor(self.samples[i], sampling_rate=SAMPLE_RATE,
                                       return_tensors="np").input_features[0]
        return {"input_features": feats, "labels": self.labels[i]}


def collate_speech(features: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    input_features = torch.from_numpy(np.stack([f["input_features"] for f in features]).astype(np.float32))
    width = max(len(f["labels"]) for f in features)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for row, f in enumerate(features):
        labels[row, :len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_features": input_features, "labels": labels}


def _labelled(examples: Sequence[Example], tokenizer: Any, setup: WhisperSetup,
              report: dict[str, Any]) -> tuple[list[Example], list[list[int]]]:
    kept: list[Example] = []
    labels: list[list[int]] = []
    limit = setup.max_target_positions - 1  # the decoder input is the labels shifted right by one
    too_long: list[str] = []
    for e in examples:
        ids = make_labels(" ".join(e.item.references), tokenizer, setup)
        if len(ids) > limit:
            too_long.append(e.item.id)
            continue
        kept.append(e)
        labels.append(ids)
    if too_long:
        log.warning("skipped %d rows whose reference is over %d tokens (e.g. %s)", len(too_long), limit,
                    too_long[0])
        report[LABEL_TOO_LONG] = report.get(LABEL_TOO_LONG, 0) + len(too_long)
    return kept, labels


# --- training ----------------------------------------------------------------------------------


def _history_rows(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[float, dict[str, Any]] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = round(float(entry["epoch"]), 3)
        if "loss" in entry:
            rows.setdefault(epoch, {"epoch": epoch})
            rows[epoch].update(step=entry.get("step"), train_loss=round(float(entry["loss"]), 5))
        if "eval_loss" in entry:
            rows.setdefault(epoch, {"epoch": epoch})
            rows[epoch].update(step=entry.get("step"), val_loss=round(float(entry["eval_loss"]), 5))
            if entry.get("eval_wer") is not None:
                rows[epoch]["wer"] = round(float(entry["eval_wer"]), 5)
    return [rows[k] for k in sorted(rows)]


def train_audio(manifest: str, out_dir: str, options: AudioTrainOptions | None = None,
                **overrides: Any) -> AudioTrainResult:
    """LoRA-fine-tune Whisper on ``manifest``; adapter in OUT_DIR/adapter, merged model in OUT_DIR."""
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    opts = options or AudioTrainOptions()
    apply_overrides(opts, overrides, "train_audio")
    started = time.time()
    device = resolve_device(opts.device)
    if device.type not in ("cpu", "cuda"):
        raise FatalError(f"--device {device}: Whisper fine-tuning runs on cuda or cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    precision = resolve_train_precision(opts.precision, device)
    spec = audio_spec(opts.path_column, opts.reference_columns, opts.id_column)
    check_inputs(spec, manifest, opts.val_manifest)
    prepare_out_dir(out_dir, resume=opts.resume, overwrite=opts.overwrite,
                    markers=(CHECKPOINTS, ADAPTER, "history.json", INFO_FILE, "config.json"))
    ckpt_dir = os.path.join(out_dir, CHECKPOINTS)
    last = get_last_checkpoint(ckpt_dir) if opts.resume and os.path.isdir(ckpt_dir) else None
    if opts.resume and last is None:
        log.info("--resume: no checkpoint in %s yet; starting from the beginning", ckpt_dir)
    seed_everything(opts.seed)

    model, feature_extractor, tokenizer = load_whisper(opts.model)
    setup = whisper_setup(model, tokenizer, opts.language, opts.task, opts.model)
    finalize_generation_config(model, setup)

    def decode(item: Item, data: bytes) -> Any:
        samples = decode_audio(data)
        seconds = len(samples) / SAMPLE_RATE
        if seconds > MAX_SECONDS:
            raise ItemError(TOO_LONG, f"clip is {seconds:.1f} s, longer than Whisper's {MAX_SECONDS:g} s window")
        return samples

    def load(path: str) -> Any:
        return load_examples(path, spec, decode, fetch=opts.fetch, workers=opts.workers, limit=opts.limit)

    train_ex, val_ex, data_report = load_train_val(manifest, opts.val_manifest, opts.val_fraction, opts.seed, load)
    train_ex, train_labels = _labelled(train_ex, tokenizer, setup, data_report)
    val_ex, val_labels = _labelled(val_ex, tokenizer, setup, data_report)
    if not train_ex:
        raise FatalError(f"{manifest}: no usable training rows")

    gradient_checkpointing = (device.type == "cuda") if opts.gradient_checkpointing is None \
        else opts.gradient_checkpointing
    if gradient_checkpointing:
        enable_checkpointing(model)
    model = apply_lora(model, opts)
    trainable, total = count_parameters(model)
    log.info("LoRA r=%d alpha=%d on %s (%s)%s: %s of %s parameters trainable (%.2f%%)", opts.lora_r,
             opts.lora_alpha, ",".join(opts.lora_targets), "encoder+decoder" if opts.lora_scope == "all"
             else "decoder only", f" + top {opts.unfreeze_last} decoder layers" if opts.unfreeze_last
             else "", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    normalizer = get_normalizer(opts.normalize, setup.language or "en", load_english_spelling(
        opts.model if os.path.isdir(opts.model) else None) or _hub_spelling(opts.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else setup.eos

    samples: list[dict[str, Any]] = []  # validation predictions of the last evaluation, for report.html

    def compute_metrics(pred: Any) -> dict[str, float]:
        preds = np.where(pred.predictions != -100, pred.predictions, pad_id)
        refs = np.where(pred.label_ids != -100, pred.label_ids, pad_id)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        texts = tokenizer.batch_decode(refs, skip_special_tokens=True)
        rate = ErrorRate()
        for ref, hyp in zip(texts, hyps):
            rate.add(*wer_counts(normalizer(ref), normalizer(hyp)))
        samples[:] = [{"reference": r, "prediction": h, "normalized": (normalizer(r), normalizer(h))}
                      for r, h in zip(texts[:24], hyps[:24])]
        return {"wer": rate.errors / max(rate.total, 1)}

    has_val = bool(val_ex)
    longest = max(len(x) for x in train_labels + val_labels)
    eval_bs = opts.eval_batch_size or opts.batch_size
    steps_per_epoch = math.ceil(len(train_ex) / (opts.batch_size * opts.grad_accum))
    args = Seq2SeqTrainingArguments(
        output_dir=ckpt_dir, per_device_train_batch_size=opts.batch_size, per_device_eval_batch_size=eval_bs,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, weight_decay=opts.weight_decay,
        num_train_epochs=opts.epochs, max_steps=opts.max_steps or -1, **_warmup_args(Seq2SeqTrainingArguments,
                                                                                      opts.warmup),
        lr_scheduler_type="linear", logging_strategy="epoch", eval_strategy="epoch" if has_val else "no",
        save_strategy="epoch", save_total_limit=2, load_best_model_at_end=has_val,
        metric_for_best_model="wer" if has_val else None, greater_is_better=False if has_val else None,
        predict_with_generate=True, generation_max_length=min(setup.max_target_positions, longest + 8),
        generation_num_beams=opts.num_beams, fp16=precision == "fp16", bf16=precision == "bf16",
        use_cpu=device.type == "cpu", report_to="none", seed=opts.seed, data_seed=opts.seed,
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=not opts.progress,
        dataloader_num_workers=0)

    class LogEpochs(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                log.info("epoch %.2f (step %d): train_loss %.4f", logs.get("epoch", state.epoch or 0),
                         state.global_step, logs["loss"])
            if "eval_loss" in logs:
                log.info("epoch %.2f: val_loss %.4f, WER %s", logs.get("epoch", state.epoch or 0),
                         logs["eval_loss"], f"{logs['eval_wer']:.2%}" if "eval_wer" in logs else "-")

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    class WhisperTrainer(Seq2SeqTrainer):
        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None, **gen_kwargs: Any) -> Any:
            context = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
            with context:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys,
                                               **gen_kwargs)

    trainer = WhisperTrainer(
        model=model, args=args, data_collator=collate_speech,
        train_dataset=SpeechDataset(train_ex, train_labels, feature_extractor),
        eval_dataset=SpeechDataset(val_ex, val_labels, feature_extractor) if has_val else None,
        processing_class=tokenizer, compute_metrics=compute_metrics if has_val else None, callbacks=[LogEpochs()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; LogEpochs logs instead
    if last:
        log.info("resuming from %s", last)
    log.info("%d training clips (%d steps per epoch), %d validation clips, %s on %s", len(train_ex),
             steps_per_epoch, len(val_ex), precision, device)
    trainer.train(resume_from_checkpoint=last)
    history = _history_rows(trainer.state.log_history)
    write_history(out_dir, history, metrics=("wer",), title="batchcap train audio (best: lowest WER)")

    adapter_dir = os.path.join(out_dir, ADAPTER)
    if os.path.exists(adapter_dir):
        shutil.rmtree(adapter_dir)
    trainer.model.save_pretrained(adapter_dir)
    best_ckpt = trainer.state.best_model_checkpoint
    best_wer = trainer.state.best_metric if has_val else None
    del trainer, model
    save_merged(opts.model, adapter_dir, out_dir, setup, feature_extractor, tokenizer)
    info = {"manifest": manifest, "options": _jsonable(asdict(opts)), "device": str(device), "precision": precision,
            "gradient_checkpointing": gradient_checkpointing, "trainable_params": trainable, "total_params": total,
            "best_metric": "wer" if has_val else "last_epoch", "best_wer": best_wer,
            "best_checkpoint": best_ckpt, "data": data_report}
    atomic_write_text(os.path.join(out_dir, INFO_FILE), json.dumps(info, indent=2))
    write_training_report(out_dir, history, samples, title=f"batchcap train audio: {os.path.basename(out_dir)}",
                          info=info, strict=False)
    log.info("adapter in %s, merged model in %s%s", adapter_dir, out_dir,
             f" (best validation WER {best_wer:.2%})" if best_wer is not None else "")
    return AudioTrainResult(out_dir, history, best_wer, best_ckpt, trainable, total, data_report,
                            time.time() - started)


def save_merged(base_model: str, adapter_dir: str, out_dir: str, setup: WhisperSetup, feature_extractor: Any,
                tokenizer: Any) -> None:
    """Merge the adapter into a fresh float32 copy of the base model and save a plain Whisper checkpoint."""
    import torch
    from peft import PeftModel

    base = _load_base(base_model, torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    finalize_generation_config(merged, setup)
    merged.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    target = os.path.join(out_dir, "normalizer.json")
    if not os.path.isfile(target):
        source = _normalizer_file(base_model)
        if source:
            shutil.copyfile(source, target)


def _normalizer_file(model: str) -> str | None:
    if os.path.isdir(model):
        path = os.path.join(model, "normalizer.json")
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(model, "normalizer.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - no normalizer is fine
        return None


def _hub_spelling(model: str) -> dict[str, str]:
    path = _normalizer_file(model)
    return load_english_spelling(os.path.dirname(path)) if path else {}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {k: _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)
