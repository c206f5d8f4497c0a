"""Fine-tuning: ``batchcap train images`` (VisionEncoderDecoder captioners) and ``batchcap train audio``
(Whisper with LoRA). Heavy modules (torch, transformers, peft) load on first use only.

    from batchcap.train.images import train_images
    from batchcap.train.audio import train_audio
"""
