"""The frozen foundation model: VAE, denoising UNet, noise schedule, empty-prompt embedding.

The codec never trains any of this (paper, Sec. 3). A `Backbone` is loaded either

* from a Stable Diffusion checkpoint with diffusers `from_pretrained` (a hub id or a local
  snapshot folder with `vae/`, `unet/`, `scheduler/` and, to compute the empty-prompt embedding
  once, `text_encoder/` + `tokenizer/`), or
* built in code: `Backbone.tiny(seed)` is a random backbone of the same architecture, for tests
  and the offline demo only (it decodes noise-like images).

Latents are always handled in the *scaled* units the UNet was trained on
(`vae.encode(x) * scaling_factor`, 0.18215 for SD 1/2).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PAD_MULTIPLE = 64  # pixels; SD's UNet downsamples the 8x latent 3 more times


class BackboneError(RuntimeError):
    """A backbone could not be loaded; the message says what to do."""


@dataclass
class Backbone:
    """A frozen VAE + UNet + noise schedule, ready for the codec.

    Attributes:
        vae: an `AutoencoderKL` or a TAESD-style module with `encode`/`decode`.
        unet: a `UNet2DConditionModel` (epsilon or v prediction).
        alphas_cumprod: ᾱ_t for t = 0..T-1 as float64 (CPU).
        prediction_type: "epsilon" or "v_prediction".
        prompt_embeds: the empty-prompt text embedding, (1, L, D).
        scaling_factor: latent scale (1.0 for TAESD-style VAEs, whose latents are pre-scaled).
        name: a human-readable id (hub id, folder, "tiny", ...).
        vae_kind: "kl" for diffusers AutoencoderKL, "taesd" for a TAESD-style autoencoder.
        default_steps: the decoder's DDIM budget when none is asked for (`DECODER_FILE` in the
            snapshot; None: the codec's `DEFAULT_STEPS`). A UNet trained as a one-step denoiser
            says 1. Not part of the fingerprint: records do not carry the step budget.
    """

    vae: nn.Module
    unet: nn.Module
    alphas_cumprod: torch.Tensor
    prediction_type: str
    prompt_embeds: torch.Tensor
    scaling_factor: float
    name: str
    vae_kind: str = "kl"
    latent_channels: int = 4
    pad_multiple: int = PAD_MULTIPLE
    default_steps: int | None = None
    _fingerprint: bytes | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(cls, seed: int = 0) -> "Backbone":
        """A random backbone of the SD architecture, small enough for CPU tests.

        4-level VAE (8x downsampling, 4 latent channels), ~1M-parameter UNet with cross-attention,
        SD's scaled-linear schedule. Built with a fixed seed, so every machine gets the same
        weights (and the same fingerprint) for a given torch version.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        vae_cfg, unet_cfg = tiny_configs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**vae_cfg)
            unet = UNet2DConditionModel(**unet_cfg)
            g = torch.Generator().manual_seed(seed + 1)
            prompt = torch.randn(1, 8, unet_cfg["cross_attention_dim"], generator=g) * 0.5
        return cls(
            vae=vae.eval().requires_grad_(False),
            unet=unet.eval().requires_grad_(False),
            alphas_cumprod=sd_alphas_cumprod(),
            prediction_type="epsilon",
            prompt_embeds=prompt,
            scaling_factor=float(vae_cfg["scaling_factor"]),
            name=f"tiny-{seed}",
        )

    @classmethod
    def from_pretrained(cls, id_or_dir: str, local_files_only: bool | None = None) -> "Backbone":
        """Load a Stable Diffusion checkpoint (hub id or local snapshot) with diffusers.

        Only `vae/`, `unet/`, `scheduler/` are kept; the text encoder is run once for the empty
        prompt and its embedding cached (`fcodec_empty_prompt.safetensors` beside the snapshot or
        in `$FCODEC_CACHE`). Errors name the path and how to point at a local snapshot.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        path = Path(id_or_dir).expanduser()
        is_dir = path.is_dir()
        if not is_dir and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", id_or_dir):
            raise BackboneError(
                f"backbone folder '{id_or_dir}' not found. Pass --backbone DIR with a diffusers snapshot "
                "folder (vae/, unet/, scheduler/), e.g. one made by `huggingface-cli download "
                "stabilityai/stable-diffusion-2-1 --local-dir DIR`, a hub id (owner/name), "
                "or --backbone nano / tiny for the built-in backbones."
            )
        if local_files_only is None:
            local_files_only = is_dir or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        src = str(path) if is_dir else id_or_dir
        taesd_vae = is_dir and _is_taesd_folder(path / "vae")
        try:
            if taesd_vae:  # a snapshot pairing TAESD (SD's latent space, pre-scaled) with its own UNet
                from .taesd import TinyAutoencoder

                vae = TinyAutoencoder.from_dir(path / "vae")
            else:
                vae = AutoencoderKL.from_pretrained(src, subfolder="vae", local_files_only=local_files_only, low_cpu_mem_usage=False)
            unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", local_files_only=local_files_only, low_cpu_mem_usage=False)
            sched = DDIMScheduler.from_pretrained(src, subfolder="scheduler", local_files_only=local_files_only)
        except Exception as e:  # diffusers raises OSError/EnvironmentError/ValueError variously
            raise BackboneError(
                f"could not load backbone '{id_or_dir}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                "Download a snapshot where the hub is reachable (`huggingface-cli download "
                "stabilityai/stable-diffusion-2-1 --local-dir DIR`), copy it here and pass --backbone DIR."
            ) from e
        embeds = _empty_prompt_embeds(src, is_dir, local_files_only, unet.config.cross_attention_dim)
        return cls(
            vae=vae.eval().requires_grad_(False),
            unet=unet.eval().requires_grad_(False),
            alphas_cumprod=sched.alphas_cumprod.to(torch.float64).clone(),
            prediction_type=sched.config.prediction_type,
            prompt_embeds=embeds,
            scaling_factor=1.0 if taesd_vae else float(vae.config.scaling_factor),
            name=id_or_dir,
            vae_kind="taesd" if taesd_vae else "kl",
            latent_channels=int(unet.config.in_channels),
            default_steps=_decoder_steps(path / DECODER_FILE) if is_dir else None,
        )

    def with_vae(self, vae: nn.Module, kind: str = "taesd", scaling_factor: float = 1.0) -> "Backbone":
        """The same backbone with another autoencoder (e.g. TAESD) in place of the VAE."""
        return Backbone(
            vae=vae.eval().requires_grad_(False), unet=self.unet, alphas_cumprod=self.alphas_cumprod,
            prediction_type=self.prediction_type, prompt_embeds=self.prompt_embeds,
            scaling_factor=scaling_factor, name=f"{self.name}+vae", vae_kind=kind,
            latent_channels=self.latent_channels, pad_multiple=self.pad_multiple,
            default_steps=self.default_steps,
        )

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the SD folder layout (vae/, unet/, scheduler/, empty-prompt embedding)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.vae_kind == "taesd":  # TAESD's own flat layout (codec/taesd.py), bf16 as shipped
            (out / "vae").mkdir(exist_ok=True)
            for part in ("encoder", "decoder"):
                state = {k: v.to(torch.bfloat16).contiguous() for k, v in getattr(self.vae, part).state_dict().items()}
                save_file(state, str(out / "vae" / f"taesd_{part}.safetensors"))
            vae_entry = ["fcodec", "TinyAutoencoder"]
        else:
            self.vae.save_pretrained(out / "vae")
            vae_entry = ["diffusers", "AutoencoderKL"]
        self.unet.save_pretrained(out / "unet")
        sd_scheduler(self.prediction_type).save_pretrained(out / "scheduler")
        save_file({"prompt_embeds": self.prompt_embeds.contiguous()}, str(out / EMBED_FILE))
        if self.default_steps is not None:
            (out / DECODER_FILE).write_text(json.dumps({"default_steps": int(self.default_steps)}, indent=2) + "\n")
        (out / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "vae": vae_entry, "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }, indent=2))

    # ------------------------------------------------------------------ use
    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Backbone":
        """Move the networks (fingerprint is kept: it describes the weights as loaded)."""
        import logging

        self.fingerprint()  # freeze it before any dtype change
        if dtype == self.dtype:
            dtype = None
        log = logging.getLogger("diffusers")
        level = log.level
        log.setLevel(logging.ERROR)  # diffusers advises torch_dtype at load time; a cast is what we mean
        try:
            self.vae.to(device=device, dtype=dtype)
            self.unet.to(device=device, dtype=dtype)
        finally:
            log.setLevel(level)
        self.prompt_embeds = self.prompt_embeds.to(device=device, dtype=dtype or self.prompt_embeds.dtype)
        return self

    def set_channels_last(self, enabled: bool = True) -> "Backbone":
        """Store conv weights channels-last (NHWC): faster convolutions on CPU (oneDNN) and on
        GPU tensor cores; values, and so the fingerprint, are unchanged."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.vae.to(memory_format=fmt)
        self.unet.to(memory_format=fmt)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B,3,H,W) -> scaled latents (B,C,H/8,W/8). Deterministic (mode)."""
        x = x.to(self.device, self.dtype)
        if self.vae_kind == "kl":
            z = self.vae.encode(x).latent_dist.mode()
        else:
            z = self.vae.encode(x)
        return _out(z) * self.scaling_factor

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (not clamped)."""
        z = (z / self.scaling_factor).to(self.device, self.dtype)
        if self.vae_kind == "kl":
            return _out(self.vae.decode(z).sample)
        return _out(self.vae.decode(z))

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One UNet call with the empty prompt; returns the raw model output (eps or v)."""
        b = x_t.shape[0]
        # encoder_hidden_states must match the batch (a diffusers trap).
        ehs = self.prompt_embeds.expand(b, -1, -1).to(self.device, self.dtype)
        out = self.unet(x_t.to(self.device, self.dtype), t.to(self.device), encoder_hidden_states=ehs).sample
        return _out(out)

    def encoder_fingerprint(self) -> bytes:
        """8-byte id of what maps pixels to latents (the VAE, its kind and scale): latents cached
        with one UNet serve any other UNet on the same VAE."""
        h = hashlib.blake2b(digest_size=8)
        h.update(b"vae")
        _hash_module(h, self.vae)
        h.update(f"{self.scaling_factor:.8f}|{self.vae_kind}".encode())
        return h.digest()

    def fingerprint(self) -> bytes:
        """8-byte id of the weights and schedule; bitstreams carry it so decoding with another
        model is a clear error, never garbage."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=8)
            for tag, module in (("vae", self.vae), ("unet", self.unet)):
                h.update(tag.encode())
                _hash_module(h, module)
            h.update(self.alphas_cumprod.numpy().astype("<f8").tobytes())
            h.update(self.prompt_embeds.detach().float().cpu().numpy().astype("<f4").tobytes())
            h.update(f"{self.prediction_type}|{self.scaling_factor:.8f}|{self.vae_kind}".encode())
            self._fingerprint = h.digest()
        return self._fingerprint


EMBED_FILE = "fcodec_empty_prompt.safetensors"
DECODER_FILE = "fcodec_decoder.json"  # {"default_steps": K}: how this UNet is meant to be run


def _decoder_steps(path: Path) -> int | None:
    """A snapshot's default DDIM budget from its `DECODER_FILE`, or None when it has none."""
    if not path.is_file():
        return None
    try:
        steps = int(json.loads(path.read_text())["default_steps"])
    except (ValueError, KeyError, TypeError) as e:
        raise BackboneError(f"{path} is not a valid decoder file ({e}): expected {{\"default_steps\": K}}") from None
    if steps < 0:
        raise BackboneError(f"{path}: default_steps must be >= 0, got {steps}")
    return steps


def _is_taesd_folder(path: Path) -> bool:
    """A snapshot's `vae/` holding TAESD's flat weights instead of a diffusers AutoencoderKL."""
    return not (path / "config.json").is_file() and any(
        (path / f"taesd_encoder.{ext}").is_file() for ext in ("safetensors", "pth"))


def _out(x: torch.Tensor) -> torch.Tensor:
    """Network outputs leave as float32, or float64 when the networks run in float64."""
    return x if x.dtype == torch.float64 else x.float()


def _hash_module(h: "hashlib._Hash", module: nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes())


def sd_scheduler(prediction_type: str = "epsilon"):
    """SD's DDIM scheduler config (scaled_linear β from 0.00085 to 0.012 over 1000 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def sd_alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of SD's schedule, computed exactly as diffusers does (float32), held as float64.

    β_t = (linspace(√β0, √β1, T))², ᾱ_t = Π_{s≤t}(1 − β_s).
    """
    return sd_scheduler().alphas_cumprod.to(torch.float64).clone()


def tiny_configs() -> tuple[dict, dict]:
    """diffusers configs of the tiny SD-architecture backbone (see `Backbone.tiny`)."""
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64,
        # SD picked 0.18215 so its scaled latents have unit-ish std; the random tiny VAE needs 4.
        scaling_factor=4.0,
    )
    unet = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[32, 64], norm_num_groups=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
    )
    return vae, unet


def _empty_prompt_embeds(src: str, is_dir: bool, local_files_only: bool, dim: int) -> torch.Tensor:
    """The text encoder's output for "" — computed once, then read from a cache file."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(os.environ.get("FCODEC_CACHE", Path.home() / ".cache" / "fcodec"))
    candidates = [Path(src) / EMBED_FILE] if is_dir else []
    candidates.append(cache_dir / (hashlib.sha256(src.encode()).hexdigest()[:16] + ".safetensors"))
    for c in candidates:
        if c.is_file():
            return load_file(str(c))["prompt_embeds"]
    try:
        from transformers import AutoTokenizer, CLIPTextModel

        tok = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", local_files_only=local_files_only)
        enc = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", local_files_only=local_files_only)
    except Exception as e:
        raise BackboneError(
            f"backbone '{src}' has no cached empty-prompt embedding and its text encoder could not be "
            f"loaded ({type(e).__name__}). Use a full snapshot (with text_encoder/ and tokenizer/)."
        ) from e
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        embeds = enc(ids)[0].float().clone()
    if embeds.shape[-1] != dim:
        raise BackboneError(f"text encoder width {embeds.shape[-1]} != unet cross_attention_dim {dim} in '{src}'")
    for c in candidates:  # first writable place wins
        try:
            c.parent.mkdir(parents=True, exist_ok=True)
            save_file({"prompt_embeds": embeds.contiguous()}, str(c))
            break
        except OSError:
            continue
    return embeds
