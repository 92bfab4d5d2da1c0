"""Baseline codecs (JPEG/WebP/AVIF via Pillow, JPEG XL via imagecodecs, CompressAI from local
weights) behind the codec API."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import CodecError, Encoded, load_image
from codec.baselines import CompressAICodec, JpegXLCodec, PillowCodec, compressai_weights_path, make_baseline
from codec.metrics import psnr


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_pillow_baselines_round_trip_and_rate_order(fmt, sample_images):
    lo, hi = PillowCodec(fmt, 10), PillowCodec(fmt, 90)
    enc_lo, enc_hi = lo.encode(sample_images), hi.encode(sample_images)
    assert all(isinstance(e, Encoded) and e.t == 10 for e in enc_lo)
    dec_lo, dec_hi = lo.decode([e.data for e in enc_lo]), hi.decode([e.data for e in enc_hi])
    for im, a, b, ea, eb in zip(sample_images, dec_lo, dec_hi, enc_lo, enc_hi):
        assert a.shape == im.shape and a.dtype == np.uint8
        assert 0 < ea.bpp < eb.bpp  # more quality, more bits
        assert psnr(im, a) < psnr(im, b) and psnr(im, b) > 30
    assert lo.fingerprint() != hi.fingerprint() and len(lo.fingerprint()) == 8
    # the bitstream is the standard file: the project's image loader reads it
    assert load_image(enc_hi[0].data).pixels.shape == sample_images[0].shape


def test_jpeg_xl_round_trip_rate_order_and_target_bpp(sample_images):
    lo, hi = make_baseline("jxl", 10), make_baseline("jxl", 90)
    assert isinstance(lo, JpegXLCodec)
    enc_lo, enc_hi = lo.encode(sample_images), hi.encode(sample_images)
    for im, ea, eb in zip(sample_images, enc_lo, enc_hi):
        a, b = lo.decode([ea.data])[0], hi.decode([eb.data])[0]
        assert a.shape == im.shape and a.dtype == np.uint8 and ea.t == 10
        assert 0 < ea.bpp < eb.bpp and psnr(im, a) < psnr(im, b) and psnr(im, b) > 30
    assert lo.fingerprint() != hi.fingerprint() and len(lo.fingerprint()) == 8
    e = lo.encode(sample_images[1:2], target_bpp=1.0)[0]
    assert e.bpp <= 1.0 and lo.encode(sample_images[1:2], t=e.t + 1)[0].bpp > 1.0
    bad = lo.decode([b"junk"], errors="return")[0]
    assert isinstance(bad, CodecError) and "JPEG XL" in str(bad)


def test_pillow_target_bpp_and_errors(sample_images):
    c = PillowCodec("jpeg", 75)
    e = c.encode(sample_images[1:2], target_bpp=1.0)[0]
    assert e.bpp <= 1.0 and 1 <= e.t < 100
    assert c.encode(sample_images[1:2], t=e.t + 1)[0].bpp > 1.0  # the search picked the highest fitting quality
    webp = PillowCodec("webp", 50).encode(sample_images[:1])[0].data
    out = c.decode([b"junk", webp, c.encode(sample_images[:1])[0].data], errors="return")
    assert isinstance(out[0], CodecError) and "not a readable JPEG" in str(out[0])
    assert isinstance(out[1], CodecError) and "bitstream is WEBP" in str(out[1])
    assert out[2].shape == sample_images[0].shape
    bad = c.encode([np.zeros((4, 4), np.uint8), sample_images[0]], errors="return")
    assert isinstance(bad[0], CodecError) and isinstance(bad[1], Encoded)
    with pytest.raises(CodecError, match="unknown baseline"):
        make_baseline("bpg", 30)


def test_compressai_only_from_local_weights(tmp_path, sample_images):
    with pytest.raises(CodecError, match="weights not found at .*FCODEC_COMPRESSAI_WEIGHTS"):
        CompressAICodec("bmshj2018-factorized", 1, weights_dir=str(tmp_path))
    from compressai.zoo import bmshj2018_factorized

    torch.manual_seed(0)  # a seeded stand-in checkpoint, saved under the zoo's own file name
    torch.save(bmshj2018_factorized(1, pretrained=False).state_dict(), compressai_weights_path("bmshj2018-factorized", 1, weights_dir=str(tmp_path)))
    c = make_baseline("compressai:bmshj2018-factorized", 1, weights_dir=str(tmp_path))
    imgs = [sample_images[0], sample_images[3]]  # 64x64 and 33x47 (padded to 64 inside)
    enc = c.encode(imgs)
    dec = c.decode([e.data for e in enc])
    assert [d.shape for d in dec] == [im.shape for im in imgs]
    assert all(e.bpp > 0 for e in enc) and len(c.fingerprint()) == 8
    assert np.array_equal(c.decode([enc[0].data])[0], dec[0])  # deterministic
    assert isinstance(c.decode([b"CAI1junk"], errors="return")[0], Exception)


def test_pipeline_encode_actor_and_audit_run_a_baseline_unchanged(tmp_path, sample_images):
    """A baseline spec goes through the pipeline's EncodeActor and the audit's worker as is."""
    import io

    from PIL import Image

    from pipeline.actors import EncodeActor
    from pipeline.audit import AuditConfig, AuditWorker

    spec = {"baseline": "webp", "quality": 50}
    rows = []
    for i, im in enumerate(sample_images[:3]):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        (tmp_path / f"{i}.png").write_bytes(buf.getvalue())
        rows.append({"key": f"{i}.png", "source_uri": str(tmp_path / f"{i}.png"), "data": buf.getvalue(), "read_error": None})
    out = EncodeActor(spec).encode_rows(rows)
    assert [r["status"] for r in out] == ["ok"] * 3 and all(r["t"] == 50 for r in out)
    assert out[0]["bitstream"][8:12] == b"WEBP" and len(out[0]["codec_fingerprint"]) == 32
    w = AuditWorker(AuditConfig(codec=spec, fid="none", perceptual=()), {r["key"]: r["source_uri"] for r in rows})
    res = w.process_rows(out)
    assert [r["status"] for r in res] == ["ok"] * 3 and w.label == "webp"
    for r, im in zip(res, sample_images):
        assert r["psnr"] == pytest.approx(psnr(im, PillowCodec("webp", 50).decode([PillowCodec("webp", 50).encode([im])[0].data])[0]))
        assert r["psnr"] > 25
