"""Sample images for the demo and tests: four real photographs shipped with the package
(`jobs/sample_photos/`, licences in its NOTICE.md), and synthetic images (smooth gradients,
shapes, textures and noise, varied sizes) for tests that need many small inputs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

PHOTOS_DIR = Path(__file__).parent / "sample_photos"


def sample_photos() -> list[Path]:
    """The shipped demo photographs (JPEG, longer side 512 px), sorted by name."""
    return sorted(PHOTOS_DIR.glob("*.jpg"))


def write_photos(out_dir: str | Path, n: int | None = None) -> list[Path]:
    """Copy the first n shipped photographs (all when None) into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sample_photos()[:n]:
        dst = out / src.name
        dst.write_bytes(src.read_bytes())
        paths.append(dst)
    return paths


def sample_image(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A deterministic RGB uint8 image with sky-like gradients, blobs, stripes and grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(40, 200, 3)
    grad = rng.uniform(-1, 1, (2, 3))
    img = base + (yy / height)[..., None] * grad[0] * 80 + (xx / width)[..., None] * grad[1] * 80
    for _ in range(rng.integers(2, 6)):  # soft blobs ("objects")
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, max(6, min(height, width) / 2))
        mask = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        img += mask[..., None] * rng.uniform(-90, 90, 3)
    f, phase = rng.uniform(0.05, 0.4), rng.uniform(0, 6.28)  # texture
    img += np.sin(xx * f + yy * f * rng.uniform(-1, 1) + phase)[..., None] * rng.uniform(3, 20)
    img += rng.normal(0, rng.uniform(1, 6), img.shape)  # sensor grain
    return np.clip(img, 0, 255).astype(np.uint8)


def write_samples(out_dir: str | Path, n: int = 12, seed: int = 0, fmt: str = "png",
                  sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 128), (80, 72), (128, 96))) -> list[Path]:
    """Write n sample images (cycling through sizes) to out_dir; returns their paths."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        p = out / f"sample_{i:04d}.{fmt}"
        buf = io.BytesIO()
        Image.fromarray(sample_image(seed * 100003 + i, h, w)).save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper())
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths
