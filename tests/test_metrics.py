"""Metric correctness against references: PSNR on a known perturbation, MS-SSIM against
pytorch_msssim, FID/KID from merged partial statistics against all features at once (scipy)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codec import metrics as M


def _img(seed: int, h: int = 192, w: int = 256) -> np.ndarray:
    from jobs.samples import sample_image

    return sample_image(seed, h, w)


def test_psnr_known_perturbation():
    rng = np.random.default_rng(0)
    orig = rng.integers(10, 240, (48, 64, 3)).astype(np.uint8)
    assert M.psnr(orig, orig + 5) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)  # MSE = 25
    # +-4 on exactly a quarter of the values: MSE = 16 / 4 = 4
    dec = orig.astype(np.int16)
    flat = dec.reshape(-1)
    idx = rng.permutation(flat.size)[: flat.size // 4]
    flat[idx] += np.where(rng.random(idx.size) < 0.5, -4, 4)
    assert M.psnr(orig, dec.astype(np.uint8)) == pytest.approx(10 * math.log10(255**2 / 4), abs=1e-9)
    assert M.psnr(orig, orig) == float("inf")


def test_psnr_is_measured_on_the_unpadded_size():
    orig = _img(1, 50, 70)
    padded = np.full((64, 128, 3), 255, np.uint8)  # a decoder's padded output, garbage borders
    padded[:50, :70] = orig
    padded[:50, :70][0, 0] ^= 8
    expected = 10 * math.log10(255**2 / ((orig[0, 0].astype(float) - (orig[0, 0] ^ 8)) ** 2).sum() * orig.size)
    assert M.psnr(orig, padded) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="smaller than the original"):
        M.psnr(orig, orig[:40])


def test_ms_ssim_and_ssim_match_pytorch_msssim():
    from pytorch_msssim import ms_ssim, ssim

    orig = _img(2, 192, 256)
    rng = np.random.default_rng(1)
    dec = np.clip(orig.astype(int) + rng.normal(0, 12, orig.shape), 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float()  # noqa: E731 - reference's usual float32 call
    ref_ms = float(ms_ssim(t(orig), t(dec), data_range=255))
    ref_s = float(ssim(t(orig), t(dec), data_range=255))
    assert 0.5 < ref_ms < 0.999
    assert abs(M.ms_ssim(orig, dec) - ref_ms) < 1e-4
    assert abs(M.ssim(orig, dec) - ref_s) < 1e-4
    assert M.ms_ssim(orig, orig) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(M.ms_ssim(orig[:160], dec[:160]))  # too small for 5 scales: NaN, not a crash
    m = M.image_metrics(orig, dec)
    assert set(m) == {"psnr", "ssim", "ms_ssim", "colour_error"} and 20 < m["psnr"] < 30
    assert m["colour_error"] == pytest.approx(np.abs(orig.reshape(-1, 3).mean(0) - dec.reshape(-1, 3).mean(0)).mean())
    assert M.colour_error(orig, orig) == 0.0


def test_hific_patches_grid_and_shift():
    img = np.zeros((512, 768, 3), np.uint8)
    img[..., 0] = np.arange(768)[None, :] % 256
    img[..., 1] = np.arange(512)[:, None] % 256
    p = M.hific_patches(img)
    assert p.shape == (6 + 2, 256, 256, 3)  # 3x2 grid, then the 128-px shifted grid has 2x1
    assert p[6, 0, 0, 0] == 128 and p[6, 0, 0, 1] == 128  # first shifted patch starts at (128, 128)
    assert M.hific_patches(img[:200]).shape[0] == 0


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def _reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD², written from the definition with explicit pair sums."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return float(sxx + syy - 2 * sxy)


def test_fid_kid_from_merged_partial_sums_equal_all_at_once():
    rng = np.random.default_rng(0)
    d = 12
    real = rng.normal(0, 1, (300, d)) @ rng.normal(0, 1, (d, d))
    fake = rng.normal(0.3, 1.2, (300, d)) @ rng.normal(0, 1, (d, d))
    # three "workers", uneven shards of several "images" each
    shards = [[(0, 40), (40, 41)], [(41, 170)], [(170, 230), (230, 300)]]
    parts_r, parts_f = [], []
    for shard in shards:
        sr, sf = M.FeatureStats(d, cap=1000), M.FeatureStats(d, cap=1000)
        for a, b in shard:
            sr.add(real[a:b], key=f"img{a}")
            sf.add(fake[a:b], key=f"img{a}")
        parts_r.append(sr)
        parts_f.append(sf)
    sr, sf = M.FeatureStats(d, cap=1000), M.FeatureStats(d, cap=1000)
    for p in parts_r[::-1]:  # merge order differs from add order
        sr.merge(p)
    for p in parts_f:
        sf.merge(p)
    assert sr.n == 300
    np.testing.assert_allclose(sr.cov(), np.cov(real, rowvar=False), rtol=1e-9, atol=1e-9)
    ref = _reference_fid(real, fake)
    assert ref > 1
    assert abs(M.fid(sr, sf) - ref) / ref < 1e-6
    # KID: the merged sample holds every feature (cap >= n), so it equals KID on all features
    kref = _reference_kid(real[:120], fake[:120])
    assert abs(M.kid_from_features(real[:120], fake[:120]) - kref) / abs(kref) < 1e-6
    kall = M.kid_from_features(real, fake)
    assert abs(M.kid(sr, sf) - kall) / abs(kall) < 1e-6
    assert abs(M.kid_from_features(real[:150], real[150:])) < 0.05 * kall  # same distribution: ~0


def test_kid_sample_is_independent_of_sharding():
    rng = np.random.default_rng(3)
    feats = {f"k{i}": rng.normal(0, 1, (5, 4)) for i in range(40)}
    a = M.FeatureStats(4, cap=37)
    for k, f in feats.items():
        a.add(f, key=k)
    b1, b2 = M.FeatureStats(4, cap=37), M.FeatureStats(4, cap=37)
    for i, (k, f) in enumerate(reversed(feats.items())):
        (b1 if i % 3 else b2).add(f, key=k)
    b = b2.merge(b1)
    assert len(a.sample) == 37 and a.n == b.n == 200
    np.testing.assert_array_equal(a.sample, b.sample)


def test_seeded_extractor_patch_features_end_to_end():
    ext, why = M.feature_extractor("seeded:8:1")
    assert why == "ok" and ext.dim == 8
    imgs = [_img(i, 96, 128) for i in range(3)]
    feats = [M.patch_features(ext, im, size=32) for im in imgs]
    assert feats[0].shape == (12 + 6, 8)  # 4x3 grid + 3x2 shifted grid of 32-px patches
    np.testing.assert_array_equal(feats[1], M.patch_features(M.SeededFeatures(8, 1), imgs[1], size=32))
    s = M.FeatureStats(8)
    for i, f in enumerate(feats):
        s.add(f, key=str(i))
    assert M.fid(s, s) == pytest.approx(0.0, abs=1e-6)


def test_inception_and_perceptual_skip_cleanly_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("FCODEC_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    ext, why = M.feature_extractor("inception")
    assert ext is None and why.startswith("skipped: weights not found at") and "FCODEC_INCEPTION_WEIGHTS" in why
    monkeypatch.delenv("FCODEC_LPIPS_WEIGHTS", raising=False)
    m, why = M.load_perceptual("lpips")
    assert m is None and "set FCODEC_LPIPS_WEIGHTS" in why
    m, why = M.load_perceptual("dists", tmp_path)
    assert m is None and str(tmp_path / "weights.pt") in why and "FCODEC_DISTS_WEIGHTS" in why


def test_lpips_and_dists_load_local_weights(tmp_path, monkeypatch):
    """The loading path with weights files in the published layouts (random values, seeded)."""
    from torchvision.models import alexnet, vgg16

    torch.manual_seed(0)
    torch.save({k: v for k, v in alexnet().state_dict().items() if k.startswith("features.")}, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 192, 384, 256, 256])}, tmp_path / "alex.pth")
    torch.save({k: v for k, v in vgg16().features.state_dict().items()} | {}, tmp_path / "tmp.pth")
    torch.save({f"features.{k}": v for k, v in torch.load(tmp_path / "tmp.pth").items()}, tmp_path / "vgg16-397923af.pth")
    torch.save({"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}, tmp_path / "weights.pt")
    monkeypatch.setenv("FCODEC_LPIPS_WEIGHTS", str(tmp_path))
    orig = _img(4, 64, 64)
    noisy = np.clip(orig.astype(int) + np.random.default_rng(0).normal(0, 30, orig.shape), 0, 255).astype(np.uint8)
    lp, why = M.load_perceptual("lpips")
    assert why == "ok"
    assert lp(orig, orig) == pytest.approx(0.0, abs=1e-6) and lp(orig, noisy) > 1e-4
    ds, why = M.load_perceptual("dists", tmp_path)
    assert why == "ok"
    assert abs(ds(orig, orig)) < 1e-5 and ds(orig, noisy) > 1e-3
    m = M.image_metrics(orig, noisy, {"lpips": lp, "dists": ds})
    assert m["lpips"] == pytest.approx(lp(orig, noisy))


def _layout_weights(tmp_path, alex_features: dict, vgg_features: dict | None = None) -> None:
    """Weights files in the layout load_perceptual reads (torchvision names)."""
    torch.save({f"features.{k}": v for k, v in alex_features.items()}, tmp_path / "alexnet-owt-7be5be79.pth")
    if vgg_features is not None:
        torch.save({f"features.{k}": v for k, v in vgg_features.items()}, tmp_path / "vgg16-397923af.pth")


def test_lpips_matches_the_reference_package(tmp_path):
    """Same backbone weights (the reference's seeded random AlexNet: no download) and the
    reference package's own trained linear heads: our LPIPS equals `lpips.LPIPS` to 1e-5."""
    lpips = pytest.importorskip("lpips")
    from pathlib import Path

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    alex = {}
    for i in range(1, 6):
        for k, v in getattr(ref.net, f"slice{i}").state_dict().items():
            alex[k] = v  # keys are the torchvision feature indices ('0.weight', '3.bias', ...)
    _layout_weights(tmp_path, alex)
    (tmp_path / "alex.pth").write_bytes((Path(lpips.__file__).parent / "weights/v0.1/alex.pth").read_bytes())
    ours, why = M.load_perceptual("lpips", tmp_path)
    assert why == "ok"
    a = _img(5, 64, 96)
    b = np.clip(a.astype(int) + np.random.default_rng(2).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        want = float(ref(t(a), t(b)).flatten()[0])
    assert want > 1e-3
    assert ours(a, b) == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_dists_matches_the_reference_package(tmp_path, monkeypatch):
    """DISTS against `DISTS_pytorch` with the package's trained alpha/beta and a seeded random
    VGG16 for both (the reference would download ImageNet VGG weights; we hand it a random one)."""
    dp = pytest.importorskip("DISTS_pytorch.DISTS_pt")
    from pathlib import Path

    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    monkeypatch.setattr(dp.models, "vgg16", lambda pretrained=True, **kw: vgg)  # weight source only
    ref = dp.DISTS(load_weights=False).eval()
    ab = torch.load(Path(dp.__file__).parent / "weights.pt", map_location="cpu", weights_only=True)
    ref.alpha.data, ref.beta.data = ab["alpha"], ab["beta"]
    _layout_weights(tmp_path, {}, vgg.features.state_dict())
    torch.save(ab, tmp_path / "weights.pt")
    ours, why = M.load_perceptual("dists", tmp_path)
    assert why == "ok"
    a = _img(6, 64, 96)
    b = np.clip(a.astype(int) + np.random.default_rng(3).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    want = float(ref(t(a), t(b)))
    assert want > 1e-3
    assert ours(a, b) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_inception_extractor_loads_a_local_state_dict(tmp_path, monkeypatch):
    """The Inception path end to end with a torchvision-layout file (seeded random weights)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(), tmp_path / "inc.pth")
    monkeypatch.setenv("FCODEC_INCEPTION_WEIGHTS", str(tmp_path / "inc.pth"))
    ext, why = M.feature_extractor("inception")
    assert why == "ok" and ext.dim == 2048
    img = _img(7, 256, 384)
    f = M.patch_features(ext, img)
    assert f.shape == (1, 2048) and np.isfinite(f).all()  # one 256 patch; the shifted grid has none
    np.testing.assert_allclose(M.patch_features(ext, img), f, rtol=1e-6)
