"""Pixels for training and evaluation: a folder of photos as arrays, [-1, 1] tensors, padding,
a scale pyramid, and random and center crops.

Decoding image bytes is `codec.images.load_image`'s job (one input policy for the codec and
for its training); this module only shapes the pixels it returns.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


TRAINING_MAX_PIXELS = 1 << 27  # a training folder is the user's own photos: wallpaper sizes (~20 MP) pass


def load_folder(folder: str | Path, max_pixels: int = TRAINING_MAX_PIXELS) -> list[np.ndarray]:
    """All PNG/JPEG images of a folder as RGB uint8 arrays (sorted by name)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .png/.jpg images in '{folder}': point --data at a folder of photos")
    return [load_image(p.read_bytes(), max_pixels=max_pixels).pixels for p in paths]


def cap_long_side(images: list[np.ndarray], max_side: int | None) -> list[np.ndarray]:
    """Each image downscaled (Lanczos) so its longer side is at most `max_side` (None: unchanged).

    Wallpaper-sized photos hold far less detail per pixel than test sets like Kodak (768x512);
    downscaling first makes the training crops look like the images the codec is judged on.
    """
    if not max_side:
        return images
    from PIL import Image

    out = []
    for im in images:
        h, w = im.shape[:2]
        s = max_side / max(h, w)
        out.append(im if s >= 1 else np.asarray(Image.fromarray(im).resize((round(w * s), round(h * s)), Image.LANCZOS)))
    return out


def to_unit(px: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(px)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def pad_to_multiple(px: np.ndarray, multiple: int) -> torch.Tensor:
    """`to_unit` of the image edge-padded on the bottom/right to a multiple of `multiple` pixels."""
    h, w = px.shape[:2]
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    return to_unit(np.pad(px, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge"))


def scale_pyramid(images: list[np.ndarray], scales: tuple[float, ...], min_side: int) -> list[torch.Tensor]:
    """Each image at each scale (Lanczos, antialiased) as `to_unit` tensors; scales that leave a
    side shorter than `min_side` are skipped."""
    from PIL import Image

    out = []
    for im in images:
        h, w = im.shape[:2]
        for s in scales:
            sh, sw = round(h * s), round(w * s)
            if min(sh, sw) < min_side:
                continue
            px = im if s == 1.0 else np.asarray(Image.fromarray(im).resize((sw, sh), Image.LANCZOS))
            out.append(to_unit(px.copy()))
    if not out:
        raise ValueError(f"no training image is at least {min_side} px on its shorter side")
    return out


def random_crops(pool: list[torch.Tensor], n: int, size: int, rng: np.random.Generator,
                 augment: bool = True) -> torch.Tensor:
    """A batch of n random size×size crops from tensors (C, H, W) of the pool (numpy RNG), with
    random flips / 90° turns if `augment`. Every pool tensor must be at least `size` on each side."""
    crops = []
    for _ in range(n):
        x = pool[rng.integers(len(pool))]
        i = rng.integers(x.shape[1] - size + 1)
        j = rng.integers(x.shape[2] - size + 1)
        c = x[:, i : i + size, j : j + size]
        if augment:  # (latents are not flip-equivariant: their pool holds encoded mirror images instead)
            if rng.random() < 0.5:
                c = c.flip(2)
            c = torch.rot90(c, int(rng.integers(4)), dims=(1, 2))
        crops.append(c)
    return torch.stack(crops).contiguous()


def random_crop(z: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random size×size crop of a (C, h, w) tensor (torch RNG), edge-padded first when it is smaller."""
    c, h, w = z.shape
    if h < size or w < size:
        z = F.pad(z[None], (0, max(0, size - w), 0, max(0, size - h)), mode="replicate")[0]
        h, w = z.shape[-2:]
    i = int(torch.randint(0, h - size + 1, (), generator=generator))
    j = int(torch.randint(0, w - size + 1, (), generator=generator))
    return z[:, i : i + size, j : j + size]


def center_crop(px: np.ndarray, crop: str | None) -> np.ndarray:
    """Center crop to 'WxH' where the image is large enough (per side); None: the image itself."""
    if not crop:
        return px
    w, h = (int(v) for v in crop.lower().split("x"))
    H, W = px.shape[:2]
    y, x = max(0, (H - h) // 2), max(0, (W - w) // 2)
    return px[y : y + min(h, H), x : x + min(w, W)].copy()
