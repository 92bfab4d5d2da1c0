"""A TAESD-style tiny autoencoder as a drop-in VAE (Ollin Boer Bohan's TAESD layout).

Loads the original flat-`nn.Sequential` weights (`taesd_encoder.pth`/`.safetensors`,
`taesd_decoder.*`; see ../shared/models/taesd/SOURCE.md for the layout). TAESD latents are
already in SD's *scaled* latent space, so the backbone uses scaling_factor 1.0 with it.
Inputs/outputs here are images in [-1, 1], like the diffusers VAE.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


def taesd_encoder(latent_channels: int = 4) -> nn.Sequential:
    return nn.Sequential(
        _conv(3, 64), _Block(),
        _conv(64, 64, stride=2, bias=False), _Block(), _Block(), _Block(),
        _conv(64, 64, stride=2, bias=False), _Block(), _Block(), _Block(),
        _conv(64, 64, stride=2, bias=False), _Block(), _Block(), _Block(),
        _conv(64, latent_channels),
    )


def taesd_decoder(latent_channels: int = 4) -> nn.Sequential:
    up = lambda: nn.Upsample(scale_factor=2)  # noqa: E731
    return nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        _Block(), _Block(), _Block(), up(), _conv(64, 64, bias=False),
        _Block(), _Block(), _Block(), up(), _conv(64, 64, bias=False),
        _Block(), _Block(), _Block(), up(), _conv(64, 64, bias=False),
        _Block(), _conv(64, 3),
    )


class TinyAutoencoder(nn.Module):
    """TAESD encoder + decoder with the [-1, 1] image convention of diffusers VAEs."""

    def __init__(self, latent_channels: int = 4) -> None:
        super().__init__()
        self.encoder = taesd_encoder(latent_channels)
        self.decoder = taesd_decoder(latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.add(1).div(2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).clamp(0, 1).mul(2).sub(1)

    @classmethod
    def from_dir(cls, path: str | Path, prefix: str = "taesd") -> "TinyAutoencoder":
        """Load `{prefix}_encoder` and `{prefix}_decoder` (.safetensors preferred, else .pth)."""
        path = Path(path)
        model = cls()
        for part, module in (("encoder", model.encoder), ("decoder", model.decoder)):
            sd = _load_state(path, f"{prefix}_{part}")
            try:
                module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path}/{prefix}_{part} does not have the TAESD layout: {str(e).splitlines()[0]}") from None
        return model.eval().requires_grad_(False)


def _load_state(path: Path, stem: str) -> dict[str, torch.Tensor]:
    st, pth = path / f"{stem}.safetensors", path / f"{stem}.pth"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pth.is_file():
        return torch.load(str(pth), map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no TAESD weights '{stem}.safetensors' or '{stem}.pth' in '{path}'. Pass --vae DIR with a folder "
        "holding taesd_encoder.* and taesd_decoder.* (e.g. ../shared/models/taesd)."
    )
