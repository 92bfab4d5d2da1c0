"""Training the learned parts — entropy model and γ/t estimator — with the backbone frozen.

The paper (Sec. 3.4) trains only these two; the VAE and UNet never change. One training step:

    (shift, scale, t) = estimator(z, λ)         or γ = (channel mean, 1) and t sampled, when the
                                                estimator is not trained
    ᾱ = ᾱ(t) interpolated between integer steps  → t gets gradients
    Δ = √(12 (1 − ᾱ) / ᾱ)                       (noise-matched step, `codec.noise`)
    ỹ = (z − shift) / (scale · Δ) + u,  u ~ U(−½, ½)   (the rounding proxy of Ballé et al.)
    rate      = entropy.likelihood_bits(ỹ) / pixels
    ẑ = ỹ · scale · Δ + shift,   x_t = √ᾱ ẑ
    x̂₀ = one UNet step from x_t  (no backprop through a DDIM chain)
    distortion = MSE(x̂₀, z) in latents (fast), or MSE of VAE-decoded pixels
    loss = rate + λ · distortion,  λ log-uniform per batch and fed to the estimator

Pure torch: no Ray, no storage. `pipeline/train.py` runs `train_step` on Ray Train workers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .entropy import HyperpriorEntropyModel
from .estimator import T_MAX, T_MIN, ParameterEstimator
from .noise import alpha_bar_continuous

VAE_FACTOR = 8  # pixels per latent cell along each axis (SD's VAE and TAESD)


@dataclass
class CodecTrainConfig:
    """What to train and how; plain data (it travels to Ray workers and into checkpoints).

    Not to be confused with `codec.nano.BackboneTrainConfig`, which trains the backbone itself.
    """

    lam_min: float = 0.1  # λ range, sampled log-uniformly per batch
    lam_max: float = 10.0
    distortion: str = "latent"  # "latent" (fast) or "pixel" (through the VAE decoder)
    # Rounding proxy: "round" trains on the integers the coder sees (straight-through gradient);
    # at the codec's low rates (|ŷ| mostly ≤ 1) additive noise mis-states the rate of ŷ badly.
    quantizer: str = "round"
    denoise: bool = True  # one UNet step x_t -> x̂₀ before measuring distortion; False: ẑ itself
    train_estimator: bool = True  # False: γ = (channel mean, 1), t ~ U(t_range); rate-only training
    t_range: tuple[float, float] = (T_MIN, T_MAX)
    z_warmup: int = 200  # steps over which the side latent's bits ramp from free to full price (logged bpp too)
    entropy_model: str = "hyperprior"  # or "checkerboard" (+ spatial context), "channel-checkerboard" (+ channel groups)
    init_weights: str | None = None  # codec weights (name or folder) whose entropy tensors start training
    hidden: int = 64  # hyperprior width
    z_channels: int = 8  # hyperprior side-latent width
    estimator_hidden: int = 32
    lr: float = 3e-3
    decay_steps: int | None = None  # cosine decay of the learning rate to 10% over this many steps
    quantile_lr: float = 1e-2  # EntropyBottleneck quantiles (CompressAI's "aux" parameters)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecTrainConfig":
        d = dict(d)
        if "t_range" in d:
            d["t_range"] = tuple(d["t_range"])
        return cls(**d)


class RateDistortion(nn.Module):
    """The trainable parts (entropy model, optional estimator) and the loss around a frozen backbone.

    The backbone is kept outside the module tree on purpose: its weights are not trained, not in
    `state_dict()`, and not synchronised by DDP.
    """

    def __init__(self, backbone, config: CodecTrainConfig, entropy: HyperpriorEntropyModel | None = None,
                 estimator: ParameterEstimator | None = None) -> None:
        super().__init__()
        self.config = config
        self._backbone = [backbone]  # a list hides it from nn.Module registration
        c = backbone.latent_channels
        self.entropy = entropy if entropy is not None else initial_entropy(config, c)
        if config.train_estimator:
            self.estimator = estimator if estimator is not None else ParameterEstimator(c, config.estimator_hidden)
        else:
            self.estimator = None
        self.z_weight = 1.0  # set per step by train_step (warm-up of the side-information cost)
        self.register_buffer("alphas_cumprod", backbone.alphas_cumprod.float().clone(), persistent=False)

    @property
    def backbone(self):
        return self._backbone[0]

    def sample_lambda(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One λ per batch, log-uniform in [lam_min, lam_max], repeated for each image."""
        lo, hi = math.log(self.config.lam_min), math.log(self.config.lam_max)
        u = torch.rand((), generator=generator)
        return torch.full((batch,), math.exp(lo + (hi - lo) * float(u)))

    def gamma_t(self, z: torch.Tensor, lam: torch.Tensor, generator: torch.Generator | None = None):
        """(shift (B,C), scale (B,C), t (B,)) from the estimator, or the training-free fallback."""
        if self.estimator is not None:
            return self.estimator(z, lam.to(z.device))
        shift = z.mean(dim=(2, 3))
        lo, hi = self.config.t_range
        t = lo + (hi - lo) * torch.rand(z.shape[0], generator=generator)
        return shift, torch.ones_like(shift), t.to(z.device)

    def forward(self, z: torch.Tensor, lam: torch.Tensor, images: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for latents z (B,C,h,w) at trade-off λ (B,); images (B,3,8h,8w) in [-1,1]
        are the pixel-distortion target when given (else the VAE's own decode of z)."""
        shift, scale, t = self.gamma_t(z, lam, generator)
        ab = alpha_bar_continuous(self.alphas_cumprod, t).view(-1, 1, 1, 1)
        delta = torch.sqrt(12.0 * (1.0 - ab) / ab)
        step = scale[..., None, None] * delta
        y = (z - shift[..., None, None]) / step
        if self.config.quantizer == "noise":  # Ballé et al.'s additive-uniform proxy
            y_tilde = y + (torch.rand(y.shape, generator=generator).to(y.device) - 0.5)
        elif self.config.quantizer == "round":  # the symbols actually coded; straight-through gradient
            y_tilde = y + (torch.round(y) - y).detach()
        else:
            raise ValueError(f"unknown quantizer '{self.config.quantizer}' (choose round or noise)")
        bits = self.entropy.likelihood_bits(y_tilde, self.z_weight)
        pixels = z.shape[-2] * z.shape[-1] * VAE_FACTOR**2
        bpp = bits / pixels
        z_tilde = y_tilde * step + shift[..., None, None]
        x0 = one_step_x0(self.backbone, z_tilde, ab, t) if self.config.denoise else z_tilde
        if self.config.distortion == "pixel":
            rec = decode_with_grad(self.backbone, x0)
            with torch.no_grad():
                target = images if images is not None else decode_with_grad(self.backbone, z)
            dist = F.mse_loss(rec, target.to(rec.dtype), reduction="none").mean(dim=(1, 2, 3))
        elif self.config.distortion == "latent":
            dist = F.mse_loss(x0, z, reduction="none").mean(dim=(1, 2, 3))
        else:
            raise ValueError(f"unknown distortion '{self.config.distortion}' (choose latent or pixel)")
        lam = lam.to(z.device)
        aux = self.entropy.entropy_bottleneck.loss()  # fits the quantiles the CDF tables span
        rd = (bpp + lam * dist).mean()
        return {"loss": rd + aux, "rd": rd.detach(), "bpp": bpp.mean().detach(), "distortion": dist.mean().detach(),
                "t": t.mean().detach(), "lam": lam.mean(), "aux": aux.detach()}


def initial_entropy(config: CodecTrainConfig, channels: int) -> nn.Module:
    """The entropy model training starts from: fresh, or warm-started from trained weights (a
    checkerboard model from a hyperprior of the same widths: its context correction starts at 0)."""
    from .entropy import ENTROPY_MODELS, LEARNED_ENTROPY

    if config.entropy_model not in LEARNED_ENTROPY:
        raise ValueError(f"cannot train entropy model '{config.entropy_model}' (choose {' or '.join(LEARNED_ENTROPY)})")
    ent = ENTROPY_MODELS[config.entropy_model](channels, config.hidden, config.z_channels)
    if config.init_weights:
        from safetensors.torch import load_file

        from .registry import codec_weights_path

        path = Path(codec_weights_path(config.init_weights)) / "entropy.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"--init-weights '{config.init_weights}': no {path.name} there (a folder from "
                                    "`fcodec train` or the name of shipped weights)")
        try:
            ent.load_state_dict(load_file(str(path)), strict=False)
        except RuntimeError as e:  # shapes differ: other widths
            raise ValueError(f"--init-weights '{config.init_weights}' has other widths than --hp-hidden/--hp-z-channels: {e}") from None
    return ent


def one_step_x0(backbone, z_tilde: torch.Tensor, ab: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂₀ from x_t = √ᾱ ẑ with one UNet call, differentiable in ẑ and ᾱ (and in the UNet's
    weights where they require grad: `train_backbone.finetune_denoiser` tunes them through it)."""
    x_t = ab.sqrt() * z_tilde
    b = x_t.shape[0]
    ehs = backbone.prompt_embeds.expand(b, -1, -1).to(x_t.device, x_t.dtype)
    out = backbone.unet(x_t, t.to(x_t.dtype), encoder_hidden_states=ehs).sample
    if backbone.prediction_type == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out
    return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()


def decode_with_grad(backbone, z: torch.Tensor) -> torch.Tensor:
    """The backbone's VAE decoder without `inference_mode`, so gradients reach z."""
    if backbone.vae_kind == "kl":
        return backbone.vae.decode(z / backbone.scaling_factor).sample
    return backbone.vae.decode(z / backbone.scaling_factor)


def make_optimizer(model: nn.Module, config: CodecTrainConfig) -> torch.optim.Optimizer:
    """Adam; the bottleneck's quantiles get their own (larger) step, as CompressAI's aux optimizer."""
    quant = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    main = [p for n, p in model.named_parameters() if not n.endswith("quantiles") and p.requires_grad]
    return torch.optim.Adam([{"params": main, "lr": config.lr}, {"params": quant, "lr": config.quantile_lr}])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, z: torch.Tensor, lam: torch.Tensor | None = None,
               images: torch.Tensor | None = None, generator: torch.Generator | None = None,
               step: int | None = None, clip: float = 1.0) -> dict[str, float]:
    """One optimisation step on a batch of latents; returns the logged metrics as floats.

    `model` is a `RateDistortion`, possibly wrapped by DDP (its `.module`); `step` (0-based)
    drives the side-information warm-up (full price when None).
    """
    core = model.module if hasattr(model, "module") else model
    core.train()
    warm = max(1, core.config.z_warmup)
    core.z_weight = 1.0 if step is None else min(1.0, (step + 1) / warm)
    if step is not None and core.config.decay_steps:
        frac = min(1.0, step / core.config.decay_steps)
        f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        optimizer.param_groups[0]["lr"] = core.config.lr * f
    if lam is None:
        lam = core.sample_lambda(z.shape[0], generator)
    out = model(z, lam, images, generator)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups[:1] for p in g["params"]], clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items()}


def fit_quantiles(entropy: HyperpriorEntropyModel, steps: int = 2000, lr: float = 0.05) -> float:
    """Finish fitting the EntropyBottleneck's quantiles (only they move) before `update()`.

    Short runs leave them short of their targets; the CDF tables would then be narrow and
    values outside them take the (correct but costly) escape path. Cheap: no data involved.
    """
    eb = entropy.entropy_bottleneck
    opt = torch.optim.Adam([eb.quantiles], lr=lr)
    loss = eb.loss()
    for _ in range(steps):
        loss = eb.loss()
        if loss.item() < 1e-3:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def export_codec(backbone, model: RateDistortion, lam: float = 1.0, quantile_steps: int = 2000,
                 default_t: int | None = None):
    """A ready `DiffusionCodec` from trained parts (CDF tables rebuilt); `.save_pretrained(DIR)` it.
    `default_t`: the t it encodes at when none is given (and no estimator chooses), saved with it."""
    from .model import CodecConfig, DiffusionCodec

    fit_quantiles(model.entropy, quantile_steps)
    entropy = model.entropy.cpu().float().eval()
    est = model.estimator.cpu().float().eval() if model.estimator is not None else None
    codec = DiffusionCodec(backbone, entropy, est, CodecConfig(entropy=entropy.name, lam=lam))
    if default_t is not None:
        codec.default_t = int(default_t)
    return codec


def encode_latents(backbone, x: torch.Tensor) -> torch.Tensor:
    """Images (B,3,H,W) in [-1,1] -> latents (B,C,⌈H/8⌉,⌈W/8⌉), edge-padded to a multiple of 8.

    Returns a normal tensor (not an inference-mode one) so it can enter the autograd graph.
    """
    h, w = x.shape[-2:]
    ph, pw = -(-h // VAE_FACTOR) * VAE_FACTOR, -(-w // VAE_FACTOR) * VAE_FACTOR
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
    return backbone.encode(x).float().clone()
