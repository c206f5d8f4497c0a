"""The vocabulary projection in blocks on an x86 CPU in float32 (models/blocked.py)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from PIL import Image

from batchcap.models import blocked
from batchcap.models.captioner import Captioner

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("rows", [1, 2, 7, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_give_the_same_logits(rows, bias):
    torch.manual_seed(rows)
    proj = torch.nn.Linear(48, 1300, bias=bias)  # 1300: the last block is a partial one
    x = torch.randn(rows, 3, 48)
    with torch.no_grad():
        got = blocked.blocked_linear(x, proj.weight, proj.bias, block=512)
        assert got.shape == (rows, 3, 1300)
        assert torch.allclose(got, proj(x), atol=1e-5, rtol=1e-5)  # the same dot products, in blocks


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    inner = blocked.blocked_linear

    def counted(x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return inner(x, *args, **kwargs)
    monkeypatch.setattr(blocked, "blocked_linear", counted)
    return calls


@pytest.mark.skipif(not X86, reason="set up on x86 CPUs only (measured there)")
def test_captions_project_in_blocks_with_the_same_captions(tiny_captioner, monkeypatch):
    calls = _counting(monkeypatch)
    captioner = Captioner(tiny_captioner, device="cpu", dtype="float32", num_beams=2, max_new_tokens=6)
    head = captioner.model.get_output_embeddings()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    got = captioner.caption(images)
    assert calls and min(calls) >= blocked.MIN_ROWS  # every decoding step of 3 images x 2 beams, in blocks
    del head.forward  # the plain projection
    calls.clear()
    assert captioner.caption(images) == got and not calls
    with torch.no_grad():  # one row, with autograd, or another dtype: the plain call
        blocked.block_output_embeddings(captioner.model, captioner.device)
        head(torch.randn(1, head.in_features))
        head.to(torch.float64)(torch.randn(4, head.in_features, dtype=torch.float64))
        head.to(torch.float32)(torch.randn(4, head.in_features))
    assert calls == [4]
    head(torch.randn(4, head.in_features))  # autograd on
    assert calls == [4]


def test_off_where_it_does_not_apply(tiny_captioner, monkeypatch):
    monkeypatch.setenv("BATCHCAP_BLOCKED_VOCAB", "0")
    captioner = Captioner(tiny_captioner, device="cpu", dtype="float32")
    assert not getattr(captioner.model.get_output_embeddings().forward, blocked.ATTR, False)
