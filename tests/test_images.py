"""Hostile and unusual images: the documented input policy of codec/images.py, measured."""
import io

import numpy as np
import pytest
from PIL import Image

from codec import ImageError, load_image
from jobs.samples import sample_image


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = sample_image(11, 40, 60)


def test_cmyk_jpeg_becomes_rgb():
    li = load_image(_save(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95))
    assert li.pixels.shape == (40, 60, 3) and not li.gray
    assert np.abs(li.pixels.astype(int) - RGB.astype(int)).mean() < 12


def test_palette_png_with_transparency():
    p = Image.fromarray(RGB).convert("P", palette=Image.ADAPTIVE, colors=16)
    p.info["transparency"] = 0
    li = load_image(_save(p, "PNG", transparency=0))
    assert li.pixels.shape == (40, 60, 3) and li.alpha


def test_exif_rotation_is_applied():
    im = Image.fromarray(RGB)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° CW on display
    li = load_image(_save(im, "JPEG", exif=exif.tobytes(), quality=95))
    assert li.pixels.shape == (60, 40, 3)  # stored upright


def test_sixteen_bit_gray_and_rgb():
    g16 = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27)
    li = load_image(_save(Image.fromarray(g16), "PNG"))
    assert li.gray and li.pixels.dtype == np.uint8
    assert np.array_equal(li.pixels[..., 0], np.round(g16 / 65535 * 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(fmt):
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 200, 90)]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    li = load_image(data)
    assert li.pixels.shape == (20, 30, 3) and abs(int(li.pixels.mean()) - 10) <= 3


def test_one_by_one_and_pixel_cap():
    assert load_image(_save(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG")).pixels.tolist() == [[[9, 8, 7]]]
    big = _save(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageError, match="exceeds the cap"):
        load_image(big, max_pixels=4_000_000)


def test_decompression_bomb_is_refused_before_decoding():
    # A 30000x30000 PNG header (900 MP) over a few KB: refused on the header, never decoded.
    bomb = _save(Image.new("1", (30000, 30000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="exceeds the cap|bomb"):
        load_image(bomb)


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a", b"<svg></svg>"])
def test_garbage_is_a_clear_error(data):
    with pytest.raises(ImageError):
        load_image(data)
