#!/usr/bin/env python
"""Measure LoRA fine-tuning of a real Whisper: WER on a test manifest before and after.

    python scripts/finetune_whisper_real.py                       # whisper-tiny.en, speech-en, CPU
    python scripts/finetune_whisper_real.py --device cuda --epochs 3 --batch-size 16

1. WER of the base model on TEST (``batchcap.transcribe``, the pipeline ``batchcap audio`` runs).
2. ``batchcap.train.audio.train_audio`` on TRAIN (LoRA; validation split of TRAIN picks the best epoch).
3. WER of the merged model in OUT/model on TEST, the same way.
Prints both WERs, the time each step took and the trainable parameter count, and writes them to
OUT/report.json. Exit code 1 if the fine-tuned model is worse than the base.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("finetune_whisper_real")

DEV = os.path.expanduser("~/.cache/batchcap-dev")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(DEV, "models", "whisper-tiny.en"))
    p.add_argument("--train", default=os.path.join(DEV, "speech-en", "train.csv"))
    p.add_argument("--test", default=os.path.join(DEV, "speech-en", "test.csv"))
    p.add_argument("--out", default=os.path.join(DEV, "runs", "finetune-whisper"))
    p.add_argument("--language", default=None, help="for multilingual models")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=int, default=64)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--lora-scope", choices=("all", "decoder"), default="all")
    p.add_argument("--unfreeze-last", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-base", action="store_true", help="reuse OUT/base.parquet's WER if present")
    return p.parse_args()


def wer_of(model: str, manifest: str, output: str, device: str, batch_size: int) -> tuple[float, float, int]:
    """(WER, seconds, rows scored) of ``model`` on ``manifest`` through batchcap.transcribe."""
    from batchcap import transcribe

    t0 = time.time()
    result = transcribe(manifest, output, model=model, device=device, batch_size=batch_size, overwrite=True,
                        quiet=True)
    summary = result.summary
    return summary["wer"], time.time() - t0, summary.get("scored_rows", 0)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from batchcap.train.audio import AudioTrainOptions, train_audio

    os.makedirs(args.out, exist_ok=True)
    report: dict = {"model": args.model, "train": args.train, "test": args.test, "args": vars(args)}

    base_out = os.path.join(args.out, "base.parquet")
    base_summary = os.path.join(args.out, "base.summary.json")
    if args.skip_base and os.path.isfile(base_summary):
        with open(base_summary) as f:
            saved = json.load(f)
        base_wer, base_s, n = saved["wer"], saved.get("wall_time_s"), saved.get("scored_rows")
    else:
        base_wer, base_s, n = wer_of(args.model, args.test, base_out, args.device, 16)
    log.info("base model: WER %.2f%% on %s rows of %s", 100 * base_wer, n, args.test)
    report["base"] = {"wer": base_wer, "seconds": base_s, "rows": n}

    model_dir = os.path.join(args.out, "model")
    opts = AudioTrainOptions(
        model=args.model, language=args.language, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t), lora_scope=args.lora_scope,
        unfreeze_last=args.unfreeze_last,
        val_fraction=args.val_fraction, device=args.device, limit=args.limit, overwrite=True)
    t0 = time.time()
    result = train_audio(args.train, model_dir, opts)
    train_s = time.time() - t0
    report["training"] = {"seconds": train_s, "trainable_params": result.trainable_params,
                          "total_params": result.total_params, "best_val_wer": result.best_wer,
                          "history": result.history, "data": result.data}

    tuned_wer, tuned_s, n = wer_of(model_dir, args.test, os.path.join(args.out, "tuned.parquet"), args.device, 16)
    report["tuned"] = {"wer": tuned_wer, "seconds": tuned_s, "rows": n}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)

    print(f"base      WER {base_wer:.2%}  ({args.model})")
    print(f"fine-tuned WER {tuned_wer:.2%}  ({model_dir})")
    print(f"training: {train_s:.0f} s, {result.trainable_params:,} of {result.total_params:,} parameters trainable "
          f"({100 * result.trainable_params / result.total_params:.2f}%), best validation WER "
          f"{result.best_wer if result.best_wer is None else f'{result.best_wer:.2%}'}")
    print(f"report: {os.path.join(args.out, 'report.json')}")
    if tuned_wer > base_wer:
        print("the fine-tuned model is WORSE than the base model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
