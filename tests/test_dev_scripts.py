"""Dev tools a GPU session depends on: the bundle that carries a model to the offline GPU machine."""

from __future__ import annotations

import importlib.util
import os

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bundle_module():
    spec = importlib.util.spec_from_file_location("gpu_bundle", os.path.join(ROOT, "scripts", "gpu_bundle.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_packed_model_split_into_parts_comes_back_loadable(tiny_whisper, tmp_path):
    bundle = _bundle_module()
    packed = tmp_path / "bundle"
    bundle.pack_model(tiny_whisper, str(packed / "model"))
    parts = bundle.split_bundle(str(packed), str(tmp_path / "parts"), max_mb=0.05)
    assert len(parts) > 2  # the weights are cut across calls
    bundle.gather_bundle(parts, str(tmp_path / "gathered"))
    bundle.unpack_model(str(tmp_path / "gathered" / "model"), str(tmp_path / "model"))

    original = load_file(os.path.join(tiny_whisper, "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(rebuilt) == set(original)
    for name, tensor in original.items():  # rounded to bf16 for the trip, nothing else
        assert torch.equal(rebuilt[name], tensor.to(torch.bfloat16)), name

    from batchcap.asr import AudioOptions, load_transcriber

    transcriber = load_transcriber(AudioOptions(model=str(tmp_path / "model"), device="cpu"))
    assert transcriber.model.config.d_model > 0
