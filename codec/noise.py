"""Quantization as diffusion noise (paper, Sec. 3.2).

The forward diffusion at step t gives  x_t = √ᾱ_t · z + √(1 − ᾱ_t) · ε,  i.e.

    x_t / √ᾱ_t = z + √((1 − ᾱ_t) / ᾱ_t) · ε .

Uniform rounding with step Δ adds error e ~ U(−Δ/2, Δ/2) of variance Δ²/12. Choosing

    Δ_t² / 12 = (1 − ᾱ_t) / ᾱ_t        (eq. noise-matching)

makes the dequantized latent ẑ = z + e look like x_t / √ᾱ_t (uniform instead of Gaussian
noise of the same variance), so the decoder feeds the UNet  x_t = √ᾱ_t · ẑ  and denoises
from t down to 0.

Everything here is float64 on the CPU: Δ_t enters the bitstream implicitly (through t), so the
encoder and every decoder must compute exactly the same number.
"""
from __future__ import annotations

import math

import torch


def step_size(alphas_cumprod: torch.Tensor, t: int) -> float:
    """Latent-domain quantization step Δ_t = √(12 (1 − ᾱ_t) / ᾱ_t) for integer t ≥ 1."""
    if not 1 <= int(t) < len(alphas_cumprod):
        raise ValueError(f"t must be in [1, {len(alphas_cumprod) - 1}], got {t}")
    a = float(alphas_cumprod[int(t)])
    return math.sqrt(12.0 * (1.0 - a) / a)


def noise_variance(alphas_cumprod: torch.Tensor, t: int) -> float:
    """(1 − ᾱ_t) / ᾱ_t : the variance the quantization error must have at step t."""
    a = float(alphas_cumprod[int(t)])
    return (1.0 - a) / a


def alpha_bar_continuous(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) for real-valued t by linear interpolation between integer steps.

    Used in training so that t predicted by the estimator gets gradients.
    """
    ac = alphas_cumprod.to(t.device, torch.float32)
    t = t.clamp(0, len(ac) - 1)
    lo = t.floor().long().clamp(max=len(ac) - 2)
    w = t - lo.float()
    return ac[lo] * (1 - w) + ac[lo + 1] * w


def to_x_t(z_hat: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x_t = √ᾱ_t · ẑ : the dequantized latent as a diffusion sample at step t."""
    if isinstance(alpha_bar, torch.Tensor):
        alpha_bar = alpha_bar.to(z_hat.device, z_hat.dtype).view(-1, *([1] * (z_hat.dim() - 1)))
        return alpha_bar.sqrt() * z_hat
    return math.sqrt(alpha_bar) * z_hat
