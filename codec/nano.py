"""The project's own small backbone ("nano"): configs and CPU training loops, pure torch.

Stable Diffusion weights cannot be downloaded everywhere, and a random backbone decodes noise.
`nano` is a backbone of the same *form*, small enough to train on a CPU in about an hour:

* a diffusers `AutoencoderKL` with 4 down blocks (8x downsampling) and 4 latent channels — the
  SD latent layout — whose `scaling_factor` makes scaled latents roughly unit-std, as SD's does;
* a `UNet2DConditionModel` with cross-attention on a fixed "empty prompt" embedding (a seeded
  random tensor: there is no text encoder), trained with SD's noise schedule (`sd_scheduler`)
  *only* on the low-noise range the codec uses (t ≤ ~400).

Training (`train_backbone`) runs two stages: the VAE on random crops of natural images (MSE +
a tiny KL: a near-deterministic autoencoder, the codec uses the latent mode), then the UNet on the
VAE's pre-computed latents. The UNet sees the noise the decoder really feeds it: besides
Gaussian noise, the *uniform quantization* error of step Δ_t (paper, Sec. 3.2), both as additive
uniform noise and as true rounding on a randomly shifted grid. `evaluate` measures what the
issue asks (VAE round trip, denoising gain over `--steps 0`, bpp) with the real codec.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import Backbone, sd_alphas_cumprod
from .noise import step_size

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
class TrainConfig:
    """Everything that determines a nano training run (stored in the model card / metrics)."""

    seed: int = 0
    vae_steps: int = 2600
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # per latent element, relative to the per-pixel MSE: near-deterministic
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_crop: int = 16  # latent pixels (128 image pixels)
    unet_lr: float = 1e-3
    t_max: int = 400  # the codec only starts denoising from t ≤ ~400
    prediction_type: str = "epsilon"
    scales: tuple[float, ...] = (1.0, 0.75, 0.5)  # scale jitter: pre-resized copies of each image
    unet_scales: tuple[float, ...] = (1.0, 0.5)  # images whose latents (and mirrors') the UNet sees
    small: bool = False  # smoke-test model sizes
    log_every: int = 50
    ckpt_every: int = 500
    # Stop a stage after this many steps of its schedule (the committed run was stopped at a
    # checkpoint to fit a shared CPU's time budget; these reproduce it exactly).
    vae_stop_at: int | None = None
    unet_stop_at: int | None = None


# ---------------------------------------------------------------------------------------- data
def load_folder(folder: str | Path) -> list[np.ndarray]:
    """All PNG/JPEG images of a folder as RGB uint8 arrays (sorted by name)."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise FileNotFoundError(f"no .png/.jpg images in '{folder}': point --data at a folder of photos")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _pyramid(images: list[np.ndarray], scales: tuple[float, ...], min_side: int) -> list[torch.Tensor]:
    """Each image at each scale (antialiased), as [-1, 1] float tensors (3, H, W)."""
    from PIL import Image

    out = []
    for im in images:
        h, w = im.shape[:2]
        for s in scales:
            sh, sw = round(h * s), round(w * s)
            if min(sh, sw) < min_side:
                continue
            px = im if s == 1.0 else np.asarray(Image.fromarray(im).resize((sw, sh), Image.LANCZOS))
            out.append(torch.from_numpy(px.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0))
    if not out:
        raise ValueError(f"no training image is at least {min_side} px on its shorter side")
    return out


def _random_crops(pool: list[torch.Tensor], n: int, size: int, rng: np.random.Generator,
                  augment: bool = True) -> torch.Tensor:
    """n random crops of size×size from the pool, with random flips / 90° turns if `augment`."""
    crops = []
    for _ in range(n):
        x = pool[rng.integers(len(pool))]
        i = rng.integers(x.shape[1] - size + 1)
        j = rng.integers(x.shape[2] - size + 1)
        c = x[:, i : i + size, j : j + size]
        if augment:  # (latents are not flip-equivariant: their pool holds encoded mirror images instead)
            if rng.random() < 0.5:
                c = c.flip(2)
            c = torch.rot90(c, int(rng.integers(4)), dims=(1, 2))
        crops.append(c)
    return torch.stack(crops).contiguous()


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to 5% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _train_step(opt: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module, lr: float) -> None:
    """One Adam step at learning rate `lr`, gradients clipped to norm 1."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()


def _due(step: int, every: int, n_steps: int) -> bool:
    """Whether step (0-based) ends a period of `every` steps or the run."""
    return (step + 1) % every == 0 or step + 1 == n_steps


# ---------------------------------------------------------------------------------------- VAE
def train_vae(images: list[np.ndarray], cfg: TrainConfig, log: Callable[[str], None] = print,
              ckpt: Path | None = None):
    """Train the nano `AutoencoderKL` on random crops; returns it (eval mode, scaling_factor 1)."""
    from diffusers import AutoencoderKL

    vae_cfg, _ = nano_configs(cfg.small)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = AutoencoderKL(**vae_cfg).train()
    pool = _pyramid(images, cfg.scales, cfg.vae_crop)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    t0, run_mse = time.time(), None
    n_steps = min(cfg.vae_steps, cfg.vae_stop_at or cfg.vae_steps)
    for step in range(n_steps):
        x = _random_crops(pool, cfg.vae_batch, cfg.vae_crop, rng)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        mse = F.mse_loss(y, x)
        kl = post.kl().mean() / post.mean[0].numel()
        _train_step(opt, mse + cfg.kl_weight * kl, vae, _lr(step, cfg.vae_steps, cfg.vae_lr))
        m = float(mse.detach())
        run_mse = m if run_mse is None else 0.98 * run_mse + 0.02 * m
        if _due(step, cfg.log_every, n_steps):
            # PSNR of [-1, 1] images: MSE on the 0..255 scale is mse * 127.5².
            log(f"vae step {step + 1}/{cfg.vae_steps}  mse {run_mse:.5f}  "
                f"psnr~{10 * math.log10(4.0 / max(run_mse, 1e-12)):.2f} dB  kl {float(kl.detach()):.2f}  {time.time() - t0:.0f}s")
        if ckpt is not None and _due(step, cfg.ckpt_every, n_steps):
            torch.save({"step": step + 1, "state": vae.state_dict()}, ckpt)
    return vae.eval().requires_grad_(False)


@torch.inference_mode()
def latent_scaling_factor(vae, images: list[np.ndarray]) -> float:
    """1 / std of the VAE's latent modes over the images, to 4 significant digits (SD: 0.18215)."""
    zs = [vae.encode(_pad64(im)[None]).latent_dist.mode().flatten() for im in images]
    std = float(torch.cat(zs).std())
    return float(f"{1.0 / std:.4g}")


def _pad64(im: np.ndarray) -> torch.Tensor:
    h, w = im.shape[:2]
    ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
    px = np.pad(im, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    return torch.from_numpy(px).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------- UNet
@torch.inference_mode()
def encode_latents(vae, images: list[np.ndarray], scaling_factor: float, scales: tuple[float, ...],
                   min_side: int) -> list[torch.Tensor]:
    """Scaled latent modes of every image at every scale, and of its mirror image."""
    out = []
    for x in _pyramid(images, scales, min_side):
        for v in (x, x.flip(2)):
            h, w = v.shape[1] // 8 * 8, v.shape[2] // 8 * 8
            out.append(vae.encode(v[None, :, :h, :w]).latent_dist.mode()[0] * scaling_factor)
    return out


def corrupt(z: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's input at step t and the matching ε target, for a batch of clean latents.

    Per sample, one of three corruptions of variance (1 − ᾱ)/ᾱ in the z domain:
    true rounding on a grid of step Δ_t with a random offset (exactly what the codec's
    quantizer does, the per-channel shift being arbitrary), additive uniform noise U(±Δ_t/2),
    or Gaussian noise (what DDIM's later steps re-inject). Returns x_t = √ᾱ ẑ and
    ε = √ᾱ (ẑ − z) / √(1 − ᾱ).
    """
    b = z.shape[0]
    a = alphas_cumprod[t].to(z.dtype).view(b, 1, 1, 1)
    delta = torch.sqrt(12 * (1 - a) / a)
    kind = torch.randint(0, 4, (b, 1, 1, 1), generator=gen)  # 0,1: rounding; 2: uniform; 3: Gaussian
    offset = (torch.rand(b, z.shape[1], 1, 1, generator=gen) - 0.5) * delta
    rounded = torch.round((z - offset) / delta) * delta + offset
    uniform = z + (torch.rand(z.shape, generator=gen) - 0.5) * delta
    gauss = z + torch.randn(z.shape, generator=gen) * torch.sqrt((1 - a) / a)
    z_hat = torch.where(kind <= 1, rounded, torch.where(kind == 2, uniform, gauss))
    x_t = a.sqrt() * z_hat
    eps = a.sqrt() * (z_hat - z) / (1 - a).sqrt()
    return x_t, eps


def empty_prompt(dim: int, seed: int = 0) -> torch.Tensor:
    """The fixed (1, 8, dim) "empty prompt" the UNet cross-attends to (there is no text encoder)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, PROMPT_TOKENS, dim, generator=g) * 0.5


def train_unet(latents: list[torch.Tensor], cfg: TrainConfig, log: Callable[[str], None] = print,
               ckpt: Path | None = None):
    """Train the nano UNet on latent crops for t in [1, t_max]; returns (unet, prompt_embeds)."""
    from diffusers import UNet2DConditionModel

    _, unet_cfg = nano_configs(cfg.small)
    torch.manual_seed(cfg.seed + 10)
    rng = np.random.default_rng(cfg.seed + 10)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    unet = UNet2DConditionModel(**unet_cfg).train()
    prompt = empty_prompt(unet_cfg["cross_attention_dim"], cfg.seed)
    ac = sd_alphas_cumprod().float()
    pool = [z for z in latents if min(z.shape[1:]) >= cfg.unet_crop]
    if not pool:
        raise ValueError(f"no latent is at least {cfg.unet_crop} wide: use larger images or a smaller --unet-crop")
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.unet_lr)
    t0, run = time.time(), None
    n_steps = min(cfg.unet_steps, cfg.unet_stop_at or cfg.unet_steps)
    for step in range(n_steps):
        z = _random_crops(pool, cfg.unet_batch, cfg.unet_crop, rng, augment=False)
        t = torch.randint(1, cfg.t_max + 1, (z.shape[0],), generator=gen)
        x_t, eps = corrupt(z, t, ac, gen)
        out = unet(x_t, t, encoder_hidden_states=prompt.expand(z.shape[0], -1, -1)).sample
        if cfg.prediction_type == "v_prediction":
            a = ac[t].view(-1, 1, 1, 1)
            target = a.sqrt() * eps - (1 - a).sqrt() * z
        else:
            target = eps
        loss = F.mse_loss(out, target)
        _train_step(opt, loss, unet, _lr(step, cfg.unet_steps, cfg.unet_lr))
        lv = float(loss.detach())
        run = lv if run is None else 0.98 * run + 0.02 * lv
        if _due(step, cfg.log_every, n_steps):
            # loss < 1 means the UNet explains part of the quantization noise (1 = no better than 0).
            log(f"unet step {step + 1}/{cfg.unet_steps}  loss {run:.4f}  {time.time() - t0:.0f}s")
        if ckpt is not None and _due(step, cfg.ckpt_every, n_steps):
            torch.save({"step": step + 1, "state": unet.state_dict(), "prompt": prompt}, ckpt)
    return unet.eval().requires_grad_(False), prompt


# ---------------------------------------------------------------------------------------- assembly
def make_backbone(vae, unet, prompt: torch.Tensor, scaling_factor: float, prediction_type: str,
                  half: bool = True) -> Backbone:
    """Wrap trained nets as a `Backbone`; `half` rounds the weights to fp16 (as committed)."""
    vae.register_to_config(scaling_factor=scaling_factor)
    if half:  # round-trip through fp16 so the in-memory backbone equals the saved one
        vae.half().float()
        unet.half().float()
    return Backbone(vae=vae, unet=unet, alphas_cumprod=sd_alphas_cumprod(), prediction_type=prediction_type,
                    prompt_embeds=prompt.float(), scaling_factor=scaling_factor, name="nano",
                    latent_channels=int(vae.config.latent_channels))


def save_backbone(bb: Backbone, out_dir: str | Path, half: bool = True) -> None:
    """`Backbone.save_pretrained` with fp16 VAE/UNet weights (loaded back as float32)."""
    if half:
        bb.vae.half()
        bb.unet.half()
    try:
        bb.save_pretrained(out_dir)
    finally:
        bb.vae.float()
        bb.unet.float()


def train_backbone(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
                   log: Callable[[str], None] = print, stage: str = "all") -> Path:
    """Train the VAE then the UNet, write the SD snapshot layout to `out_dir` and return it.

    `stage="vae"` stops after the VAE (saved as `out_dir/vae_trained.pt`); `stage="unet"` reuses
    that file. Checkpoints are written to `out_dir/ckpt_*.pt` every `cfg.ckpt_every` steps.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = load_folder(data_dir)
    log(f"{len(images)} training images from {data_dir}; config {asdict(cfg)}")
    t0 = time.time()
    vae_file = out / "vae_trained.pt"
    if stage in ("all", "vae"):
        vae = train_vae(images, cfg, log, out / "ckpt_vae.pt")
        torch.save(vae.state_dict(), vae_file)
        log(f"vae done in {time.time() - t0:.0f}s")
        if stage == "vae":
            return out
    else:
        from diffusers import AutoencoderKL

        if not vae_file.is_file():
            raise FileNotFoundError(f"{vae_file} not found: run --stage vae (or all) first")
        vae = AutoencoderKL(**nano_configs(cfg.small)[0])
        vae.load_state_dict(torch.load(vae_file))
        vae.eval().requires_grad_(False)
    # The latent scale, then the latents, from the fp16-rounded VAE that will be committed.
    vae.half().float()
    sf = latent_scaling_factor(vae, images)
    latents = encode_latents(vae, images, sf, cfg.unet_scales, cfg.unet_crop * 8)
    log(f"scaling_factor {sf}; {len(latents)} latent maps for the UNet")
    t1 = time.time()
    unet, prompt = train_unet(latents, cfg, log, out / "ckpt_unet.pt")
    log(f"unet done in {time.time() - t1:.0f}s")
    bb = make_backbone(vae, unet, prompt, sf, cfg.prediction_type)
    save_backbone(bb, out)
    return out


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(backbone: Backbone, images: list[np.ndarray], ts: tuple[int, ...] = (50, 100, 200),
             steps: tuple[int, ...] = (0, 4), default_t: bool = True) -> dict:
    """The issue's numbers on a list of RGB images, through the real codec (static entropy).

    Returns {"vae_psnr": mean PSNR of the unquantized round trip, "per_t": {t: {"bpp": ...,
    "psnr_steps{k}": ...}}, "default": {...} (codec defaults), "sizes_ok": bool}.
    """
    from .model import CodecConfig, DiffusionCodec, _to_uint8, psnr

    codec = DiffusionCodec(backbone, config=CodecConfig())
    rt = []
    for im in images:
        x = _pad64(im)[None]
        y = backbone.decode(backbone.encode(x))[0]
        rt.append(psnr(im, _to_uint8(y[:, : im.shape[0], : im.shape[1]])))
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
