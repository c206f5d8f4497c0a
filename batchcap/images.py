"""Bytes -> RGB ``PIL.Image``, with every way that can fail turned into a ``decode_error``."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchcap.inputs import IMAGE_EXTENSIONS  # noqa: F401  (re-exported: the formats a directory walk picks)
from batchcap.items import DECODE_ERROR, ItemError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit (~89.5 MP)

_SNIFF = (  # lowercase prefixes (after leading whitespace) of common non-images
    (("<!doctype html", "<html", "<head", "<body"), "HTML"),
    (("<?xml", "<svg"), "XML/SVG; SVG is not supported"),
    (("{", "["), "JSON"),
    (("%pdf",), "PDF"),
)


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _not_an_image(data: bytes) -> str:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for prefixes, kind in _SNIFF:
        if head.startswith(tuple(p.encode() for p in prefixes)):
            return f"not an image (looks like {kind})"
    if b"<html" in head:
        return "not an image (looks like HTML)"
    try:
        text = data[:512].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "not an image (looks like text)"
    return f"not an image (unrecognized format, starts with {data[:8].hex(' ')})"


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    """Pillow refused the header itself (over twice its global limit); it only tells the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if not found:
        return f"image too large: {exc}"
    pixels = int(found.group(1))
    if pixels > max_pixels:
        return f"image too large: {_mp(pixels)} exceeds --max-pixels {_mp(max_pixels)}"
    return f"image too large: {_mp(pixels)} exceeds Pillow's decompression-bomb limit ({exc})"


def _to_8bit(im: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits (I;16*, I, F) -> L, keeping the contrast."""
    arr = np.asarray(im).astype(np.float64)
    hi = float(arr.max()) if arr.size else 0.0
    lo = float(arr.min()) if arr.size else 0.0
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif im.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
        arr = arr / 257.0
    elif lo < 0 or hi > 255:  # signed or wider than 16 bits: stretch to the full range
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    transparent = "transparency" in im.info
    if im.mode in ("LA", "La", "PA", "RGBa", "RGBA") or (transparent and im.mode in ("P", "L", "RGB")):
        im = im.convert("RGBA")
    elif im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im).convert("RGB")
    else:  # 1, L, P, RGB, CMYK, YCbCr, LAB, HSV, ...
        im = im.convert("RGB")
    if im.mode == "RGBA":  # composite on white
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        im = background
    return im


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB image (first frame, EXIF orientation applied).

    Raises ``ItemError(DECODE_ERROR, ...)`` for empty or non-image bytes, truncated or corrupt files,
    and images with more than ``max_pixels`` pixels (checked from the header, before any pixel is decoded).
    Pillow's global ``MAX_IMAGE_PIXELS`` still applies on top (refused at twice its value).
    """
    if not data:
        raise ItemError(DECODE_ERROR, "empty file")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ItemError(DECODE_ERROR, _not_an_image(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(DECODE_ERROR, _bomb_message(exc, max_pixels)) from None
    except Exception as exc:  # noqa: BLE001 - plugins raise anything on a bad header
        raise ItemError(DECODE_ERROR, f"image truncated or corrupt: {exc}") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ItemError(
                DECODE_ERROR,
                f"image too large: {width}x{height} = {_mp(width * height)} "
                f"exceeds --max-pixels {_mp(max_pixels)}",
            )
        if width <= 0 or height <= 0:
            raise ItemError(DECODE_ERROR, f"image truncated or corrupt: size {width}x{height}")
        try:
            im.seek(0)  # first frame of an animation / multi-page file
            im.load()
            try:
                frame = ImageOps.exif_transpose(im)
            except Exception as exc:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
                logger.debug("ignoring unreadable EXIF orientation: %s", exc)
                frame = im.copy()
            return _to_rgb(frame)
        except ItemError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ItemError(DECODE_ERROR, _bomb_message(exc, max_pixels)) from None
        except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, zlib.error, ValueError, ...
            raise ItemError(DECODE_ERROR, f"image truncated or corrupt: {exc}") from None
