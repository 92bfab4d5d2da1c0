"""Real SD latents: Kodak through TAESD encode → quantize → decode (skipped without ../shared)."""
import numpy as np

from codec import load_codec, load_image, psnr
from codec.taesd import TinyAutoencoder


def test_taesd_loads_both_layouts(taesd_dir, tmp_path):
    import shutil

    a = TinyAutoencoder.from_dir(taesd_dir)
    for f in ("taesd_encoder.pth", "taesd_decoder.pth"):
        shutil.copy(taesd_dir / f, tmp_path / f)
    b = TinyAutoencoder.from_dir(tmp_path)  # the original .pth layout
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert np.array_equal(v.numpy(), w.numpy()), k


def test_kodak_through_taesd_real_bpp_and_psnr(taesd_dir, kodak):
    codec = load_codec("tiny", vae=str(taesd_dir))
    images = [load_image(p.read_bytes()) for p in kodak[:4]]
    for t in (50, 100):
        enc = codec.encode(images, t=t)
        dec = codec.decode([e.data for e in enc], steps=0)
        bpp = float(np.mean([e.bpp for e in enc]))
        q = float(np.mean([psnr(i.pixels, d) for i, d in zip(images, dec)]))
        print(f"TAESD Kodak[:4] t={t}: {bpp:.4f} bpp, {q:.2f} dB (no denoising)")
        # DESIGN.md's naive baseline on all 24: t=50 0.113 bpp / 21.6 dB, t=100 0.083 bpp / 18.8 dB
        assert 0.03 < bpp < 0.25 and q > 16.0
