"""Image bytes <-> uint8 arrays, with the input policy documented in one place.

Policy (docs/reliability.md repeats it):
* Formats: only `ALLOWED_FORMATS` (PNG, JPEG and MPO, WebP, AVIF, TIFF, BMP, GIF, PPM/PGM/PBM) are tried;
  no other Pillow plugin (EPS, which calls Ghostscript, PSD, ...) ever sees the bytes.
* Size: the cap counts *padded* pixels (`codec.limits.check_encode_size`) and is checked on the
  header, before the pixels are decoded.
* Orientation: EXIF orientation is applied (the pixels are stored upright).
* Grayscale (L, I;16, I from a 16-bit PGM, 1) is coded as RGB and decoded back to grayscale.
* Alpha (RGBA, LA, P with transparency) is dropped; the record says it was there.
* 16-bit images are reduced to 8 bits with the scale of their mode (I;16*: 65535; "I" only from
  a 16-bit PPM/PGM, which Pillow scales to 0..65535), never guessed from the content.
* CMYK/YCbCr/palette images are converted to RGB; LAB, HSV, 32-bit integer and float images are
  refused (no conversion that keeps their colours or their scale).
* Animated images (GIF, WebP, APNG): the first frame is coded.
* Pillow's decompression-bomb guard stays on, and our own pixel cap (`max_pixels`) applies.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np

from .limits import DEFAULT_MAX_PIXELS, check_encode_size

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "TIFF", "BMP", "GIF", "PPM")  # JPEG includes MPO (phones)
PAD_MULTIPLE = 64  # the backbones' padding multiple (codec.backbone.PAD_MULTIPLE); counted by the cap
_SIXTEEN = ("I;16", "I;16B", "I;16L", "I;16N")
_TO_RGB = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "P", "PA", "L", "LA", "La", "1")
_GRAY = ("L", "LA", "La", "1", "I", *_SIXTEEN)


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


@dataclass
class LoadedImage:
    """RGB pixels plus what the source looked like."""

    pixels: np.ndarray  # (H, W, 3) uint8
    gray: bool = False
    alpha: bool = False


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, pad_multiple: int = PAD_MULTIPLE) -> LoadedImage:
    """Decode image bytes (a format of `ALLOWED_FORMATS`) into RGB uint8 under the policy above."""
    from PIL import Image, ImageOps

    if not data:
        raise ImageError("empty file (0 bytes) is not an image")
    Image.init()  # registers every plugin's format id; `formats=` below limits which are tried
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = im.size
            try:  # on the header: padded pixels and the format's latent limits, before decoding
                check_encode_size(w, h, pad_multiple, max_pixels)
            except ValueError as e:
                raise ImageError(str(e)) from None
            im.seek(0)  # first frame of animations
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"rejected as a decompression bomb: {_clean(e)}") from None
    except Exception as e:  # PIL raises many types for bad data
        raise ImageError(f"not a readable image of an allowed format ({', '.join(ALLOWED_FORMATS)}): "
                         f"{type(e).__name__}: {_clean(e)}") from None
    fmt = im.format  # exif_transpose returns a copy without it
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # a broken EXIF block must not lose the image; keep the stored orientation
    mode = im.mode
    alpha = mode in ("RGBA", "LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in im.info)
    gray = mode in _GRAY
    if mode in _SIXTEEN or mode == "I":
        if mode == "I" and fmt != "PPM":
            raise ImageError(f"{fmt} image in mode I (32-bit integer samples) is not supported: "
                             "convert it to 8- or 16-bit first")
        arr = np.asarray(im).astype(np.float64)  # 16-bit samples (PPM/PGM "I": Pillow scaled to 0..65535)
        arr = np.clip(np.round(arr / 65535.0 * 255.0), 0, 255).astype(np.uint8)
        px = np.repeat(arr[..., None], 3, axis=2)
    elif mode in _TO_RGB:
        px = np.asarray(im.convert("RGB"), dtype=np.uint8)
    else:
        raise ImageError(f"image mode {mode} ({fmt}) is not supported: its colours or scale have no faithful "
                         "RGB conversion here; convert it to RGB first")
    if px.ndim != 3 or px.shape[0] < 1 or px.shape[1] < 1:
        raise ImageError(f"image has an unusable shape {px.shape}")
    return LoadedImage(np.ascontiguousarray(px), gray=gray, alpha=alpha)


def _clean(e: BaseException) -> str:
    """Pillow's message without the repr of our in-memory file."""
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the input", str(e))


def to_png(pixels: np.ndarray, gray: bool = False) -> bytes:
    """Encode decoded pixels as PNG (grayscale sources back as L)."""
    from PIL import Image

    im = Image.fromarray(pixels)
    if gray:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
