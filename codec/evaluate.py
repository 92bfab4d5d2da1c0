"""Held-out numbers measured with the real codec: a backbone's VAE round trip, the denoising gain
over `--steps 0` at several t and the default rate (`evaluate`), and the real bytes of several
entropy models on the same latents at equal t (`rate_study`). RD curves against other codecs
are `fcodec compare`'s job."""
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
        res["default"] = {"t": enc[0].t, "steps": codec.decode_steps,
                          "bpp": float(np.mean([e.bpp for e in enc])),
                          "bpp_min": float(min(e.bpp for e in enc)), "bpp_max": float(max(e.bpp for e in enc)),
                          "psnr": float(np.mean([psnr(a, b) for a, b in zip(images, dec)]))}
        res["sizes_ok"] = all(d.shape == a.shape for a, d in zip(images, dec))
    return res


def step_sizes(ts: tuple[int, ...] = (50, 100, 200)) -> dict[int, float]:
    """Δ_t of SD's schedule at the given t (for reports)."""
    ac = sd_alphas_cumprod()
    return {t: step_size(ac, t) for t in ts}


def rate_study(codecs: dict, images: list[np.ndarray], ts: tuple[int, ...]) -> dict:
    """Real record bytes of each codec (same backbone, e.g. static vs hyperprior) on the same
    latents and γ at each t: {name: {t: mean bpp}} plus {"saving": {name: {t: 1 − bpp/first's bpp}}}.

    Each image is VAE-encoded once (the first codec's backbone); with equal γ and t the quantized
    symbols are the same for every codec, so only the entropy coding differs."""
    import torch

    first = next(iter(codecs.values()))
    out: dict = {name: {t: [] for t in ts} for name in codecs}
    for im in images:
        with torch.inference_mode():
            z = first.backbone.encode(first.to_tensor([im]))[0].float()
        shift, scale, _ = first.gamma(z)
        for name, codec in codecs.items():
            for t in ts:
                out[name][t].append(codec.encode_at(z, im, t, shift, scale).bpp)
    res = {name: {t: float(np.mean(v)) for t, v in per_t.items()} for name, per_t in out.items()}
    base = next(iter(res))
    res["saving"] = {name: {t: 1.0 - res[name][t] / res[base][t] for t in ts} for name in codecs if name != base}
    return res
