"""A tiny random Whisper checkpoint built offline: same files and code paths as a real one.

The tokenizer is a byte-level BPE trained in memory on a few sentences, with Whisper's special
tokens, language tokens and timestamp tokens laid out as in the real vocabularies, so that
``WhisperForConditionalGeneration.generate`` (prompt, language detection, long-form
timestamps) runs as it does for openai/whisper-*.
"""

from __future__ import annotations

import json
import os
import tempfile

LANGUAGES = ("en", "de", "fr", "es")
TEXT = ["the quick brown fox jumps over the lazy dog", "hello world this is a test of speech",
        "a red circle and a blue square", "one two three four five six seven eight nine ten",
        "please leave a message after the tone", "the number you have dialed is not in service"]


def _tokenizer(out_dir: str, multilingual: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, WhisperTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(TEXT * 4, trainer)
    specials = ["<|startoftranscript|>", *[f"<|{lang}|>" for lang in LANGUAGES], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    bpe.add_special_tokens(specials)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save(os.path.join(tmp, "tokenizer.json"))
        config = {"tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>",
                  "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                  "additional_special_tokens": ["<|endoftext|>", *specials], "add_prefix_space": False,
                  "model_max_length": 1024, "clean_up_tokenization_spaces": False}
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        tok = WhisperTokenizerFast.from_pretrained(tmp)
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
                    for i in range(1501)])
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "normalizer.json"), "w") as f:
        json.dump({"colour": "color"}, f)  # the British->American spelling map real checkpoints ship
    return tok


def make_tiny_whisper(out_dir: str, multilingual: bool = True, max_length: int = 24, seed: int = 0) -> str:
    """Save a tiny random Whisper (model, tokenizer, feature extractor) into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tok = _tokenizer(out_dir, multilingual)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>",
            "<|notimestamps|>", "<|startoflm|>")}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=sot, pad_token_id=eot,
        bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    gen = {
        "decoder_start_token_id": sot, "eos_token_id": eot, "pad_token_id": eot, "bos_token_id": eot,
        "max_length": max_length, "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"], "begin_suppress_tokens": [eot], "suppress_tokens": [],
        "is_multilingual": multilingual, "return_timestamps": False, "max_initial_timestamp_index": 50,
        "alignment_heads": [[1, 0], [1, 1]],
    }
    if multilingual:
        gen["lang_to_id"] = {f"<|{lang}|>": tok.convert_tokens_to_ids(f"<|{lang}|>") for lang in LANGUAGES}
        gen["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        gen["forced_decoder_ids"] = [[1, None], [2, ids["<|transcribe|>"]]]
    else:
        gen["forced_decoder_ids"] = [[1, ids["<|notimestamps|>"]]]
    model.generation_config = GenerationConfig.from_dict(gen)
    model.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out_dir)
    return out_dir
