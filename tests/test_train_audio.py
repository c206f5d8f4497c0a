"""batchcap train audio: LoRA on a tiny Whisper teaches it to name tones, and batchcap audio loads the result.

The tiny random Whisper of tests/tiny_whisper.py is made a little more like a trained one before LoRA
sees it (LoRA presumes a pretrained model): its convolutional stem is scaled up so the encoder's output
depends on the sound (at the random 0.02 init, positional embeddings drown the audio: every clip encodes
to the same thing), and its token embeddings, tied to the output head, are redrawn at a trained-like scale
(the random init leaves the <|endoftext|> row at zero, so a frozen head could never predict the end).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import rows_of  # noqa: F401
from tests.tiny_whisper import make_tiny_whisper
from tests.train_helpers import TRAIN_DEVICE, one_thread, run_cli, write_manifest  # noqa: F401

WORDS = {300.0: "red", 1000.0: "blue", 3000.0: "square"}
RATES = (8000, 16000, 22050)  # decode_audio resamples them all to 16 kHz


def make_base(directory: str, multilingual: bool = True) -> str:
    import torch
    from transformers import WhisperForConditionalGeneration

    make_tiny_whisper(directory, multilingual=multilingual)
    model = WhisperForConditionalGeneration.from_pretrained(directory)
    torch.manual_seed(1)
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.normal_(0.0, 0.2)
        model.model.encoder.conv1.weight.mul_(10.0)
        model.model.encoder.conv2.weight.mul_(10.0)
    model.save_pretrained(directory)
    return directory


def tone_clip(freq: float, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wobble = 1 + rng.uniform(-0.03, 0.03)
    return (0.3 * np.sin(2 * np.pi * freq * wobble * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def make_tones(directory, n: int, seed: int, extra_rows: list[dict] | None = None) -> str:
    """``n`` tone clips of 20-28 s (most of Whisper's window) cycling through WORDS, + manifest.csv."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(n):
        freq = list(WORDS)[i % len(WORDS)]
        rate = RATES[i % len(RATES)]
        name = f"{i:03d}.wav"
        sf.write(os.path.join(directory, name), tone_clip(freq, rng.uniform(20, 28), rate, rng), rate,
                 subtype="PCM_16")
        rows.append({"path": name, "text": WORDS[freq]})
    rows += extra_rows or []
    return write_manifest(os.path.join(directory, "manifest.csv"), rows)


def transcribe_wer(model: str, manifest: str, out, exit_code: int = 0) -> tuple[float, list[dict]]:
    """WER from `batchcap audio --model MODEL` (its own summary) and the rows."""
    from batchcap.output import read_table

    code, output = run_cli("audio", manifest, "--model", model, "-o", out, "--device", "cpu", "--dtype", "float32",
                           "--language", "en", "-q")
    assert code == exit_code, output
    with open(str(out).removesuffix(".parquet") + ".summary.json") as f:
        summary = json.load(f)
    return summary["wer"], read_table(str(out)).to_pylist()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tones")
    return {"train": make_tones(root / "train", 30, seed=0), "test": make_tones(root / "test", 15, seed=1),
            "base": make_base(str(root / "base")), "root": str(root)}


@pytest.fixture(scope="module")
def trained(data) -> str:
    import torch

    torch.set_num_threads(1)
    out = os.path.join(data["root"], "out")
    code, output = run_cli("train", "audio", data["train"], "-o", out, "--model", data["base"], "--language", "en",
                           "--lora-targets", "all-linear", "--unfreeze-last", "1", "--epochs", "4", "--lr", "5e-3",
                           "--batch-size", "4", "--val-fraction", "0.2", "--device", TRAIN_DEVICE, "-q")
    assert code == 0, output
    return out


def test_lora_teaches_the_tones(data, trained, tmp_path):
    before, _ = transcribe_wer(data["base"], data["test"], tmp_path / "before.parquet")
    after, rows = transcribe_wer(trained, data["test"], tmp_path / "after.parquet")
    assert before >= 0.8
    assert after <= 0.2, [(r["reference"], r["text"]) for r in rows]
    assert all(r["status"] == "ok" for r in rows)


def test_outputs(data, trained):
    from transformers import GenerationConfig

    with open(os.path.join(trained, "history.json")) as f:
        history = json.load(f)
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0, 4.0]
    assert all({"train_loss", "val_loss", "wer"} <= row.keys() for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 4
    with open(os.path.join(trained, "training.json")) as f:
        info = json.load(f)
    assert info["best_wer"] == min(row["wer"] for row in history)
    with open(os.path.join(trained, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(trained, "history.csv")) as f:
        assert len(list(csv.DictReader(f))) == 4
    with open(os.path.join(trained, "report.html"), encoding="utf-8") as f:  # batchcap report's training page
        page = f.read()
    assert page.count("<polyline") == 3 and page.count('class="align mono"') == 6  # loss x2, WER; 6 val clips
    # fine-tuned on text without times: batchcap audio decodes it without timestamp tokens
    assert GenerationConfig.from_pretrained(trained).trained_without_timestamps is True
    # the adapter, and a plain merged Whisper checkpoint beside it
    assert os.path.isfile(os.path.join(trained, "adapter", "adapter_config.json"))
    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                 "tokenizer.json", "normalizer.json"):
        assert os.path.isfile(os.path.join(trained, name)), name
    with open(os.path.join(trained, "model.safetensors"), "rb") as f:
        assert b"lora_" not in f.read(200_000)
    gen = GenerationConfig.from_pretrained(trained)
    assert getattr(gen, "forced_decoder_ids", None) is None
    assert gen.language == "en" and gen.task == "transcribe"


def test_merged_model_equals_base_plus_adapter(data, trained):
    import torch
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    merged = WhisperForConditionalGeneration.from_pretrained(trained).eval()
    adapted = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(data["base"]),
                                        os.path.join(trained, "adapter")).eval()
    features = torch.randn(1, 80, 3000)
    decoder_input_ids = torch.tensor([[merged.generation_config.decoder_start_token_id]])
    with torch.no_grad():
        a = merged(input_features=features, decoder_input_ids=decoder_input_ids).logits
        b = adapted(input_features=features, decoder_input_ids=decoder_input_ids).logits
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2])
def test_unfreeze_last_counts(tmp_path, n):
    from transformers import WhisperForConditionalGeneration

    from batchcap.train.audio import AudioTrainOptions, apply_lora
    from batchcap.train.base import count_parameters

    model = WhisperForConditionalGeneration.from_pretrained(make_tiny_whisper(str(tmp_path / "w")))
    layers = model.model.decoder.layers
    top = [f"model.decoder.layers.{i}." for i in range(len(layers) - n, len(layers))]
    r = 8
    expected = sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj") and not name.startswith(tuple(top)))
    expected += sum(p.numel() for p in layers[len(layers) - n:].parameters())
    expected += sum(p.numel() for p in model.model.decoder.layer_norm.parameters())
    total_before = sum(p.numel() for p in model.parameters())
    n_proj = sum(1 for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj")))
    n_dec = sum(1 for name, _ in model.named_modules() if name.startswith("model.decoder.")
                and name.endswith(("q_proj", "v_proj")))

    peft_model = apply_lora(model, AudioTrainOptions(lora_r=r, lora_alpha=16, unfreeze_last=n))
    trainable, _ = count_parameters(peft_model)
    assert trainable == expected
    names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert not any(".model.encoder." in name and "lora_" not in name for name in names)
    assert not any("embed_tokens" in name or "proj_out" in name for name in names)
    # LoRA-only: exactly r * (in + out) per adapted projection
    plain = apply_lora(WhisperForConditionalGeneration.from_pretrained(str(tmp_path / "w")),
                       AudioTrainOptions(lora_r=r, lora_alpha=16))
    assert count_parameters(plain)[0] == n_proj * r * (64 + 64)
    assert count_parameters(plain)[1] == total_before + n_proj * r * 128
    # --lora-scope decoder: the encoder gets no adapter at all
    decoder_only = apply_lora(WhisperForConditionalGeneration.from_pretrained(str(tmp_path / "w")),
                              AudioTrainOptions(lora_r=r, lora_alpha=16, lora_scope="decoder"))
    assert count_parameters(decoder_only)[0] == n_dec * r * 128
    assert not any(".encoder." in name for name, p in decoder_only.named_parameters() if p.requires_grad)


def test_skips_long_and_bad_clips_english_only(tmp_path):
    """An English-only model, a 35 s clip, a missing file and a corrupt one: trained on the rest, each skip
    counted with its reason; the merged model transcribes through batchcap audio."""
    base = make_base(str(tmp_path / "base-en"), multilingual=False)
    directory = tmp_path / "data"
    directory.mkdir()
    rng = np.random.default_rng(3)
    sf.write(str(directory / "long.wav"), tone_clip(300.0, 35.0, 16000, rng), 16000, subtype="PCM_16")
    (directory / "corrupt.wav").write_bytes(b"RIFF\x00\x00not audio at all" * 8)
    manifest = make_tones(directory, 6, seed=2, extra_rows=[
        {"path": "long.wav", "text": "red"}, {"path": "missing.wav", "text": "red"},
        {"path": "corrupt.wav", "text": "blue"}, {"path": "000.wav", "text": ""}])
    out = tmp_path / "out"
    code, output = run_cli("train", "audio", manifest, "-o", out, "--model", base, "--max-steps", "1",
                           "--batch-size", "2", "--val-fraction", "0.34", "--device", "cpu")
    assert code == 0, output
    with open(out / "training.json") as f:
        report = json.load(f)["data"]["train_manifest"]
    assert report["rows"] == 10 and report["kept"] == 6
    assert report["skipped"] == {"too_long": 1, "fetch_error": 1, "decode_error": 1, "no_reference": 1}
    assert any("long.wav" in e and "30 s" in e for e in report["first_errors"])
    with open(out / "generation_config.json") as f:
        assert json.load(f).get("forced_decoder_ids") is None
    # the one step trained something: a linear warmup's first step has a learning rate of 0, and with the
    # warmup running past the run's only step the merged model was the base, bit for bit
    from safetensors.numpy import load_file

    before, after = load_file(os.path.join(base, "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not np.array_equal(before[k], after[k]) for k in before if k in after)
    # exit code 3: the missing and the corrupt file are failed rows there
    wer, rows = transcribe_wer(str(out), str(directory / "manifest.csv"), tmp_path / "t.parquet", exit_code=3)
    assert sum(r["status"] == "ok" for r in rows) == 8 and wer is not None  # + the long one, 000.wav twice


def test_resume_continues(data, tmp_path):
    manifest = make_tones(tmp_path / "small", 6, seed=4)
    common = ["--model", data["base"], "--language", "en", "--batch-size", "4", "--val-fraction", "0.34",
              "--device", "cpu", "-q"]
    out = tmp_path / "out"
    code, output = run_cli("train", "audio", manifest, "-o", out, "--epochs", "1", *common)
    assert code == 0, output
    code, output = run_cli("train", "audio", manifest, "-o", out, "--epochs", "2", *common)
    assert code == 1 and "--resume" in output
    code, output = run_cli("train", "audio", manifest, "-o", out, "--epochs", "2", "--resume", *common)
    assert code == 0, output
    with open(out / "history.json") as f:
        history = json.load(f)
    assert [row["epoch"] for row in history] == [1.0, 2.0]
    assert all("wer" in row for row in history)


def test_usage_errors(data, tmp_path):
    code, output = run_cli("train", "audio", data["train"], "-o", tmp_path / "a", "--model", data["base"],
                           "--device", "cpu")
    assert code == 1 and "--language" in output and output.count("\n") == 1
    code, output = run_cli("train", "audio", data["train"], "-o", tmp_path / "b", "--model", data["base"],
                           "--language", "en", "--lora-targets", "qkv", "--device", "cpu")
    assert code == 1 and "qkv" in output
    code, output = run_cli("train", "audio", tmp_path / "none.csv", "-o", tmp_path / "c", "--device", "cpu")
    assert code == 1 and "input not found" in output


def with_languages(manifest: str, languages: list[str], column: str = "language") -> str:
    """``manifest`` with a ``column`` of per-row languages (cycled)."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row[column] = languages[i % len(languages)]
    return write_manifest(manifest, rows)


def test_labels_carry_each_rows_language(data):
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from batchcap.items import Item, ItemError
    from batchcap.train.audio import _labelled, row_language, whisper_setup
    from batchcap.train.data import Example

    model = WhisperForConditionalGeneration.from_pretrained(data["base"])
    tokenizer = WhisperTokenizerFast.from_pretrained(data["base"])
    setup = whisper_setup(model, tokenizer, None, "transcribe", "tiny", per_row_language=True)
    items = [Item(i, f"r{i}", f"{i}.wav", references=["red"], language=lang)
             for i, lang in enumerate(["en", "german", "fr", "de"])]
    kept, labels = _labelled([Example(item, None) for item in items], tokenizer, setup, "language", {})
    token = tokenizer.convert_tokens_to_ids
    assert [ids[0] for ids in labels] == [token("<|en|>"), token("<|de|>"), token("<|fr|>"), token("<|de|>")]
    assert all(ids[1:3] == [token("<|transcribe|>"), token("<|notimestamps|>")] for ids in labels)
    assert labels[0][3:] == labels[1][3:]  # the same text after the prefix
    for value, status in ((None, "no_language"), ("", "no_language"), ("klingon", "unsupported_language")):
        with pytest.raises(ItemError) as err:
            setup.check_language(row_language(Item(0, "x", "x", language=value), "language"))
        assert err.value.status == status
    with_default = whisper_setup(model, tokenizer, "fr", "transcribe", "tiny", per_row_language=True)
    assert with_default.check_language(None) == "fr" and with_default.check_language("de") == "de"


def test_mixed_language_manifest(data, tmp_path, monkeypatch):
    """A multilingual checkpoint, no --language: each row's language comes from its column; rows whose
    language is missing or unknown are skipped with that reason; validation generates in each row's language."""
    from transformers import WhisperForConditionalGeneration

    languages = ["en", "de", "fr", "de", "en", "fr", "", "klingon"]
    manifest = with_languages(make_tones(tmp_path / "mixed", 8, seed=5), languages)
    asked: list = []
    generate = WhisperForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("language"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(WhisperForConditionalGeneration, "generate", spy)
    out = tmp_path / "out"
    code, output = run_cli("train", "audio", manifest, "-o", out, "--model", data["base"], "--max-steps", "1",
                           "--batch-size", "2", "--val-fraction", "0.34", "--device", "cpu", "-q")
    assert code == 0, output
    with open(out / "training.json") as f:
        info = json.load(f)
    report = info["data"]["train_manifest"]
    assert report["kept"] == 6 and report["skipped"] == {"no_language": 1, "unsupported_language": 1}
    assert info["best_metric"] == "wer" and info["best_wer"] is not None  # validation ran
    val_languages = sorted(lang for batch in asked for lang in batch)  # one per validation clip, its row's
    assert len(val_languages) == 2 and set(val_languages) <= {"en", "de", "fr"}
    with open(out / "generation_config.json") as f:
        assert json.load(f).get("language") is None  # mixed: the merged model detects the language

    # --language fills the empty row; --language-column names another column; a missing one is an error
    renamed = with_languages(make_tones(tmp_path / "renamed", 4, seed=6), ["de", ""], column="lang")
    code, output = run_cli("train", "audio", renamed, "-o", tmp_path / "out2", "--model", data["base"],
                           "--language-column", "lang", "--language", "es", "--max-steps", "1", "--batch-size", "2",
                           "--val-fraction", "0", "--device", "cpu", "-q")
    assert code == 0, output
    with open(tmp_path / "out2" / "training.json") as f:
        assert json.load(f)["data"]["train_manifest"]["kept"] == 4
    code, output = run_cli("train", "audio", renamed, "-o", tmp_path / "out3", "--model", data["base"],
                           "--language-column", "lingua", "--device", "cpu")
    assert code == 1 and "lingua" in output and output.count("\n") == 1
