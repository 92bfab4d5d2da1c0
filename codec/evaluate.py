"""The nano backbone's held-out numbers, measured with the real codec (static entropy): the
VAE round trip, the denoising gain over `--steps 0` at several t, and the default rate."""
from __future__ import annotations

import numpy as np

from .backbone import Backbone, sd_alphas_cumprod
from .metrics import psnr
from .model import CodecConfig, DiffusionCodec
from .noise import step_size
from .pixels import pad_to_multiple


def evaluate(backbone: Backbone, images: list[np.ndarray], ts: tuple[int, ...] = (50, 100, 200),
             steps: tuple[int, ...] = (0, 4), default_t: bool = True) -> dict:
    """The issue's numbers on a list of RGB images, through the real codec (static entropy).

    Returns {"vae_psnr": mean PSNR of the unquantized round trip, "per_t": {t: {"bpp": ...,
    "psnr_steps{k}": ...}}, "default": {...} (codec defaults), "sizes_ok": bool}.
    """
    codec = DiffusionCodec(backbone, config=CodecConfig())
    rt = []
    for im in images:
        x = pad_to_multiple(im, 64)[None]
        y = backbone.decode(backbone.encode(x))[0]
        rt.append(psnr(im, codec.to_pixels(y[:, : im.shape[0], : im.shape[1]])))
    res: dict = {"vae_psnr": float(np.mean(rt)), "vae_psnr_each": [round(v, 3) for v in rt], "per_t": {}}
    for t in ts:
        enc = codec.encode(images, t=t)
        row = {"bpp": float(np.mean([e.bpp for e in enc]))}
        for k in steps:
            dec = codec.decode([e.data for e in enc], steps=k)
            row[f"psnr_steps{k}"] = float(np.mean([psnr(a, b) for a, b in zip(images, dec)]))
        res["per_t"][t] = row
    if default_t:
        enc = codec.encode(images)
        dec = codec.decode([e.data for e in enc])
        res["default"] = {"t": enc[0].t, "steps": codec.config.steps,
                          "bpp": float(np.mean([e.bpp for e in enc])),
                          "bpp_min": float(min(e.bpp for e in enc)), "bpp_max": float(max(e.bpp for e in enc)),
                          "psnr": float(np.mean([psnr(a, b) for a, b in zip(images, dec)]))}
        res["sizes_ok"] = all(d.shape == a.shape for a, d in zip(images, dec))
    return res


def step_sizes(ts: tuple[int, ...] = (50, 100, 200)) -> dict[int, float]:
    """Δ_t of SD's schedule at the given t (for reports)."""
    ac = sd_alphas_cumprod()
    return {t: step_size(ac, t) for t in ts}
