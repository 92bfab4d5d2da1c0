"""Image bytes <-> uint8 arrays, with the input policy documented in one place.

Policy (docs/reliability.md repeats it):
* Orientation: EXIF orientation is applied (the pixels are stored upright).
* Grayscale (L, I;16, 1) is coded as RGB and decoded back to grayscale (flag in the record).
* Alpha (RGBA, LA, P with transparency) is dropped; the record says it was there.
* 16-bit images are reduced to 8 bits (the codec is an 8-bit codec).
* CMYK/YCbCr/palette images are converted to RGB.
* Animated images (GIF, WebP, APNG): the first frame is coded.
* Pillow's decompression-bomb guard stays on, and our own pixel cap (`max_pixels`) applies.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from .limits import DEFAULT_MAX_PIXELS  # noqa: E402  (16.7 MP padded per image unless a job says otherwise)


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


@dataclass
class LoadedImage:
    """RGB pixels plus what the source looked like."""

    pixels: np.ndarray  # (H, W, 3) uint8
    gray: bool = False
    alpha: bool = False


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode image bytes (any format Pillow reads) into RGB uint8 under the policy above."""
    from PIL import Image, ImageOps

    if not data:
        raise ImageError("empty file (0 bytes) is not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image of {w}x{h} pixels exceeds the cap of {max_pixels} pixels")
            im.seek(0)  # first frame of animations
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"rejected as a decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types for bad data
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # a broken EXIF block must not lose the image; keep the stored orientation
    mode = im.mode
    alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
    gray = mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        px = np.repeat(arr[..., None], 3, axis=2)
    else:
        px = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if px.ndim != 3 or px.shape[0] < 1 or px.shape[1] < 1:
        raise ImageError(f"image has an unusable shape {px.shape}")
    return LoadedImage(np.ascontiguousarray(px), gray=gray, alpha=alpha)


def to_png(pixels: np.ndarray, gray: bool = False) -> bytes:
    """Encode decoded pixels as PNG (grayscale sources back as L)."""
    from PIL import Image

    im = Image.fromarray(pixels)
    if gray:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
