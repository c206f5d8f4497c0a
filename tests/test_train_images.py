"""batchcap train images: a tiny ViT + GPT-2 captioner learns to name coloured shapes.

The pair is built here from configs (nothing downloaded): a 1-layer ViT on 32x32 images with 4x4 patches
(48 pixel values -> 64 dims, so even a random patch embedding keeps what a patch shows) and a 2-block
GPT-2 with a word-level tokenizer. Trained with the default freezing (encoder frozen), it names held-out
shapes in a few seconds.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.helpers import rows_of  # noqa: F401
from tests.train_helpers import TRAIN_DEVICE, one_thread, run_cli, write_manifest  # noqa: F401

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("a", *COLOURS, *SHAPES)


def draw(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(im)
    side = rng.randint(size // 2, size * 9 // 10)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([x, y, x + side, y + side], fill=fill)
    elif shape == "square":
        pen.rectangle([x, y, x + side, y + side], fill=fill)
    else:
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return im


def make_shapes(directory, n: int, seed: int, extra_rows: list[dict] | None = None) -> str:
    """``n`` PNGs cycling through the 9 colour x shape pairs at random places and sizes, + manifest.csv."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 3]
        name = f"{i:04d}.png"
        draw(colour, shape, rng).save(os.path.join(directory, name))
        rows.append({"path": name, "caption": f"a {colour} {shape}"})
    rows += extra_rows or []
    return write_manifest(os.path.join(directory, "manifest.csv"), rows)


def make_pair(root) -> tuple[str, str]:
    """A random ViT (+ image processor) and a random GPT-2 (+ word-level tokenizer), saved as checkpoints."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, ViTConfig, ViTModel

    try:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as ViTProcessor
    except ImportError:
        from transformers import ViTImageProcessor as ViTProcessor

    enc_dir, dec_dir = os.path.join(root, "vit"), os.path.join(root, "gpt2")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=128), add_pooling_layer=False)
    vit.save_pretrained(enc_dir)
    ViTProcessor(size={"height": 32, "width": 32}).save_pretrained(enc_dir)
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<unk>")  # GPT-2 style: no pad token
    # initializer_range 0.2: token embeddings (and the LM head tied to them) of a useful scale, as trained
    # ones are; with GPT-2's 0.02 the frozen head's logits stay near zero for many epochs.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.2))
    gpt2.save_pretrained(dec_dir)
    tokenizer.save_pretrained(dec_dir)
    return enc_dir, dec_dir


def exact(captions: list[str], refs: list[str]) -> float:
    return sum(c.strip().lower() == r for c, r in zip(captions, refs)) / len(refs)


def caption_dir(model_dir: str, manifest: str) -> tuple[list[str], list[str]]:
    from batchcap.models.captioner import Captioner

    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    base = os.path.dirname(manifest)
    images = [Image.open(os.path.join(base, r["path"])).convert("RGB") for r in rows]
    captioner = Captioner(model_dir, device="cpu", dtype="float32", max_new_tokens=8)
    return captioner.caption(images), [r["caption"] for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shapes")
    train = make_shapes(root / "train", 180, seed=0)
    test = make_shapes(root / "test", 27, seed=1)
    enc, dec = make_pair(root / "pair")
    return {"train": train, "test": test, "encoder": enc, "decoder": dec, "root": str(root)}


@pytest.fixture(scope="module")
def trained(data) -> str:
    import torch

    torch.set_num_threads(1)
    out = os.path.join(data["root"], "out")
    code, output = run_cli("train", "images", data["train"], "-o", out, "--encoder", data["encoder"], "--decoder",
                           data["decoder"], "--unfreeze-last", "2", "--epochs", "10", "--lr", "3e-3",
                           "--batch-size", "8", "--val-fraction", "0.15", "--device", TRAIN_DEVICE, "-q")
    assert code == 0, output
    return out


def test_trained_captioner_names_held_out_shapes(data, trained, tmp_path):
    captions, refs = caption_dir(trained, data["test"])
    assert exact(captions, refs) >= 0.7, list(zip(captions, refs))

    # the same through `batchcap images --model OUT_DIR`, the pipeline users run
    from batchcap.output import read_table

    out = tmp_path / "captions.parquet"
    code, output = run_cli("images", data["test"], "--model", trained, "-o", out, "--device", "cpu",
                           "--dtype", "float32", "-q")
    assert code == 0, output
    rows = read_table(str(out)).to_pylist()
    assert len(rows) == 27 and all(r["status"] == "ok" for r in rows)
    assert exact([r["caption"] for r in rows], [r["references"][0] for r in rows]) >= 0.7
    by_source = {os.path.basename(r["source"]): r["caption"] for r in rows}
    assert [by_source[f"{i:04d}.png"] for i in range(27)] == captions  # same model, same greedy captions


def test_untrained_captioner_does_not(data, tmp_path):
    out = tmp_path / "untrained"
    code, output = run_cli("train", "images", data["train"], "-o", out, "--encoder", data["encoder"], "--decoder",
                           data["decoder"], "--epochs", "0", "--device", "cpu", "-q")
    assert code == 0, output
    captions, refs = caption_dir(str(out), data["test"])
    assert exact(captions, refs) < 0.2


def test_outputs(trained):
    with open(os.path.join(trained, "history.json")) as f:
        history = json.load(f)
    assert [row["epoch"] for row in history] == list(range(1, 11))
    for key in ("train_loss", "val_loss", "bleu_4", "rouge_l", "cider_d", "exact", "best"):
        assert key in history[0], key
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 3
    with open(os.path.join(trained, "history.csv")) as f:
        assert len(list(csv.DictReader(f))) == 10
    with open(os.path.join(trained, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(trained, "training.json")) as f:
        info = json.load(f)
    best = [row for row in history if row["best"]][-1]
    assert info["best_epoch"] == best["epoch"] and info["best_metric"] == "cider_d"
    assert best["cider_d"] == max(row["cider_d"] for row in history)
    assert info["data"]["train_items"] + info["data"]["val_items"] == 180
    # the saved model: tokenizer with a pad token, special tokens in config and generation_config
    from transformers import AutoTokenizer, GenerationConfig, VisionEncoderDecoderConfig

    cfg = VisionEncoderDecoderConfig.from_pretrained(trained)
    gen = GenerationConfig.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    assert cfg.decoder_start_token_id == gen.decoder_start_token_id == tok.eos_token_id
    assert cfg.pad_token_id == gen.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert os.path.isfile(os.path.join(trained, "preprocessor_config.json"))
    assert os.path.isfile(os.path.join(trained, "checkpoint-last", "training_state.pt"))


@pytest.mark.parametrize("n", [1, 2])
def test_unfreeze_last_trains_exactly_the_top_blocks(tmp_path, n):
    from batchcap.train.base import count_parameters
    from batchcap.train.images import ImageTrainOptions, freeze_for_finetuning, load_captioner_for_training
    from tests.tiny_models import make_tiny_captioner

    model, _, _ = load_captioner_for_training(ImageTrainOptions(model=make_tiny_captioner(tmp_path / "m")))
    trained = freeze_for_finetuning(model, n)
    blocks = model.decoder.transformer.h
    expected = sum(p.numel() for p in blocks[len(blocks) - n:].parameters())
    expected += sum(p.numel() for p in model.decoder.transformer.ln_f.parameters())
    trainable, total = count_parameters(model)
    assert trainable == expected and total == sum(p.numel() for p in model.parameters())
    assert trained[-1] == "decoder.transformer.ln_f" and len(trained) == n + 1
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.decoder.lm_head.parameters())
    assert not any(p.requires_grad for p in model.decoder.transformer.wte.parameters())
    assert not any(p.requires_grad for p in blocks[: len(blocks) - n].parameters())
    assert all(p.requires_grad for p in blocks[len(blocks) - n].crossattention.parameters())
    freeze_for_finetuning(model, 1, train_all=True)
    assert count_parameters(model)[0] == total


class _Payload:
    """Unpickling this creates a directory: what a malicious checkpoint would do with a worse call."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture()
def one_epoch(data, tmp_path) -> tuple[list[str], str, str]:
    """(common args, manifest, OUT_DIR) of a finished 1-epoch run on 27 shapes."""
    manifest = make_shapes(tmp_path / "small", 27, seed=3)
    common = ["--encoder", data["encoder"], "--decoder", data["decoder"], "--lr", "3e-3", "--val-fraction", "0.2",
              "--device", "cpu", "-q", "--unfreeze-last", "2"]
    out = tmp_path / "out"
    code, output = run_cli("train", "images", manifest, "-o", out, "--epochs", "1", *common)
    assert code == 0, output
    return common, manifest, str(out)


def test_resume_continues_from_the_last_epoch(one_epoch, tmp_path):
    common, manifest, out = one_epoch
    once = Path(out)
    # a second run into the same directory must choose: --resume or --overwrite
    code, output = run_cli("train", "images", manifest, "-o", once, "--epochs", "2", *common)
    assert code == 1 and "--resume" in output and "--overwrite" in output
    code, output = run_cli("train", "images", manifest, "-o", once, "--epochs", "2", "--resume", *common)
    assert code == 0, output
    with open(once / "history.json") as f:
        resumed = json.load(f)
    assert [row["epoch"] for row in resumed] == [1, 2]

    # model, optimizer and random state all came back: epoch 2 is the epoch an uninterrupted run trains
    straight = tmp_path / "straight"
    code, output = run_cli("train", "images", manifest, "-o", straight, "--epochs", "2", *common)
    assert code == 0, output
    with open(straight / "history.json") as f:
        uninterrupted = json.load(f)
    for a, b in zip(resumed, uninterrupted):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)

    code, output = run_cli("train", "images", manifest, "-o", once, "--epochs", "1", "--overwrite", *common)
    assert code == 0, output
    with open(once / "history.json") as f:
        assert [row["epoch"] for row in json.load(f)] == [1]


def test_bad_rows_are_reported_and_skipped(data, tmp_path, caplog):
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    make_shapes(directory, 12, seed=4, extra_rows=[
        {"path": "missing.png", "caption": "a red circle"},
        {"path": "corrupt.png", "caption": "a blue square"},
        {"path": "0000.png", "caption": ""},
    ])
    out = tmp_path / "out"
    code, output = run_cli("train", "images", str(directory / "manifest.csv"), "-o", out, "--encoder",
                           data["encoder"], "--decoder", data["decoder"], "--epochs", "1", "--device", "cpu")
    assert code == 0, output
    with open(out / "training.json") as f:
        report = json.load(f)["data"]["train_manifest"]
    assert report["rows"] == 15 and report["kept"] == 12
    assert report["skipped"] == {"fetch_error": 1, "decode_error": 1, "no_reference": 1}
    assert any("missing.png" in e and "not found" in e for e in report["first_errors"])
    assert any("corrupt.png" in e for e in report["first_errors"])


def test_several_references_and_urls_cached(data, tmp_path, http_server):
    """A JSONL manifest of URLs with a list of captions each: one training example per caption; each image
    is downloaded once, then read from the cache (a second run fetches nothing)."""
    rng = random.Random(5)
    rows = []
    for i in range(6):
        colour, shape = list(COLOURS)[i % 3], SHAPES[i % 3]
        path = f"/img/{i}.png"
        buf = tmp_path / f"{i}.png"
        draw(colour, shape, rng).save(buf)
        http_server.add(path, buf.read_bytes(), content_type="image/png")
        rows.append({"url": http_server.url(path), "captions": [f"a {colour} {shape}", f"a {shape}"]})
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    args = ["--encoder", data["encoder"], "--decoder", data["decoder"], "--epochs", "1", "--device", "cpu",
            "--val-fraction", "0.34", "--cache-dir", cache, "-q"]
    code, output = run_cli("train", "images", manifest, "-o", tmp_path / "a", *args)
    assert code == 0, output
    with open(tmp_path / "a" / "training.json") as f:
        report = json.load(f)["data"]
    assert report["train_items"] == 4 and report["val_items"] == 2
    assert report["train_captions"] == 8 and report["val_captions"] == 4
    assert len(os.listdir(cache)) == 6
    assert all(http_server.hits[f"/img/{i}.png"] == 1 for i in range(6))
    code, output = run_cli("train", "images", manifest, "-o", tmp_path / "b", *args)
    assert code == 0, output
    assert all(http_server.hits[f"/img/{i}.png"] == 1 for i in range(6))


def test_usage_errors(data, tmp_path):
    code, output = run_cli("train", "images", data["train"], "-o", tmp_path / "x", "--encoder", data["encoder"])
    assert code == 1 and "--encoder and --decoder go together" in output
    code, output = run_cli("train", "images", tmp_path / "nope.csv", "-o", tmp_path / "y", "--model",
                           data["encoder"])
    assert code == 1 and "input not found" in output
    code, output = run_cli("train", "images", data["train"], "-o", tmp_path / "z", "--model",
                           str(tmp_path / "no-such-model"))
    assert code == 1 and output.count("\n") == 1


def test_the_output_is_never_the_model_it_starts_from(data, trained, tmp_path):
    """``-o run1 --model run1 --overwrite`` (train again on top of last week's model, as the "already holds a
    training run" line suggested) removed the model's files before loading them: the model was lost."""
    import shutil

    run1 = tmp_path / "run1"
    shutil.copytree(trained, run1)
    before = sorted(p.name for p in run1.iterdir())
    for out, model, where in ((run1, run1, "is"), (tmp_path, run1, "holds")):
        code, output = run_cli("train", "images", data["train"], "-o", out, "--model", model, "--overwrite",
                               "--epochs", "1", "--device", TRAIN_DEVICE, "-q")
        assert code == 1 and output.count("\n") == 1, output
        assert f"output {out} {where} the model the run starts from (--model {model})" in output
    assert sorted(p.name for p in run1.iterdir()) == before
    code, output = run_cli("images", data["test"], "-o", tmp_path / "c.parquet", "--model", run1, "-q")
    assert code == 0, output


def test_resume_refuses_a_checkpoint_that_would_run_code(one_epoch, tmp_path):
    import torch

    common, manifest, out = one_epoch
    marker = tmp_path / "payload-ran"
    state = os.path.join(out, "checkpoint-last", "training_state.pt")
    torch.save({"epoch": 1, "optimizer": _Payload(str(marker))}, state)
    code, output = run_cli("train", "images", manifest, "-o", out, "--epochs", "2", "--resume", *common)
    assert not marker.exists()  # never unpickled
    assert code == 1 and output.count("\n") == 1 and "refused" in output and "training_state.pt" in output


def test_resume_after_a_crash_between_the_checkpoint_renames(one_epoch):
    """A kill after checkpoint-last -> checkpoint-last.old and before checkpoint-last.tmp -> checkpoint-last:
    --resume finds the checkpoint in .old and continues after epoch 1."""
    common, manifest, out = one_epoch
    final = os.path.join(out, "checkpoint-last")
    os.replace(final, final + ".old")
    os.makedirs(final + ".tmp")  # the half-written new one
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    history[0]["train_loss"] = 123.0  # kept as it is only by a run that resumes after epoch 1
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history, f)
    code, output = run_cli("train", "images", manifest, "-o", out, "--epochs", "2", "--resume", *common)
    assert code == 0, output
    with open(os.path.join(out, "history.json")) as f:
        resumed = json.load(f)
    assert [row["epoch"] for row in resumed] == [1, 2] and resumed[0]["train_loss"] == 123.0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-last")) == ["checkpoint-last"]


def test_a_checkpoint_of_another_kind_is_refused_not_replaced_by_a_random_pair(data, tiny_whisper, tmp_path):
    """From a GIT, BLIP (or Whisper) checkpoint, VisionEncoderDecoderModel.from_pretrained built a random
    ViT-base + BERT-base from default configs; the run trained that and said "model: out"."""
    code, output = run_cli("train", "images", data["train"], "-o", tmp_path / "out", "--model", tiny_whisper,
                           "--epochs", "1", "--device", TRAIN_DEVICE, "-q")
    assert code == 1 and output.strip().splitlines() == [
        f"Error: {tiny_whisper} is a whisper checkpoint: train images fine-tunes VisionEncoderDecoder models "
        "(a vision encoder + a text decoder, such as ViT + GPT-2); it cannot train this one"], output
    assert not (tmp_path / "out" / "model.safetensors").exists()
