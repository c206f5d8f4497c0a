"""The vocabulary projection of a decoding step on an x86 CPU in float32: int8 for the whole
vocabulary, float32 for the tokens that can be chosen.

Each decoding step projects every row's decoder state onto the vocabulary (51,865 x 384 float32
weights for whisper-tiny, 80 MB read per step). On a CPU without fast bfloat16 (AVX2 only) PyTorch's
float32 matmul took 12-28 ms per step for 1-16 rows there, more than the rest of the decoder step.
fbgemm's int8 matmul over the same weights takes 1.2-3.6 ms, but int8 logits are off by ~0.1 on
average, enough to change a close choice. So the int8 pass only picks each row's candidates: the
decoding rules run on the estimates (``decoding.decode``), and the ``k`` best text tokens and
timestamps they leave (and the estimate's ``k`` best text tokens) get float32 logits, computed from
the model's own weights and written over the estimates; then the rules run again on those. Greedy
choices, timestamp rules and the highest log-probabilities are those of float32; the other tokens
keep their int8 estimates, which only move the softmax's normaliser a little (see the README's
figures for the mean log-probabilities).

Two things keep the estimates close. The decoder's final layer norm scales its output by a learnt
``gamma`` of up to ~17 (whisper-tiny) or ~37 (whisper-base), so the states span a wide range and
int8 activations would be coarse: the normalised states ``(h - beta) / gamma`` are quantized instead,
with ``gamma`` folded into the weights (quantized per vocabulary row) and ``beta`` into a bias. And
activations use 7 bits (``reduce_range``): AVX2's 8-bit multiply-add saturates at int16 otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

log = logging.getLogger(__name__)

CANDIDATES = 16  # per row: this many text tokens and this many timestamps get float32 logits


class ShortlistHead:
    """``head(hidden) -> logits`` in float32, as ``proj(hidden).float()`` would give them for the
    candidates (see the module's docstring). ``split``: where the timestamp tokens begin (the
    vocabulary's size where there are none)."""

    def __init__(self, proj: Any, norm: Any, split: int, k: int = CANDIDATES):
        import torch

        weight = proj.weight.detach()
        gamma, beta = norm.weight.detach().float(), norm.bias.detach().float()
        folded = weight.float() * gamma
        scales = (folded.abs().amax(1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # PyTorch marks its quantized tensors deprecated (2.10+)
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(folded, scales, torch.zeros(len(scales), dtype=torch.long),
                                                   0, torch.qint8)
            bias = weight.float() @ beta
            if proj.bias is not None:
                bias = bias + proj.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(quantized, bias)
        self._gamma, self._beta = gamma, beta
        self._weight, self._bias = weight, proj.bias
        self.split = split
        self.k = k
        self.vocab = weight.shape[0]

    def estimate(self, hidden: Any) -> Any:
        """int8 logits of every token, float32 [rows, vocab]."""
        import torch

        normalised = ((hidden.float() - self._beta) / self._gamma).contiguous()
        return torch.ops.quantized.linear_dynamic(normalised, self._packed, True)

    def refine(self, hidden: Any, scores: Any, ruled: Any) -> Any:
        """``scores`` (the estimate, changed in place) with float32 logits for each row's candidates: the
        ``k`` best text tokens and timestamps of ``ruled`` (the estimate after the decoding rules, which
        rule out the specials, the timestamps that cannot come next, or all text where a time must come)
        and the ``k`` best text tokens of the estimate itself (for where the rules ruled text out only
        because of the estimate's values)."""
        import torch

        split, vocab = self.split, self.vocab
        parts = [ruled[:, :split].topk(min(self.k, split), -1, sorted=False).indices,
                 scores[:, :split].topk(min(self.k, split), -1, sorted=False).indices]
        if split < vocab:
            parts.append(ruled[:, split:].topk(min(self.k, vocab - split), -1, sorted=False).indices + split)
        picked = torch.cat(parts, 1)  # [rows, candidates]; a token picked twice is written twice, the same
        exact = torch.bmm(self._weight[picked], hidden.to(self._weight.dtype)[:, :, None])[:, :, 0]
        if self._bias is not None:
            exact = exact + self._bias[picked]
        return scores.scatter_(1, picked, exact.float())

    def __call__(self, hidden: Any) -> Any:
        """Logits with float32 values for the estimate's best text tokens and timestamps (no rules)."""
        scores = self.estimate(hidden)
        return self.refine(hidden, scores, scores)


def shortlist_head(proj: Any, norm: Any, split: int, device: Any) -> ShortlistHead | None:
    """A :class:`ShortlistHead` where it applies: a CPU, float32 weights, a layer norm with an affine
    part and no zero ``gamma`` before the projection, and PyTorch's x86 int8 kernels (fbgemm). Else None
    (the projection is used as it is). ``BATCHCAP_SHORTLIST=0`` turns it off."""
    import torch

    if os.environ.get("BATCHCAP_SHORTLIST", "1") == "0" or device.type != "cpu":
        return None
    if proj.weight.dtype != torch.float32 or getattr(norm, "weight", None) is None \
            or getattr(norm, "bias", None) is None or bool((norm.weight == 0).any()):
        return None
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):  # ARM's qnnpack: not measured
        return None
    try:
        return ShortlistHead(proj, norm, split)
    except (RuntimeError, AttributeError) as exc:  # a PyTorch built without fbgemm, or without the ops
        log.debug("int8 vocabulary shortlist unavailable (%s): float32 projection", exc)
        return None
