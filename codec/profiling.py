"""Where the codec's time goes: per-stage wall time per megapixel, measured side by side.

Stages follow the data flow: VAE encode, estimator (if trained), quantize + entropy encode +
pack, parse + entropy decode, each UNet step, VAE decode. Used by `fcodec bench`; tests only
check the structure, never the timings.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from . import bitstream as bs
from .denoise import ddim_schedule
from .model import DiffusionCodec, _to_tensor
from .noise import to_x_t


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    @contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def stage_breakdown(codec: DiffusionCodec, images: list[np.ndarray], t: int = 100, steps: int = 4,
                    repeats: int = 1) -> dict:
    """Seconds per megapixel for each stage over `images` (batch of one size, one batch).

    Returns {"megapixels", "stages": {name: s/MP}, "entropy_share": fraction of encode+decode
    time spent in entropy coding and bitstream handling}.
    """
    bb = codec.backbone
    h, w = images[0].shape[:2]
    m = bb.pad_multiple
    ph, pw = -(-h // m) * m, -(-w // m) * m
    x = torch.stack([_to_tensor(im, ph, pw) for im in images])
    mp = len(images) * h * w / 1e6 * repeats
    clock = _Clock(bb.device)
    with torch.inference_mode():
        for _ in range(repeats):
            with clock.stage("vae_encode"):
                z = bb.encode(x).cpu()
            gammas = []
            with clock.stage("estimator"):
                for zi in z:
                    gammas.append(codec._gamma(zi))
            records = []
            with clock.stage("entropy_encode"):
                for zi, (shift, scale, _), im in zip(z, gammas, images):
                    from .images import LoadedImage

                    records.append(codec._encode_at(zi, LoadedImage(im), t, shift, scale).data)
            with clock.stage("entropy_decode"):
                z_hat = torch.stack([codec.decode_latent(codec.parse(r)) for r in records])
            ts = torch.full((len(images),), t, dtype=torch.long)
            sched = ddim_schedule(ts, steps)
            xt = to_x_t(z_hat.to(bb.device, bb.dtype), bb.alphas_cumprod[ts])
            for i in range(sched.shape[0]):
                with clock.stage(f"unet_step_{i + 1}"):
                    bb.predict(xt, sched[i])
            with clock.stage("vae_decode"):
                bb.decode(z_hat.to(bb.device, bb.dtype))
    stages = {k: v / mp for k, v in clock.totals.items()}
    if codec.estimator is None:
        stages.pop("estimator", None)
    total = sum(stages.values())
    entropy = stages["entropy_encode"] + stages["entropy_decode"]
    return {"megapixels": mp, "image_size": [h, w], "batch": len(images), "t": t, "steps": int(sched.shape[0]),
            "stages_s_per_mp": stages, "total_s_per_mp": total, "entropy_share": entropy / total,
            "bytes_per_image": float(np.mean([len(r) for r in records])),
            "header_bytes": bs._FIXED.size + 4 * bb.latent_channels + 2 + 1 + 8 + 4}
