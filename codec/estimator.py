"""The parameter estimator: γ (per-channel shift and scale) and t from the latent and λ.

One model covers a range of rates: the rate–distortion trade-off λ enters as log λ, so the
network learns which noise level t (hence which rate) suits an image at that λ. Until trained
weights exist the codec does not call it: t is given (`--t`) or searched (`--target-bpp`), and
γ falls back to (channel mean, 1).
"""
from __future__ import annotations

import torch
from torch import nn

T_MIN, T_MAX = 1.0, 400.0  # the low-noise end of SD's 1000-step schedule that the codec uses


class ParameterEstimator(nn.Module):
    """Small CNN + MLP: (z, λ) -> (shift (B,C), scale (B,C), t (B,) real-valued in [T_MIN, T_MAX])."""

    def __init__(self, channels: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.features = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Linear(hidden + 2 * channels + 1, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels + 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, z: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = z.mean(dim=(2, 3))
        std = z.std(dim=(2, 3)) if z.shape[-1] * z.shape[-2] > 1 else torch.ones_like(mean)
        f = self.features(z).mean(dim=(2, 3))
        out = self.head(torch.cat([f, mean, std.log(), lam.log().view(-1, 1)], dim=1))
        c = self.channels
        shift = mean + out[:, :c] * std  # starts at the channel mean
        scale = torch.exp(out[:, c : 2 * c].clamp(-0.7, 0.7))  # within [0.5, 2]; starts at 1
        t = T_MIN + (T_MAX - T_MIN) * torch.sigmoid(out[:, -1] - 2.0)
        return shift, scale, t
