"""Tiny random models built offline (no Hugging Face hub), saved like real checkpoints.

Import the fixtures into ``tests/conftest.py`` with::

    from tests.tiny_models import tiny_captioner  # noqa: F401
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

# A few sentences to build the tiny captioner's word-level vocabulary from.
CAPTION_SENTENCES = (
    "a red circle on a white background",
    "a blue square next to a green triangle",
    "a cat sitting on a table",
    "a dog running in the grass",
    "two people standing near a car",
    "an astronaut in a space suit",
    "a cup of coffee on a plate",
)
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# With the default 0.02 every image gets the same caption (often just EOS); 0.2 makes the caption
# depend on the image, with lengths that differ, so batched decoding really pads.
INIT_RANGE = 0.2


def _make_caption_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A word-level tokenizer over ``CAPTION_SENTENCES``; GPT-2 style: bos = eos = pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=[EOS_TOKEN, UNK_TOKEN], min_frequency=1)
    tok.train_from_iterator(CAPTION_SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
    )


def make_tiny_captioner(path: str | Path, *, seed: int = 0) -> str:
    """Save a tiny random ViT + GPT-2 VisionEncoderDecoder, its image processor and tokenizer to ``path``.

    Everything is built from configs: nothing is downloaded. Returns ``str(path)``.
    """
    import torch
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    try:  # transformers >= 5.2x: the PIL backend (needs no torchvision)
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as ViTProcessor
    except ImportError:
        from transformers import ViTImageProcessor as ViTProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_caption_tokenizer()
    eos = tokenizer.eos_token_id

    encoder = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=INIT_RANGE,
    )
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        add_cross_attention=True,
        is_decoder=True,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = eos
    config.pad_token_id = eos
    config.eos_token_id = eos

    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    gen = model.generation_config
    gen.decoder_start_token_id = eos
    gen.bos_token_id = eos
    gen.eos_token_id = eos
    gen.pad_token_id = eos
    model.save_pretrained(path)

    processor = ViTProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    logger.debug("tiny captioner saved to %s", path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a tiny random ViT + GPT-2 captioner (built once per test session)."""
    return make_tiny_captioner(tmp_path_factory.mktemp("tiny_captioner"))
