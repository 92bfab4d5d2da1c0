"""Training the nano backbone on a CPU: the VAE, then the UNet on the VAE's latents; pure torch.

Two stages (or, with a frozen TAESD as the VAE, only the second: `train_denoiser`, a UNet in the
real SD latent space). The VAE trains on random crops of natural images (MSE + a tiny KL: a near-
deterministic autoencoder, the codec uses the latent mode). The UNet then trains on the VAE's
pre-computed latents and sees the noise the decoder really feeds it: besides Gaussian noise, the
*uniform quantization* error of step Δ_t (paper, Sec. 3.2), both as additive uniform noise and
as true rounding on a randomly shifted grid (`corrupt`). The configs are in `codec.nano`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import sd_alphas_cumprod
from .nano import BackboneTrainConfig, empty_prompt, make_backbone, nano_configs, save_backbone
from .pixels import cap_long_side, load_folder, pad_to_multiple, random_crops, scale_pyramid


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
def train_vae(images: list[np.ndarray], cfg: BackboneTrainConfig, log: Callable[[str], None] = print,
              ckpt: Path | None = None):
    """Train the nano `AutoencoderKL` on random crops; returns it (eval mode, scaling_factor 1)."""
    from diffusers import AutoencoderKL

    vae_cfg, _ = nano_configs(cfg.small)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vae = AutoencoderKL(**vae_cfg).train()
    pool = scale_pyramid(images, cfg.scales, cfg.vae_crop)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    t0, run_mse = time.time(), None
    n_steps = min(cfg.vae_steps, cfg.vae_stop_at or cfg.vae_steps)
    for step in range(n_steps):
        x = random_crops(pool, cfg.vae_batch, cfg.vae_crop, rng)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        mse = F.mse_loss(y, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + cfg.kl_weight * kl
        if cfg.colour_weight:
            loss = loss + cfg.colour_weight * F.mse_loss(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)))
        _train_step(opt, loss, vae, _lr(step, cfg.vae_steps, cfg.vae_lr))
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
    zs = [vae.encode(pad_to_multiple(im, 64)[None]).latent_dist.mode().flatten() for im in images]
    std = float(torch.cat(zs).std())
    return float(f"{1.0 / std:.4g}")


# ---------------------------------------------------------------------------------------- UNet
@torch.inference_mode()
def latent_pool(vae, images: list[np.ndarray], scaling_factor: float, scales: tuple[float, ...],
                min_side: int, kind: str = "kl") -> list[torch.Tensor]:
    """The UNet's training pool: scaled latent modes of every image at every scale and of its
    mirror image, each cropped to a multiple of 8 pixels. (The bare VAE, before a `Backbone`
    exists; codec training encodes through `codec.training.encode_latents`.)"""
    out = []
    for x in scale_pyramid(images, scales, min_side):
        for v in (x, x.flip(2)):
            h, w = v.shape[1] // 8 * 8, v.shape[2] // 8 * 8
            z = vae.encode(v[None, :, :h, :w])
            out.append((z.latent_dist.mode() if kind == "kl" else z)[0].float() * scaling_factor)
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
    rounded = quantize_like_codec(z, t, alphas_cumprod, gen)
    uniform = z + (torch.rand(z.shape, generator=gen) - 0.5) * delta
    gauss = z + torch.randn(z.shape, generator=gen) * torch.sqrt((1 - a) / a)
    z_hat = torch.where(kind <= 1, rounded, torch.where(kind == 2, uniform, gauss))
    x_t = a.sqrt() * z_hat
    eps = a.sqrt() * (z_hat - z) / (1 - a).sqrt()
    return x_t, eps


def quantize_like_codec(z: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
    """ẑ as the codec dequantizes it at step t (per sample): rounding on a grid of step Δ_t whose
    per-channel offset is random (the codec's is the image's channel mean, arbitrary to a crop)."""
    b = z.shape[0]
    a = alphas_cumprod[t].to(z.dtype).view(b, 1, 1, 1)
    delta = torch.sqrt(12 * (1 - a) / a)
    offset = (torch.rand(b, z.shape[1], 1, 1, generator=gen) - 0.5) * delta
    return torch.round((z - offset) / delta) * delta + offset


def train_unet(latents: list[torch.Tensor], cfg: BackboneTrainConfig, log: Callable[[str], None] = print,
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
        z = random_crops(pool, cfg.unet_batch, cfg.unet_crop, rng, augment=False)
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


# ---------------------------------------------------------------------------------------- both
def train_backbone(data_dir: str | Path, out_dir: str | Path, cfg: BackboneTrainConfig,
                   log: Callable[[str], None] = print, stage: str = "all") -> Path:
    """Train the VAE then the UNet, write the SD snapshot layout to `out_dir` and return it.

    `stage="vae"` stops after the VAE (saved as `out_dir/vae_trained.pt`); `stage="unet"` reuses
    that file. Checkpoints are written to `out_dir/ckpt_*.pt` every `cfg.ckpt_every` steps.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = cap_long_side(load_folder(data_dir), cfg.max_side)
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
    latents = latent_pool(vae, images, sf, cfg.unet_scales, cfg.unet_crop * 8)
    log(f"scaling_factor {sf}; {len(latents)} latent maps for the UNet")
    t1 = time.time()
    unet, prompt = train_unet(latents, cfg, log, out / "ckpt_unet.pt")
    log(f"unet done in {time.time() - t1:.0f}s")
    bb = make_backbone(vae, unet, prompt, sf, cfg.prediction_type)
    save_backbone(bb, out)
    return out


# ------------------------------------------------------------------------- SD-latent denoiser
def train_denoiser(data_dir: str | Path, vae_dir: str | Path, out_dir: str | Path, cfg: BackboneTrainConfig,
                   log: Callable[[str], None] = print) -> Path:
    """Train only the UNet, on the latents of a frozen TAESD (the real SD latent space), and write
    a snapshot whose `vae/` holds the TAESD weights and licence next to the new UNet.

    TAESD latents are already in SD's scaled units (scaling_factor 1.0), so the UNet sees what an
    SD UNet would see; with the paper's noise-matched quantization this is its decoder in SD's
    latent space, at the size a CPU can train.
    """
    from .taesd import TinyAutoencoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = cap_long_side(load_folder(data_dir), cfg.max_side)
    log(f"{len(images)} training images from {data_dir} (long side <= {cfg.max_side}); config {asdict(cfg)}")
    vae = TinyAutoencoder.from_dir(vae_dir)
    t0 = time.time()
    latents = latent_pool(vae, images, 1.0, cfg.unet_scales, cfg.unet_crop * 8, kind="taesd")
    log(f"{len(latents)} TAESD latent maps for the UNet in {time.time() - t0:.0f}s")
    unet, prompt = train_unet(latents, cfg, log, out / "ckpt_unet.pt")
    log(f"unet done in {time.time() - t0:.0f}s")
    bb = make_backbone(vae, unet, prompt, 1.0, cfg.prediction_type, vae_kind="taesd")
    save_backbone(bb, out)
    copy_taesd_licence(Path(vae_dir), out)
    return out


def copy_taesd_licence(vae_dir: Path, out: Path) -> None:
    """TAESD is MIT: its notice travels with the weights into the snapshot's vae/ (when the
    source folder has it)."""
    import shutil

    licence = vae_dir / "LICENSE.taesd.txt"
    if licence.is_file():
        shutil.copyfile(licence, out / "vae" / licence.name)


# ------------------------------------------------------------------ pixel fine-tuning (taesd-v2)
def finetune_denoiser(source_dir: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: BackboneTrainConfig,
                      log: Callable[[str], None] = print) -> Path:
    """Fine-tune a TAESD backbone's UNet as a one-step denoiser judged in pixels; write the snapshot.

    The ε-trained UNet estimates the latent's posterior mean, which TAESD's decoder turns into
    a blurred picture: the latent error it minimises is not the error anyone sees. Here each
    step quantizes TAESD latents of photo crops exactly as the codec does at t ~ U[pixel_t_min,
    pixel_t_max], runs one DDIM step (x̂₀ from the UNet's ε), decodes x̂₀ with the frozen TAESD
    and scores it against the crop: 1 − MS-SSIM + pixel_mse_weight · MSE. Gradients flow through
    the decoder into the UNet only; the VAE, schedule and prompt are unchanged, so latents (and
    entropy models) of the starting backbone serve the new one. The snapshot says
    `default_steps = 1` (`codec.backbone.DECODER_FILE`): the one step it was trained for.
    `source_dir` is the starting snapshot (a `train-backbone --vae` output, or taesd-v1's folder).
    """
    from pytorch_msssim import ms_ssim

    from .backbone import Backbone
    from .training import decode_with_grad, one_step_x0

    backbone = Backbone.from_pretrained(str(source_dir))
    if backbone.vae_kind != "taesd":
        raise ValueError(f"pixel fine-tuning needs a TAESD backbone (got vae kind '{backbone.vae_kind}')")
    if cfg.pixel_crop <= 160:
        raise ValueError(f"--pixel-crop must be > 160 px (MS-SSIM's 5 scales), got {cfg.pixel_crop}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = cap_long_side(load_folder(data_dir), cfg.max_side)
    pool = scale_pyramid(images, cfg.unet_scales, cfg.pixel_crop)
    log(f"{len(images)} training images from {data_dir} ({len(pool)} with scales {cfg.unet_scales}); "
        f"fine-tuning {backbone.name}'s UNet; config {asdict(cfg)}")
    torch.manual_seed(cfg.seed + 20)
    rng = np.random.default_rng(cfg.seed + 20)
    gen = torch.Generator().manual_seed(cfg.seed + 21)
    backbone.set_channels_last(True)  # oneDNN's faster layout on the CPU (~25% per step here); values unchanged
    vae, unet = backbone.vae.float().requires_grad_(False), backbone.unet.float().train().requires_grad_(True)
    ac = backbone.alphas_cumprod.float()
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.pixel_lr)
    t0, run = time.time(), None
    for step in range(cfg.pixel_steps):
        x = random_crops(pool, cfg.pixel_batch, cfg.pixel_crop, rng)
        with torch.no_grad():
            z = vae.encode(x)
        t = torch.randint(cfg.pixel_t_min, cfg.pixel_t_max + 1, (x.shape[0],), generator=gen)
        x0 = one_step_x0(backbone, quantize_like_codec(z, t, ac, gen), ac[t].view(-1, 1, 1, 1), t)
        y = (decode_with_grad(backbone, x0).clamp(-1, 1) + 1) / 2
        ref = (x + 1) / 2
        loss = 1 - ms_ssim(y, ref, data_range=1.0) + cfg.pixel_mse_weight * F.mse_loss(y, ref)
        _train_step(opt, loss, unet, _lr(step, cfg.pixel_steps, cfg.pixel_lr, warmup=20))
        lv = float(loss.detach())
        run = lv if run is None else 0.95 * run + 0.05 * lv
        if _due(step, cfg.log_every, cfg.pixel_steps):
            log(f"pixel step {step + 1}/{cfg.pixel_steps}  loss {run:.4f}  {time.time() - t0:.0f}s")
    unet.eval().requires_grad_(False)
    bb = make_backbone(vae, unet, backbone.prompt_embeds, 1.0, backbone.prediction_type, vae_kind="taesd")
    bb.default_steps = 1
    save_backbone(bb, out)
    copy_taesd_licence(Path(source_dir) / "vae", out)
    log(f"pixel fine-tuning done in {time.time() - t0:.0f}s")
    return out
