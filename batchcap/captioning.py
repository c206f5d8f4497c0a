"""``batchcap images``: images -> captions, scored against reference captions when there are any."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .images import DEFAULT_MAX_PIXELS, decode_image
from .inputs import image_spec
from .items import OK, Item, ItemError
from .job import Job, JobOptions, adopt_loaded, call_options, run_pipeline
from .metrics import caption_metrics
from .predictions import Caption
from .runner import RunResult
from .stages import ModelFreePreprocessor

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("id", "source", "caption", "status", "error", "http_status", "width", "height", "model",
                 "references", "bleu_4", "rouge_l", "cider_d")
ROW_METRICS = ("bleu_4", "rouge_l", "cider_d")
DEFAULT_IMAGE_MODEL = "nlpconnect/vit-gpt2-image-captioning"


@dataclass
class ImageOptions(JobOptions):
    model: str = DEFAULT_IMAGE_MODEL
    max_new_tokens: int = 32
    min_new_tokens: int | None = None
    prompt: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 16

    limit_numbers: ClassVar[tuple[str, ...]] = (*JobOptions.limit_numbers, "max_new_tokens", "max_pixels")


@dataclass
class LoadedImage:
    pixels: Any  # preprocessed tensor [C, H, W]
    width: int
    height: int


class ImagePreprocessor(ModelFreePreprocessor):
    """Decode, check and preprocess one image: the model's image processor only, no weights."""

    options: ImageOptions

    def load_features(self) -> Any:
        from .models.captioner import CaptionFeatures

        return CaptionFeatures(self.options.model)

    def load(self, item: Item, data: bytes) -> LoadedImage:
        image = decode_image(data, max_pixels=self.options.max_pixels)
        return LoadedImage(self.features.prepare(image), image.width, image.height)

    def size(self, loaded: LoadedImage) -> float:
        return 0.0  # every image becomes the same tensor shape


class CaptionPredictor:
    def __init__(self, captioner: Any):
        self.captioner = captioner

    def predict(self, batch: list[LoadedImage]) -> list[Caption]:
        return [Caption(c) for c in self.captioner.caption_prepared([b.pixels for b in batch])]


class ImageScorer:
    """Rows, per-row and corpus caption metrics over the final set, the run's figures: no model needed."""

    kind = "images"
    reserved_columns = IMAGE_COLUMNS

    def __init__(self, options: ImageOptions):
        self.options = options
        self.model_name = options.model
        self.images = 0
        self.corpus: dict[str, float] = {}
        self.scored_rows = 0

    def row(self, item: Item, loaded: LoadedImage | None, prediction: Caption | None,
            error: ItemError | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": item.id,
            "source": item.source,
            "caption": prediction.caption if prediction else None,
            "status": OK if error is None else error.status,
            "error": None if error is None else error.message,
            "http_status": None,  # filled from the fetch
            "width": loaded.width if loaded is not None else None,
            "height": loaded.height if loaded is not None else None,
            "model": self.model_name,
        }
        if item.references:
            row["references"] = list(item.references)
        return row

    def observe(self, row: dict[str, Any]) -> None:
        if row.get("status") == OK:
            self.images += 1

    def finalize_table(self, table: Any) -> Any:
        """Per-row BLEU-4 / ROUGE-L / CIDEr-D over the whole final set (CIDEr-D's IDF needs it)."""
        import pyarrow as pa

        self.corpus = {}
        if "references" not in table.column_names:
            return table
        status = table.column("status").to_pylist()
        refs = table.column("references").to_pylist()
        captions = table.column("caption").to_pylist()
        scored = [i for i, (s, r) in enumerate(zip(status, refs)) if s == OK and r]
        if not scored:
            return table
        corpus, per_row = caption_metrics([captions[i] or "" for i in scored], [_as_list(refs[i]) for i in scored])
        self.corpus = corpus
        self.scored_rows = len(scored)
        for name in ROW_METRICS:
            values: list[float | None] = [None] * table.num_rows
            for i, scores in zip(scored, per_row):
                values[i] = round(scores[name], 6)
            column = pa.array(values, pa.float64())
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, column)
            else:
                table = table.append_column(name, column)
        return table

    def summarize(self, table: Any, wall_time_s: float) -> dict[str, Any]:
        wall = wall_time_s
        summary: dict[str, Any] = {"model": self.model_name, "images_this_run": self.images,
                                   "images_per_s_this_run": round(self.images / wall, 3) if wall > 0 else None}
        if self.corpus:
            summary.update({name: round(value, 6) for name, value in self.corpus.items()})
            summary["scored_rows"] = self.scored_rows
        return summary


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):  # a CSV output read back: JSON text
        import json

        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return [str(v) for v in value]


def load_captioner(options: ImageOptions) -> Any:
    from .models.captioner import Captioner

    return Captioner(options.model, device=options.device, dtype=options.dtype, max_new_tokens=options.max_new_tokens,
                     num_beams=options.num_beams, prompt=options.prompt, min_new_tokens=options.min_new_tokens)


def load_predictor(options: ImageOptions) -> CaptionPredictor:
    return CaptionPredictor(load_captioner(options))


def image_job(options: ImageOptions) -> Job:
    """The captioning job: its preprocessor and scorer hold no model; the predictor loads where it runs."""
    return Job(ImagePreprocessor(options), ImageScorer(options), functools.partial(load_predictor, options), group=1)


def caption_images(inputs: str | Sequence[str], output: str = "captions.parquet", *,
                   options: ImageOptions | None = None, captioner: Any = None, **overrides: Any) -> RunResult:
    """Caption every image of ``inputs`` (directories, files, URLs, manifests) into ``output``.

    The same pipeline as ``batchcap images``: resumes from what ``output`` holds, writes the final
    file atomically and a summary JSON beside it. Keyword overrides set ImageOptions fields.
    ``captioner``: an already loaded Captioner to use instead of loading ``options.model``.
    """
    options = call_options(options, ImageOptions, overrides, "caption_images")
    if captioner is not None:
        adopt_loaded(options, ImageOptions, {"model": captioner.name, **getattr(captioner, "settings", {})},
                     "captioner")
    options.check()
    spec = image_spec(options.path_column, options.reference_columns, options.id_column)
    spec.reserved = IMAGE_COLUMNS
    predictor = CaptionPredictor(captioner) if captioner is not None else None
    return run_pipeline(inputs, output, options, spec, image_job(options), predictor=predictor)
