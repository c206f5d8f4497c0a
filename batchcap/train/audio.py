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
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE, decode_audio
from ..inputs import audio_spec
from ..items import FatalError, Item, ItemError
from ..metrics import ErrorRate, get_normalizer, wer_counts
from ..metrics.asr import english_spelling, normalizer_file
from ..models.common import hub_guard, load_error_message
from .base import FineTuneResult, autocast_dtype, count_parameters, start_run
from .checkpoints import INFO_FILE, fresh_dir, jsonable, replace_dir, write_info
from .data import Example
from .history import HISTORY_JSON, write_history
from .options import DEFAULT_AUDIO_MODEL, LANGUAGE_COLUMN, LORA_SCOPES, AudioTrainOptions

__all__ = ["DEFAULT_AUDIO_MODEL", "AudioTrainOptions", "AudioTrainResult", "train_audio", "apply_lora"]
from ..report import write_training_report

log = logging.getLogger(__name__)

MAX_SECONDS = 30.0
TOO_LONG = "too_long"
LABEL_TOO_LONG = "label_too_long"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class AudioTrainResult(FineTuneResult):
    best_wer: float | None = None
    best_checkpoint: str | None = None


# --- model and labels --------------------------------------------------------------------------


def _language_code(language: str) -> str:
    """Whisper's code for a row's language, as inference reads it (``language_code``); as given where
    Whisper does not know it (the model check says so)."""
    from ..models.whisper import language_code

    try:
        return language_code(language)
    except ValueError:
        return language.strip().lower()


NO_LANGUAGE = "no_language"
BAD_LANGUAGE = "unsupported_language"


@dataclass
class WhisperSetup:
    """What labels and generation need to agree on."""

    multilingual: bool
    language: str | None  # --language as a code: the language of rows without one of their own
    task: str
    start: int  # <|startoftranscript|>
    task_id: int | None  # <|transcribe|> / <|translate|> (multilingual checkpoints)
    no_timestamps: int
    eos: int
    max_target_positions: int
    lang_to_id: dict[str, int]  # language code -> <|code|> token id (multilingual checkpoints)
    name: str = "the model"

    def prefix_for(self, code: str | None) -> list[int]:
        """The decoder prompt of a row in language ``code`` (None: --language's):
        <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>."""
        code = code or self.language
        if not self.multilingual or code is None:
            return [self.start, self.no_timestamps]
        return [self.start, self.lang_to_id[code], self.task_id, self.no_timestamps]  # type: ignore[list-item]

    def check_language(self, language: str | None) -> str | None:
        """The language code of a row (its own value, else --language); ItemError when it cannot be trained."""
        if not language or not str(language).strip():
            if self.multilingual and self.language is None:
                raise ItemError(NO_LANGUAGE, f"no language for this row: {self.name} is multilingual (fill the "
                                "row's language column or pass --language)")
            return self.language
        code = _language_code(str(language))
        if self.multilingual and code not in self.lang_to_id:
            raise ItemError(BAD_LANGUAGE, f"{self.name} does not know language {language!r}")
        if not self.multilingual and code != "en":
            raise ItemError(BAD_LANGUAGE, f"{self.name} is an English-only model; it cannot train on language "
                            f"{language!r}")
        return code

    def language_of(self, token_id: int) -> str | None:
        """The language code of a label sequence's first token (None: English-only labels)."""
        return next((code for code, tid in self.lang_to_id.items() if tid == token_id), None)


def whisper_setup(model: Any, tokenizer: Any, language: str | None, task: str, name: str, *,
                  per_row_language: bool = False) -> WhisperSetup:
    """``per_row_language``: the manifest names each row's language, so --language may be absent."""
    gen = model.generation_config
    multilingual = bool(getattr(gen, "is_multilingual", False)) and bool(getattr(gen, "lang_to_id", None))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else tokenizer.eos_token_id
    code = None
    task_id = None
    lang_to_id: dict[str, int] = {}
    if multilingual:
        lang_to_id = {token.strip("<|>"): int(tid) for token, tid in gen.lang_to_id.items()}
        if language:
            code = _language_code(language)
            if code not in lang_to_id:
                raise FatalError(f"{name} does not know language {language!r} (no <|{code}|> in its generation "
                                 "config)")
        elif not per_row_language:
            raise FatalError(f"{name} is multilingual: say which language the recordings are in with --language "
                             "(e.g. --language en) or a language column in the manifest (--language-column)")
        task_to_id = getattr(gen, "task_to_id", None) or {}
        if task not in task_to_id:
            raise FatalError(f"{name} has no task {task!r}")
        task_id = int(task_to_id[task])
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
    return WhisperSetup(multilingual, code, task, gen.decoder_start_token_id, task_id, int(no_ts), eos,
                        model.config.max_target_positions, lang_to_id, name)


def make_labels(text: str, tokenizer: Any, setup: WhisperSetup, language: str | None = None) -> list[int]:
    """Prefix in ``language`` (without <|startoftranscript|>) + text tokens + <|endoftext|>. The text gets the
    leading space Whisper's own transcripts start with."""
    ids = tokenizer(" " + " ".join(text.split()), add_special_tokens=False).input_ids
    return [*setup.prefix_for(language)[1:], *ids, setup.eos]


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
    # trained on text without times: batchcap audio decodes it without timestamp tokens (see whisper.py)
    gen.trained_without_timestamps = True


def _load_base(model_name: str, dtype: Any = None) -> Any:
    from transformers import WhisperForConditionalGeneration

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return WhisperForConditionalGeneration.from_pretrained(model_name, **kwargs)


def load_whisper(model_name: str) -> tuple[Any, Any, Any]:
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    with hub_guard(model_name):  # no hub: fail at once, or load from the cache without its retries
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


def _warmup_args(cls: Any, warmup: float, total_steps: int | None = None) -> dict[str, Any]:
    """``warmup_steps`` takes a fraction (< 1) in recent transformers; older ones have ``warmup_ratio`` for that.
    With ``total_steps`` known, the warmup ends before the last step: a linear warmup's first step runs at a
    learning rate of 0, so a run of one step (``--max-steps 1``, a tiny manifest) saved its base model unchanged
    while it reported the parameters trained."""
    import dataclasses

    if total_steps:
        steps = math.ceil(warmup * total_steps) if warmup < 1 else int(warmup)
        return {"warmup_steps": max(0, min(steps, total_steps - 1))}
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


def row_language(item: Item, column: str | None) -> Any:
    """The row's language from the manifest (the inputs layer reads the language column, as for
    ``batchcap audio``), None without one."""
    return item.language if column else None


def language_column(opts: AudioTrainOptions, spec: Any, manifests: Sequence[str]) -> str | None:
    """Whether rows name their language: --language-column (the inputs layer fails on a missing one), else
    a ``language`` / ``lang`` / ``locale`` column when the (first row of the) training manifest has one."""
    from ..inputs import Inputs

    for i, manifest in enumerate(manifests):
        first = next(iter(Inputs([manifest], spec)), None)
        if i == 0 and (first is None or first.language is None) and not opts.language_column:
            return None
    return opts.language_column or LANGUAGE_COLUMN


def _labelled(examples: Sequence[Example], tokenizer: Any, setup: WhisperSetup, column: str | None,
              report: dict[str, Any]) -> tuple[list[Example], list[list[int]]]:
    kept: list[Example] = []
    labels: list[list[int]] = []
    limit = setup.max_target_positions - 1  # the decoder input is the labels shifted right by one
    too_long: list[str] = []
    for e in examples:
        language = setup.check_language(row_language(e.item, column))  # checked in decode already
        ids = make_labels(" ".join(e.item.references), tokenizer, setup, language)
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


def decode_clip(data: bytes) -> Any:
    """16 kHz samples of a clip that fits Whisper's window; longer ones are not even decoded in full."""
    try:
        return decode_audio(data, max_duration_s=MAX_SECONDS)
    except ItemError as exc:
        if "max_duration_s" not in exc.fields:
            raise
        seconds = exc.fields.get("duration_s")
        length = f"{seconds:.1f} s, " if seconds else ""
        raise ItemError(TOO_LONG, f"clip is {length}longer than Whisper's {MAX_SECONDS:g} s window",
                        fields=exc.fields) from None


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


def _metrics(opts: AudioTrainOptions, setup: WhisperSetup, tokenizer: Any) -> Any:
    """``compute_metrics``: the normalized WER of the validation transcripts, each row normalized for its
    language (read from its labels' language token)."""
    spelling = english_spelling(opts.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else setup.eos

    samples: list[dict[str, Any]] = []  # validation predictions of the last evaluation, for report.html

    def compute_metrics(pred: Any) -> dict[str, float]:
        preds = np.where(pred.predictions != -100, pred.predictions, pad_id)
        refs = np.where(pred.label_ids != -100, pred.label_ids, pad_id)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        texts = tokenizer.batch_decode(refs, skip_special_tokens=True)
        rate = ErrorRate()
        for ref_ids, ref, hyp in zip(refs, texts, hyps):
            language = setup.language_of(int(ref_ids[0])) or setup.language or "en"
            normalizer = get_normalizer(opts.normalize, language, spelling)
            rate.add(*wer_counts(normalizer(ref), normalizer(hyp)))
        samples[:] = [{"reference": r, "prediction": h, "normalized": (normalizer(r), normalizer(h))}
                      for r, h in zip(texts[:24], hyps[:24])]
        return {"wer": rate.errors / max(rate.total, 1)}

    compute_metrics.samples = samples  # type: ignore[attr-defined]
    return compute_metrics


def _training_args(opts: AudioTrainOptions, ckpt_dir: str, device: Any, precision: str, has_val: bool,
                   max_length: int, total_steps: int | None = None) -> Any:
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(
        output_dir=ckpt_dir, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.eval_batch_size or opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, weight_decay=opts.weight_decay,
        num_train_epochs=opts.epochs, max_steps=opts.max_steps or -1,
        **_warmup_args(Seq2SeqTrainingArguments, opts.warmup, total_steps),
        lr_scheduler_type="linear", logging_strategy="epoch", eval_strategy="epoch" if has_val else "no",
        save_strategy="epoch", save_total_limit=2, load_best_model_at_end=has_val,
        metric_for_best_model="wer" if has_val else None, greater_is_better=False if has_val else None,
        predict_with_generate=True, generation_max_length=max_length,
        generation_num_beams=opts.num_beams, fp16=precision == "fp16", bf16=precision == "bf16",
        use_cpu=device.type == "cpu", report_to="none", seed=opts.seed, data_seed=opts.seed,
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=not opts.progress,
        dataloader_num_workers=0)


def _trainer_class(device: Any, precision: str, setup: WhisperSetup) -> type:
    """Seq2SeqTrainer whose validation ``generate`` runs under the training's autocast, in each row's language."""
    import torch
    from transformers import Seq2SeqTrainer

    half = autocast_dtype(precision)

    class WhisperTrainer(Seq2SeqTrainer):
        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None, **gen_kwargs: Any) -> Any:
            if setup.multilingual and not prediction_loss_only:
                gen_kwargs = {**(gen_kwargs or getattr(self, "_gen_kwargs", {})),
                              "language": [setup.language_of(int(t)) for t in inputs["labels"][:, 0]]}
            context = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
            with context:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys,
                                               **gen_kwargs)

    return WhisperTrainer


def _log_callback() -> Any:
    from transformers import TrainerCallback

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

    return LogEpochs()


def train_audio(manifest: str, out_dir: str, options: AudioTrainOptions | None = None,
                **overrides: Any) -> AudioTrainResult:
    """LoRA-fine-tune Whisper on ``manifest``; adapter in OUT_DIR/adapter, merged model in OUT_DIR."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    opts = options or AudioTrainOptions()
    opts.update(overrides, "train_audio")
    spec = audio_spec(opts.path_column, opts.reference_columns, opts.id_column, language_column=opts.language_column)
    run = start_run(manifest, out_dir, opts, spec,
                    markers=(CHECKPOINTS, ADAPTER, HISTORY_JSON, INFO_FILE, "config.json"), checkpoints=(ADAPTER,))
    device, precision = run.device, run.precision
    if device.type not in ("cpu", "cuda"):
        raise FatalError(f"--device {device}: Whisper fine-tuning runs on cuda or cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    column = language_column(opts, spec, [manifest] + ([opts.val_manifest] if opts.val_manifest else []))
    ckpt_dir = os.path.join(out_dir, CHECKPOINTS)
    last = get_last_checkpoint(ckpt_dir) if opts.resume and os.path.isdir(ckpt_dir) else None
    if opts.resume and last is None:
        log.info("--resume: no checkpoint in %s yet; starting from the beginning", ckpt_dir)

    model, feature_extractor, tokenizer = load_whisper(opts.model)
    setup = whisper_setup(model, tokenizer, opts.language, opts.task, opts.model, per_row_language=bool(column))

    def decode(item: Item, data: bytes) -> Any:
        setup.check_language(row_language(item, column))
        return decode_clip(data)

    train_ex, val_ex, data_report = run.load_data(decode)
    train_ex, train_labels = _labelled(train_ex, tokenizer, setup, column, data_report)
    val_ex, val_labels = _labelled(val_ex, tokenizer, setup, column, data_report)
    if not train_ex:
        raise FatalError(f"{manifest}: no usable training rows")
    if setup.multilingual and setup.language is None:
        languages = sorted({setup.language_of(ids[0]) or "" for ids in train_labels})
        setup.language = languages[0] if len(languages) == 1 else None  # the merged model's default language
        log.info("training rows' languages: %s", ", ".join(languages))
    finalize_generation_config(model, setup)

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

    has_val = bool(val_ex)
    longest = max(len(x) for x in train_labels + val_labels)
    steps_per_epoch = math.ceil(len(train_ex) / (opts.batch_size * opts.grad_accum))
    total_steps = opts.max_steps or math.ceil(steps_per_epoch * opts.epochs)
    args = _training_args(opts, ckpt_dir, device, precision, has_val, min(setup.max_target_positions, longest + 8),
                          total_steps)
    compute_metrics = _metrics(opts, setup, tokenizer) if has_val else None
    samples = getattr(compute_metrics, "samples", [])  # the last evaluation's predictions, for report.html
    trainer = _trainer_class(device, precision, setup)(
        model=model, args=args, data_collator=collate_speech,
        train_dataset=SpeechDataset(train_ex, train_labels, feature_extractor),
        eval_dataset=SpeechDataset(val_ex, val_labels, feature_extractor) if has_val else None,
        processing_class=tokenizer, compute_metrics=compute_metrics,
        callbacks=[_log_callback()])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; LogEpochs logs instead
    if last:
        log.info("resuming from %s", last)
    log.info("%d training clips (%d steps per epoch), %d validation clips, %s on %s", len(train_ex),
             steps_per_epoch, len(val_ex), precision, device)
    trainer.train(resume_from_checkpoint=last)
    history = _history_rows(trainer.state.log_history)
    write_history(out_dir, history, metrics=("wer",), title="batchcap train audio (best: lowest WER)")

    adapter_dir = os.path.join(out_dir, ADAPTER)
    tmp = fresh_dir(f"{adapter_dir}.tmp")
    trainer.model.save_pretrained(tmp)
    replace_dir(tmp, adapter_dir)
    best_ckpt = trainer.state.best_model_checkpoint
    best_wer = trainer.state.best_metric if has_val else None
    del trainer, model
    save_merged(opts.model, adapter_dir, out_dir, setup, feature_extractor, tokenizer)
    info = {"manifest": manifest, "options": asdict(opts), "device": str(device), "precision": precision,
            "gradient_checkpointing": gradient_checkpointing, "trainable_params": trainable, "total_params": total,
            "best_metric": "wer" if has_val else "last_epoch", "best_wer": best_wer,
            "best_checkpoint": best_ckpt, "data": data_report}
    write_info(out_dir, info)
    write_training_report(out_dir, history, samples, title=f"batchcap train audio: {os.path.basename(out_dir)}",
                          info=jsonable(info), strict=False)
    log.info("adapter in %s, merged model in %s%s", adapter_dir, out_dir,
             f" (best validation WER {best_wer:.2%})" if best_wer is not None else "")
    return AudioTrainResult(out_dir, history, trainable, total, data_report, run.elapsed(), best_wer=best_wer,
                            best_checkpoint=best_ckpt)


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
        source = normalizer_file(base_model, local_only=False)
        if source:
            shutil.copyfile(source, target)
