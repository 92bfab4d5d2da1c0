"""Deterministic DDIM from t down to 0 with a step budget (paper, Sec. 3.3).

The decoder holds x_t = √ᾱ_t · ẑ and runs only the last t steps of the reverse process,
with at most `steps` UNet calls (DDIM, η = 0, so no randomness):

    x̂₀ = (x_τ − √(1−ᾱ_τ) ε̂) / √ᾱ_τ                  (ε-prediction)
    x̂₀ = √ᾱ_τ x_τ − √(1−ᾱ_τ) v̂,  ε̂ = √(1−ᾱ_τ) x_τ + √ᾱ_τ v̂   (v-prediction, SD 2.1)
    x_τ' = √ᾱ_τ' x̂₀ + √(1−ᾱ_τ') ε̂                   (τ' < τ; the last step returns x̂₀)

The K visited steps are τ_i = round(t (K − i) / K), i = 0..K−1, which are distinct because
K ≤ t. Every image of a batch may have its own t; all share K.
"""
from __future__ import annotations

import torch

from .noise import to_x_t


def ddim_schedule(t: torch.Tensor, steps: int) -> torch.Tensor:
    """(K, B) integer timesteps visited for per-image start steps t (B,), K = min(steps, min t)."""
    k = int(min(steps, int(t.min())))
    i = torch.arange(k, dtype=torch.float64)[:, None]
    return torch.floor(t.double()[None] * (k - i) / k + 0.5).long()


def denoise(backbone, z_hat: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
    """Run ≤ `steps` DDIM steps from x_t = √ᾱ_t ẑ to a clean latent estimate x̂₀.

    Args:
        backbone: a `Backbone` (UNet, ᾱ schedule, prediction type).
        z_hat: dequantized latents (B, C, h, w), scaled latent units.
        t: (B,) integer start steps.
        steps: UNet call budget; 0 returns ẑ unchanged (no denoising).
    """
    if steps <= 0:
        return z_hat
    ac = backbone.alphas_cumprod
    sched = ddim_schedule(t.cpu(), steps)
    x = to_x_t(z_hat, ac[t.cpu()])
    for i in range(sched.shape[0]):
        tau = sched[i]
        a = ac[tau].to(x.device, x.dtype).view(-1, 1, 1, 1)
        out = backbone.predict(x, tau)
        if backbone.prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x + a.sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if i + 1 == sched.shape[0]:
            return x0
        a_next = ac[sched[i + 1]].to(x.device, x.dtype).view(-1, 1, 1, 1)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
