"""Model wrappers: image captioning and speech transcription through transformers."""
