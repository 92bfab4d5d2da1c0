"""`DiffusionCodec`: Figure 3 of the paper, encode and decode, batched.

Encode (one image):  RGB uint8 → pad to the backbone's multiple → VAE encode (scaled latent z)
→ γ and t (given, searched for a target bpp, or predicted by the estimator)
→ y = (z − shift) / (scale · Δ_t), ŷ = round(y) → entropy code (CPU, float64 → integers)
→ bitstream record.

Decode: parse + verify → entropy decode ŷ (+ symbol hash check) → ẑ = ŷ · scale · Δ_t + shift
→ x_t = √ᾱ_t ẑ → DDIM t → 0 (≤ steps UNet calls) → VAE decode → crop → RGB uint8.

This module knows nothing of Ray or storage: lists of arrays and bytes in, lists out.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import bitstream as bs
from .bitstream import Encoded  # noqa: F401 - re-exported: codec.Encoded
from . import limits
from .backbone import Backbone
from .denoise import denoise
from .entropy import ENTROPY_IDS, ENTROPY_MODELS, LEARNED_ENTROPY, Payload
from .estimator import ParameterEstimator
from .images import DEFAULT_MAX_PIXELS, LoadedImage
from .metrics import psnr  # noqa: F401  (one PSNR: codec.psnr is codec.metrics.psnr)
from .noise import step_size

PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_T = 100
DEFAULT_STEPS = 8
from .version import CODEC_VERSION  # noqa: E402 - re-exported
FINGERPRINT_FORMAT = 1  # hashed into the codec fingerprint; format version 2 records share it with v1


class CodecError(ValueError):
    """An encode/decode request that cannot be served; the message says what to do."""


@dataclass
class CodecConfig:
    """Encoder and decoder settings (plain data, stored in job manifests)."""

    entropy: str = "static"
    t: int | None = None  # fixed t; None: estimator if trained, else target_bpp, else DEFAULT_T
    target_bpp: float | None = None
    lam: float = 1.0  # rate trade-off fed to the estimator
    steps: int | None = None  # decoder DDIM budget; None: the backbone's default_steps, else DEFAULT_STEPS
    batch_size: int = 8
    # Network precision: auto (default: bfloat16 on a GPU, float32 on the CPU), float32, float64
    # ("exact") or bfloat16/float16. The entropy path is always float64 → integers on the CPU,
    # so symbols are bit-exact everywhere whatever runs the networks. Decoded *pixels* are
    # identical across batch compositions and thread counts only in float64 ("exact" mode):
    # float32 kernels differ by ~1e-6 between batch sizes, enough to flip a rare rounded pixel.
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS  # padded pixels per image, encode and decode (clamped to codec.limits)
    max_latent_tokens: int = limits.MAX_LATENT_TOKENS  # decode/encode: latent h x w (attention cost)
    decode_seconds: float = limits.DECODE_SECONDS  # wall-clock budget of one decode batch
    # Entropy coding in a side thread, overlapping the model's next batch (the bytes are the
    # same either way: the entropy path is per image and integer-exact).
    overlap_entropy: bool = True
    # Conv weights channels-last (faster on CPU and GPU). None: on, except in float64 ("exact")
    # mode, whose promise of identical pixels everywhere keeps the one plain layout.
    channels_last: bool | None = None
    extra: dict = field(default_factory=dict)


class DiffusionCodec:
    """The codec: a frozen `Backbone`, an entropy model and (optionally) a trained estimator."""

    def __init__(self, backbone: Backbone, entropy_model=None, estimator: ParameterEstimator | None = None,
                 config: CodecConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config or CodecConfig()
        auto = "bfloat16" if backbone.device.type == "cuda" else "float32"
        prec = {"exact": "float64", "auto": auto}.get(self.config.precision, self.config.precision)
        if prec not in PRECISIONS:
            raise CodecError(f"unknown precision '{prec}' (choose auto, exact, {', '.join(PRECISIONS)})")
        self.precision = prec
        backbone.to(backbone.device, PRECISIONS[prec])
        backbone.set_channels_last(self.config.channels_last if self.config.channels_last is not None else prec != "float64")
        if entropy_model is None:
            if self.config.entropy not in ENTROPY_MODELS:
                raise CodecError(f"unknown entropy model '{self.config.entropy}' (choose {', '.join(ENTROPY_MODELS)})")
            entropy_model = ENTROPY_MODELS[self.config.entropy](backbone.latent_channels)
        self.entropy = entropy_model.eval()
        self.entropy.update()
        if estimator is not None and prec == "float64":
            # exact mode promises the same bytes at any thread count: γ and t too, so a float64 copy
            # (the caller's module and the saved weights stay float32)
            estimator = copy.deepcopy(estimator).double()
        self.estimator = estimator.eval() if estimator is not None else None
        # t when none is given and no estimator chooses one; shipped weights carry the t they
        # were trained for (codec_config.json "default_t"), the static model uses DEFAULT_T.
        self.default_t = DEFAULT_T
        self._fp: bytes | None = None

    @property
    def decode_steps(self) -> int:
        """The DDIM budget `decode` uses when none is given: the config's, else the backbone's
        own (a one-step denoiser says 1), else `DEFAULT_STEPS`."""
        if self.config.steps is not None:
            return int(self.config.steps)
        return int(self.backbone.default_steps if self.backbone.default_steps is not None else DEFAULT_STEPS)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> bytes:
        """8 bytes naming everything the decoder needs besides the backbone: the entropy model's
        weights and its integer CDF tables, and the format version."""
        if self._fp is None:
            h = hashlib.blake2b(digest_size=8)
            h.update(f"fdc{FINGERPRINT_FORMAT}|{self.entropy.name}".encode())
            for name, tensor in sorted(self.entropy.state_dict().items()):
                if tensor.is_floating_point():
                    h.update(name.encode() + tensor.detach().float().cpu().numpy().astype("<f4").tobytes())
            h.update(self.entropy.tables_digest())
            self._fp = h.digest()
        return self._fp

    # ------------------------------------------------------------------ encode
    def encode(self, images: list, t: int | None = None, target_bpp: float | None = None,
               errors: str = "raise", keys: list[str] | None = None,
               source_sha256: list[str] | None = None) -> list:
        """Encode RGB uint8 arrays (H,W,3) or `LoadedImage`s; returns `Encoded` per image.

        With errors="return", a failing image yields its exception in place of an `Encoded`.
        `keys` / `source_sha256` (hex), one per image, bind each record to its dataset key and
        source bytes (format v2 tags, `bitstream.check_binding`); absent: unbound (zero tags).
        """
        t = t if t is not None else self.config.t
        target_bpp = target_bpp if target_bpp is not None else self.config.target_bpp
        items = [im if isinstance(im, LoadedImage) else LoadedImage(np.asarray(im)) for im in images]
        tags = [_tags(items, keys, "keys"), _tags(items, source_sha256, "source_sha256", lower=True)]
        out: list = [None] * len(items)

        def code(idx_group: list[int], z: torch.Tensor) -> None:
            for i, zi in zip(idx_group, z):
                try:
                    out[i] = self._encode_latent(zi, items[i], t, target_bpp, (tags[0][i], tags[1][i]))
                except Exception as e:  # one bad image fails alone
                    out[i] = e

        # Entropy coding (CPU) of one batch runs while the model encodes the next.
        with _side_thread(self.config.overlap_entropy) as pool:
            for f in [pool.submit(code, g, z) for g, z in self._latents(items, out)]:
                f.result()
        if errors == "raise":
            for r in out:
                if isinstance(r, Exception):
                    raise r
        return out

    def _latents(self, items: list[LoadedImage], out: list):
        """Yield (indices, latents) per bucket of equal padded size, in batches."""
        m = self.backbone.pad_multiple
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(items):
            px = it.pixels
            if px.ndim != 3 or px.shape[2] != 3 or px.dtype != np.uint8 or px.shape[0] < 1 or px.shape[1] < 1:
                out[i] = CodecError(f"expected an (H, W, 3) uint8 image, got {px.shape} {px.dtype}")
                continue
            try:  # before the VAE: padded pixels, the format's u16 latent sides, the decoder's token cap
                self.check_encode_size(px.shape[1], px.shape[0])
            except ValueError as e:
                out[i] = CodecError(str(e))
                continue
            key = (-(-px.shape[0] // m) * m, -(-px.shape[1] // m) * m)
            buckets.setdefault(key, []).append(i)
        bsz = max(1, self.config.batch_size)
        for (ph, pw), idxs in buckets.items():
            for s in range(0, len(idxs), bsz):
                group = idxs[s : s + bsz]
                x = torch.stack([_to_tensor(items[i].pixels, ph, pw) for i in group])
                yield group, self.backbone.encode(x).cpu()

    def check_encode_size(self, width: int, height: int) -> None:
        """Refuse (ValueError) an image this codec must not start encoding: over the padded pixel
        cap, a latent side the format cannot store, or more latent tokens than its decoder takes."""
        m, f = self.backbone.pad_multiple, 8  # the VAE downsamples 8x (bitstream.parse assumes it too)
        limits.check_encode_size(width, height, m, min(self.config.max_pixels, limits.ENCODE_MAX_PIXELS), f)
        tokens = (limits.padded(width, m) // f) * (limits.padded(height, m) // f)
        if tokens > self.config.max_latent_tokens:
            raise limits.DecodeBudgetError(
                f"image of {width}x{height} pixels has {tokens} latent positions, over the decoder's cap of "
                f"{self.config.max_latent_tokens} (CodecConfig.max_latent_tokens): its record could not be decoded")

    def _encode_latent(self, z: torch.Tensor, item: LoadedImage, t: int | None, target_bpp: float | None,
                       tags: tuple[bytes, bytes] = (bs.UNBOUND, bs.UNBOUND)) -> Encoded:
        shift, scale, t_pred = self._gamma(z)
        if t is None and target_bpp is None and t_pred is not None:
            t = t_pred
        if t is not None:
            return self._encode_at(z, item, int(t), shift, scale, tags)
        if target_bpp is None:
            return self._encode_at(z, item, self.default_t, shift, scale, tags)
        return self._search_t(z, item, float(target_bpp), shift, scale, tags)

    def _gamma(self, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int | None]:
        """γ = (shift, scale) per channel as float16 (as stored), and the estimator's t if any."""
        if self.estimator is not None:
            with torch.inference_mode():
                dtype = next(self.estimator.parameters()).dtype
                shift, scale, t = self.estimator(z[None].to(dtype), torch.tensor([self.config.lam], dtype=dtype))
            return (shift[0].numpy().astype(np.float16), scale[0].numpy().astype(np.float16),
                    int(round(float(t[0]))))
        shift = z.double().mean(dim=(1, 2)).numpy().astype(np.float16)
        return shift, np.ones_like(shift), None

    def _search_t(self, z, item, target: float, shift, scale, tags) -> Encoded:
        """Smallest-error t for a target bpp: bisection on t (rate falls as t grows)."""
        t_max = len(self.backbone.alphas_cumprod) - 1
        lo, hi = 1, t_max
        cache: dict[int, Encoded] = {}

        def at(t: int) -> Encoded:
            if t not in cache:
                cache[t] = self._encode_at(z, item, t, shift, scale, tags)
            return cache[t]

        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid).bpp > target:
                lo = mid + 1
            else:
                hi = mid
        best = min((at(c) for c in {max(1, lo - 1), lo, min(t_max, lo + 1)}), key=lambda e: abs(e.bpp - target))
        return best

    def quantize(self, z: torch.Tensor, t: int, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """ŷ = round((z − shift) / (scale · Δ_t)) as int32 (C, h, w)."""
        delta = step_size(self.backbone.alphas_cumprod, t)
        step = scale.astype(np.float64)[:, None, None] * delta
        y = (z.double().numpy() - shift.astype(np.float64)[:, None, None]) / step
        return np.clip(np.round(y), -(2**20), 2**20).astype(np.int32)

    def dequantize(self, y_hat: np.ndarray, t: int, shift: np.ndarray, scale: np.ndarray) -> torch.Tensor:
        """ẑ = ŷ · scale · Δ_t + shift (float64 arithmetic, float32 result)."""
        delta = step_size(self.backbone.alphas_cumprod, t)
        step = scale.astype(np.float64)[:, None, None] * delta
        return torch.from_numpy((y_hat.astype(np.float64) * step + shift.astype(np.float64)[:, None, None]).astype(np.float32))

    def _encode_at(self, z, item: LoadedImage, t: int, shift, scale,
                   tags: tuple[bytes, bytes] = (bs.UNBOUND, bs.UNBOUND)) -> Encoded:
        t = int(min(max(t, 1), len(self.backbone.alphas_cumprod) - 1))
        y_hat = self.quantize(z, t, shift, scale)
        payload = self.entropy.compress(y_hat)
        h, w = item.pixels.shape[:2]
        rec = bs.Record(
            flags=(bs.FLAG_GRAY if item.gray else 0) | (bs.FLAG_ALPHA if item.alpha else 0),
            entropy_id=self.entropy.model_id, backbone_fp=self.backbone.fingerprint(), codec_fp=self.fingerprint(),
            width=w, height=h, t=t, latent_h=y_hat.shape[1], latent_w=y_hat.shape[2],
            gamma=np.stack([shift, scale], axis=1).astype(np.float16), side=payload.side,
            strings=payload.strings, symbol_hash=bs.symbol_hash(y_hat), key_tag=tags[0], source_tag=tags[1],
        )
        data = bs.pack(rec)
        short = limits.min_record_bytes(w * h) - len(data)
        if short > 0:  # a near-uniform image under the decoder's plausibility floor: zero-pad the side info
            if len(rec.side) + short > 0xFFFF:
                raise CodecError(f"image of {w}x{h} codes to {len(data)} bytes, under the format's plausibility floor "
                                 f"of {limits.min_record_bytes(w * h)} bytes and beyond what padding can add")
            rec.side = rec.side + bytes(short)
            data = bs.pack(rec)
        return Encoded(data, t, w, h)

    # ------------------------------------------------------------------ decode
    def parse(self, data: bytes, key: str | None = None, source_sha256: str | None = None) -> bs.Record:
        """Parse and check that this codec can decode the record (fingerprints, model id, decode
        budgets: all on the header, before anything is allocated); with `key`/`source_sha256`,
        also that a v2 record is bound to them (`bitstream.check_binding`)."""
        rec = bs.parse(data, max_pixels=min(self.config.max_pixels, limits.DECODE_MAX_PIXELS))
        bs.check_binding(rec, key, source_sha256)
        if rec.backbone_fp != self.backbone.fingerprint():
            raise CodecError(
                f"bitstream was made with another backbone (fingerprint {rec.backbone_fp.hex()}, this decoder has "
                f"{self.backbone.fingerprint().hex()}): decode with the same --backbone/--vae as the encoder"
            )
        if rec.entropy_id != self.entropy.model_id:
            want = ENTROPY_IDS.get(rec.entropy_id, f"unknown id {rec.entropy_id}")
            raise CodecError(f"bitstream uses the '{want}' entropy model; this decoder has '{self.entropy.name}' (pass --entropy {want})")
        if rec.codec_fp != self.fingerprint():
            raise CodecError(
                f"bitstream was made with other codec weights (fingerprint {rec.codec_fp.hex()}, this decoder has "
                f"{self.fingerprint().hex()}): pass the same --codec-weights as the encoder"
            )
        if rec.channels != self.backbone.latent_channels:
            raise CodecError(f"bitstream has {rec.channels} latent channels, the backbone {self.backbone.latent_channels}")
        if rec.t >= len(self.backbone.alphas_cumprod):
            raise bs.BitstreamError(f"bitstream has t = {rec.t}, beyond the schedule of {len(self.backbone.alphas_cumprod)} steps")
        m = self.backbone.pad_multiple  # this encoder pads to m: the latent size follows from the image size
        if (rec.latent_h * 8, rec.latent_w * 8) != (limits.padded(rec.height, m), limits.padded(rec.width, m)):
            raise bs.BitstreamError(f"latent size {rec.latent_h}x{rec.latent_w} is not that of a {rec.width}x{rec.height} "
                                    f"image padded to multiples of {m}")
        tokens = rec.latent_h * rec.latent_w
        if tokens > self.config.max_latent_tokens:
            raise limits.DecodeBudgetError(
                f"bitstream declares a {rec.latent_h}x{rec.latent_w} latent ({tokens} positions), over the decode cap of "
                f"{self.config.max_latent_tokens} (CodecConfig.max_latent_tokens; attention cost is quadratic in it)")
        if ENTROPY_IDS[rec.entropy_id] in LEARNED_ENTROPY and tokens > limits.MAX_HS_POSITIONS:
            raise limits.DecodeBudgetError(f"hyperprior record with {tokens} latent positions, over the h_s cap of "
                                           f"{limits.MAX_HS_POSITIONS} (codec.limits.MAX_HS_POSITIONS)")
        return rec

    def decode_latent(self, rec: bs.Record, deadline: float | None = None) -> torch.Tensor:
        """Entropy-decode and dequantize one parsed record to ẑ (C, h, w); checks the symbol hash."""
        shape = (rec.channels, rec.latent_h, rec.latent_w)
        try:
            y_hat = self.entropy.decompress(Payload(rec.strings, rec.side), shape, deadline=deadline)
        except (bs.BitstreamError, limits.DecodeBudgetError):
            raise
        except Exception as e:
            raise bs.BitstreamError(f"entropy decoding failed: {e}") from None
        if bs.symbol_hash(y_hat) != rec.symbol_hash:
            raise bs.BitstreamError("decoded symbols do not match the record's symbol hash (corrupt or hostile record)")
        gamma = rec.gamma.astype(np.float16)
        return self.dequantize(y_hat, rec.t, gamma[:, 0], gamma[:, 1])

    def decode(self, records: list[bytes], steps: int | None = None, errors: str = "raise",
               keys: list[str] | None = None, source_sha256: list[str] | None = None) -> list:
        """Decode records to RGB uint8 arrays (H, W, 3) at their original size.

        `steps` is the DDIM budget (0 = no denoising). With errors="return", a failing record
        yields its exception in its place. `keys`/`source_sha256`: check each v2 record's binding.
        Each batch has `config.decode_seconds` of wall clock (checked in the range decoder and
        between UNet calls); past it its records fail with `DecodeBudgetError`.
        """
        steps = self.decode_steps if steps is None else int(steps)
        out: list = [None] * len(records)
        groups: dict[tuple[int, int, int], list[tuple[int, bs.Record]]] = {}
        for i, data in enumerate(records):
            try:
                rec = self.parse(data, keys[i] if keys else None, source_sha256[i] if source_sha256 else None)
                groups.setdefault((rec.latent_h, rec.latent_w, min(steps, rec.t)), []).append((i, rec))
            except Exception as e:
                out[i] = e
        bsz = max(1, self.config.batch_size)
        batches = [(k, group[s : s + bsz]) for (_, _, k), group in groups.items() for s in range(0, len(group), bsz)]

        def latents(part: list[tuple[int, bs.Record]]) -> list[tuple[int, bs.Record, torch.Tensor]]:
            ok = []
            for i, rec in part:
                try:
                    ok.append((i, rec, self.decode_latent(rec, time.monotonic() + self.config.decode_seconds)))
                except Exception as e:  # one bad record fails alone
                    out[i] = e
            return ok

        # Entropy decoding (CPU) of the next batch runs while the model denoises this one.
        with _side_thread(self.config.overlap_entropy) as pool:
            for k, fut in [(k, pool.submit(latents, part)) for k, part in batches]:
                part = fut.result()
                if not part:
                    continue
                z = torch.stack([g[2] for g in part])
                ts = torch.tensor([g[1].t for g in part], dtype=torch.long)
                try:
                    timed = DeadlineBackbone(self.backbone, time.monotonic() + self.config.decode_seconds)
                    x0 = denoise(timed, z.to(self.backbone.device, self.backbone.dtype), ts, k)
                    timed.check()
                    imgs = self.backbone.decode(x0).cpu()
                except limits.DecodeBudgetError as e:
                    for i, _, _ in part:
                        out[i] = e
                    continue
                for (i, rec, _), img in zip(part, imgs):
                    out[i] = _to_uint8(img[:, : rec.height, : rec.width])
        if errors == "raise":
            for r in out:
                if isinstance(r, Exception):
                    raise r
        return out

    # ------------------------------------------------------------------ weights
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Entropy model (+ estimator) as safetensors + JSON config with the backbone fingerprint."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ent = {k: v.detach().cpu().contiguous() for k, v in self.entropy.state_dict().items() if v.is_floating_point()}
        save_file(ent, str(out / "entropy.safetensors"))
        cfg = {"format": 1, "entropy": self.entropy.name, "channels": self.backbone.latent_channels,
               "hidden": getattr(self.entropy, "hidden", None), "z_channels": getattr(self.entropy, "z_channels", None),
               "backbone_fingerprint": self.backbone.fingerprint().hex(),
               "codec_fingerprint": self.fingerprint().hex(), "lam": self.config.lam, "default_t": self.default_t}
        if self.estimator is not None:
            save_file({k: v.detach().cpu().float().contiguous() for k, v in self.estimator.state_dict().items()},
                      str(out / "estimator.safetensors"))
            cfg["estimator_hidden"] = self.estimator.features[0].out_channels
        (out / "codec_config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, backbone: Backbone, config: CodecConfig | None = None) -> "DiffusionCodec":
        """Load a folder written by `save_pretrained`; CDF tables are rebuilt with `update()`."""
        from safetensors.torch import load_file

        d = Path(weights_dir)
        cfg_path = d / "codec_config.json"
        if not cfg_path.is_file():
            raise CodecError(f"no codec weights at '{d}' (expected codec_config.json and entropy.safetensors from `fcodec train`)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("backbone_fingerprint") != backbone.fingerprint().hex():
            raise CodecError(
                f"codec weights in '{d}' were trained for backbone {cfg.get('backbone_fingerprint')}, "
                f"not {backbone.fingerprint().hex()} ({backbone.name}): use the same --backbone/--vae as in training"
            )
        name = cfg["entropy"]
        learned = name in LEARNED_ENTROPY
        kwargs = {"hidden": cfg["hidden"]} if learned and cfg.get("hidden") else {}
        if learned and cfg.get("z_channels"):
            kwargs["z_channels"] = cfg["z_channels"]
        ent = ENTROPY_MODELS[name](cfg.get("channels", backbone.latent_channels), **kwargs)
        missing = ent.load_state_dict(load_file(str(d / "entropy.safetensors")), strict=False)
        if [k for k in missing.missing_keys if "quantized_cdf" not in k and "offset" not in k and "cdf_length" not in k]:
            raise CodecError(f"codec weights in '{d}' miss tensors: {missing.missing_keys[:5]}")
        est = None
        if (d / "estimator.safetensors").is_file():
            est = ParameterEstimator(backbone.latent_channels, cfg.get("estimator_hidden", 32))
            est.load_state_dict(load_file(str(d / "estimator.safetensors")))
        config = config or CodecConfig()
        config.entropy = name
        if "lam" in cfg and config.lam == CodecConfig.lam:
            config.lam = float(cfg["lam"])
        codec = cls(backbone, ent, est, config)
        codec.default_t = int(cfg.get("default_t") or DEFAULT_T)
        return codec

    # ------------------------------------------------------------------ public stages
    # Thin public names for encode's and decode's stages, so tools (codec.profiling) can time
    # them one by one without reaching for private helpers. `encode`/`decode` are unchanged.
    def to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) images of one size -> the VAE's input: (B, 3, ph, pw) in [-1, 1],
        edge-padded to the backbone's multiple, as `encode` builds it."""
        m = self.backbone.pad_multiple
        h, w = images[0].shape[:2]
        ph, pw = -(-h // m) * m, -(-w // m) * m
        return torch.stack([_to_tensor(np.asarray(im), ph, pw) for im in images])

    def gamma(self, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int | None]:
        """γ = (shift, scale) of one latent (C, h, w) as stored (float16), and the estimator's t (None untrained)."""
        return self._gamma(z)

    def encode_at(self, z: torch.Tensor, image, t: int, shift: np.ndarray, scale: np.ndarray) -> Encoded:
        """One latent at a given t and γ -> its record: quantize, entropy code and pack."""
        item = image if isinstance(image, LoadedImage) else LoadedImage(np.asarray(image))
        return self._encode_at(z, item, t, shift, scale)

    @staticmethod
    def to_pixels(img: torch.Tensor) -> np.ndarray:
        """A decoded (3, H, W) tensor in [-1, 1] -> uint8 (H, W, 3), rounded as `decode` does."""
        return _to_uint8(img)


class DeadlineBackbone:
    """The backbone as `denoise` sees it, with a wall-clock check before every UNet call."""

    def __init__(self, backbone: Backbone, deadline: float) -> None:
        self._bb, self._deadline = backbone, deadline
        self.alphas_cumprod, self.prediction_type = backbone.alphas_cumprod, backbone.prediction_type

    def check(self) -> None:
        if time.monotonic() > self._deadline:
            raise limits.DecodeBudgetError("decoding ran past its time budget (CodecConfig.decode_seconds)")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check()
        return self._bb.predict(x_t, t)


def _tags(items: list, values: list[str] | None, name: str, lower: bool = False) -> list[bytes]:
    """One binding tag per image (zeros when `values` is None)."""
    if values is None:
        return [bs.UNBOUND] * len(items)
    if len(values) != len(items):
        raise CodecError(f"{name} has {len(values)} entries for {len(items)} images")
    return [bs.binding_tag(v.lower() if lower else v) if v is not None else bs.UNBOUND for v in values]


class _Inline:
    """The executor interface, run on the calling thread (overlap_entropy=False)."""

    def submit(self, fn, *args):
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # surfaced by result(), as a pool would
            f.set_exception(e)
        return f


@contextmanager
def _side_thread(enabled: bool):
    """One worker thread for CPU entropy work (torch and numpy release the GIL while the model
    runs), or inline execution when disabled."""
    if not enabled:
        yield _Inline()
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fcodec-entropy") as pool:
        yield pool


def _to_tensor(px: np.ndarray, ph: int, pw: int) -> torch.Tensor:
    """uint8 (H,W,3) -> [-1,1] (3,ph,pw), edge-padded (replicated borders cost fewer bits)."""
    h, w = px.shape[:2]
    padded = np.pad(px, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    return torch.from_numpy(padded).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
