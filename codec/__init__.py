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


NANO_DIR = Path(__file__).parent / "weights" / "nano"


def default_backbone() -> str:
    """The project's own nano backbone once its weights ship; the random tiny one until then."""
    return "nano" if (NANO_DIR / "model_index.json").is_file() else "tiny"


def load_backbone(spec: str = "tiny", vae: str | None = None, device: str | None = None) -> Backbone:
    """Resolve a backbone spec: `tiny`, `nano`, a hub id or a snapshot folder; optional TAESD VAE."""
    from .backbone import Backbone, BackboneError

    if spec == "tiny":
        bb = Backbone.tiny(0)
    elif spec == "nano":
        if not (NANO_DIR / "model_index.json").is_file():
            raise BackboneError(f"the nano backbone's weights are not installed at {NANO_DIR}; use --backbone tiny")
        bb = Backbone.from_pretrained(str(NANO_DIR))
        bb.name = "nano"
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

    if entropy == "hyperprior" and not codec_weights:
        # An untrained hyperprior is a random initialisation: its fingerprint would differ in every
        # process, so records would encode fine and never decode anywhere else.
        from .model import CodecError

        raise CodecError("--entropy hyperprior needs trained codec weights: pass --codec-weights DIR "
                         "(a folder written by `fcodec train`), or use --entropy static")
    bb = load_backbone(backbone, vae, device)
    config = config or CodecConfig()
    if codec_weights:
        return DiffusionCodec.from_pretrained(codec_weights, bb, config)
    config.entropy = entropy
    return DiffusionCodec(bb, config=config)


__all__ = [
    "Backbone", "BackboneError", "BitstreamError", "CODEC_VERSION", "CodecConfig", "CodecError",
    "DiffusionCodec", "Encoded", "ImageError", "LoadedImage", "default_backbone", "load_backbone",
    "load_codec", "load_image", "psnr", "to_png",
]
