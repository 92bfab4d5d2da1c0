"""foundation-codec: lossy image compression with a frozen foundation diffusion model.

`load_codec()` is the one entry point jobs use; the pieces live one concept per file.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from .images import ImageError, LoadedImage, load_image, to_png

if TYPE_CHECKING:
    from .backbone import Backbone, BackboneError
    from .bitstream import BitstreamError
    from .model import CODEC_VERSION, CodecConfig, CodecError, DiffusionCodec, Encoded, psnr

# torch and diffusers load on first use, so processes that only decode images (the pipeline's
# transform tasks) start in milliseconds instead of seconds.
_LAZY = {"Backbone": "backbone", "BackboneError": "backbone", "BitstreamError": "bitstream",
         **dict.fromkeys(("CODEC_VERSION", "CodecConfig", "CodecError", "DiffusionCodec", "Encoded", "psnr"), "model")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'codec' has no attribute {name!r}")


def _newest_nano_dir() -> Path:
    from .registry import WEIGHTS_DIR, newest

    nano = newest("nano")
    return nano.path if nano is not None and nano.path is not None else WEIGHTS_DIR / "nano-v1"


# The newest shipped nano snapshot (codec/weights/nano-v<N>/); older versions stay beside it.
NANO_DIR = _newest_nano_dir()


# Built-in families, best first: TAESD (SD's own latent space) with the project's SD-latent
# denoiser, then the project's own small nano VAE + UNet. `tiny` (random weights) is the last resort.
DEFAULT_FAMILIES = ("taesd", "nano")


def default_backbone() -> str:
    """The best built-in backbone that ships (the newest version of the first family of
    `DEFAULT_FAMILIES` found); tiny when none does."""
    from .registry import newest

    return next((f for f in DEFAULT_FAMILIES if newest(f) is not None), "tiny")


def load_backbone(spec: str = "tiny", vae: str | None = None, device: str | None = None) -> Backbone:
    """Resolve a backbone spec: a built-in (`tiny`, `nano` = newest nano, `nano-v1`, ...; see
    codec/registry.py), a hub id or a snapshot folder; optional TAESD VAE."""
    from . import registry
    from .backbone import Backbone, BackboneError

    builtin = registry.lookup(spec)
    if builtin is not None and builtin.path is None:
        bb = Backbone.tiny(0)
    elif builtin is not None:
        bb = Backbone.from_pretrained(str(builtin.path))
        bb.name = builtin.name
    elif (spec == "nano" or registry.VERSIONED_NAME.fullmatch(spec)) and not Path(spec).is_dir():
        raise BackboneError(f"no built-in backbone '{spec}' (known: {registry.known_backbones_text()}); "
                            "pass --backbone DIR with a snapshot folder")
    else:
        bb = Backbone.from_pretrained(spec)
    if vae:
        from .taesd import TinyAutoencoder

        try:
            bb = bb.with_vae(TinyAutoencoder.from_dir(vae))
        except (FileNotFoundError, ValueError) as e:
            raise BackboneError(str(e)) from None
    if device:
        bb.to(device)
    return bb


def load_codec(backbone: str = "tiny", vae: str | None = None, entropy: str = "static",
               codec_weights: str | None = None, device: str | None = None,
               config: CodecConfig | None = None) -> DiffusionCodec:
    """Build a ready codec (entropy tables updated) from CLI-style options."""
    from .model import CodecConfig, DiffusionCodec

    from .entropy import LEARNED_ENTROPY

    if entropy in LEARNED_ENTROPY and not codec_weights:
        # An untrained hyperprior is a random initialisation: its fingerprint would differ in every
        # process, so records would encode fine and never decode anywhere else.
        from .model import CodecError
        from .registry import shipped_entropy_text

        raise CodecError(f"--entropy {entropy} needs trained codec weights, and none of that model ship for "
                         f"backbone {backbone!r} (shipped {entropy} weights: {shipped_entropy_text(entropy)}). "
                         "Pass --codec-weights DIR (a folder written by `fcodec train`), --entropy auto "
                         "(the backbone's shipped weights, if any), or --entropy static")
    bb = load_backbone(backbone, vae, device)
    config = config or CodecConfig()
    if codec_weights:
        from .registry import codec_weights_path

        return DiffusionCodec.from_pretrained(codec_weights_path(codec_weights), bb, config)
    config.entropy = entropy
    return DiffusionCodec(bb, config=config)


__all__ = [
    "Backbone", "BackboneError", "BitstreamError", "CODEC_VERSION", "CodecConfig", "CodecError",
    "DiffusionCodec", "Encoded", "ImageError", "LoadedImage", "default_backbone", "load_backbone",
    "load_codec", "load_image", "psnr", "to_png",
]
