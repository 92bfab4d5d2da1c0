"""End to end on the tiny backbone: sizes, modes, rate ordering, fingerprints, batching."""
import io

import numpy as np
import pytest
import torch
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


def untrained_hyperprior():
    """A seeded, untrained hyperprior codec (`load_codec` refuses a hyperprior without weights)."""
    import torch

    from codec import CodecConfig, DiffusionCodec, load_backbone

    torch.manual_seed(0)
    return DiffusionCodec(load_backbone("tiny"), config=CodecConfig(entropy="hyperprior"))


def test_hyperprior_without_weights_is_a_clear_error():
    from codec import load_codec

    with pytest.raises(CodecError, match="needs trained codec weights") as err:
        load_codec("tiny", entropy="hyperprior")
    # it says where that model does ship, and the way out with this backbone
    assert "backbone 'tiny'" in str(err.value) and "taesd-v1 (taesd-v1-hyperprior)" in str(err.value)
    assert "--entropy auto" in str(err.value) and "--entropy static" in str(err.value)
    with pytest.raises(CodecError, match=r"checkerboard weights: taesd-v1 \(taesd-v1-hyperprior-v2\)"):
        load_codec("tiny", entropy="checkerboard")


def test_other_model_is_refused(tiny_codec, sample_images):
    other = untrained_hyperprior()
    data = other.encode([sample_images[0]], t=50)[0].data
    with pytest.raises(CodecError, match="hyperprior"):
        tiny_codec.decode([data])
    rec = bs.parse(tiny_codec.encode([sample_images[0]], t=50)[0].data)
    rec.backbone_fp = b"\x00" * 8
    with pytest.raises(CodecError, match="another backbone"):
        tiny_codec.decode([bs.pack(rec)])


def test_hyperprior_roundtrip(sample_images):
    c = untrained_hyperprior()
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


def test_speed_options_keep_the_bytes_and_the_pixels(sample_images):
    """Overlapped entropy coding changes nothing; channels-last weights change no symbol a
    decoder reads and move decoded pixels by at most one level (float32), and the fingerprint
    (the weights' identity) is the same."""
    from codec import CodecConfig, load_codec

    imgs = sample_images * 3  # 12 images in 3 size buckets, batches of 2: several batches to overlap
    plain = load_codec("tiny", config=CodecConfig(batch_size=2, overlap_entropy=False, channels_last=False))
    fast = load_codec("tiny", config=CodecConfig(batch_size=2, overlap_entropy=True, channels_last=True))
    assert plain.backbone.fingerprint() == fast.backbone.fingerprint() and plain.fingerprint() == fast.fingerprint()
    convs = [p for p in fast.backbone.vae.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    overlap_only = load_codec("tiny", config=CodecConfig(batch_size=2, overlap_entropy=True, channels_last=False))
    a = [e.data for e in plain.encode(imgs, t=60)]
    assert [e.data for e in overlap_only.encode(imgs, t=60)] == a  # same bytes, byte for byte
    bad = a[:5] + [a[5][:-4]] + a[6:]
    px_plain = plain.decode(bad, steps=2, errors="return")
    px_overlap = overlap_only.decode(bad, steps=2, errors="return")
    px_fast = fast.decode(bad, steps=2, errors="return")
    for i, (p, o, f) in enumerate(zip(px_plain, px_overlap, px_fast)):
        if i == 5:  # the truncated record fails alone, whichever thread decoded it
            assert isinstance(p, bs.BitstreamError) and isinstance(o, bs.BitstreamError) and isinstance(f, bs.BitstreamError)
            continue
        assert np.array_equal(p, o)
        assert np.abs(p.astype(int) - f.astype(int)).max() <= 1


def test_exact_mode_keeps_the_plain_memory_layout():
    from codec import CodecConfig, load_codec

    conv = lambda c: next(p for p in c.backbone.unet.parameters() if p.dim() == 4)  # noqa: E731
    assert conv(load_codec("tiny", config=CodecConfig(precision="exact"))).is_contiguous()
    cpu_default = load_codec("tiny")
    assert conv(cpu_default).is_contiguous(memory_format=torch.channels_last)
    assert cpu_default.precision == "float32" and cpu_default.backbone.dtype == torch.float32  # auto on the CPU
    half = load_codec("tiny", config=CodecConfig(precision="bfloat16"))
    assert half.backbone.dtype == torch.bfloat16 and half.encode([np.full((16, 16, 3), 128, np.uint8)], t=50)[0].t == 50


def test_importing_image_io_does_not_load_torch():
    """The pipeline's image-decoding tasks import codec.images: they must start fast."""
    import subprocess
    import sys

    code = "import sys, codec.images; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
