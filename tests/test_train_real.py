"""A real rate result: a hyperprior trained briefly on TAESD latents of the training corpus
(`../shared/data/photos`, never the held-out sets) beats the static model on held-out photos
(USC-SIPI) at equal t, in real range-coded bytes. Skipped without ../shared."""
from __future__ import annotations

import numpy as np
import pytest
import torch

T = 50  # DESIGN.md: static ≈ 0.113 bpp on Kodak at t = 50


@pytest.mark.slow
def test_hyperprior_beats_static_on_real_latents(taesd_dir, shared_dir):
    from codec import load_codec, load_image
    from codec.pixels import random_crop
    from codec.training import CodecTrainConfig, RateDistortion, encode_latents, export_codec, make_optimizer, train_step
    from pipeline.train import training_pixels

    held_out = sorted((shared_dir / "data" / "usc_sipi").glob("*.png"))
    photos = sorted((shared_dir / "data" / "photos").glob("*.jpg"))[::4]  # 9 of the 36 training photos
    if not held_out or not photos:
        pytest.skip("../shared/data/usc_sipi or ../shared/data/photos is absent")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        static = load_codec("tiny", vae=str(taesd_dir))
        bb = static.backbone
        # Cache the photos' latents once (downscaled to 512 px, TAESD encode ~1 s each).
        latents = []
        for p in photos:
            px = training_pixels(p.read_bytes(), 512)
            x = torch.from_numpy(np.ascontiguousarray(px)).permute(2, 0, 1)[None]
            latents.append(encode_latents(bb, x.float() / 127.5 - 1)[0])
        # Rate-only training at the evaluation t: γ = (channel mean, 1) as the codec uses without
        # an estimator, so distortion does not depend on the entropy model and is left out.
        steps = 400
        cfg = CodecTrainConfig(train_estimator=False, t_range=(T, T), denoise=False, decay_steps=steps)
        torch.manual_seed(0)
        model = RateDistortion(bb, cfg)
        opt = make_optimizer(model, cfg)
        g = torch.Generator().manual_seed(0)
        for s in range(steps):
            idx = torch.randint(0, len(latents), (8,), generator=g).tolist()
            z = torch.stack([random_crop(latents[i], 32, g) for i in idx])
            m = train_step(model, opt, z, generator=g, step=s)
        print(f"last training batch: {m['bpp']:.4f} bpp")
        hyper = export_codec(bb, model)

        images = [load_image(p.read_bytes()) for p in held_out][:8]
        pixels = sum(im.pixels.shape[0] * im.pixels.shape[1] for im in images)
        enc_s = static.encode(images, t=T)
        enc_h = hyper.encode(images, t=T)
        bytes_s, bytes_h = sum(len(e.data) for e in enc_s), sum(len(e.data) for e in enc_h)
        bpp_s, bpp_h = bytes_s * 8 / pixels, bytes_h * 8 / pixels
        print(f"USC-SIPI ({len(images)} images) at t={T}: static {bpp_s:.4f} bpp ({bytes_s} B), "
              f"hyperprior {bpp_h:.4f} bpp ({bytes_h} B), {100 * (1 - bytes_h / bytes_s):.1f}% smaller")
        assert bytes_h < bytes_s
        assert 0.05 < bpp_s < 0.2  # the static model's known range on real latents at t=50
        # Lossless entropy coding: both records hold the same symbols, so they decode identically.
        a = static.decode([enc_s[0].data], steps=0)[0]
        b = hyper.decode([enc_h[0].data], steps=0)[0]
        assert np.array_equal(a, b)
    finally:
        torch.set_num_threads(threads)
