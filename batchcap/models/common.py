"""What every model loader shares: device and dtype choice, and one-line load errors."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..items import FatalError

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def cache_kwarg(module: Any) -> str:
    """The keyword under which ``module.forward`` (and so ``generate``) takes a KV cache in the installed
    transformers: ``cache`` since it was renamed (5.2x; the old name is deprecated until 5.40), else
    ``past_key_values``. setup.py allows any 5.x, and a name the model does not know is a ValueError."""
    return _cache_kwarg(type(module))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def load_image_processor(source: str) -> Any:
    """``AutoImageProcessor.from_pretrained(source)``. Where that asks for torchvision (transformers 5.17
    does, even for processors with a PIL backend), the config's own class is loaded instead: it falls back
    to PIL by itself."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        from transformers.image_processing_base import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(source)
        cls = getattr(transformers, str(config.get("image_processor_type") or ""), None)
        if cls is None:
            raise
        return cls.from_pretrained(source)


def resolve_device(spec: str = "auto") -> Any:
    """``auto`` -> cuda if available, else mps, else cpu; ``cuda:N``, ``cpu``, ``mps`` as given."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise FatalError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FatalError(f"device {spec} asked for, but CUDA is not available here (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FatalError(f"device {spec} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FatalError("device mps asked for, but MPS is not available here (try --device cpu)")
    return device


def resolve_dtype(spec: str, device: Any) -> Any:
    """``auto`` -> float16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise FatalError(f"unknown dtype {spec!r} (use auto, float32, float16 or bfloat16)")
    return getattr(torch, _DTYPES[spec])


HUB_PROBE_TIMEOUT = 3.0  # seconds: one HEAD request to the hub before a model load from a hub id
_probe_lock = threading.Lock()
_probed: dict[str, bool] = {}  # endpoint -> reachable, once per process


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_hub_id(model: str) -> bool:
    return not (os.path.isdir(model) or model.startswith((".", "/", "~")) or model.count("/") > 1)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face hub answers at all (any HTTP status counts), probed once per process.

    Without it, huggingface_hub retries each file of a missing model 5 times with backoff (about 23 s
    a file, ~50 s for a model, longer where packets are dropped) before the load fails.
    """
    from huggingface_hub import constants, get_session

    endpoint = constants.ENDPOINT
    with _probe_lock:
        if endpoint not in _probed:
            try:
                get_session().head(endpoint, timeout=timeout)
                _probed[endpoint] = True
            except Exception as exc:  # DNS failure, refused, timed out, proxy error: all mean "not from here"
                log.debug("Hugging Face hub %s unreachable: %s: %s", endpoint, type(exc).__name__, exc)
                _probed[endpoint] = False
        return _probed[endpoint]


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # an id the hub would not take (HFValidationError) is not cached either
        return False


@contextmanager
def hub_guard(*models: str) -> Iterator[None]:
    """Around a model load: when a hub id is to be loaded and the hub cannot be reached, fail at once
    with one line if the model is not cached, else load it from the cache without asking the hub
    (offline mode for the duration of the load only). Local directories and HF_HUB_OFFLINE runs pass."""
    hub_ids = [m for m in models if m and _is_hub_id(m)]
    if not hub_ids or _hub_offline() or hub_reachable():
        yield
        return
    from huggingface_hub import constants

    for model in hub_ids:
        if not _in_hub_cache(model):
            raise FatalError(f"cannot load model {model!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot "
                             f"be reached from here and the model is not in the local cache ({_hf_home()}). "
                             "Download it where there is network (huggingface-cli download), or pass --model "
                             "/path/to/a/local/model/dir")
    log.info("the Hugging Face hub (%s) cannot be reached: loading %s from the local cache", constants.ENDPOINT,
             ", ".join(hub_ids))
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hf_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def load_error_message(model: str, exc: BaseException) -> str:
    """One actionable line for a model that would not load."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if os.path.isdir(model):
        return f"cannot load model from {model}: {type(exc).__name__}: {first_line}"
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not os.path.exists(model):
        return f"model directory not found: {model} (pass --model a local model directory or a hub id)"
    home = _hf_home()
    return (f"cannot load model {model!r}: it is not in the local cache ({home}) and the Hugging Face hub could "
            f"not be reached or does not have it ({type(exc).__name__}). Download it where there is network "
            "(huggingface-cli download), or pass --model /path/to/a/local/model/dir")


def config_model_type(model: str) -> str:
    """The ``model_type`` of ``model``'s config; "" when there is no config to read (the load says why)."""
    from transformers import AutoConfig

    try:
        return str(getattr(AutoConfig.from_pretrained(model), "model_type", "") or "")
    except Exception:  # noqa: BLE001 - no config (or no hub)
        return ""


def check_model_kind(model: str, whisper: bool) -> None:
    """A one-line FatalError when ``model``'s config names the other kind of model: a Whisper checkpoint
    given to ``batchcap images`` or an image-to-text one to ``batchcap audio`` (transformers' own errors
    there were an AttributeError about dicts or a list of 250 model types). Anything the config cannot
    tell is left to the load itself."""
    kind = config_model_type(model)
    if whisper and kind and kind != "whisper":
        raise FatalError(f"{model} is a {kind} checkpoint, not Whisper: batchcap audio needs a Whisper model "
                         "(image-to-text models caption with batchcap images)")
    if not whisper and kind == "whisper":
        raise FatalError(f"{model} is a Whisper checkpoint: transcribe with batchcap audio; batchcap images "
                         "needs an image-to-text model")


_LOADS = threading.RLock()


def load_pretrained(model_class: Any, model: str, dtype: Any, attn_implementation: str | None = "sdpa",
                    **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` with ``attn_implementation`` where the model has it (else the
    default attention), and one actionable line (FatalError) when the checkpoint will not load."""
    kwargs["dtype"] = dtype
    announce_load(model)
    # one load at a time in a process: two threads' from_pretrained at once (two transcribe() calls of a
    # service) failed with "Cannot copy out of meta tensor" (transformers#41782)
    with _LOADS, hub_guard(model):  # no hub: fail at once, or load from the cache without its retries
        try:
            if attn_implementation:
                try:
                    return model_class.from_pretrained(model, attn_implementation=attn_implementation, **kwargs)
                except (ValueError, ImportError) as exc:  # an attention implementation this model or build lacks
                    log.debug("loading %s with %s attention failed (%s); using the default", model,
                              attn_implementation, exc)
            return model_class.from_pretrained(model, **kwargs)
        except FatalError:
            raise
        except Exception as exc:
            raise FatalError(load_error_message(model, exc)) from exc


def inference_context(device: Any, autocast: Any) -> contextlib.ExitStack:
    """What every model call runs under: ``torch.autocast`` to ``autocast`` on ``device`` (none when it is
    None) and, on CUDA, scaled-dot-product attention without its cuDNN backend.

    PyTorch 2.11 picks cuDNN's fused attention on Hopper GPUs, and cuDNN builds a kernel graph for every new
    shape. Decoding makes a new shape at every step (the keys grow by one) and the live window at every
    batch, so on an H200 the first pass over 250 clips took 8.6-10.4 s against 1.5 s once warm (3.8 s
    without cuDNN). Flash and memory-efficient attention need no per-shape build.
    ``BATCHCAP_CUDNN_ATTENTION=1`` keeps cuDNN."""
    import torch

    stack = contextlib.ExitStack()
    if autocast is not None:
        stack.enter_context(torch.autocast(device.type, dtype=autocast))
    if device.type == "cuda" and os.environ.get("BATCHCAP_CUDNN_ATTENTION") != "1":
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3 has no cuDNN attention either
            return stack
        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                         SDPBackend.MATH]))
    return stack


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(spec: str, device: Any) -> tuple[Any, Any]:
    """(dtype of the weights, dtype to autocast to or None) for a ``--dtype`` choice.

    ``auto``: float16 weights on CUDA; on a CPU with native bfloat16, float32 weights with
    bfloat16 autocast (matmuls in bf16, norms and softmax in fp32); float32 elsewhere.
    ``bfloat16`` on a CPU also means autocast; ``float32`` is plain fp32 everywhere.
    """
    import torch

    spec = (spec or "auto").lower()
    if device.type == "cpu" and (spec in ("bfloat16", "bf16") or (spec == "auto" and cpu_has_fast_bf16())):
        return torch.float32, torch.bfloat16
    return resolve_dtype(spec, device), None


def cast_matmul_weights(model: Any, dtype: Any) -> int:
    """Store the weights of ``model``'s linear and convolution layers in ``dtype``, for a model run
    under ``torch.autocast`` to that dtype; returns the number of parameters cast.

    Autocast rounds float32 weights to its dtype on every use; inside one autocast region it caches
    those copies, so a float32 model in bfloat16 autocast holds its weights twice (the float32 ones,
    memory-mapped from the checkpoint, plus the cached bfloat16 copies) and casts them again for each
    batch. Casting once gives the matmuls the same operands (the same rounding) in half the memory.
    Norms and embeddings stay float32, as autocast leaves them; an output projection that shares the
    token embedding's weight gets its own cast copy, so the embedding lookup is unchanged.
    Parameters stop requiring gradients: inference only.
    """
    import torch

    kinds: tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    try:  # GPT-2's linear layers (an addmm over a [in, out] weight)
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - a transformers without it
        pass
    cast: dict[int, Any] = {}  # by the id of the old parameter: layers that shared a weight still share it
    count = 0
    for module in model.modules():
        if not isinstance(module, kinds):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in cast:
                cast[id(param)] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
                count += param.numel()
            setattr(module, name, cast[id(param)])
    for param in model.parameters():
        param.requires_grad_(False)
    return count


def load_for_autocast(load: Callable[[], Any], autocast: Any, cap_kernels: bool = False) -> Any:
    """``load()`` (a model on its device, in eval mode), then, for a model run under ``torch.autocast``:
    its matmul weights cast once (:func:`cast_matmul_weights`) and the float32 checkpoint pages the casts
    read released (``memory.py``; files mapped before are left alone); with ``cap_kernels``, oneDNN's
    kernel cache capped (Whisper's live windows come in many lengths: ``limit_onednn_cache``)."""
    from ..memory import limit_onednn_cache, mapped_checkpoint_ranges, release_checkpoint_pages

    mapped_before = {path for _, _, path in mapped_checkpoint_ranges()} if autocast is not None else set()
    model = load()
    if autocast is not None:
        cast_matmul_weights(model, autocast)
        if cap_kernels:
            limit_onednn_cache()
        release_checkpoint_pages(keep=mapped_before)
    return model


def announce_load(model: str) -> None:
    """Say where a model comes from before a possibly slow hub download or retry loop."""
    if os.path.isdir(model):
        log.info("loading model from %s", model)
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        log.info("loading model %s from the Hugging Face cache (offline mode)", model)
    else:
        log.info("loading model %s from the Hugging Face hub or its cache (HF_HOME)", model)


# transformers' padding warnings, false alarms for batchcap's generate calls: every row of a call has
# the same prompt (nothing is padded); they fire because these vocabularies' pad token is their
# end (or start) token
_FALSE_ALARMS = ("The attention mask is not set", "We strongly recommend passing in an `attention_mask`")
_WARNING_LOGGERS = ("transformers.generation.utils", "transformers.modeling_utils")


class _DropFalseAlarms(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_FALSE_ALARMS)


@contextmanager
def padding_warnings_off() -> Iterator[None]:
    """Within: transformers' "attention mask" padding warnings are dropped (only those, only on its
    generation and modeling loggers): library users of batchcap saw them once per process."""
    drop = _DropFalseAlarms()
    loggers = [logging.getLogger(name) for name in _WARNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
