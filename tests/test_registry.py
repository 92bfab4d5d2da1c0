"""Versioned built-in backbones and shipped codec weights (codec/registry.py): names never change
meaning, `nano` is the newest nano, and a record picks its models by fingerprint."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codec import CodecConfig, NANO_DIR, bitstream, default_backbone, load_backbone, load_codec, registry, resolve
from jobs.cli import main
from jobs.samples import sample_image

V1 = Path(__file__).parent / "golden" / "v1"
INDEX = json.loads((V1 / "index.json").read_text())
GOLDEN = {r["name"]: r for r in INDEX["records"]}
NANO_V1_FP = GOLDEN["nano_t50"]["backbone_fingerprint"]  # made by 0.1.0's `nano`


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_nano_v1_is_todays_weights_with_the_release_fingerprint():
    assert registry.aliases()["nano"] == "nano-v1" and default_backbone() in ("taesd", "nano")
    assert registry.lookup("nano-v1").fingerprint == NANO_V1_FP
    assert NANO_DIR == registry.lookup("nano-v1").path and NANO_DIR.name == "nano-v1"
    for spec in ("nano", "nano-v1"):
        bb = load_backbone(spec)
        assert bb.fingerprint().hex() == NANO_V1_FP and bb.name == "nano-v1"


def test_constants_match_the_models():
    from codec.backbone import Backbone
    from codec.entropy import ENTROPY_IDS

    assert Backbone.tiny(0).fingerprint().hex() == registry.TINY_FINGERPRINT == GOLDEN["tiny_t100"]["backbone_fingerprint"]
    assert load_codec("tiny").fingerprint().hex() == registry.STATIC_CODEC_FINGERPRINT
    assert registry.ENTROPY_NAMES == ENTROPY_IDS


def test_names_are_versioned_and_never_reused(tmp_path):
    with pytest.raises(registry.RegistryError, match="versioned"):
        registry.register_backbone("mynano", tmp_path)
    with pytest.raises(registry.RegistryError, match="already registered.*nano-v2"):
        registry.register_backbone("nano-v1", NANO_DIR, fingerprint="0" * 16)
    with pytest.raises(Exception, match="no built-in backbone 'nano-v9'.*nano-v1"):
        load_backbone("nano-v9")


def _with_backbone_fp(data: bytes, fp: bytes) -> bytes:
    body = bytearray(data[:-4])
    body[8:16] = fp
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_unknown_fingerprint_is_one_line_listing_the_builtins(tmp_path, capsys):
    src = tmp_path / "odd.fdc"
    src.write_bytes(_with_backbone_fp((V1 / GOLDEN["nano_t50"]["file"]).read_bytes(), bytes.fromhex("0123456789abcdef")))
    assert main(["decode", str(src), str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for part in ("0123456789abcdef", f"nano-v1 ({NANO_V1_FP}; alias nano)", "tiny", "--backbone DIR"):
        assert part in err
    assert not (tmp_path / "out.png").exists()


@pytest.fixture
def nano_v2(tmp_path):
    """A 'retrained' nano: nano-v1 with perturbed UNet weights, registered as nano-v2."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nano-v2"
    shutil.copytree(NANO_DIR, d)
    (d / "weights.sha256.json").unlink()  # its fingerprint is computed from the weights
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    name = sorted(k for k in sd if k.endswith("conv_in.weight"))[0]
    sd[name] = sd[name] * 1.01
    save_file(sd, str(f))
    entry = registry.register_backbone("nano-v2", d)
    yield entry
    registry.unregister_backbone("nano-v2")


def test_retrained_nano_is_added_beside_and_old_records_still_decode(nano_v2, tmp_path):
    assert nano_v2.fingerprint != NANO_V1_FP
    assert registry.aliases()["nano"] == "nano-v2" and registry.lookup("nano-v1").fingerprint == NANO_V1_FP

    # `--backbone nano` now encodes with the newest version, and decode finds it without flags
    img = tmp_path / "img.png"
    Image.fromarray(sample_image(7, 48, 64)).save(img)
    assert main(["encode", str(img), str(tmp_path / "new.fdc"), "--backbone", "nano", "--t", "100"]) == 0
    new = (tmp_path / "new.fdc").read_bytes()
    assert bitstream.parse(new).backbone_fp.hex() == nano_v2.fingerprint
    assert main(["decode", str(tmp_path / "new.fdc"), str(tmp_path / "new.png")]) == 0
    assert png_pixels(tmp_path / "new.png").shape == (48, 64, 3)

    # records of nano-v1 still decode to identical pixels (exact mode), and through the CLI
    entry = GOLDEN["nano_t50"]
    data = (V1 / entry["file"]).read_bytes()
    opts = resolve.options_for_record(data)
    assert opts["backbone"] == "nano-v1"
    got = load_codec(**opts, config=CodecConfig(precision="exact")).decode([data])[0]
    assert np.array_equal(got, png_pixels(V1 / entry["exact"]))
    assert main(["decode", str(V1 / entry["file"]), str(tmp_path / "old.png")]) == 0
    with pytest.raises(registry.RegistryError, match=r"made with the built-in backbone nano-v1, not nano \(= nano-v2\)"):
        resolve.options_for_record(data, backbone="nano")
    assert resolve.options_for_record(data, backbone="nano-v1")["backbone"] == "nano-v1"
    d = np.abs(png_pixels(tmp_path / "old.png").astype(int) - png_pixels(V1 / entry["default"]).astype(int))
    assert d.max() <= 1 and (d > 0).mean() <= 0.001


def test_shipped_codec_weights_are_found_by_codec_fingerprint(tmp_path, capsys):
    entry = GOLDEN["nano_hyperprior_t80"]
    rec = str(V1 / entry["file"])
    assert main(["decode", rec, str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "hyperprior" in err and entry["codec_fingerprint"] in err and "--codec-weights DIR" in err

    shipped = registry.register_codec_weights("golden-hyperprior", V1 / entry["codec_weights"])
    try:
        assert shipped.codec_fingerprint == entry["codec_fingerprint"] and shipped.backbone_fingerprint == NANO_V1_FP
        assert registry.codec_for_fingerprint(entry["codec_fingerprint"], "0" * 16) is None  # other backbone
        assert main(["decode", rec, str(tmp_path / "b.png")]) == 0
        d = np.abs(png_pixels(tmp_path / "b.png").astype(int) - png_pixels(V1 / entry["default"]).astype(int))
        assert d.max() <= 1 and (d > 0).mean() <= 0.001
    finally:
        registry.unregister_codec_weights("golden-hyperprior")
    assert registry.codec_for_fingerprint(entry["codec_fingerprint"]) is None


def test_entropy_auto_picks_the_weights_shipped_for_the_backbone(tmp_path, sample_images):
    """`--entropy auto` (the default): the hyperprior shipped for a built-in backbone, stored by
    name in the pinned spec, with the t it was trained for; static where none ships."""
    from codec import DiffusionCodec
    from codec.spec import CodecSpec

    assert CodecSpec(backbone="tiny").resolved_entropy() == ("static", None)
    hp = DiffusionCodec(load_backbone("tiny"), config=CodecConfig(entropy="hyperprior"))
    hp.default_t = 77
    hp.save_pretrained(tmp_path / "hp")
    assert json.loads((tmp_path / "hp" / "codec_config.json").read_text())["default_t"] == 77
    registry.register_codec_weights("tiny-hyperprior-test", tmp_path / "hp")
    try:
        spec = CodecSpec(backbone="tiny")
        assert spec.resolved_entropy() == ("hyperprior", "tiny-hyperprior-test")
        assert spec.pinned().entropy == "hyperprior" and spec.pinned().codec_weights == "tiny-hyperprior-test"
        assert spec.identity() == CodecSpec(backbone="tiny", entropy="hyperprior",
                                            codec_weights="tiny-hyperprior-test").identity()
        assert CodecSpec(backbone="tiny", entropy="static").resolved_entropy() == ("static", None)
        assert CodecSpec(backbone="tiny", vae="/x").resolved_entropy() == ("static", None)  # another VAE
        # a learned model named without weights: the shipped weights of that model, none of another
        assert CodecSpec(backbone="tiny", entropy="hyperprior").resolved_entropy() == ("hyperprior", "tiny-hyperprior-test")
        assert CodecSpec(backbone="tiny", entropy="checkerboard").resolved_entropy() == ("checkerboard", None)
        codec = spec.build()
        assert codec.entropy.name == "hyperprior" and codec.fingerprint() == hp.fingerprint()
        enc = codec.encode(sample_images[:1])[0]
        assert enc.t == 77 and codec.decode([enc.data])[0].shape == sample_images[0].shape
    finally:
        registry.unregister_codec_weights("tiny-hyperprior-test")
    assert CodecSpec(backbone="tiny").resolved_entropy() == ("static", None)
    assert CodecSpec(backbone="tiny", entropy="hyperprior").resolved_entropy() == ("hyperprior", None)
    # taesd-v1 ships three: auto takes the newest (the channel checkerboard), a named model its own weights
    assert CodecSpec(backbone="taesd-v1").resolved_entropy() == ("channel-checkerboard", "taesd-v1-hyperprior-v3")
    assert CodecSpec(backbone="taesd-v1", entropy="channel-checkerboard").resolved_entropy() == (
        "channel-checkerboard", "taesd-v1-hyperprior-v3")
    assert CodecSpec(backbone="taesd-v1", entropy="hyperprior").resolved_entropy() == ("hyperprior", "taesd-v1-hyperprior")
    assert CodecSpec(backbone="taesd-v1", entropy="checkerboard").resolved_entropy() == (
        "checkerboard", "taesd-v1-hyperprior-v2")
    # taesd-v2 (the default; same VAE) ships v3's weights re-bound to it, and only those
    assert CodecSpec().resolved_entropy() == CodecSpec(backbone="taesd-v2").resolved_entropy() == (
        "channel-checkerboard", "taesd-v2-hyperprior-v3")
    assert CodecSpec(backbone="taesd-v2", entropy="hyperprior").resolved_entropy() == ("hyperprior", None)
    v1w, v2w = (registry.default_codec_weights(registry.lookup(b).fingerprint) for b in ("taesd-v1", "taesd-v2"))
    assert v1w.codec_fingerprint == v2w.codec_fingerprint and v1w.backbone_fingerprint != v2w.backbone_fingerprint
    assert registry.codec_for_fingerprint(v1w.codec_fingerprint, v2w.backbone_fingerprint).name == "taesd-v2-hyperprior-v3"
    assert registry.codec_for_fingerprint(v1w.codec_fingerprint, v1w.backbone_fingerprint).name == "taesd-v1-hyperprior-v3"


def test_record_with_a_vae_finds_its_builtin(taesd_dir):
    entry = GOLDEN["nano_taesd_t100"]
    data = (V1 / entry["file"]).read_bytes()
    with pytest.raises(registry.RegistryError, match="--backbone DIR"):
        resolve.options_for_record(data)
    assert resolve.options_for_record(data, vae=str(taesd_dir))["backbone"] == "nano-v1"

