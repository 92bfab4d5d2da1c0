"""Quantization as diffusion noise: Var(ẑ − z) = (1 − ᾱ_t) / ᾱ_t."""
import numpy as np
import pytest
import torch

from codec.backbone import sd_alphas_cumprod
from codec.noise import alpha_bar_continuous, noise_variance, step_size


# Matching holds while Δ_t is small against the latent spread (SD latents: std ≈ 1, so t ≤ ~250);
# beyond it most values round to the shift and the error variance saturates at Var(z).
@pytest.mark.parametrize("t", [5, 50, 100, 200])
def test_quantization_error_variance_matches_diffusion_noise(tiny_codec, t):
    g = torch.Generator().manual_seed(t)
    z = torch.randn(4, 64, 64, generator=g) * 1.3 + 0.2
    shift = np.full(4, 0.2, np.float16)
    scale = np.ones(4, np.float16)
    y_hat = tiny_codec.quantize(z, t, shift, scale)
    z_hat = tiny_codec.dequantize(y_hat, t, shift, scale)
    emp = float((z_hat.double() - z.double()).var())
    want = noise_variance(tiny_codec.backbone.alphas_cumprod, t)
    print(f"t={t}: empirical {emp:.5f} vs (1-ab)/ab {want:.5f}")
    assert abs(emp / want - 1) < 0.05


def test_step_size_equation():
    ac = sd_alphas_cumprod()
    for t in (1, 10, 500, 999):
        a = float(ac[t])
        assert step_size(ac, t) ** 2 / 12 == pytest.approx((1 - a) / a, rel=1e-12)
    with pytest.raises(ValueError):
        step_size(ac, 0)


def test_sd_schedule_values():
    ac = sd_alphas_cumprod()
    # diffusers' scaled_linear schedule for SD: ᾱ_0 = 1 − 0.00085, ᾱ_999 ≈ 0.0047
    assert float(ac[0]) == pytest.approx(1 - 0.00085)
    assert float(ac[999]) == pytest.approx(0.00466, abs=2e-4)


def test_continuous_alpha_bar_interpolates_and_has_gradient():
    ac = sd_alphas_cumprod()
    t = torch.tensor([10.0, 10.5, 11.0], requires_grad=True)
    a = alpha_bar_continuous(ac, t)
    assert float(a[0]) == pytest.approx(float(ac[10]), rel=1e-6)
    assert float(a[1]) == pytest.approx((float(ac[10]) + float(ac[11])) / 2, rel=1e-6)
    a.sum().backward()
    assert float(t.grad[1]) < 0  # more noise as t grows
