"""Baseline codecs behind `DiffusionCodec`'s interface, so the pipeline and the audit run them
unchanged: `encode(images, t=None, target_bpp=None, errors=...) -> list[Encoded]`,
`decode(list[bytes], steps=None, errors=...) -> list[uint8 arrays]`, `fingerprint() -> 8 bytes`.

* `PillowCodec`: JPEG, WebP and AVIF through Pillow at a quality setting; the bitstream is the
  standard file itself. `Encoded.t` holds the quality used (the search result for a target bpp).
* `JpegXLCodec`: JPEG XL (libjxl through imagecodecs) the same way; Pillow has no JPEG XL.
* `CompressAICodec`: CompressAI zoo models, only when their weights are on disk (never fetched).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import numpy as np

from .images import LoadedImage
from .model import CodecConfig, CodecError, Encoded

PILLOW_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
# quality sweeps used by `fcodec compare` when none is given (low to high rate)
DEFAULT_QUALITIES = {"jpeg": [10, 25, 50, 75, 90], "webp": [10, 25, 50, 75, 90], "avif": [10, 25, 50, 70, 85],
                     "jxl": [1, 10, 25, 50, 75]}
DEFAULT_COMPRESSAI_QUALITIES = [1, 2, 3, 4, 5, 6]  # CompressAI zoo quality indices, any compressai:ARCH


class Family:
    """Stands where `DiffusionCodec.backbone` stands, so pipeline code that records
    `codec.backbone.fingerprint()` + `codec.fingerprint()` runs baselines unchanged."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fingerprint(self) -> bytes:
        return hashlib.blake2b(f"baseline|{self.name}".encode(), digest_size=8).digest()


def _pixels(im) -> np.ndarray:
    px = im.pixels if isinstance(im, LoadedImage) else np.asarray(im)
    if px.ndim != 3 or px.shape[2] != 3 or px.dtype != np.uint8 or min(px.shape[:2]) < 1:
        raise CodecError(f"expected an (H, W, 3) uint8 image, got {px.shape} {px.dtype}")
    return px


def _per_item(fn, items, errors: str) -> list:
    """Run fn per item; with errors='return' a failure stands in place of its result."""
    out = []
    for it in items:
        try:
            out.append(fn(it))
        except Exception as e:  # one bad image fails alone
            if errors == "raise":
                raise
            out.append(e)
    return out


class PillowCodec:
    """JPEG / WebP / AVIF at one quality (1..100), or searched per image for a target bpp."""

    def __init__(self, fmt: str, quality: int = 75, config: CodecConfig | None = None) -> None:
        from PIL import features

        fmt = fmt.lower()
        if fmt not in PILLOW_FORMATS:
            raise CodecError(f"unknown Pillow codec '{fmt}' (choose {', '.join(PILLOW_FORMATS)})")
        if fmt != "jpeg" and not features.check(fmt):
            raise CodecError(f"this Pillow build has no {fmt.upper()} support (pip install 'pillow>=11.3' with {fmt})")
        self.fmt, self.quality = fmt, int(quality)
        self.config = config or CodecConfig()
        self.name = fmt
        self.backbone = Family(f"pillow-{fmt}")

    @property
    def setting(self) -> str:
        return f"q{self.quality}"

    def fingerprint(self) -> bytes:
        """8 bytes naming the format, quality and encoder library version."""
        import PIL
        from PIL import features

        lib = features.version({"jpeg": "jpg"}.get(self.fmt, self.fmt)) or ""
        return hashlib.blake2b(f"pillow|{self.fmt}|{self.quality}|{PIL.__version__}|{lib}".encode(), digest_size=8).digest()

    def _encode_q(self, px: np.ndarray, q: int) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        kw = {"quality": int(q)}
        if self.fmt == "jpeg":
            kw.update(subsampling=2, optimize=True)  # 4:2:0 like libjpeg's default, Huffman optimized
        elif self.fmt == "webp":
            kw.update(method=4)
        else:
            kw.update(speed=6, subsampling="4:2:0")
        Image.fromarray(px).save(buf, format=PILLOW_FORMATS[self.fmt], **kw)
        return buf.getvalue()

    def _encode_one(self, im, target_bpp: float | None, quality: int) -> Encoded:
        px = _pixels(im)
        h, w = px.shape[:2]
        if target_bpp is None:
            return Encoded(self._encode_q(px, quality), quality, w, h)
        # bisection on quality: the highest quality whose rate stays within the target
        lo, hi, best = 1, 100, None
        while lo <= hi:
            mid = (lo + hi) // 2
            e = Encoded(self._encode_q(px, mid), mid, w, h)
            if e.bpp <= target_bpp:
                best, lo = e, mid + 1
            else:
                hi = mid - 1
        return best or Encoded(self._encode_q(px, 1), 1, w, h)

    def encode(self, images: list, t: int | None = None, target_bpp: float | None = None, errors: str = "raise") -> list:
        """Encode uint8 (H,W,3) arrays or `LoadedImage`s; `t` (if given) overrides the quality."""
        quality = self.quality if t is None else int(t)
        target_bpp = target_bpp if target_bpp is not None else self.config.target_bpp
        return _per_item(lambda im: self._encode_one(im, target_bpp, quality), images, errors)

    def _decode_one(self, data: bytes) -> np.ndarray:
        from PIL import Image

        try:
            im = Image.open(io.BytesIO(bytes(data)))
            im.load()
        except Exception as e:
            raise CodecError(f"not a readable {self.fmt.upper()} bitstream ({type(e).__name__}: {e})") from None
        if im.format != PILLOW_FORMATS[self.fmt]:
            raise CodecError(f"bitstream is {im.format}, this decoder is {self.fmt.upper()}")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def decode(self, records: list, steps: int | None = None, errors: str = "raise") -> list:
        """Decode bitstreams to uint8 (H,W,3) arrays (`steps` is accepted and ignored)."""
        return _per_item(self._decode_one, records, errors)


class JpegXLCodec(PillowCodec):
    """JPEG XL through imagecodecs (libjxl), quality 1..100 mapped by libjxl to a distance; the
    bitstream is a bare JPEG XL codestream. Encoder effort 7 (libjxl's default)."""

    EFFORT = 7

    def __init__(self, quality: int = 75, config: CodecConfig | None = None) -> None:
        try:
            import imagecodecs
        except ImportError:
            raise CodecError("JPEG XL needs imagecodecs (pip install 'imagecodecs==2024.12.30')") from None
        if not imagecodecs.JPEGXL.available:
            raise CodecError("this imagecodecs build has no JPEG XL codec")
        self.fmt, self.quality = "jxl", int(quality)
        self.config = config or CodecConfig()
        self.name = "jxl"
        self.backbone = Family("imagecodecs-jxl")

    def fingerprint(self) -> bytes:
        import imagecodecs

        return hashlib.blake2b(f"jxl|{self.quality}|{self.EFFORT}|{imagecodecs.jpegxl_version()}".encode(),
                               digest_size=8).digest()

    def _encode_q(self, px: np.ndarray, q: int) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(px), level=int(q), effort=self.EFFORT))

    def _decode_one(self, data: bytes) -> np.ndarray:
        import imagecodecs

        try:
            px = imagecodecs.jpegxl_decode(bytes(data))
        except Exception as e:
            raise CodecError(f"not a readable JPEG XL bitstream ({type(e).__name__}: {e})") from None
        if px.ndim == 2:
            px = np.repeat(px[..., None], 3, axis=2)
        return np.ascontiguousarray(px[..., :3], dtype=np.uint8)


# ---------------------------------------------------------------------------- CompressAI
_CAI_MAGIC = b"CAI1"


def compressai_weights_path(arch: str, quality: int, metric: str = "mse", weights_dir: str | None = None) -> Path:
    """Where a zoo checkpoint is looked for: `weights_dir`, $FCODEC_COMPRESSAI_WEIGHTS, else the
    torch hub cache (`$TORCH_HOME/hub/checkpoints`), under the zoo's own file name."""
    import torch
    from compressai.zoo.image import model_urls

    try:
        url = model_urls[arch][metric][quality]
    except KeyError:
        raise CodecError(f"CompressAI zoo has no {arch} / {metric} / quality {quality}") from None
    d = weights_dir or os.environ.get("FCODEC_COMPRESSAI_WEIGHTS") or str(Path(torch.hub.get_dir()) / "checkpoints")
    return Path(d) / url.rsplit("/", 1)[1]


class CompressAICodec:
    """A CompressAI zoo model (e.g. bmshj2018-factorized, mbt2018-mean) from local weights only."""

    def __init__(self, arch: str = "bmshj2018-factorized", quality: int = 4, metric: str = "mse",
                 weights_dir: str | None = None, config: CodecConfig | None = None) -> None:
        import torch
        from compressai.zoo.image import model_architectures
        from compressai.zoo.pretrained import load_pretrained

        path = compressai_weights_path(arch, quality, metric, weights_dir)
        if not path.is_file():
            raise CodecError(f"CompressAI weights not found at {path}: put the zoo checkpoint there or set "
                             "FCODEC_COMPRESSAI_WEIGHTS=DIR (never downloaded)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = load_pretrained(state.get("state_dict", state))
        self.net = model_architectures[arch].from_state_dict(state).eval()
        self.net.update(force=True)
        self.arch, self.quality, self.metric = arch, int(quality), metric
        self.config = config or CodecConfig()
        self.name = f"compressai-{arch}"
        self.backbone = Family(f"compressai-{arch}-{metric}")
        h = hashlib.blake2b(f"compressai|{arch}|{metric}|{quality}".encode(), digest_size=8)
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().numpy().tobytes())
        self._fp = h.digest()

    @property
    def setting(self) -> str:
        return f"q{self.quality}"

    def fingerprint(self) -> bytes:
        return self._fp

    def _encode_one(self, im) -> Encoded:
        import torch

        px = _pixels(im)
        h, w = px.shape[:2]
        ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
        x = torch.from_numpy(np.pad(px, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            out = self.net.compress(x)
        strings = [s[0] for s in out["strings"]]
        sh = tuple(int(v) for v in out["shape"])
        head = _CAI_MAGIC + struct.pack("<IIHHB", w, h, sh[0], sh[1], len(strings))
        body = b"".join(struct.pack("<I", len(s)) + s for s in strings)
        return Encoded(head + body, self.quality, w, h)

    def encode(self, images: list, t: int | None = None, target_bpp: float | None = None, errors: str = "raise") -> list:
        """Encode images at this model's quality (one model per quality: no t / target_bpp)."""
        if t is not None or target_bpp is not None:
            raise CodecError("CompressAI models have one rate per checkpoint: pick another --quality instead of t/target_bpp")
        return _per_item(self._encode_one, images, errors)

    def _decode_one(self, data: bytes) -> np.ndarray:
        import torch

        data = bytes(data)
        if data[:4] != _CAI_MAGIC or len(data) < 17:
            raise CodecError("not a CompressAI baseline bitstream")
        w, h, sh0, sh1, n = struct.unpack_from("<IIHHB", data, 4)
        pos, strings = 17, []
        for _ in range(n):
            (ln,) = struct.unpack_from("<I", data, pos)
            strings.append([data[pos + 4 : pos + 4 + ln]])
            pos += 4 + ln
        with torch.inference_mode():
            x = self.net.decompress(strings, (sh0, sh1))["x_hat"][0, :, :h, :w]
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def decode(self, records: list, steps: int | None = None, errors: str = "raise") -> list:
        return _per_item(self._decode_one, records, errors)


def make_baseline(name: str, quality: int, config: CodecConfig | None = None, weights_dir: str | None = None):
    """`jpeg`, `webp`, `avif`, `jxl` or `compressai:ARCH[:METRIC]` at one quality."""
    if name in PILLOW_FORMATS:
        return PillowCodec(name, quality, config)
    if name == "jxl":
        return JpegXLCodec(quality, config)
    if name.startswith("compressai"):
        parts = name.split(":")
        arch = parts[1] if len(parts) > 1 else "bmshj2018-factorized"
        metric = parts[2] if len(parts) > 2 else "mse"
        return CompressAICodec(arch, quality, metric, weights_dir, config)
    raise CodecError(f"unknown baseline '{name}' (choose jpeg, webp, avif, jxl or compressai:ARCH)")
