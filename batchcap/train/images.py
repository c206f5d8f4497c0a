"""``batchcap train images``: fine-tune a VisionEncoderDecoder captioner (ViT + GPT-2 and the like).

What is trained (``unfreeze_last``): the top N transformer blocks of the text decoder (GPT-2's
``transformer.h.*``: each block holds its self-attention, its cross-attention to the image and its MLP)
plus the decoder's final layer norm (GPT-2's ``ln_f``). Everything else stays frozen: the vision encoder,
the token and position embeddings and the LM head (tied to the token embeddings in GPT-2). ``train_all``
fine-tunes every parameter instead.

Best checkpoint: the epoch with the highest validation CIDEr-D (greedy captions of the validation images
against all their references), ties and all-zero scores broken by the lower validation loss; with fewer
than two validation images (CIDEr-D needs a set) or ``best_metric="val_loss"``, the lowest validation
loss; with no validation set, the last epoch. OUT_DIR holds the best model, loadable by
``batchcap images --model OUT_DIR``; OUT_DIR/checkpoint-last holds the last epoch with the optimizer
state, for ``resume``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..fsutil import atomic_path
from ..images import decode_image
from ..inputs import image_spec
from ..items import FatalError, Item
from ..metrics import caption_metrics
from ..models.captioner import Captioner
from ..models.common import hub_guard, load_error_message, load_image_processor
from .base import FineTuneResult, TrainRun, autocast_dtype, count_parameters, start_run
from .checkpoints import INFO_FILE, fresh_dir, jsonable, replace_dir, write_info
from .data import Example
from .history import HISTORY_JSON, read_history, write_history
from .options import BEST_METRICS, DEFAULT_IMAGE_MODEL, ImageTrainOptions

__all__ = ["ImageTrainOptions", "TrainResult", "train_images", "load_captioner_for_training",
           "freeze_for_finetuning"]
from ..report import write_training_report

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint-last"
STATE_FILE = "training_state.pt"
_BLOCK_LISTS = ("transformer.h", "model.decoder.layers", "bert.encoder.layer", "roberta.encoder.layer",
                "decoder.layers", "layers", "h")
_FINAL_NORMS = ("transformer.ln_f", "model.decoder.layer_norm", "model.norm", "ln_f", "norm", "layer_norm")


@dataclass
class TrainResult(FineTuneResult):
    best_epoch: int | None = None
    best_metric: str | None = None  # cider_d, val_loss or last_epoch
    best_value: float | None = None


# --- model -------------------------------------------------------------------------------------

def _check_vision_encoder_decoder(source: str) -> None:
    """Stop with one line when ``source`` is another kind of model: from a GIT or BLIP checkpoint,
    VisionEncoderDecoderModel.from_pretrained built a random ViT-base + BERT-base from default configs and
    the run trained that, none of the checkpoint's weights in it."""
    from ..models.common import config_model_type

    kind = config_model_type(source)
    if kind and kind != "vision-encoder-decoder":
        raise FatalError(f"{source} is a {kind} checkpoint: train images fine-tunes VisionEncoderDecoder models "
                         "(a vision encoder + a text decoder, such as ViT + GPT-2); it cannot train this one")

def load_captioner_for_training(opts: ImageTrainOptions, checkpoint: str | None = None) -> tuple[Any, Any, Any]:
    """(model, image processor, tokenizer), special tokens set in config and generation_config."""
    from transformers import AutoConfig, AutoTokenizer, VisionEncoderDecoderModel

    if checkpoint:
        source = checkpoint
    elif opts.encoder or opts.decoder:
        if not (opts.encoder and opts.decoder):
            raise FatalError("--encoder and --decoder go together (a fresh vision encoder + text decoder pair)")
        if opts.model:
            raise FatalError("give either --model or --encoder + --decoder, not both")
        source = opts.decoder
    else:
        source = opts.model or DEFAULT_IMAGE_MODEL
    hub_ids = (source,) if checkpoint or not opts.encoder else (opts.encoder, opts.decoder or "")
    with hub_guard(*hub_ids):  # no hub: fail at once, or load from the cache without its retries
        try:
            if checkpoint or not opts.encoder:
                _check_vision_encoder_decoder(source)
                model = VisionEncoderDecoderModel.from_pretrained(source)
                image_processor = load_image_processor(source)
                tokenizer = AutoTokenizer.from_pretrained(source)
            else:
                assert opts.decoder is not None
                source = opts.encoder
                image_processor = load_image_processor(opts.encoder)
                source = opts.decoder
                tokenizer = AutoTokenizer.from_pretrained(opts.decoder)
                # v5: from_encoder_decoder_pretrained reads ``decoder_config.is_decoder``, which configs no longer
                # carry by default (AttributeError): hand it a decoder config with both flags set.
                decoder_config = AutoConfig.from_pretrained(opts.decoder)
                decoder_config.is_decoder = True
                decoder_config.add_cross_attention = True
                source = opts.encoder
                model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(opts.encoder, opts.decoder,
                                                                                  decoder_config=decoder_config)
        except FatalError:
            raise
        except Exception as exc:
            raise FatalError(load_error_message(source, exc)) from exc
    set_special_tokens(model, tokenizer)
    return model, image_processor, tokenizer


def set_special_tokens(model: Any, tokenizer: Any) -> None:
    """decoder_start / pad / eos in the model config (training shifts labels with them) and in
    generation_config (v5 ``generate`` reads only that). GPT-2 has no pad token: eos stands in."""
    text_cfg = model.config.decoder
    eos = next((t for t in (tokenizer.eos_token_id, getattr(text_cfg, "eos_token_id", None),
                            getattr(model.config, "eos_token_id", None)) if t is not None), None)
    if eos is None:
        raise FatalError("the decoder's tokenizer has no end-of-sequence token: cannot train a captioner")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    start = next((t for t in (getattr(model.config, "decoder_start_token_id", None), tokenizer.bos_token_id,
                              getattr(text_cfg, "bos_token_id", None), tokenizer.cls_token_id) if t is not None), eos)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = start
        cfg.pad_token_id = pad
        cfg.eos_token_id = eos
    model.generation_config.bos_token_id = start
    if getattr(text_cfg, "pad_token_id", None) is None:
        text_cfg.pad_token_id = pad


def decoder_blocks(model: Any) -> tuple[str, list[Any]]:
    """(name, blocks) of the text decoder's stack of transformer blocks, bottom to top."""
    import torch

    modules = dict(model.decoder.named_modules())
    for name in _BLOCK_LISTS:
        if isinstance(modules.get(name), torch.nn.ModuleList):
            return f"decoder.{name}", list(modules[name])
    lists = [(n, m) for n, m in modules.items() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise FatalError(f"cannot find the transformer blocks of decoder {type(model.decoder).__name__}")
    name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return f"decoder.{name}", list(blocks)


def decoder_final_norm(model: Any) -> tuple[str, Any] | None:
    modules = dict(model.decoder.named_modules())
    for name in _FINAL_NORMS:
        module = modules.get(name)
        if module is not None and sum(p.numel() for p in module.parameters()):
            return f"decoder.{name}", module
    return None


def freeze_for_finetuning(model: Any, unfreeze_last: int, train_all: bool = False) -> list[str]:
    """Set ``requires_grad`` as the module docstring says; returns the names of the trained parts."""
    if train_all:
        for p in model.parameters():
            p.requires_grad_(True)
        return ["all parameters"]
    if unfreeze_last < 1:
        raise FatalError("--unfreeze-last must be at least 1 (or use --train-all)")
    for p in model.parameters():
        p.requires_grad_(False)
    name, blocks = decoder_blocks(model)
    n = min(unfreeze_last, len(blocks))
    if unfreeze_last > len(blocks):
        log.warning("--unfreeze-last %d: the decoder has only %d blocks; training all of them", unfreeze_last,
                    len(blocks))
    trained = [f"{name}.{i}" for i in range(len(blocks) - n, len(blocks))]
    for block in blocks[len(blocks) - n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    norm = decoder_final_norm(model)
    if norm is not None:
        for p in norm[1].parameters():
            p.requires_grad_(True)
        trained.append(norm[0])
    return trained


# --- data --------------------------------------------------------------------------------------


def _image_size(processor: Any) -> tuple[int, int] | None:
    size = getattr(processor, "size", None)
    get = (lambda k: getattr(size, k, None)) if not isinstance(size, dict) else size.get
    height, width = get("height"), get("width")
    return (int(width), int(height)) if height and width else None


def _shrink(image: Any, processor: Any) -> Any:
    """Resize once to the processor's fixed input size (what it would do anyway), so thousands of decoded
    images fit in memory; processors without a fixed size get a thumbnail of at most 768 px."""
    from PIL import Image

    size = _image_size(processor)
    resample = getattr(processor, "resample", None)
    try:
        method = Image.Resampling(int(resample)) if resample is not None else Image.Resampling.BILINEAR
    except (TypeError, ValueError):
        method = Image.Resampling.BILINEAR
    if size:
        return image.resize(size, resample=method) if image.size != size else image
    image.thumbnail((768, 768), method)
    return image


class CaptionData:
    """Images (shrunk, in memory) and their tokenized references: one training pair per reference."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int):
        self.images = [e.data for e in examples]
        self.items: list[Item] = [e.item for e in examples]
        self.references = [[r for r in e.item.references if r.strip()] for e in examples]
        eos = tokenizer.eos_token_id
        self.pairs: list[tuple[int, list[int]]] = []
        truncated = 0
        for i, refs in enumerate(self.references):
            for ref in refs:
                ids = list(tokenizer(" ".join(ref.split()), add_special_tokens=False).input_ids)
                if len(ids) > max_length - 1:
                    truncated += 1
                    ids = ids[: max_length - 1]
                self.pairs.append((i, [*ids, eos]))
        if truncated:
            log.info("%d of %d captions cut to --max-length %d tokens", truncated, len(self.pairs), max_length)

    def batches(self, batch_size: int, generator: Any = None) -> list[list[int]]:
        import torch

        n = len(self.pairs)
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]

    def collate(self, indices: Sequence[int], processor: Any) -> dict[str, Any]:
        import torch

        pairs = [self.pairs[i] for i in indices]
        pixel_values = processor(images=[self.images[i] for i, _ in pairs], return_tensors="pt")["pixel_values"]
        width = max(len(ids) for _, ids in pairs)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        for row, (_, ids) in enumerate(pairs):
            labels[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


# --- training ----------------------------------------------------------------------------------


def _autocast(device: Any, precision: str) -> Any:
    import torch

    dtype = autocast_dtype(precision)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def validation_captioner(model: Any, processor: Any, tokenizer: Any, run: TrainRun, max_new_tokens: int) -> Captioner:
    """The captioner ``batchcap images`` would be, around the model being trained: greedy, the training's
    autocast (CUDA half precision), float32 inputs."""
    autocast = autocast_dtype(run.precision) if run.device.type == "cuda" else None
    return Captioner.from_model(model, processor, tokenizer, device=run.device, autocast=autocast,
                                max_new_tokens=max_new_tokens, num_beams=1, name="validation")


def generate_captions(captioner: Captioner, images: Sequence[Any], batch_size: int) -> list[str]:
    """Greedy captions of ``images``, ``batch_size`` at a time, as ``batchcap images`` makes them."""
    captioner.model.eval()
    captions: list[str] = []
    for i in range(0, len(images), batch_size):
        captions.extend(captioner.caption(list(images[i:i + batch_size])))
    return captions


def _mean_loss(model: Any, data: CaptionData, processor: Any, *, device: Any, precision: str,
               batch_size: int) -> float | None:
    import torch

    if not data.pairs:
        return None
    model.eval()
    total = 0.0
    tokens = 0
    with torch.inference_mode():
        for idx in data.batches(batch_size):
            batch = {k: v.to(device) for k, v in data.collate(idx, processor).items()}
            with _autocast(device, precision):
                loss = model(**batch).loss
            n = int((batch["labels"] != -100).sum())
            total += float(loss) * n
            tokens += n
    return total / tokens if tokens else None


class _Saver:
    """Writes the model the way it was loaded: the generation config is saved as it was before the
    validation captioner tuned it (its greedy settings are not the checkpoint's)."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any):
        import copy

        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.generation_config = copy.deepcopy(model.generation_config)

    def save(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def publish(self, out_dir: str) -> None:
        """Write the model files into OUT_DIR file by file from a complete temporary save."""
        tmp = fresh_dir(os.path.join(out_dir, ".best.tmp"))
        self.save(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)


def _is_better(metric: str, value: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """``value``/``best``: (cider, val_loss) for cider_d (higher CIDEr, then lower loss), (loss, loss) else."""
    if best is None:
        return True
    if metric == "cider_d":
        return value[0] > best[0] + 1e-9 or (abs(value[0] - best[0]) <= 1e-9 and value[1] < best[1])
    return value[0] < best[0]


def load_state(checkpoint: str) -> dict[str, Any]:
    """The training state of ``checkpoint``, loaded with ``weights_only`` (tensors and plain values only:
    a state file that holds anything else is refused, never unpickled)."""
    import torch

    path = os.path.join(checkpoint, STATE_FILE)
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:
        raise FatalError(f"cannot resume from {checkpoint}: {STATE_FILE} holds more than tensors and plain values, "
                         "and loading it could run code, so it is refused (start over with --overwrite)") from None
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FatalError(f"cannot resume from {checkpoint}: {STATE_FILE} is unreadable ({first})") from None


def train_images(manifest: str, out_dir: str, options: ImageTrainOptions | None = None,
                 **overrides: Any) -> TrainResult:
    """Fine-tune a captioner on ``manifest`` (image path/URL + caption columns); results in ``out_dir``."""
    import torch

    opts = options or ImageTrainOptions()
    opts.update(overrides, "train_images")
    if opts.best_metric not in BEST_METRICS:
        raise FatalError(f"unknown --best-metric {opts.best_metric!r} (use {', '.join(BEST_METRICS)})")
    run = start_run(manifest, out_dir, opts, image_spec(opts.path_column, opts.reference_columns, opts.id_column),
                    markers=(CHECKPOINT, HISTORY_JSON, INFO_FILE, "config.json", "model.safetensors"),
                    checkpoints=(CHECKPOINT,))
    device, precision = run.device, run.precision
    checkpoint = os.path.join(out_dir, CHECKPOINT)
    state = load_state(checkpoint) if opts.resume and os.path.isfile(os.path.join(checkpoint, STATE_FILE)) else None
    if opts.resume and state is None:
        log.info("--resume: no checkpoint in %s yet; starting from the beginning", out_dir)

    model, processor, tokenizer = load_captioner_for_training(opts, checkpoint if state is not None else None)
    trained_parts = freeze_for_finetuning(model, opts.unfreeze_last, opts.train_all)
    trainable, total = count_parameters(model)
    log.info("training %s of %s parameters (%.2f%%): %s", f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1), ", ".join(trained_parts))
    model.to(device)
    saver = _Saver(model, processor, tokenizer)

    def decode(item: Item, data: bytes) -> Any:
        return _shrink(decode_image(data), processor)

    train_ex, val_ex, data_report = run.load_data(decode, cache_dir=opts.cache_dir or os.path.join(out_dir, "cache"))
    train_data = CaptionData(train_ex, tokenizer, opts.max_length)
    val_data = CaptionData(val_ex, tokenizer, opts.max_length)
    log.info("%d training captions, %d validation captions", len(train_data.pairs), len(val_data.pairs))
    data_report.update(train_captions=len(train_data.pairs), val_captions=len(val_data.pairs))
    metric = opts.best_metric
    if metric == "cider_d" and len(val_data.images) < 2:
        metric = "val_loss"
        if val_data.images:
            log.warning("CIDEr-D needs at least 2 validation images: the best checkpoint is chosen by val_loss")
    captioner = validation_captioner(model, processor, tokenizer, run, opts.max_length)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    start_epoch = 0
    best: tuple[float, float] | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []  # validation predictions of the last epoch, for report.html
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise FatalError(f"cannot resume from {checkpoint}: its optimizer state does not match the trained "
                             f"parameters (was --unfreeze-last / --train-all changed?): {exc}") from exc
        for group in optimizer.param_groups:
            group["lr"] = opts.lr
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        best = tuple(state["best"]) if state.get("best") is not None else None  # type: ignore[assignment]
        best_epoch = state.get("best_epoch")
        metric = state.get("metric", metric)
        history = read_history(out_dir)[:start_epoch]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        log.info("resuming after epoch %d of %d from %s", start_epoch, opts.epochs, checkpoint)

    steps_per_epoch = math.ceil(len(train_data.pairs) / opts.batch_size)
    for epoch in range(start_epoch, opts.epochs):
        t0 = time.time()
        model.train()
        generator = torch.Generator().manual_seed(opts.seed * 1000 + epoch)
        batches = train_data.batches(opts.batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, token_sum = 0.0, 0
        for step, idx in enumerate(batches):
            batch = {k: v.to(device) for k, v in train_data.collate(idx, processor).items()}
            with _autocast(device, precision):
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FatalError(f"epoch {epoch + 1}, step {step + 1}: the loss is {float(loss)} (try a lower --lr)")
            n = int((batch["labels"] != -100).sum())
            loss_sum += float(loss.detach()) * n
            token_sum += n
            scaler.scale(loss / opts.grad_accum).backward()
            if (step + 1) % opts.grad_accum == 0 or step + 1 == len(batches):
                scaler.unscale_(optimizer)
                if opts.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        row: dict[str, Any] = {"epoch": epoch + 1, "steps": (epoch + 1) * steps_per_epoch,
                               "train_loss": loss_sum / max(token_sum, 1)}
        if val_data.images:
            row["val_loss"] = _mean_loss(model, val_data, processor, device=device, precision=precision,
                                         batch_size=opts.batch_size)
            hyps = generate_captions(captioner, val_data.images, opts.batch_size)
            corpus, _ = caption_metrics(hyps, val_data.references)
            samples = [{"id": it.id, "prediction": h, "references": refs, "image": im} for h, refs, im, it
                       in zip(hyps[:24], val_data.references, val_data.images, val_data.items)]
            row.update({k: round(v, 5) for k, v in corpus.items()})
            row["exact"] = round(sum(h.lower() in {r.lower() for r in refs}
                                     for h, refs in zip(hyps, val_data.references)) / len(hyps), 5)
            row["example"] = f"{hyps[0]!r} (ref {val_data.references[0][0]!r})"
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        if val_data.images:
            vloss = row["val_loss"] if row["val_loss"] is not None else math.inf
            value = (row["cider_d"], vloss) if metric == "cider_d" else (vloss, vloss)
        else:
            value = (float(epoch), 0.0)  # no validation: the latest epoch is the best
        improved = _is_better(metric if val_data.images else "cider_d", value, best)
        if improved:
            best, best_epoch = value, epoch + 1
            saver.publish(out_dir)
        row["best"] = improved
        log.info("epoch %d/%d: train_loss %.4f%s%s, %.1f s%s", epoch + 1, opts.epochs, row["train_loss"],
                 f", val_loss {row['val_loss']:.4f}" if row.get("val_loss") is not None else "",
                 f", CIDEr-D {row['cider_d']:.3f}, BLEU-4 {row['bleu_4']:.3f}, exact {row['exact']:.0%}"
                 if "cider_d" in row else "", row["seconds"], " (best so far)" if improved else "")
        if val_data.images:
            log.info("  e.g. %s", row["example"])
        _save_checkpoint(saver, optimizer, scaler, checkpoint, epoch=epoch + 1, best=best, best_epoch=best_epoch,
                         metric=metric)
        write_history(out_dir, history, metrics=("cider_d", "bleu_4", "exact"),
                      title=f"batchcap train images ({metric} picks the best epoch)")

    if best_epoch is None and not os.path.isfile(os.path.join(out_dir, "config.json")):
        saver.publish(out_dir)  # zero epochs: the model as loaded
    best_metric = metric if val_data.images else "last_epoch"
    info = {"manifest": manifest, "options": asdict(opts), "device": str(device), "precision": precision,
            "trained": trained_parts, "trainable_params": trainable, "total_params": total,
            "best_metric": best_metric, "best_epoch": best_epoch, "data": data_report}
    write_info(out_dir, info)
    write_training_report(out_dir, history, samples, title=f"batchcap train images: {os.path.basename(out_dir)}",
                          info=jsonable(info), strict=False)
    if best_epoch is not None:
        log.info("best epoch %d (%s); model in %s", best_epoch, best_metric, out_dir)
    return TrainResult(out_dir, history, trainable, total, data_report, run.elapsed(), best_epoch=best_epoch,
                       best_metric=best_metric, best_value=best[0] if best else None)


def _save_checkpoint(saver: _Saver, optimizer: Any, scaler: Any, path: str, *, epoch: int, best: Any,
                     best_epoch: int | None, metric: str) -> None:
    """The model and the training state (tensors and plain values only: loadable with ``weights_only``) into a
    fresh directory, swapped in for ``path`` (crash-safe, see :mod:`batchcap.train.checkpoints`)."""
    import torch

    tmp = fresh_dir(f"{path}.tmp")
    saver.save(tmp)
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "epoch": epoch, "best": list(best) if best is not None else None, "best_epoch": best_epoch,
             "metric": metric, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    with atomic_path(os.path.join(tmp, STATE_FILE)) as target:
        torch.save(state, target)
    replace_dir(tmp, path)
