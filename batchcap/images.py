"""Bytes -> RGB ``PIL.Image``, with every way that can fail turned into a ``decode_error``."""

from __future__ import annotations

import functools
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
    if data[4:8] == b"ftyp":  # ISO media: HEIC / AVIF pictures (or a video)
        brand = data[8:12]
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"):
            return "HEIC/HEIF image, which Pillow reads only with a plug-in (pip install pillow-heif)"
        if brand in (b"avif", b"avis"):
            return "AVIF image, which this Pillow cannot read (newer releases can: pip install -U pillow)"
    for signature, kind in _DAMAGED:
        if data.startswith(signature):  # the format is known; its data is what does not read
            return f"not a readable image (a damaged {kind} file)"
    return f"not an image (unrecognized format, starts with {data[:8].hex(' ')})"


# signatures of formats Pillow reads: a file that starts like one and still does not open is damaged
_DAMAGED = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
            (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


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
    return Image.fromarray(_array_to_8bit(np.asarray(im), sixteen_bit=im.mode.startswith("I;16")), mode="L")


def _array_to_8bit(values: np.ndarray, sixteen_bit: bool = False) -> np.ndarray:
    """Samples of any numeric type -> uint8: floats in [0, 1] scaled, 16-bit ranges divided, anything else
    signed or wider stretched to the full range."""
    if values.dtype == np.uint8:
        return values
    arr = values.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    hi = float(finite.max()) if finite.size else 0.0  # an inf pixel made everything else 0 in the stretch
    lo = float(finite.min()) if finite.size else 0.0
    arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
    if values.dtype.kind == "f" and lo >= 0.0 and hi <= 2.0:  # 0..1, highlights a little over (HDR, processed)
        arr = arr * 255.0
    elif sixteen_bit or (values.dtype.kind in "iu" and lo >= 0 and 255 < hi <= 65535):
        arr = arr / 257.0  # integer samples of 16 bits (floats beyond 255 are stretched: linear, radiometric data)
    elif lo < 0 or hi > 255:  # signed or wider than 16 bits: stretch to the full range
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# what a pixel of a TIFF read through tifffile may cost decoded: four float samples (RGBA float32). A page of
# 300x300 pixels with 5,000 samples each (a 1.8 MB file) decoded to 1.8 GB under --max-pixels' pixel count.
TIFF_BYTES_PER_PIXEL = 16
_JPEG_END = b"\xff\xd9"


def _decode_tiff(data: bytes, max_pixels: int) -> Image.Image:
    """The first page of a TIFF Pillow cannot open (float samples, planar layouts, ...), through tifffile."""
    try:
        import tifffile
    except ImportError:
        raise ItemError(DECODE_ERROR, "TIFF that Pillow cannot decode (float samples, a planar layout or a "
                        "compression it lacks); pip install tifffile to read it") from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            axes, shape = page.axes, page.shape
            if "Y" not in axes or "X" not in axes:
                raise ItemError(DECODE_ERROR, "TIFF that Pillow cannot decode, whose first page holds no image "
                                f"(axes {axes!r})")
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            if width * height > max_pixels:
                raise ItemError(DECODE_ERROR, f"image too large: {width}x{height} = {_mp(width * height)} "
                                f"exceeds --max-pixels {_mp(max_pixels)}")
            if page.nbytes > max_pixels * TIFF_BYTES_PER_PIXEL:  # samples or other axes make it a bomb
                raise ItemError(DECODE_ERROR, f"image too large: its first page decodes to "
                                f"{page.nbytes / 1e6:,.0f} MB ({'x'.join(map(str, shape))} {axes} of {page.dtype}), "
                                f"more than --max-pixels allows ({_mp(max_pixels)} of {TIFF_BYTES_PER_PIXEL} bytes)")
            arr = page.asarray()
    except ItemError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds (TiffFileError, ValueError, codecs...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ItemError(DECODE_ERROR, f"TIFF that Pillow cannot decode, nor tifffile: {first}") from None
    # to [Y, X, S]: samples last, any other axis (pages of a volume, ...) at its first index
    order = [axes.index("Y"), axes.index("X")] + ([axes.index("S")] if "S" in axes else [])
    arr = arr.transpose(order + [i for i in range(arr.ndim) if i not in order])
    arr = arr.reshape(arr.shape[:len(order)] + (-1,))[..., 0] if arr.ndim > len(order) else arr
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] > 4:
        arr = arr[:, :, :3]
    return _to_rgb(Image.fromarray(_array_to_8bit(arr)))  # L, LA, RGB or RGBA by the number of samples


def _to_rgb(im: Image.Image) -> Image.Image:
    key = im.info.get("transparency")
    if isinstance(key, int) and (im.mode == "1" or im.mode.startswith("I")):
        # 1-bit line art and 16-bit scans with a transparent value (tRNS): Pillow's conversions drop it, and
        # the transparent background came out black; it is white, as for the other modes
        clear = np.asarray(im) == key
        rgb = np.asarray(_to_rgb(_without_transparency(im))).copy()
        rgb[clear] = 255
        return Image.fromarray(rgb)
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


@functools.lru_cache(maxsize=1)
def _register_heif() -> bool:
    """HEIC / HEIF pictures (phones' photos) through pillow-heif's Pillow plug-in, where it is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _planar_wide_tiff(im: Image.Image) -> bool:
    """A TIFF with separate planes of more than 8 bits a sample (``PlanarConfiguration`` 2), which Pillow
    opens and decodes into a garbled picture: tifffile reads it."""
    tags = getattr(im, "tag_v2", None)
    if im.format != "TIFF" or tags is None or tags.get(284) != 2:
        return False
    bits = tags.get(258, (8,))
    return max(bits if isinstance(bits, tuple) else (bits,)) > 8


def _without_end_marker(data: bytes) -> bool:
    """A baseline JPEG whose last bytes are not its end-of-image marker (a writer cut just before closing it).
    Not a progressive one (SOF2): cut after any of its scans it decodes to a whole, blurred picture, which no
    grey band gives away (a 10 % partial download was an ok row)."""
    if not data.startswith(b"\xff\xd8\xff") or data.rstrip(b"\x00").endswith(_JPEG_END):
        return False
    return _jpeg_frame(data) in (0xC0, 0xC1)


def _jpeg_frame(data: bytes) -> int | None:
    """The marker of a JPEG's start-of-frame segment (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _whole_with_end_marker(data: bytes, max_pixels: int) -> Image.Image | None:
    """The picture of a JPEG that lacks only its end marker, decoded with one; None when scan data is missing
    too (libjpeg fills the missing blocks with mid-grey: a bottom band of one grey value)."""
    try:
        im = decode_image(data + _JPEG_END, max_pixels=max_pixels)
    except ItemError:
        return None
    bottom = np.asarray(im)[-8:]
    return None if bottom.size and (bottom == bottom.flat[0]).all() and 120 <= bottom.flat[0] <= 136 else im


def _without_transparency(im: Image.Image) -> Image.Image:
    plain = im.copy()
    plain.info.pop("transparency", None)
    return plain


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` to an RGB image (first frame, EXIF orientation applied).

    Raises ``ItemError(DECODE_ERROR, ...)`` for empty or non-image bytes, truncated or corrupt files,
    and images with more than ``max_pixels`` pixels (checked from the header, before any pixel is decoded).
    Pillow's global ``MAX_IMAGE_PIXELS`` is raised to ``max_pixels`` where that is higher (never lowered):
    Pillow refuses images over twice its limit itself, which would cap ``max_pixels`` at ~179 MP.
    ``draft``: a JPEG may be decoded at a reduced scale no smaller than this (thumbnails).
    """
    if not data:
        raise ItemError(DECODE_ERROR, "empty file")
    _register_heif()
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        if data.startswith(_TIFF_MAGIC):
            return _decode_tiff(data, max_pixels)
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
        if _planar_wide_tiff(im):
            return _decode_tiff(data, max_pixels)
        if draft is not None:
            im.draft("RGB", draft)
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
            whole = _whole_with_end_marker(data, max_pixels) if _without_end_marker(data) else None
            if whole is not None:
                logger.info("JPEG without its end marker: the picture is whole")
                return whole
            raise ItemError(DECODE_ERROR, f"image truncated or corrupt: {exc}") from None
