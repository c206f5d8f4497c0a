"""setup.py promises Python 3.10: no module may use a 3.11-only API (ruff's py310 target does not check)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_requires() -> tuple[int, int]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        match = re.search(r'python_requires\s*=\s*">=\s*(\d+)\.(\d+)"', f.read())
    assert match, "setup.py has no python_requires"
    return int(match.group(1)), int(match.group(2))


def test_code_runs_on_the_oldest_python_setup_py_allows():
    pytest.importorskip("vermin")  # in the dev extra
    major, minor = _python_requires()
    folders = [os.path.join(ROOT, d) for d in ("batchcap", "tests", "scripts")]
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={major}.{minor}-",
               "--violations", "--no-tips", "--eval-annotations", "--no-parse-comments", *folders,
               os.path.join(ROOT, "setup.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_kv_cache_keyword_follows_the_installed_transformers():
    """setup.py allows any transformers 5.x; 5.17 knows only ``past_key_values`` and rejected ``cache``
    (every row a model_error), 5.2x renamed it to ``cache``. Decorated forwards (transformers'
    ``deprecate_kwarg`` wraps them) are read through to the real signature."""
    import functools

    from batchcap.models.common import cache_kwarg

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    def renamed(fn):
        @functools.wraps(fn)
        def wrapper(*args, past_key_values=None, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    class New:
        @renamed
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return cache

    assert cache_kwarg(Old()) == "past_key_values"
    assert cache_kwarg(New()) == "cache"
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(WhisperConfig(vocab_size=64, pad_token_id=0, d_model=16, encoder_layers=1,
                                                          decoder_layers=1, encoder_attention_heads=2,
                                                          decoder_attention_heads=2, encoder_ffn_dim=16,
                                                          decoder_ffn_dim=16, max_source_positions=8,
                                                          max_target_positions=8))
    import inspect

    for module in (model, model.get_decoder()):
        assert cache_kwarg(module) in inspect.signature(type(module).forward).parameters


def test_model_calls_on_cuda_keep_attention_off_cudnn(monkeypatch):
    """cuDNN's fused attention builds a kernel graph per shape: on an H200 the first pass over 250 clips took
    10.4 s against 1.7 s warm. Model calls on CUDA run with flash / memory-efficient attention instead (the
    backend flags are process state, so this runs without a GPU); CPU calls and the opt-out leave them."""
    import torch

    from batchcap.models.common import inference_context

    before = torch.backends.cuda.cudnn_sdp_enabled()
    assert before  # torch's default
    with inference_context(torch.device("cuda"), None):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with inference_context(torch.device("cpu"), torch.bfloat16):
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.is_autocast_enabled("cpu")
    monkeypatch.setenv("BATCHCAP_CUDNN_ATTENTION", "1")
    with inference_context(torch.device("cuda"), None):
        assert torch.backends.cuda.cudnn_sdp_enabled()
