"""A stand-in codec for benchmarking the data path without a model: `encode` sleeps a fixed
latency per batch (no CPU, like waiting on a GPU) and returns bitstreams of a set size.

It has the interface the pipeline's row engine uses (`encode(images, errors=...)` -> objects with
`.data/.t/.bpp/.width/.height`, `.backbone.fingerprint()`, `.fingerprint()`, `.config.max_pixels`,
`.config.batch_size`), so `fcodec bench`'s simulated cluster runs the real compress job with it.
Spelled `baseline="standin:LAT_MS:BYTES"` in a `CodecSpec` (defaults: 100 ms per batch, 5000 bytes;
`batch_size` images per batch). It imports no torch, so an actor starts in well under a second.
Its bitstreams decode to nothing: it exists for throughput, not for images.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .bitstream import Encoded

DEFAULT_LATENCY_MS = 100.0
DEFAULT_BYTES = 5000
DEFAULT_MAX_PIXELS = 1 << 26


@dataclass
class StandinConfig:
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS


class _Family:
    def __init__(self, name: str) -> None:
        self.name = name

    def fingerprint(self) -> bytes:
        return hashlib.blake2b(f"standin|{self.name}".encode(), digest_size=8).digest()


def parse_standin(name: str) -> tuple[float, int]:
    """`standin[:LAT_MS[:BYTES]]` -> (latency in ms per batch, bytes per bitstream)."""
    parts = name.split(":")
    if parts[0] != "standin" or len(parts) > 3:
        raise ValueError(f"not a stand-in codec name: {name!r} (standin:LAT_MS:BYTES)")
    try:
        lat = float(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_LATENCY_MS
        size = int(parts[2]) if len(parts) > 2 and parts[2] else DEFAULT_BYTES
    except ValueError:
        raise ValueError(f"bad stand-in codec {name!r}: give standin:LAT_MS:BYTES, e.g. standin:100:5000") from None
    if lat < 0 or size < 1:
        raise ValueError(f"bad stand-in codec {name!r}: latency must be >= 0 ms and bytes >= 1")
    return lat, size


class StandinCodec:
    """Sleeps `latency_ms` per batch of `batch_size` images; returns `nbytes`-byte bitstreams."""

    def __init__(self, latency_ms: float = DEFAULT_LATENCY_MS, nbytes: int = DEFAULT_BYTES, batch_size: int = 8) -> None:
        self.latency_s, self.nbytes = float(latency_ms) / 1000.0, int(nbytes)
        self.config = StandinConfig(batch_size=max(1, int(batch_size)))
        self.name = f"standin:{latency_ms:g}:{nbytes}"
        self.backbone = _Family(self.name)
        # one fixed payload (random-looking, so Parquet cannot compress it away like real bitstreams)
        seed = hashlib.sha256(self.name.encode()).digest()
        self.payload = (seed * (self.nbytes // len(seed) + 1))[: self.nbytes]
        self.payload = bytes(b ^ (i * 131 & 0xFF) for i, b in enumerate(self.payload))
        self.batches = 0

    def fingerprint(self) -> bytes:
        return hashlib.blake2b(f"standin|{self.latency_s}|{self.nbytes}".encode(), digest_size=8).digest()

    def encode(self, images: list, t: int | None = None, target_bpp: float | None = None, errors: str = "raise") -> list:
        """One sleep of the latency per `batch_size` images, then one bitstream per image."""
        n = len(images)
        if not n:
            return []
        nb = -(-n // self.config.batch_size)
        time.sleep(self.latency_s * nb)
        self.batches += nb
        out = []
        for im in images:
            px = getattr(im, "pixels", im)
            h, w = px.shape[:2]
            out.append(Encoded(self.payload, int(t or 0), int(w), int(h)))
        return out

    def decode(self, data: list, steps: int | None = None, errors: str = "raise") -> list:
        raise NotImplementedError("the stand-in codec only encodes (it measures the data path)")
