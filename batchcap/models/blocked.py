"""The vocabulary projection on an x86 CPU in float32, computed 512 vocabulary rows at a time.

A decoding step projects a few hidden states onto ~50,000 tokens: ``[rows, d] x [d, 50k]``. On the
2-core AMD EPYC Zen 3 VM (AVX2) PyTorch's float32 matmul ran that shape at 18-35 GFLOP/s, against ~100
for the encoder's square ones; the same product written block by block into one output (each block a
``[d, 512]`` slice of the weights, ``torch.mm(..., out=...)``) took half the time or less from 2 rows on
(GPT-2's 50,257 x 768 at 60 rows: 137 -> 73 ms; Whisper-tiny's 51,864 x 384 at 16 rows: 38 -> 25 ms) and
gave bit-identical logits: every logit is the same dot product over the same ``d`` values. At one row
(a matrix-vector product) the plain call is faster (16 -> 19 ms), so one row keeps it.

Used for the captioner's output embedding (every GPT-2 decoding step, greedy and beam search): in one
process on 15 photos (random ViT-base + GPT-2, 16 tokens, batch 16, alternating, 4 passes each) greedy
took 10.8-12.3 s against 11.7-13.0 s, beam 4 17.4-19.0 s against 18.2-19.4 s, with identical captions;
profiled at beam 4, the projection's time fell from 2.1 s to 1.2 s. Not used for Whisper: there greedy
steps on such a CPU use the int8 shortlist (shortlist.py), and whole runs with ``--dtype float32`` or the
default were no faster with it (140 English clips, 2 passes each). Only in inference (no autograd),
float32 weights and inputs, no autocast, and only on x86 (measured there). ``BATCHCAP_BLOCKED_VOCAB=0``
turns it off.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

log = logging.getLogger(__name__)

BLOCK = 512  # vocabulary rows per block: 256-1024 were within a few ms of each other, 512 best at 16-64 rows
MIN_ROWS = 2  # one row is a matrix-vector product, faster in one call
ATTR = "_batchcap_blocked"  # marks the forward this module installs


def blocked_linear(x: Any, weight: Any, bias: Any = None, block: int = BLOCK) -> Any:
    """``F.linear(x, weight, bias)`` computed ``block`` output features at a time (no autograd)."""
    import torch

    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty((rows.shape[0], weight.shape[0]))
    for start in range(0, weight.shape[0], block):
        part = out[:, start:start + block]
        w = weight[start:start + block].t()
        if bias is None:
            torch.mm(rows, w, out=part)
        else:
            torch.addmm(bias[start:start + block], rows, w, out=part)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _applies(x: Any, weight: Any) -> bool:
    import torch

    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not _cpu_autocast(torch) and x.numel() >= MIN_ROWS * x.shape[-1])


def _cpu_autocast(torch: Any) -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch before 2.4
        return torch.is_autocast_cpu_enabled()


def block_output_embeddings(model: Any, device: Any) -> bool:
    """Make ``model``'s output embedding (an ``nn.Linear``) compute in blocks where that applies (see the
    module's docstring); the module keeps its weights (tied ones stay tied) and its plain path for every
    other call. Returns whether it was set up."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (os.environ.get("BATCHCAP_BLOCKED_VOCAB", "1") == "0" or device.type != "cpu"
            or platform.machine().lower() not in ("x86_64", "amd64") or type(head) is not torch.nn.Linear):
        return False
    if getattr(vars(head).get("forward"), ATTR, False):  # set up already
        return True
    plain = head.forward

    def forward(x: Any) -> Any:
        if _applies(x, head.weight):
            return blocked_linear(x, head.weight, head.bias)
        return plain(x)
    setattr(forward, ATTR, True)
    head.forward = forward
    log.debug("output embedding %s computed in blocks of %d on this CPU", tuple(head.weight.shape), BLOCK)
    return True
