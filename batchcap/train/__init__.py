"""Fine-tuning: ``batchcap train images`` (VisionEncoderDecoder captioners) and ``batchcap train audio``
(Whisper with LoRA). Heavy modules (torch, transformers, peft) load on first use only.

    from batchcap.train.images import train_images
    from batchcap.train.audio import train_audio

Modules: ``options`` (the options of both, and the CLI's defaults), ``base`` (the preamble both run:
checks, OUT_DIR, seeding, device and precision; then data loading), ``data`` (manifest -> fetched, cached,
decoded examples; train/validation split), ``history`` (history.json/.csv, loss.png), ``checkpoints``
(OUT_DIR guard, crash-safe directory swaps, training.json), ``images`` and ``audio`` (the two fine-tunes),
``cli`` (the Click commands).
"""
