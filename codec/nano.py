"""The project's own small backbone ("nano"): its configs, and how trained nets become a `Backbone`.

Stable Diffusion weights cannot be downloaded everywhere, and a random backbone decodes noise.
`nano` is a backbone of the same *form*, small enough to train on a CPU in about an hour:

* a diffusers `AutoencoderKL` with 4 down blocks (8x downsampling) and 4 latent channels — the
  SD latent layout — whose `scaling_factor` makes scaled latents roughly unit-std, as SD's does;
* a `UNet2DConditionModel` with cross-attention on a fixed "empty prompt" embedding (a seeded
  random tensor: there is no text encoder), trained with SD's noise schedule (`sd_scheduler`)
  *only* on the low-noise range the codec uses (t ≤ ~400).

The training loops are in `codec.train_backbone`, the held-out numbers in `codec.evaluate`.
torch loads on first use here: `fcodec train-backbone --help` reads `BackboneTrainConfig`'s
defaults without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROMPT_TOKENS = 8  # length of the fixed empty-prompt embedding


def nano_configs(small: bool = False) -> tuple[dict, dict]:
    """diffusers configs of the nano VAE and UNet; `small=True` is the smoke-test size."""
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        # Thin at full resolution (where convs are expensive on a CPU), wider near the latent.
        block_out_channels=[16, 32, 64, 64] if not small else [8, 8, 8, 8],
        layers_per_block=1, norm_num_groups=8, sample_size=128,
        # No attention in the VAE: cheaper on a CPU and free of any image-size dependence.
        mid_block_add_attention=False, scaling_factor=1.0,
    )
    unet = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=[32, 64, 96] if not small else [8, 16, 16], norm_num_groups=8,
        # Attention (self + cross to the empty prompt) only at the coarsest level: denoising
        # quantization error is mostly local, and full-resolution attention is costly on a CPU.
        down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        cross_attention_dim=32 if not small else 8, attention_head_dim=8, use_linear_projection=True,
    )
    return vae, unet


@dataclass
class BackboneTrainConfig:
    """Everything that determines a nano backbone training run (stored in the model card / metrics).

    Not to be confused with `codec.training.CodecTrainConfig`, which trains the entropy model
    and estimator on a frozen backbone.
    """

    seed: int = 0
    vae_steps: int = 2600
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # per latent element, relative to the per-pixel MSE: near-deterministic
    # Weight of the squared error of each crop's mean colour (per channel), beside the per-pixel
    # MSE: a small VAE's cheapest error is a shift of rare saturated colours towards grey, which
    # per-pixel MSE barely prices (nano-v1 lost greens). 0 reproduces nano-v1.
    colour_weight: float = 0.0
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_crop: int = 16  # latent pixels (128 image pixels)
    unet_lr: float = 1e-3
    t_max: int = 400  # the codec only starts denoising from t ≤ ~400
    prediction_type: str = "epsilon"
    scales: tuple[float, ...] = (1.0, 0.75, 0.5)  # scale jitter: pre-resized copies of each image
    unet_scales: tuple[float, ...] = (1.0, 0.5)  # images whose latents (and mirrors') the UNet sees
    max_side: int | None = None  # downscale photos to this longer side first (None: as they are)
    small: bool = False  # smoke-test model sizes
    log_every: int = 50
    ckpt_every: int = 500
    # Stop a stage after this many steps of its schedule (the committed run was stopped at a
    # checkpoint to fit a shared CPU's time budget; these reproduce it exactly).
    vae_stop_at: int | None = None
    unet_stop_at: int | None = None
    # Pixel fine-tuning of a TAESD backbone's UNet (`finetune_denoiser`): one DDIM step from the
    # codec's real quantization at t ~ U[pixel_t_min, pixel_t_max], decoded by the frozen TAESD,
    # against the photo crop: 1 − MS-SSIM + pixel_mse_weight · MSE (pixels in [0, 1]).
    pixel_steps: int = 400
    pixel_batch: int = 8
    pixel_crop: int = 192  # pixels; MS-SSIM's 5 scales need > 160
    pixel_lr: float = 2e-4
    pixel_t_min: int = 15
    pixel_t_max: int = 100
    pixel_mse_weight: float = 10.0


def empty_prompt(dim: int, seed: int = 0):
    """The fixed (1, 8, dim) "empty prompt" the UNet cross-attends to (there is no text encoder)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, PROMPT_TOKENS, dim, generator=g) * 0.5


def make_backbone(vae, unet, prompt, scaling_factor: float, prediction_type: str, half: bool = True,
                  vae_kind: str = "kl"):
    """Wrap trained nets as a `Backbone`; `half` rounds the trained weights to fp16 (as committed).

    `vae_kind="taesd"`: a frozen TAESD, kept as loaded (its shipped weights are bf16 values)."""
    from .backbone import Backbone, sd_alphas_cumprod

    if vae_kind == "kl":
        vae.register_to_config(scaling_factor=scaling_factor)
    if half:  # round-trip through fp16 so the in-memory backbone equals the saved one
        if vae_kind == "kl":
            vae.half().float()
        unet.half().float()
    return Backbone(vae=vae, unet=unet, alphas_cumprod=sd_alphas_cumprod(), prediction_type=prediction_type,
                    prompt_embeds=prompt.float(), scaling_factor=scaling_factor, name="nano", vae_kind=vae_kind,
                    latent_channels=int(unet.config.in_channels))


def save_backbone(bb, out_dir: str | Path, half: bool = True) -> None:
    """`Backbone.save_pretrained` with fp16 VAE/UNet weights (loaded back as float32); a TAESD
    VAE is saved by `save_pretrained` itself, as bf16 (the values it was loaded with)."""
    kl = bb.vae_kind == "kl"
    if half:
        if kl:
            bb.vae.half()
        bb.unet.half()
    try:
        bb.save_pretrained(out_dir)
    finally:
        bb.vae.float()
        bb.unet.float()
