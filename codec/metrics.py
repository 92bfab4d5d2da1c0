"""Image quality metrics, per image and per dataset; pure torch/numpy, no downloads ever.

Per image (uint8 HxWx3 original vs decoded, on the original's unpadded size):
  PSNR (8-bit), SSIM and MS-SSIM (`pytorch_msssim`, data range 255, float64), and LPIPS / DISTS
  when their weights are found on disk (`load_perceptual`: otherwise a 'skipped: ...' reason).

Per dataset: FID and KID on 256x256 patches cut the HiFiC way (Mentzer et al. 2020, App. A.7):
every non-overlapping patch, plus a second grid shifted by half a patch. Features are reduced
to *mergeable* statistics (`FeatureStats`) so workers never ship all features to one place:
FID needs count, sum and sum of outer products; KID (a kernel two-sample statistic, which has no
fixed-size sufficient statistic for 2048-d features) uses a bounded uniform sample chosen by a
hash of (image key, patch index), so the merged sample is the same however the work was split.
The feature extractor is pluggable: Inception (weights optional) or a small seeded network.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MS_SSIM_MIN_SIDE = 161  # pytorch_msssim's 5 scales with an 11-px window need > 160 px
PATCH = 256
KID_SAMPLE = 2000  # features kept per side for KID (bounded: 16 MB at 2048-d; Bińkowski's subsets are 1000)


# ---------------------------------------------------------------------------- per image
def _match(orig: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Crop a decoded image to the original's size (decoders may return padded pixels)."""
    h, w = orig.shape[:2]
    if dec.shape[0] < h or dec.shape[1] < w:
        raise ValueError(f"decoded image {dec.shape[1]}x{dec.shape[0]} is smaller than the original {w}x{h}")
    return dec[:h, :w]


def psnr(orig: np.ndarray, dec: np.ndarray) -> float:
    """8-bit PSNR in dB over all pixels and channels of the original's (unpadded) area."""
    dec = _match(orig, dec)
    mse = float(np.mean((orig.astype(np.float64) - dec.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(img)).permute(2, 0, 1)[None].double()  # a copy: inputs may be read-only


def ssim(orig: np.ndarray, dec: np.ndarray) -> float:
    """SSIM (Gaussian 11x11 window, sigma 1.5) averaged over RGB; NaN below 11 px."""
    from pytorch_msssim import ssim as _ssim

    dec = _match(orig, dec)
    if min(orig.shape[:2]) < 11:
        return float("nan")
    return float(_ssim(_t(orig), _t(dec), data_range=255.0, size_average=True))


def ms_ssim(orig: np.ndarray, dec: np.ndarray) -> float:
    """MS-SSIM (5 scales, standard weights) as `pytorch_msssim`; NaN when a side is < 161 px."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    dec = _match(orig, dec)
    if min(orig.shape[:2]) < MS_SSIM_MIN_SIDE:
        return float("nan")
    return float(_ms_ssim(_t(orig), _t(dec), data_range=255.0, size_average=True))


def colour_error(orig: np.ndarray, dec: np.ndarray) -> float:
    """Mean over R, G, B of |image mean of the original − image mean of the decode|, in 8-bit
    levels: a colour cast (greens turning grey) shows here even where PSNR hides it."""
    dec = _match(orig, dec)
    a = orig.reshape(-1, orig.shape[-1]).astype(np.float64).mean(0)
    b = dec.reshape(-1, dec.shape[-1]).astype(np.float64).mean(0)
    return float(np.abs(a - b).mean())


def image_metrics(orig: np.ndarray, dec: np.ndarray, perceptual: dict | None = None) -> dict[str, float]:
    """All per-image metrics; `perceptual` maps a name to a loaded `PerceptualMetric`."""
    dec = _match(orig, dec)
    out = {"psnr": psnr(orig, dec), "ssim": ssim(orig, dec), "ms_ssim": ms_ssim(orig, dec),
           "colour_error": colour_error(orig, dec)}
    for name, m in (perceptual or {}).items():
        out[name] = m(orig, dec)
    return out


# ---------------------------------------------------------------------------- LPIPS / DISTS
class _L2Pool(nn.Module):
    """DISTS' L2 pooling (Hanning 3x3 on squared activations) in place of VGG's max pooling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = np.hanning(5)[1:-1]
        g = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
        self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x**2, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet variant (Zhang et al. 2018): input uint8 images, lower is better."""

    files = ("alexnet-owt-7be5be79.pth", "alex.pth")
    env = "FCODEC_LPIPS_WEIGHTS"

    def __init__(self, alexnet_state: dict, lin_state: dict) -> None:
        super().__init__()
        from torchvision.models import alexnet

        feats = alexnet(weights=None).features
        feats.load_state_dict({k[len("features."):]: v for k, v in alexnet_state.items() if k.startswith("features.")})
        cuts = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]  # relu1 .. relu5
        self.slices = nn.ModuleList(nn.Sequential(*[feats[i] for i in range(a, b)]) for a, b in cuts)
        chans = [64, 192, 384, 256, 256]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
        for i, lin in enumerate(self.lins):
            key = next(k for k in lin_state if k.startswith(f"lin{i}.") and k.endswith("weight"))
            lin.weight.data.copy_(lin_state[key])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval()

    @torch.inference_mode()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N,3,H,W) in [-1, 1]; returns (N,)."""
        ha, hb = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device)
        for sl, lin in zip(self.slices, self.lins):
            ha, hb = sl(ha), sl(hb)
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total

    def __call__(self, orig: np.ndarray, dec: np.ndarray) -> float:  # type: ignore[override]
        to = lambda x: torch.tensor(np.asarray(x), device=self.shift.device).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
        return float(super().__call__(to(orig), to(_match(orig, dec)))[0])


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020): VGG16 with L2 pooling, structure + texture similarity; lower is better."""

    files = ("vgg16-397923af.pth", "weights.pt")
    env = "FCODEC_DISTS_WEIGHTS"
    chns = [3, 64, 128, 256, 512, 512]

    def __init__(self, vgg_state: dict, ab_state: dict) -> None:
        super().__init__()
        from torchvision.models import vgg16

        v = vgg16(weights=None).features
        v.load_state_dict({k[len("features."):]: m for k, m in vgg_state.items() if k.startswith("features.")})
        pools = {4: 64, 9: 128, 16: 256, 23: 512}
        bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[(_L2Pool(pools[i]) if i in pools else v[i]) for i in range(a, b)]) for a, b in bounds
        )
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.register_buffer("alpha", ab_state["alpha"].float().reshape(1, sum(self.chns), 1, 1))
        self.register_buffer("beta", ab_state["beta"].float().reshape(1, sum(self.chns), 1, 1))
        self.eval()

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.mean) / self.std, [x]
        for st in self.stages:
            h = st(h)
            out.append(h)
        return out

    @torch.inference_mode()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N,3,H,W) in [0, 1]; returns (N,)."""
        fa, fb = self._feats(a), self._feats(b)
        w = self.alpha.sum() + self.beta.sum()
        alpha = torch.split(self.alpha / w, self.chns, dim=1)
        beta = torch.split(self.beta / w, self.chns, dim=1)
        d1 = d2 = 0.0
        for k in range(len(self.chns)):
            xm, ym = fa[k].mean([2, 3], keepdim=True), fb[k].mean([2, 3], keepdim=True)
            d1 = d1 + (alpha[k] * (2 * xm * ym + 1e-6) / (xm**2 + ym**2 + 1e-6)).sum(1, keepdim=True)
            xv, yv = ((fa[k] - xm) ** 2).mean([2, 3], keepdim=True), ((fb[k] - ym) ** 2).mean([2, 3], keepdim=True)
            cov = (fa[k] * fb[k]).mean([2, 3], keepdim=True) - xm * ym
            d2 = d2 + (beta[k] * (2 * cov + 1e-6) / (xv + yv + 1e-6)).sum(1, keepdim=True)
        return 1 - (d1 + d2).flatten()

    def __call__(self, orig: np.ndarray, dec: np.ndarray) -> float:  # type: ignore[override]
        to = lambda x: torch.tensor(np.asarray(x), device=self.mean.device).permute(2, 0, 1)[None].float() / 255.0  # noqa: E731
        return float(super().__call__(to(orig), to(_match(orig, dec)))[0])


PERCEPTUAL = {"lpips": LPIPS, "dists": DISTS}


def load_perceptual(name: str, weights_dir: str | os.PathLike | None = None) -> tuple[nn.Module | None, str]:
    """Load LPIPS or DISTS from a local folder (argument, else $FCODEC_LPIPS_WEIGHTS / $FCODEC_DISTS_WEIGHTS).

    Never downloads. Returns (metric, "ok") or (None, "skipped: weights not found at ..., set ...").
    """
    cls = PERCEPTUAL[name]
    d = weights_dir or os.environ.get(cls.env)
    if not d:
        return None, f"skipped: weights not found (no folder given), set {cls.env}=DIR holding {' and '.join(cls.files)}"
    paths = [Path(d) / f for f in cls.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return None, f"skipped: weights not found at {', '.join(missing)}, set {cls.env}=DIR holding {' and '.join(cls.files)}"
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    return cls(*states), "ok"


# ---------------------------------------------------------------------------- FID / KID
def hific_patches(img: np.ndarray, size: int = PATCH) -> np.ndarray:
    """(N, size, size, 3) patches: the non-overlapping grid, then the grid shifted by size/2.

    Images smaller than a patch give none (HiFiC's protocol; such datasets get no FID).
    """
    h, w = img.shape[:2]
    out = []
    for off in (0, size // 2):
        for y in range(off, h - size + 1, size):
            for x in range(off, w - size + 1, size):
                out.append(img[y : y + size, x : x + size])
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _sample_keys(key: str, n: int) -> np.ndarray:
    """A deterministic pseudo-random 64-bit priority per (image key, patch index)."""
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(h, "little"))
    return rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)


@dataclass
class FeatureStats:
    """Mergeable statistics of one feature set: exact FID moments plus a bounded KID sample.

    `n`, `sum` (d) and `outer` (d x d, sum of x xᵀ) in float64 merge by addition; the KID sample
    keeps the `cap` features with the smallest hash priority, so merging keeps a uniform sample.
    """

    dim: int
    cap: int = KID_SAMPLE
    n: int = 0
    sum: np.ndarray = None  # type: ignore[assignment]
    outer: np.ndarray = None  # type: ignore[assignment]
    prio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = np.zeros(self.dim)
            self.outer = np.zeros((self.dim, self.dim))
            self.sample = np.zeros((0, self.dim))

    def add(self, feats: np.ndarray, key: str = "") -> "FeatureStats":
        """Add (N, d) features of one image (`key` seeds the KID sample's priorities)."""
        f = np.asarray(feats, np.float64).reshape(-1, self.dim)
        self.n += len(f)
        self.sum = self.sum + f.sum(0)
        self.outer = self.outer + f.T @ f
        self._keep(np.concatenate([self.prio, _sample_keys(key, len(f))]), np.concatenate([self.sample, f]))
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold another worker's statistics into this one (order does not matter)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge features of dimension {other.dim} into {self.dim}")
        self.n += other.n
        self.sum = self.sum + other.sum  # new arrays: statistics from Ray arrive read-only
        self.outer = self.outer + other.outer
        self._keep(np.concatenate([self.prio, other.prio]), np.concatenate([self.sample, other.sample]))
        return self

    def _keep(self, prio: np.ndarray, sample: np.ndarray) -> None:
        # ties (same image key twice) broken by feature values, so the result is order-free
        order = np.lexsort((sample.sum(1), sample[:, 0], prio))[: self.cap] if len(prio) else np.zeros(0, int)
        self.prio, self.sample = prio[order], sample[order]

    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance from the sums (what np.cov(features, rowvar=False) gives)."""
        mu = self.mean()
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def fid_from_moments(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1-mu2|² + tr(C1 + C2 - 2 (C1 C2)^½)."""
    from scipy import linalg

    covmean = linalg.sqrtm(c1 @ c2)
    if not np.isfinite(covmean).all():  # singular product: regularize as pytorch-fid does
        eps = np.eye(len(c1)) * 1e-6
        covmean = linalg.sqrtm((c1 + eps) @ (c2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two merged statistics."""
    if min(a.n, b.n) < 2:
        return float("nan")
    return fid_from_moments(a.mean(), a.cov(), b.mean(), b.cov())


def kid_from_features(x: np.ndarray, y: np.ndarray, subset_size: int = 1000, n_subsets: int = 100,
                      seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018): unbiased MMD² with k(a,b) = (aᵀb/d + 1)³, averaged over
    random subsets (all features, once, when there are at most `subset_size`)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    m = min(len(x), len(y), subset_size)
    if m < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    reps = 1 if len(x) == len(y) == m else n_subsets
    vals = []
    for _ in range(reps):
        xs = x if len(x) == m else x[rng.choice(len(x), m, replace=False)]
        ys = y if len(y) == m else y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = (xs @ xs.T / d + 1) ** 3, (ys @ ys.T / d + 1) ** 3, (xs @ ys.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals))


def kid(a: FeatureStats, b: FeatureStats) -> float:
    """KID between the bounded samples of two merged statistics."""
    return kid_from_features(a.sample, b.sample)


# ---------------------------------------------------------------------------- feature extractors
class SeededFeatures(nn.Module):
    """A small random conv net (fixed seed) as a stand-in feature extractor: tests check the
    statistics math with it; it is no perceptual measure."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim, self.name = dim, f"seeded:{dim}:{seed}"
        self.net = nn.Sequential(nn.Conv2d(3, 16, 5, 2, 2), nn.ReLU(), nn.Conv2d(16, dim, 5, 2, 2), nn.ReLU())
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N,3,P,P) in [0,1] -> (N, dim)."""
        return self.net(x).mean(dim=(2, 3)).double()


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 pool3 features (2048-d), from a local state-dict file."""

    default_file = "inception_v3_google-0cc3c7bd.pth"
    env = "FCODEC_INCEPTION_WEIGHTS"

    def __init__(self, state: dict) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits.")})
        self.net.fc = nn.Identity()
        self.dim, self.name = 2048, "inception_v3"
        self.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1).double()  # Google's weights expect [-1, 1]


def feature_extractor(spec: str = "inception") -> tuple[Callable | None, str]:
    """Resolve `inception` (weights from $FCODEC_INCEPTION_WEIGHTS or the torch hub cache, never
    downloaded) or `seeded[:DIM[:SEED]]`. Returns (extractor, "ok") or (None, "skipped: ...")."""
    if spec.startswith("seeded"):
        parts = spec.split(":")
        return SeededFeatures(int(parts[1]) if len(parts) > 1 else 16, int(parts[2]) if len(parts) > 2 else 0), "ok"
    if spec in ("none", "off"):
        return None, "skipped: disabled"
    if spec != "inception":
        raise ValueError(f"unknown feature extractor '{spec}' (choose inception, seeded[:DIM[:SEED]] or none)")
    path = os.environ.get(InceptionFeatures.env) or str(Path(torch.hub.get_dir()) / "checkpoints" / InceptionFeatures.default_file)
    if not Path(path).is_file():
        return None, (f"skipped: weights not found at {path}, set {InceptionFeatures.env}=FILE "
                      f"(torchvision's {InceptionFeatures.default_file})")
    return InceptionFeatures(torch.load(path, map_location="cpu", weights_only=True)), "ok"


def patch_features(extractor: Callable, img: np.ndarray, size: int = PATCH, batch: int = 16) -> np.ndarray:
    """Features (N, d) of an image's HiFiC patches."""
    p = hific_patches(img, size)
    if not len(p):
        return np.zeros((0, extractor.dim))
    out, dev = [], next(extractor.parameters()).device
    for s in range(0, len(p), batch):
        x = torch.from_numpy(p[s : s + batch]).to(dev).permute(0, 3, 1, 2).float() / 255.0
        out.append(extractor(x).cpu().numpy())
    return np.concatenate(out)
