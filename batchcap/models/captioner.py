"""Image captioning through transformers: one batched ``generate`` per batch of images.

Works with VisionEncoderDecoder checkpoints (ViT + GPT-2, e.g. ``nlpconnect/vit-gpt2-image-captioning``),
BLIP and GIT. In transformers v5 they all load through ``AutoModelForImageTextToText``
(``AutoModelForVision2Seq`` is gone). A VisionEncoderDecoder directory has no processor class:
``AutoProcessor`` returns just its tokenizer, so the image processor and the tokenizer are loaded apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..items import FatalError
from .attention import beam_cache_class, repeated_cross_cache, use_step_attention
from .blocked import block_output_embeddings
from .common import (
    cache_kwarg,
    check_model_kind,
    hub_guard,
    inference_context,
    load_error_message,
    load_for_autocast,
    load_image_processor,
    load_pretrained,
    padding_warnings_off,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

VED = "vision-encoder-decoder"


def _first(*values: Any) -> Any:
    """The first value that is not None (token ids may be 0)."""
    return next((v for v in values if v is not None), None)


class CaptionFeatures:
    """An image-to-text model's preprocessing (resize, normalize) without its weights: what decode
    threads and Ray CPU tasks need."""

    def __init__(self, model: str):
        with hub_guard(model):  # no hub: fail at once, or load from the cache without its retries
            check_model_kind(model, whisper=False)
            try:
                self.image_processor = load_image_processor(model)
            except Exception as exc:
                raise FatalError(load_error_message(model, exc)) from exc

    def prepare(self, image: Image.Image) -> Any:
        """Resize and normalize one image: a float32 CPU tensor [C, H, W] for :meth:`Captioner.caption_prepared`."""
        return pixel_values(self.image_processor, [image])[0]


def pixel_values(processor: Any, images: Sequence[Image.Image]) -> Any:
    """``processor``'s float32 tensor [N, C, H, W] of ``images``, thin pictures cut first (within_centre_crop)."""
    return processor(images=[within_centre_crop(processor, im) for im in images], return_tensors="pt")["pixel_values"]


def _field(size: Any, name: str) -> Any:
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def within_centre_crop(processor: Any, image: Image.Image) -> Image.Image:
    """``image`` with its long side cut (centred) to twice its short side, for processors that scale the
    short side to a size and then keep a centred crop no larger (CLIP's, which GIT uses): they scaled a
    1 x 5,000 picture to 224 x 1,120,000 pixels (2.9 GB) before cropping 224 x 224 of it. The crop keeps the
    same pixels; other processors (a fixed size, as ViT's) get the image unchanged."""
    shortest = _field(getattr(processor, "size", None), "shortest_edge")
    crop = getattr(processor, "crop_size", None)
    if not shortest or not getattr(processor, "do_center_crop", False) or crop is None:
        return image
    if max(_field(crop, "height") or 0, _field(crop, "width") or 0) > shortest:
        return image
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= 2 * short:
        return image
    keep = 2 * short
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


class Captioner:
    """Caption PIL images with a Hugging Face image-to-text model (hub id or local directory)."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 32,
                 num_beams: int = 1, prompt: str | None = None, min_new_tokens: int | None = None,
                 attn_implementation: str | None = "sdpa", share_cross_attention: bool = True):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        self.name = model
        # what the captions depend on, by ImageOptions' names (the API checks a call's options against them)
        self.settings: dict[str, Any] = {"device": device, "dtype": dtype, "max_new_tokens": max_new_tokens,
                                         "num_beams": num_beams, "prompt": prompt, "min_new_tokens": min_new_tokens}
        self.device = resolve_device(device)
        # weights dtype, and bf16 autocast on CPUs with native bf16 (as for Whisper)
        self.dtype, self.autocast = resolve_precision(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.num_beams = num_beams
        self.share_cross_attention = share_cross_attention  # beam search: one cross-attention K/V per image
        self.prompt = prompt.strip() if prompt and prompt.strip() else None
        self._torch = torch
        # the model's kind checked and its image processor loaded once, as the decode threads' features do
        self.image_processor = CaptionFeatures(model).image_processor
        with hub_guard(model):  # no hub: fail at once, or load from the cache without its retries
            try:
                config = AutoConfig.from_pretrained(model)
                self.tokenizer = AutoTokenizer.from_pretrained(model)
            except Exception as exc:
                raise FatalError(load_error_message(model, exc)) from exc
        # under autocast, the matmuls' weights in bf16 once: identical captions, ~12 % more images/s at beam 4
        # than casting them in every generate call (README, captioning)
        self.model = load_for_autocast(
            lambda: load_pretrained(AutoModelForImageTextToText, model, self.dtype, attn_implementation,
                                    config=config).to(self.device).eval(), self.autocast)
        use_step_attention(self.model, self.device)
        block_output_embeddings(self.model, self.device)  # float32 on x86: the vocabulary in blocks (blocked.py)
        self.model_type = config.model_type
        self._fix_special_tokens()
        self._prompt_ids = self._encode_prompt() if self.prompt else None
        attention = getattr(self.model.config, "_attn_implementation", "?")
        precision = str(self.dtype).removeprefix("torch.") + (" + bf16 autocast" if self.autocast else "")
        log.info("captioner %s (%s) on %s, %s, attention %s", model, self.model_type, self.device, precision,
                 attention)

    @classmethod
    def from_model(cls, model: Any, image_processor: Any, tokenizer: Any, *, device: Any, dtype: Any = None,
                   autocast: Any = None, max_new_tokens: int = 32, num_beams: int = 1,
                   name: str = "in-memory model") -> Captioner:
        """Wrap a model already in memory (fine-tuning's validation captions) so that it captions exactly as a
        loaded one does. Nothing is loaded or moved, the attention implementation is left as it is, and the
        caller switches the model to eval mode; ``model.generation_config`` gets the fixes of a loaded model."""
        import torch

        self = cls.__new__(cls)
        self.name = name
        self.device = device
        self.dtype, self.autocast = dtype or torch.float32, autocast
        self.max_new_tokens, self.min_new_tokens, self.num_beams = max_new_tokens, None, num_beams
        self.share_cross_attention = True
        self.prompt = None
        self._torch = torch
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.model_type = model.config.model_type
        self._fix_special_tokens()
        self._prompt_ids = None
        return self

    def _fix_special_tokens(self) -> None:
        """GPT-2 has no pad token: use eos; make sure an encoder-decoder knows how to start.

        Set on ``generation_config`` only: v5 ``generate`` refuses generation fields set on ``model.config``.
        """
        gen, cfg, tok = self.model.generation_config, self.model.config, self.tokenizer
        text_cfg = cfg.get_text_config(decoder=True)
        eos = _first(gen.eos_token_id, getattr(cfg, "eos_token_id", None),
                     getattr(text_cfg, "eos_token_id", None), tok.eos_token_id)
        eos_one = eos[0] if isinstance(eos, list) and eos else eos
        gen.eos_token_id = eos
        gen.pad_token_id = _first(gen.pad_token_id, getattr(cfg, "pad_token_id", None), tok.pad_token_id,
                                  eos_one)
        if self.model_type == VED:
            gen.decoder_start_token_id = _first(
                gen.decoder_start_token_id, getattr(cfg, "decoder_start_token_id", None),
                getattr(text_cfg, "bos_token_id", None), tok.bos_token_id, eos_one)
            if gen.decoder_start_token_id is None:
                raise FatalError(f"model {self.name} has no decoder_start_token_id, bos or eos token: "
                                 "cannot caption")
        # Our max_new_tokens / num_beams / greedy replace the checkpoint's length and sampling defaults
        # (otherwise generate warns that max_length and max_new_tokens are both set, or about temperature).
        gen.max_length = None
        gen.min_length = None
        gen.do_sample = False
        gen.temperature = gen.top_p = gen.top_k = None

    def _encode_prompt(self) -> list[int]:
        tok = self.tokenizer
        if self.model_type == VED:  # the prompt continues the decoder start token
            start = self.model.generation_config.decoder_start_token_id
            return [start, *tok(self.prompt, add_special_tokens=False).input_ids]
        if self.model_type == "git":  # GIT: [CLS] + prompt, without the trailing [SEP] that would end it
            return [tok.cls_token_id, *tok(self.prompt, add_special_tokens=False).input_ids]
        return list(tok(self.prompt).input_ids)  # BLIP drops the trailing [SEP] itself

    # --- worker threads ---------------------------------------------------------------------
    def prepare(self, image: Image.Image) -> Any:
        """Resize and normalize one image: a float32 CPU tensor [C, H, W] for :meth:`caption_prepared`."""
        return pixel_values(self.image_processor, [image])[0]

    # --- main thread ------------------------------------------------------------------------
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, from one batched ``generate`` call."""
        if not images:
            return []
        return self._generate(pixel_values(self.image_processor, images))

    def caption_prepared(self, prepared: list[Any]) -> list[str]:
        """Like :meth:`caption`, for tensors from :meth:`prepare` (all of the same shape)."""
        if not prepared:
            return []
        return self._generate(self._torch.stack(prepared))

    def _generate(self, pixel_values: Any) -> list[str]:
        torch = self._torch
        n = pixel_values.shape[0]
        inputs: dict[str, Any] = {"pixel_values": pixel_values.to(self.device, self.dtype)}
        prompt_ids = self._prompt_ids
        if prompt_ids is None and self.model_type == VED:  # explicit, to pass its mask (GPT-2 warns without)
            prompt_ids = [self.model.generation_config.decoder_start_token_id]
        if prompt_ids is not None:
            ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=self.device)
            prefix = "decoder_" if self.model_type == VED else ""
            inputs[f"{prefix}input_ids"] = ids
            inputs[f"{prefix}attention_mask"] = torch.ones_like(ids)
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                  "do_sample": False}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        with torch.inference_mode(), self._inference(), padding_warnings_off():  # nothing here is padded
            if self.num_beams > 1 and self.model_type == VED and self.share_cross_attention:
                inputs = self._beam_inputs(inputs)
            out = self.model.generate(**inputs, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [self._strip_prompt(" ".join(t.split())) for t in texts]

    def _beam_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Encoder outputs and a cache whose cross-attention keys/values are computed once per image.

        Beam search in transformers expands the encoder's states to batch x beams before decoding, so
        the decoder projects the same image's states into cross-attention keys and values once per
        beam, and then ``index_select``s all of them after every step to follow the beams. Both are
        wasted: every beam of an image has the same ones. Here the image's keys/values come from one
        decoder step over the unexpanded batch, are repeated for the beams, and the cache reorders
        only its self-attention part (beams never leave their image). Outputs are unchanged."""
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import BaseModelOutput

        encoder_states = self.model.encoder(pixel_values=inputs.pop("pixel_values")).last_hidden_state
        start = inputs["decoder_input_ids"][:, :1]
        beam_cache = beam_cache_class()
        first = beam_cache(DynamicCache(), DynamicCache())
        self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states), decoder_input_ids=start,
                   use_cache=True, **{cache_kwarg(self.model): first})
        # copied per beam: reading one copy per image (shared=True, as the guard's samples do) was slower here,
        # 16 images' groups per step against 197 positions each (2.73-2.82 vs 2.97-3.30 images/s, beam 4)
        cross = repeated_cross_cache(first.cross_attention_cache, self.num_beams, shared=False)
        inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_states)
        inputs[cache_kwarg(self.model)] = beam_cache(DynamicCache(), cross)
        return inputs

    def _inference(self) -> Any:
        return inference_context(self.device, self.autocast)

    def _strip_prompt(self, text: str) -> str:
        """Drop the prompt if the model echoes it (BLIP, GIT and VED outputs start with their inputs)."""
        if not self.prompt:
            return text
        decoded = self.tokenizer.decode(self._prompt_ids or [], skip_special_tokens=True)
        echoes = {" ".join(self.prompt.split()).lower(), " ".join(decoded.split()).lower()}
        for echo in sorted(echoes, key=len, reverse=True):
            if echo and text.lower().startswith(echo):
                return text[len(echo):].strip()
        return text
