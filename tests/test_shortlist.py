"""The int8 vocabulary shortlist of decoding steps on a CPU in float32 (models/shortlist.py)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from batchcap.models.guard import GuardConfig
from batchcap.models.shortlist import ShortlistHead, shortlist_head
from batchcap.models.whisper import WhisperTranscriber
from tests.conftest import tone

pytestmark = pytest.mark.skipif(torch.backends.quantized.engine not in ("x86", "fbgemm"),
                                reason="the shortlist runs on PyTorch's x86 int8 kernels only")

VOCAB, WIDTH, SPLIT = 3000, 64, 2500


def _layers(seed: int = 0) -> tuple[torch.nn.Linear, torch.nn.LayerNorm, torch.Tensor]:
    """A projection and the layer norm before it, whose gains have a few large outliers as Whisper's
    do (whisper-base: median 8.8, largest 37); and states the layer norm gives."""
    torch.manual_seed(seed)
    proj = torch.nn.Linear(WIDTH, VOCAB, bias=False)
    norm = torch.nn.LayerNorm(WIDTH)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.weight[:4] = 40.0
        norm.bias.normal_(0.0, 1.0)
        hidden = norm(torch.randn(6, WIDTH) * 3)
    return proj, norm, hidden


def test_candidates_get_float32_logits_and_the_others_a_close_estimate():
    proj, norm, hidden = _layers()
    head = ShortlistHead(proj, norm, SPLIT, k=8)
    with torch.no_grad():
        exact = proj(hidden)
        estimate = head.estimate(hidden)
        got = head(hidden)
    for row in range(len(hidden)):
        picked = torch.cat([estimate[row, :SPLIT].topk(8).indices, estimate[row, SPLIT:].topk(8).indices + SPLIT])
        assert torch.allclose(got[row, picked], exact[row, picked], atol=1e-5)
        others = torch.ones(VOCAB, dtype=torch.bool)
        others[picked] = False
        assert torch.equal(got[row, others], estimate[row, others])  # the rest keep the estimate
    # what decoding chooses from: the best token, and the best timestamp where timestamps are forced
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert torch.equal(got[:, SPLIT:].argmax(-1), exact[:, SPLIT:].argmax(-1))
    # quantizing the normalised states (the gains folded into the weights) keeps the estimate close where
    # the gains have outliers: 0.08 on average here, 0.18 when the layer norm's output is quantized as it is
    assert float((estimate - exact).abs().mean()) < 0.12
    assert float((got - exact).abs().max()) < 1.0


def test_candidates_are_what_the_rules_leave():
    """Where the decoding rules rule out the estimate's best tokens (specials, timestamps that cannot come
    next), the best text token and the best timestamp they leave get their float32 logits all the same."""
    proj, norm, hidden = _layers(1)
    head = ShortlistHead(proj, norm, SPLIT, k=8)
    rows = torch.arange(len(hidden))[:, None]
    with torch.no_grad():
        exact = proj(hidden)
        scores = head.estimate(hidden)
        ruled = scores.clone()
        ruled[rows, scores[:, :SPLIT].topk(40).indices] = float("-inf")
        ruled[rows, SPLIT + scores[:, SPLIT:].topk(100).indices] = float("-inf")
        allowed = ~torch.isinf(ruled)
        got = head.refine(hidden, scores, ruled)
    best = exact.masked_fill(~allowed, float("-inf"))
    mine = got.masked_fill(~allowed, float("-inf"))
    for part in (slice(0, SPLIT), slice(SPLIT, VOCAB)):  # text tokens, timestamps
        want = best[:, part].argmax(-1)
        assert torch.equal(mine[:, part].argmax(-1), want)
        assert torch.allclose(mine[:, part].gather(1, want[:, None]), best[:, part].gather(1, want[:, None]), atol=1e-5)


def test_where_the_shortlist_applies():
    proj, norm, _ = _layers()
    cpu = torch.device("cpu")
    assert isinstance(shortlist_head(proj, norm, SPLIT, cpu), ShortlistHead)
    assert shortlist_head(proj.to(torch.bfloat16), norm, SPLIT, cpu) is None  # bf16 weights (autocast CPUs)
    assert shortlist_head(proj, norm, SPLIT, torch.device("cuda")) is None
    with torch.no_grad():
        norm.weight[5] = 0.0  # a zero gain cannot be divided out
    assert shortlist_head(proj, norm, SPLIT, cpu) is None


def test_the_shortlist_transcribes_as_the_float32_projection(tiny_whisper, tmp_path, monkeypatch):
    """The same clips through the transcriber: the shortlist (``--dtype auto`` on a CPU in float32)
    against the plain projection (``BATCHCAP_SHORTLIST=0``): the same greedy tokens and segments,
    log-probabilities close. (The random model's transcripts are all suspect: without the fallback,
    whose samples are drawn from the shortlist's distribution and so differ, each keeps its greedy one.)"""
    clips = []
    for i, seconds in enumerate((0.9, 2.3, 4.1, 7.5)):
        path = tmp_path / f"c{i}.wav"
        sf.write(path, tone(seconds, freq=200 + 130 * i, seed=i), 16000)
        clips.append(path)
    samples = [sf.read(p, dtype="float32")[0] for p in clips]

    def run(**kwargs):
        t = WhisperTranscriber(tiny_whisper, device="cpu", language="en", guard=GuardConfig(fallback=False), **kwargs)
        if t.autocast is not None:
            pytest.skip("this CPU runs bfloat16 autocast: the shortlist is for float32")
        return t, t.transcribe([t.prepare(s) for s in samples])

    fast, got = run()
    assert isinstance(fast._step_head, ShortlistHead)
    monkeypatch.setenv("BATCHCAP_SHORTLIST", "0")
    plain, want = run()
    assert plain._step_head is plain.model.proj_out
    assert [r["text"] for r in got] == [r["text"] for r in want]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [[(s.start, s.end) for s in r["segments"]] for r in got] == [[(s.start, s.end) for s in r["segments"]]
                                                                         for r in want]
    assert any(r["tokens"] for r in want)
    assert np.allclose([r["avg_logprob"] for r in got], [r["avg_logprob"] for r in want], atol=0.05)
    monkeypatch.delenv("BATCHCAP_SHORTLIST")
    explicit, _ = run(dtype="float32")  # asked for plain float32: the float32 projection
    assert explicit._step_head is explicit.model.proj_out
