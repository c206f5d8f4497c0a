"""decode_image on real files of every common kind, and the Captioner on a tiny random model."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from batchcap.images import IMAGE_EXTENSIONS, decode_image
from batchcap.items import DECODE_ERROR, FatalError, ItemError

WHITE = (255, 255, 255)


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def decode_error(data: bytes, **kwargs) -> str:
    with pytest.raises(ItemError) as info:
        decode_image(data, **kwargs)
    assert info.value.status == DECODE_ERROR
    return info.value.message


def near(pixel, expected, tol: int = 24) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
            "camera": data.camera(), "logo": data.logo()}


# --- decode_image -------------------------------------------------------------------------------

def test_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_real_photos_every_format(fmt):
    for name, array in photos().items():
        im = Image.fromarray(array)
        if fmt in ("JPEG", "BMP") and im.mode == "RGBA":
            im = im.convert("RGB")
        out = decode_image(encode(im, fmt))
        assert out.mode == "RGB", (name, fmt)
        assert out.size == (array.shape[1], array.shape[0]), (name, fmt)
        if fmt in ("PNG", "BMP", "TIFF", "WEBP") and array.ndim == 3 and array.shape[2] == 3:
            diff = np.abs(np.asarray(out, dtype=int) - array.astype(int)).mean()
            assert diff < (6 if fmt == "WEBP" else 0.01), (name, fmt, diff)  # WebP is lossy


def test_matplotlib_sample_files():
    from matplotlib import cbook

    jpeg = decode_image(open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb").read())
    assert (jpeg.mode, jpeg.size) == ("RGB", (512, 600))
    logo = decode_image(open(cbook.get_sample_data("logo2.png", asfileobj=False), "rb").read())
    assert (logo.mode, logo.size) == ("RGB", (542, 130))
    assert near(logo.getpixel((0, 0)), WHITE, 0)  # transparent corner composited on white


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (80, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # red in the top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (40, 80)
    assert near(out.getpixel((35, 5)), (255, 0, 0))  # now top-right
    assert near(out.getpixel((5, 5)), (0, 0, 255))


def test_broken_exif_keeps_pixels():
    data = encode(Image.new("RGB", (30, 20), (10, 200, 10)), "JPEG", exif=b"Exif\x00\x00garbage")
    out = decode_image(data)
    assert out.size == (30, 20)


def test_palette_with_transparency_on_white():
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (10, 0, 20, 10))
    for fmt in ("PNG", "GIF"):
        out = decode_image(encode(im, fmt, transparency=0))
        assert out.mode == "RGB"
        assert near(out.getpixel((2, 2)), WHITE, 0), fmt
        assert near(out.getpixel((15, 5)), (255, 0, 0), 0), fmt


@pytest.mark.parametrize("mode,transparent,opaque", [
    ("RGBA", (0, 0, 0, 0), (0, 128, 255, 255)),
    ("LA", (0, 0), (60, 255)),
])
def test_alpha_composited_on_white(mode, transparent, opaque):
    im = Image.new(mode, (20, 10), transparent)
    im.paste(opaque, (10, 0, 20, 10))
    out = decode_image(encode(im, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == WHITE
    expected = opaque[:3] if mode == "RGBA" else (opaque[0],) * 3
    assert out.getpixel((15, 5)) == expected


def test_one_bit_and_sixteen_bit_with_a_transparent_value_on_white():
    """1-bit line art and 16-bit scans with a transparent value (tRNS): Pillow's conversions drop it, and the
    transparent background came out black."""
    art = Image.new("1", (8, 8), 0)  # the background (0) transparent, the drawing (1) opaque
    art.putpixel((2, 2), 1)
    out = np.asarray(decode_image(encode(art, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == WHITE and tuple(out[2, 2]) == WHITE  # was (0, 0, 0): a black page
    scan = np.full((8, 8), 30000, np.uint16)
    scan[0, 0] = 0  # the transparent value
    out = np.asarray(decode_image(encode(Image.fromarray(scan), "PNG", transparency=0)))
    assert tuple(out[0, 0]) == WHITE and near(out[4, 4], (117, 117, 117), tol=2)  # 30000 / 257


def test_half_transparent_blends_with_white():
    out = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert near(out.getpixel((1, 1)), (127, 127, 127), 2)


def test_16_bit_grayscale_keeps_contrast():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    out = decode_image(encode(im, "PNG"))
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert 120 <= arr[0, 32, 0] <= 135  # mid-grey, not clipped to white


def test_32_bit_int_tiff():
    ramp = np.tile(np.arange(64, dtype=np.int32) * 1000 - 5000, (8, 1))
    out = decode_image(encode(Image.fromarray(ramp), "TIFF"))
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255


def test_float_tiff_beyond_255_is_stretched():
    """Linear or radiometric float samples in 0..1000 were divided by 257 as 16-bit integers are: the model
    saw an almost black picture (mean 2 of 255)."""
    tifffile = pytest.importorskip("tifffile")
    ramp = np.tile(np.linspace(0, 1000, 64, dtype=np.float32), (8, 1))
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.stack([ramp] * 3, axis=-1), photometric="rgb")
    arr = np.asarray(decode_image(buf.getvalue()))
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255 and 120 < arr.mean() < 135
    # highlights a little over 1.0 (a processed or HDR export) are a 0..1 picture; one inf pixel is not its scale
    for values in (np.tile(np.linspace(0, 1.05, 64, dtype=np.float32), (8, 1)), ramp.copy()):
        if values.max() > 2:
            values[0, 0] = np.inf
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.stack([values] * 3, axis=-1), photometric="rgb")
        assert 110 < np.asarray(decode_image(buf.getvalue())).mean() < 140, values.max()


def test_cmyk_jpeg():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(im, "JPEG", quality=95))
    assert out.mode == "RGB"
    assert near(out.getpixel((8, 8)), (255, 0, 0), 40)


def test_one_bit_and_grayscale():
    im = Image.new("1", (16, 8), 0)
    im.paste(1, (8, 0, 16, 8))
    out = decode_image(encode(im, "PNG"))
    assert out.getpixel((2, 2)) == (0, 0, 0) and out.getpixel((12, 2)) == WHITE
    gray = decode_image(encode(Image.fromarray(photos()["camera"]), "PNG"))
    assert gray.mode == "RGB" and gray.size == (512, 512)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (24, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data)
    assert out.size == (24, 16) and near(out.getpixel((5, 5)), (255, 0, 0), 8)


def test_multipage_tiff_first_page():
    pages = [Image.new("RGB", (30, 20), (0, 0, 255)), Image.new("RGB", (50, 50), (255, 0, 0))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data)
    assert out.size == (30, 20) and out.getpixel((3, 3)) == (0, 0, 255)


def _skimage_file(name: str) -> bytes:
    import os

    from skimage import data

    with open(os.path.join(os.path.dirname(data.__file__), name), "rb") as f:
        return f.read()


def test_float64_planar_multipage_tiff():
    """scikit-image's multipage_rgb.tif: two pages of float64 samples in [0, 1], stored planar (SYX), which
    Pillow cannot open; the first page is decoded (tifffile) with its colours."""
    tifffile = pytest.importorskip("tifffile")
    data = _skimage_file("multipage_rgb.tif")
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(data))
    out = decode_image(data)
    first = tifffile.imread(io.BytesIO(data))[0]  # [3, 10, 10] float64
    assert out.mode == "RGB" and out.size == (10, 10)
    assert np.array_equal(np.asarray(out), np.rint(np.moveaxis(first, 0, -1) * 255).astype(np.uint8))
    assert "too large" in decode_error(data, max_pixels=99)  # --max-pixels checked from the page header


def test_tiff_pillow_cannot_decode_without_tifffile(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tifffile", None)  # not installed
    message = decode_error(_skimage_file("multipage_rgb.tif"))
    assert message.startswith("TIFF that Pillow cannot decode") and "tifffile" in message
    corrupt = _skimage_file("multipage_rgb.tif")[:8] + b"\x00" * 64  # the header, then no valid IFD
    monkeypatch.delitem(sys.modules, "tifffile")
    pytest.importorskip("tifffile")
    assert decode_error(corrupt).startswith("TIFF that Pillow cannot decode")  # nor tifffile: a row, no crash


def test_truncated_files():
    photo = Image.fromarray(photos()["astronaut"])
    for fmt in ("JPEG", "PNG"):
        data = encode(photo, fmt)
        message = decode_error(data[: len(data) // 2])
        assert message.startswith("image truncated or corrupt"), (fmt, message)
    assert "truncated or corrupt" in decode_error(encode(photo, "JPEG")[:200])


def test_a_jpeg_without_only_its_end_marker_is_whole():
    """A writer cut just before its last 2 bytes (FF D9) leaves the whole picture, which was a decode_error;
    a file missing scan data as well stays one (libjpeg would fill the rest with grey)."""
    photo = photos()["astronaut"]
    data = encode(Image.fromarray(photo), "JPEG", quality=90)
    assert np.array_equal(np.asarray(decode_image(data[:-2])), np.asarray(decode_image(data)))
    assert decode_error(data[:-len(data) // 20]).startswith("image truncated or corrupt")
    # a progressive JPEG cut after any scan decodes to a whole, blurred picture: still a decode_error
    progressive = encode(Image.fromarray(photo), "JPEG", quality=90, progressive=True)
    assert decode_error(progressive[:len(progressive) // 10]).startswith("image truncated or corrupt")


def test_wide_planar_tiff_is_read_as_tifffile_reads_it():
    """16-bit RGB stored as separate planes (scanners, microscopes): Pillow opened it and decoded a garbled
    picture (mean error 84 of 255) for an ``ok`` row; tifffile reads it now, as it reads 8-bit planes."""
    tifffile = pytest.importorskip("tifffile")
    photo = photos()["astronaut"]
    expected = np.asarray(decode_image(encode(Image.fromarray(photo), "PNG")))
    for dtype, scale in ((np.uint16, 257), (np.uint8, 1)):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.moveaxis(photo.astype(dtype) * scale, -1, 0), photometric="rgb",
                         planarconfig="separate")
        assert np.array_equal(np.asarray(decode_image(buf.getvalue())), expected), dtype


def test_tiff_samples_are_counted_against_max_pixels():
    """100x100 pixels of 64 float samples each: under --max-pixels by pixel count, yet 2.6 MB decoded (a page
    of 300x300 pixels x 5,000 samples was a 1.8 MB file that decoded to 1.8 GB)."""
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((100, 100, 64), np.float32), photometric="minisblack", planarconfig="contig",
                     compression="zlib")
    message = decode_error(buf.getvalue(), max_pixels=20_000)
    assert message.startswith("image too large: its first page decodes to 3 MB (100x100x64 YXS of float32)"), message
    assert decode_image(buf.getvalue(), max_pixels=200_000).size == (100, 100)


def test_empty_and_non_images():
    assert decode_error(b"") == "empty file"
    html = b"\n  <!DOCTYPE html><html><head><title>404 Not Found</title></head></html>"
    assert decode_error(html) == "not an image (looks like HTML)"
    assert "HTML" in decode_error(b"<html><body>moved</body></html>")
    assert "JSON" in decode_error(b'{"error": "rate limited"}')
    assert "text" in decode_error(b"Access denied.\n")
    assert "PDF" in decode_error(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    assert decode_error(bytes(range(256)) * 4).startswith("not an image (unrecognized format")


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR says width x height (the CRC fixed up): a bomb that costs nothing."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bomb_refused_from_the_header_quickly():
    start = time.perf_counter()
    message = decode_error(png_claiming(20000, 20000))
    assert message.startswith("image too large: ") and "400.0 MP" in message
    assert "--max-pixels 89.5 MP" in message
    assert time.perf_counter() - start < 1.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_between_pillow_warning_and_error():
    message = decode_error(png_claiming(12000, 10000))
    assert message == "image too large: 12000x10000 = 120.0 MP exceeds --max-pixels 89.5 MP"


def test_bomb_warning_raised_as_error_is_a_decode_error():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error
        message = decode_error(png_claiming(12000, 10000))
    assert message == "image too large: 120.0 MP exceeds --max-pixels 89.5 MP"


def test_max_pixels_is_ours_not_pillows(monkeypatch):
    # Pillow's own limit as it ships (an images run earlier in this process may have raised it)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024 * 1024 * 1024 // 4 // 3)
    data = encode(Image.new("RGB", (200, 100), (1, 2, 3)), "PNG")
    message = decode_error(data, max_pixels=10_000)
    assert message == "image too large: 200x100 = 20000 pixels exceeds --max-pixels 10000 pixels"
    assert decode_image(data, max_pixels=20_000).size == (200, 100)
    from PIL import ImageFile

    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # below Pillow's limit: nothing global set
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_above_pillows_own_refusal(monkeypatch):
    # Pillow refuses over twice its limit (~179 MP) by itself: --max-pixels 250 MP must still let a
    # 196 MP image through the size checks (this one's pixel data is missing: it fails decoding instead)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    data = png_claiming(14000, 14000)
    assert "too large" in decode_error(data)  # the default limit
    message = decode_error(data, max_pixels=250_000_000)
    assert "too large" not in message and message.startswith("image truncated or corrupt")
    assert decode_error(png_claiming(20000, 20000), max_pixels=250_000_000) == (
        "image too large: 20000x20000 = 400.0 MP exceeds --max-pixels 250.0 MP")


# --- Captioner ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioner(tiny_captioner):
    from batchcap.models.captioner import Captioner

    return Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=12)


def caption_images() -> list[Image.Image]:
    arrays = photos()
    rng = np.random.default_rng(1)
    return [Image.fromarray(arrays["astronaut"]), Image.fromarray(arrays["coffee"]),
            Image.fromarray(arrays["chelsea"]).resize((90, 60)), Image.new("RGB", (50, 40), (255, 0, 0)),
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))]


def test_captioner_batch(captioner, tiny_captioner):
    assert captioner.name == tiny_captioner
    captions = captioner.caption(caption_images()[:3])
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert captioner.caption([]) == []


def test_batched_equals_one_at_a_time(captioner):
    images = caption_images()
    batched = captioner.caption(images)
    assert batched == [captioner.caption([im])[0] for im in images]
    # the tiny model ends captions (EOS) at different lengths: the batch really was padded
    assert len({len(c.split()) for c in batched}) > 1
    assert captioner.caption_prepared([captioner.prepare(im) for im in images]) == batched


def test_beams_and_min_new_tokens(tiny_captioner):
    from batchcap.models.captioner import Captioner

    images = caption_images()
    beams = Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=12, num_beams=2)
    captions = beams.caption(images)
    assert len(captions) == len(images) and captions == [beams.caption([im])[0] for im in images]
    forced = Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=8, min_new_tokens=8)
    assert all(len(c.split()) == 8 for c in forced.caption(images))  # no EOS before 8 tokens


@pytest.mark.parametrize("prompt", [None, "a cat"])
def test_beam_search_shares_cross_attention_without_changing_captions(tiny_captioner, prompt):
    """Beam search with one cross-attention K/V per image gives transformers' beam search captions,
    and projects each image's encoder states once instead of once per beam."""
    from batchcap.models.captioner import Captioner

    images = caption_images()
    kwargs = dict(device="cpu", dtype="float32", max_new_tokens=10, num_beams=3, prompt=prompt)
    shared = Captioner(tiny_captioner, **kwargs)
    stock = Captioner(tiny_captioner, share_cross_attention=False, **kwargs)
    projected: dict[str, int] = {}

    def counter(name):
        def count(module, args, output):
            projected[name] = projected.get(name, 0) + args[0].shape[0]
        return count

    handles = [c.model.decoder.transformer.h[0].crossattention.c_attn.register_forward_hook(counter(name))
               for name, c in (("shared", shared), ("stock", stock))]
    try:
        captions = shared.caption(images)
        assert captions == stock.caption(images)
    finally:
        for handle in handles:
            handle.remove()
    assert len(set(captions)) > 1
    # the cross-attention keys/values of the encoder states: once per image, not once per beam
    assert projected == {"shared": len(images), "stock": 3 * len(images)}


@pytest.mark.parametrize("beams", [1, 3])
def test_step_attention_keeps_sdpa_captions(tiny_captioner, beams):
    from batchcap.models.attention import NAME
    from batchcap.models.captioner import Captioner

    images = caption_images()
    captioner = Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=10, num_beams=beams)
    assert captioner.model.config._attn_implementation == NAME
    ours = captioner.caption(images)
    captioner.model.set_attn_implementation("sdpa")
    assert captioner.caption(images) == ours


def test_auto_precision_on_cpu(tiny_captioner):
    import torch

    from batchcap.models.captioner import Captioner
    from batchcap.models.common import cpu_has_fast_bf16

    auto = Captioner(tiny_captioner, device="cpu", max_new_tokens=6)  # bf16 autocast where the CPU has it
    assert auto.dtype == torch.float32  # the weights stay fp32 on a CPU ...
    assert auto.autocast == (torch.bfloat16 if cpu_has_fast_bf16() else None)  # ... matmuls in bf16 where native
    plain = Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=6)
    assert plain.dtype == torch.float32 and plain.autocast is None
    assert len(auto.caption(caption_images())) == 5


def test_bf16_captioner_casts_its_matmul_weights_once(tiny_captioner):
    """Under bf16 autocast the matmul weights are stored in bf16 at load (GPT-2's Conv1D layers too), not
    cast again in every generate call; the captions are those of the float32 weights under autocast."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from batchcap.models.captioner import Captioner

    cast = Captioner(tiny_captioner, device="cpu", dtype="bfloat16", max_new_tokens=8, num_beams=2)
    layers = [m for m in cast.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, Conv1D))]
    assert any(isinstance(m, Conv1D) for m in layers)
    assert all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert cast.model.decoder.get_input_embeddings().weight.dtype == torch.float32  # lookups stay exact
    fp32 = Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=8, num_beams=2)
    autocast_only = Captioner.from_model(fp32.model, fp32.image_processor, fp32.tokenizer, device=torch.device("cpu"),
                                         autocast=torch.bfloat16, max_new_tokens=8, num_beams=2)
    images = caption_images()
    assert cast.caption(images) == autocast_only.caption(images)


def test_prompt_is_fed_and_stripped(tiny_captioner):
    from batchcap.models.captioner import Captioner

    prompted = Captioner(tiny_captioner, device="cpu", dtype="float32", max_new_tokens=4, min_new_tokens=4,
                         prompt="a cat")
    captions = prompted.caption(caption_images()[:2])
    assert all(len(c.split()) == 4 and not c.startswith("a cat") for c in captions)


def test_load_errors_are_fatal_and_actionable(tmp_path, monkeypatch):
    from batchcap.models.captioner import Captioner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FatalError) as info:
        Captioner("nlpconnect/vit-gpt2-image-captioning-not-cached", device="cpu")
    assert "--model" in str(info.value)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FatalError) as info:
        Captioner(missing, device="cpu")
    assert missing in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FatalError, match="cannot load model"):
        Captioner(str(tmp_path / "empty"), device="cpu")


def test_captioning_logs_no_padding_false_alarm(tiny_captioner):
    """GPT-2's pad token is its start token, so transformers warned about padding once per process
    ("We strongly recommend passing in an attention_mask", "The attention mask is not set") though
    nothing batchcap generates is padded; a library user's log stays clean."""
    from batchcap.models.captioner import Captioner
    from tests.helpers import transformers_warnings

    with transformers_warnings() as records:
        for beams in (1, 2):
            captioner = Captioner(tiny_captioner, device="cpu", max_new_tokens=6, num_beams=beams)
            assert len(captioner.caption(caption_images()[:2])) == 2
    assert not [m for m in records if "attention mask" in m or "attention_mask" in m], records


def test_a_thin_picture_is_cut_before_a_shortest_edge_processor_scales_it():
    """GIT's processor (CLIP's: the short side to 224, then a centred 224 crop) scaled a 1 x 5,000 PNG to
    224 x 1,120,000 pixels (2.9 GB) before cropping. The long side is cut to twice the short side first: the
    processor's output is the same; a fixed-size processor (ViT's) gets the picture as it is."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Clip
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as Vit
    except ImportError:
        from transformers import CLIPImageProcessor as Clip
        from transformers import ViTImageProcessor as Vit

    from batchcap.models.captioner import within_centre_crop

    clip, vit = Clip(), Vit()
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (100, 600, 3), dtype=np.uint8))
    assert within_centre_crop(clip, wide).size == (200, 100)
    np.testing.assert_array_equal(clip(images=[within_centre_crop(clip, wide)], return_tensors="np")["pixel_values"],
                                  clip(images=[wide], return_tensors="np")["pixel_values"])
    assert within_centre_crop(clip, Image.new("RGB", (1, 30000))).size == (1, 2)
    assert within_centre_crop(vit, wide) is wide
