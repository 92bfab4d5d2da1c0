"""End to end on the tiny backbone: sizes, modes, rate ordering, fingerprints, batching."""
import io

import numpy as np
import pytest
from PIL import Image

from codec import CodecError, load_image
from codec import bitstream as bs


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def test_roundtrip_sizes_and_modes(tiny_codec, sample_images):
    rgb = sample_images[1]
    gray = rgb.mean(axis=2).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    g16 = (gray.astype(np.uint16) * 257)
    inputs = [
        load_image(_png(rgb)), load_image(_png(gray)), load_image(_png(rgba)),
        load_image(_png(g16)), load_image(_png(sample_images[3])),  # 33x47: odd sizes
        load_image(_png(np.full((1, 1, 3), 200, np.uint8))),
    ]
    assert inputs[1].gray and inputs[2].alpha and inputs[3].gray
    assert np.array_equal(inputs[3].pixels[..., 0], gray)  # 16 -> 8 bit keeps the values
    enc = tiny_codec.encode(inputs, t=50)
    dec = tiny_codec.decode([e.data for e in enc], steps=2)
    for im, e, d in zip(inputs, enc, dec):
        assert d.shape == im.pixels.shape and d.dtype == np.uint8
        assert (e.width, e.height) == (im.pixels.shape[1], im.pixels.shape[0])
    recs = [bs.parse(e.data) for e in enc]
    assert recs[1].flags & bs.FLAG_GRAY and recs[2].flags & bs.FLAG_ALPHA and not recs[0].flags


def test_larger_t_gives_fewer_bytes(tiny_codec, sample_images):
    img = sample_images[2]
    sizes = [len(tiny_codec.encode([img], t=t)[0].data) for t in (10, 50, 150, 400)]
    print("bytes at t=10,50,150,400:", sizes)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1]


def test_target_bpp_search(tiny_codec, sample_images):
    img = np.tile(sample_images[2], (2, 2, 1))  # 256x256
    fixed = tiny_codec.encode([img], t=60)[0]
    got = tiny_codec.encode([img], target_bpp=fixed.bpp)[0]
    print(f"target {fixed.bpp:.4f} bpp -> t={got.t}, {got.bpp:.4f} bpp")
    assert abs(got.bpp / fixed.bpp - 1) < 0.05


def test_denoising_changes_output_and_steps_bound(tiny_codec, sample_images):
    enc = tiny_codec.encode([sample_images[0]], t=30)[0].data
    d0 = tiny_codec.decode([enc], steps=0)[0]
    d2 = tiny_codec.decode([enc], steps=2)[0]
    assert d0.shape == d2.shape and not np.array_equal(d0, d2)
    calls = []
    unet = tiny_codec.backbone.unet
    h = unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_codec.decode([enc], steps=5)
        n5 = len(calls)
        calls.clear()
        tiny_codec.decode([tiny_codec.encode([sample_images[0]], t=3)[0].data], steps=5)
        n3 = len(calls)
    finally:
        h.remove()
    assert (n5, n3) == (5, 3)  # ≤ steps and ≤ t UNet calls


def test_mixed_batch_equals_single_in_exact_mode(sample_images):
    from codec import CodecConfig, load_codec

    exact = load_codec("tiny", config=CodecConfig(precision="exact"))
    enc = [e.data for e in exact.encode(sample_images, t=40)]
    batch = exact.decode(enc, steps=2)
    single = [exact.decode([e], steps=2)[0] for e in enc]
    for a, b in zip(batch, single):
        assert np.array_equal(a, b)


def test_other_model_is_refused(tiny_codec, sample_images):
    from codec import load_codec

    other = load_codec("tiny", entropy="hyperprior")
    data = other.encode([sample_images[0]], t=50)[0].data
    with pytest.raises(CodecError, match="hyperprior"):
        tiny_codec.decode([data])
    rec = bs.parse(tiny_codec.encode([sample_images[0]], t=50)[0].data)
    rec.backbone_fp = b"\x00" * 8
    with pytest.raises(CodecError, match="another backbone"):
        tiny_codec.decode([bs.pack(rec)])


def test_hyperprior_roundtrip(sample_images):
    from codec import load_codec

    c = load_codec("tiny", entropy="hyperprior")
    enc = c.encode(sample_images, t=50)
    dec = c.decode([e.data for e in enc], steps=0)
    assert [d.shape for d in dec] == [im.shape for im in sample_images]


def test_errors_returned_in_place(tiny_codec, sample_images):
    good = tiny_codec.encode([sample_images[0]], t=50)[0].data
    out = tiny_codec.decode([good, good[:-3], b"junk"], steps=0, errors="return")
    assert out[0].shape == sample_images[0].shape
    assert isinstance(out[1], bs.BitstreamError) and isinstance(out[2], bs.BitstreamError)
    enc = tiny_codec.encode([sample_images[0], np.zeros((4, 4), np.uint8)], t=50, errors="return")
    assert enc[0].t == 50 and isinstance(enc[1], CodecError)
