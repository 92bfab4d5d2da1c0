"""The SD-latent backbone: a UNet trained on frozen TAESD latents (`fcodec train-backbone --vae`),
shipped as `taesd-v1` beside nano-v1, and its pixel-tuned one-step successor `taesd-v2`
(`--finetune taesd-v1`), used by default. Its training command runs at smoke size,
the committed weights are intact, and on held-out Kodak it meets looser forms of the issue's targets
(the full numbers are in codec/weights/taesd-v1/MODEL_CARD.md)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from codec import default_backbone, load_backbone, load_codec, psnr, registry
from jobs.cli import main
from jobs.samples import sample_image, write_samples

TAESD_V1 = registry.WEIGHTS_DIR / "taesd-v1"
# taesd-v2 over taesd-v1 on the 3 Kodak crops at the default t, same symbols (margins under
# what the crops measure: see codec/weights/taesd-v2/MODEL_CARD.md for all of Kodak)
V2_GAIN_DB, V2_GAIN_MSSSIM = 0.2, 0.005
needs_weights = pytest.mark.skipif(not (TAESD_V1 / registry.SUMS_FILE).is_file(), reason="taesd-v1 is not installed")


@pytest.fixture(scope="module")
def taesd_dir(shared_dir):
    d = shared_dir / "models" / "taesd"
    if not (d / "taesd_encoder.safetensors").is_file():
        pytest.skip("../shared/models/taesd is absent")
    return d


def test_train_denoiser_smoke_writes_a_taesd_snapshot(tmp_path, taesd_dir):
    """`fcodec train-backbone --vae TAESD` at smoke size: only the UNet trains; the snapshot ships
    TAESD's weights and licence, loads as a TAESD backbone with the recorded fingerprint, and codes."""
    data = tmp_path / "data"
    write_samples(data, n=2, sizes=((200, 300), (160, 160)))
    out = tmp_path / "sdlat"
    args = ["train-backbone", "--data", str(data), "--vae", str(taesd_dir), "--out", str(out), "--small",
            "--unet-steps", "2", "--unet-batch", "2", "--unet-crop", "8", "--max-side", "256", "--log-every", "1",
            "--threads", str(torch.get_num_threads())]
    assert main(args) == 0
    for f in ("vae/taesd_encoder.safetensors", "vae/taesd_decoder.safetensors", "vae/LICENSE.taesd.txt",
              "unet/diffusion_pytorch_model.safetensors", "model_index.json", registry.SUMS_FILE):
        assert (out / f).is_file(), f
    assert not (out / "vae" / "config.json").exists()  # not a diffusers AutoencoderKL
    sums = json.loads((out / registry.SUMS_FILE).read_text())
    assert "vae/taesd_encoder.safetensors" in sums["files"] and sums["vae_kind"] == "taesd"
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["fcodec", "TinyAutoencoder"]
    # The frozen TAESD is saved with the values it was loaded with (bf16): same encoder output.
    from codec.taesd import TinyAutoencoder

    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(TinyAutoencoder.from_dir(out / "vae").encode(x), TinyAutoencoder.from_dir(taesd_dir).encode(x))
    bb = load_backbone(str(out))
    assert bb.vae_kind == "taesd" and bb.scaling_factor == 1.0 and bb.fingerprint().hex() == sums["backbone_fingerprint"]
    codec = load_codec(str(out))
    img = sample_image(3, 72, 88)
    enc = codec.encode([img], t=60)[0]
    assert codec.decode([enc.data], steps=1)[0].shape == img.shape and enc.bpp > 0
    assert main(["train-backbone", "--data", str(data), "--vae", str(taesd_dir), "--out", str(out),
                 "--stage", "vae"]) == 2  # a frozen TAESD has no VAE stage: a clear error, not a run


@needs_weights
def test_finetune_smoke_writes_a_one_step_taesd_snapshot_on_the_same_encoder(tmp_path):
    """`fcodec train-backbone --finetune taesd-v1` at smoke size (how taesd-v2 was made): only the
    UNet changes (TAESD, prompt and schedule are byte-identical, so the encoder fingerprint and
    every entropy model of taesd-v1 carry over), the snapshot says it decodes in 1 step, and
    codecs built on it use that budget unless told otherwise."""
    data = tmp_path / "data"
    write_samples(data, n=2, sizes=((200, 240), (180, 180)))
    out = tmp_path / "ft"
    args = ["train-backbone", "--data", str(data), "--finetune", "taesd-v1", "--out", str(out), "--pixel-steps", "2",
            "--pixel-batch", "1", "--pixel-crop", "176", "--log-every", "1", "--threads", str(torch.get_num_threads())]
    assert main(args) == 0
    for f in ("vae/taesd_encoder.safetensors", "vae/taesd_decoder.safetensors", "vae/LICENSE.taesd.txt",
              "fcodec_empty_prompt.safetensors", "scheduler/scheduler_config.json"):
        assert (out / f).read_bytes() == (TAESD_V1 / f).read_bytes(), f
    assert (out / "unet/diffusion_pytorch_model.safetensors").read_bytes() != (
        TAESD_V1 / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads((out / "fcodec_decoder.json").read_text()) == {"default_steps": 1}
    bb, v1 = load_backbone(str(out)), load_backbone("taesd-v1")
    assert bb.default_steps == 1 and v1.default_steps is None
    assert bb.encoder_fingerprint() == v1.encoder_fingerprint() and bb.fingerprint() != v1.fingerprint()
    codec = load_codec(str(out))
    assert codec.decode_steps == 1 and load_codec("taesd-v1").decode_steps == 8
    from codec.model import CodecConfig

    assert load_codec(str(out), config=CodecConfig(steps=3)).decode_steps == 3  # --steps wins
    img = sample_image(5, 64, 80)
    enc = codec.encode([img], t=40)[0]
    assert codec.decode([enc.data])[0].shape == img.shape
    assert main(["train-backbone", "--data", str(data), "--finetune", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["train-backbone", "--data", str(data), "--finetune", "taesd-v1", "--out", str(out),
                 "--pixel-crop", "128"]) == 2  # MS-SSIM's 5 scales need > 160 px: a clear error


@needs_weights
@pytest.mark.parametrize("name", ["taesd-v1", "taesd-v2"])
def test_taesd_weights_match_sha256_and_load_in_fresh_process(name):
    """Both shipped versions are intact and load by name in a fresh process; `taesd` (the
    default backbone) is the newest, taesd-v2, and taesd-v1 stays beside it unchanged."""
    folder = registry.WEIGHTS_DIR / name
    sums = json.loads((folder / registry.SUMS_FILE).read_text())
    total = 0
    for rel, digest in sums["files"].items():
        data = (folder / rel).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, f"{rel} differs from its recorded sha256"
    assert "vae/LICENSE.taesd.txt" in sums["files"]  # MIT: the notice ships with the weights
    assert total < 12 * 2**20
    assert default_backbone() == "taesd" and registry.aliases()["taesd"] == "taesd-v2"
    code = (f"from codec import load_backbone; bb = load_backbone('{name}'); "
            "print(bb.fingerprint().hex(), bb.vae_kind, bb.name, bb.default_steps)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [sums["backbone_fingerprint"], "taesd", name, {"taesd-v1": "None", "taesd-v2": "1"}[name]]


@pytest.fixture(scope="module")
def kodak_crops(shared_dir):
    """Three held-out Kodak photos, center-cropped to 256x256 (the suite's CPU budget)."""
    from codec.pixels import center_crop, load_folder

    d = shared_dir / "data" / "kodak"
    if not d.is_dir():
        pytest.skip("../shared/data/kodak is absent")
    return [center_crop(im, "256x256") for im in load_folder(d)[:24:8]]


@needs_weights
@pytest.mark.slow
def test_taesd_default_beats_no_denoising_and_keeps_colour_on_held_out_kodak(kodak_crops):
    """Looser forms of the issue's Kodak targets, on 3 crops: the default setting (what the jobs
    build with no flags: taesd-v2, one denoising step, the shipped entropy model and its t) stays
    under 0.2 bpp, denoising beats --steps 0 on the same bitstreams, image-mean colours stay
    close, and it beats taesd-v1 (8 steps) on the very same entropy-coded symbols."""
    from codec.metrics import ms_ssim
    from codec.spec import CodecSpec

    codec = CodecSpec().build()
    assert codec.backbone.name == "taesd-v2" and codec.entropy.name == "channel-checkerboard"
    assert codec.decode_steps == 1
    enc = codec.encode(kodak_crops)
    den = codec.decode([e.data for e in enc])
    raw = codec.decode([e.data for e in enc], steps=0)
    bpp = float(np.mean([e.bpp for e in enc]))
    p_den = float(np.mean([psnr(a, b) for a, b in zip(kodak_crops, den)]))
    p_raw = float(np.mean([psnr(a, b) for a, b in zip(kodak_crops, raw)]))
    colour = float(np.mean([np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).astype(float).mean(0)).mean()
                            for a, b in zip(kodak_crops, den)]))
    # taesd-v1 shares the VAE and the entropy weights: the same symbols, strings and bytes; only
    # the header's backbone fingerprint and the denoiser differ
    old = CodecSpec(backbone="taesd-v1").build()
    enc1 = old.encode(kodak_crops, t=enc[0].t)
    assert [len(e.data) for e in enc1] == [len(e.data) for e in enc]
    den1 = old.decode([e.data for e in enc1])
    p_v1 = float(np.mean([psnr(a, b) for a, b in zip(kodak_crops, den1)]))
    m_v1 = float(np.mean([ms_ssim(a, b) for a, b in zip(kodak_crops, den1)]))
    m_den = float(np.mean([ms_ssim(a, b) for a, b in zip(kodak_crops, den)]))
    print(f"\ntaesd default on 3 Kodak crops: {bpp:.4f} bpp, {p_den:.2f} dB, MS-SSIM {m_den:.4f} (steps 0: "
          f"{p_raw:.2f} dB; taesd-v1, 8 steps: {p_v1:.2f} dB, {m_v1:.4f}), colour error {colour:.2f} levels")
    assert bpp < 0.2
    assert p_den > p_raw + 0.3
    assert p_den > 21.0
    assert colour < 5.0
    assert m_den > 0.82  # the 0.85 is for all of Kodak (0.853 there); these crops measure 0.857
    assert p_den > p_v1 + V2_GAIN_DB and m_den > m_v1 + V2_GAIN_MSSSIM


@needs_weights
def test_shipped_entropy_models_spend_fewer_bytes_than_static_and_the_newest_is_the_default(kodak_crops):
    """Three trained entropy models ship for taesd-v1; `--entropy auto` picks the newest,
    taesd-v1-hyperprior-v3 (the checkerboard over two channel groups), and the older ones still
    load by name (manifests pin them). On held-out Kodak crops each spends fewer real bytes than
    the static model at equal t, each newer one fewer than the one before (all of Kodak at t=40:
    10.6%, 13.1% and 16.0%; the model cards have the tables; on these 256x256 crops the side
    latent's share is larger: 4.3%, 6.1% and 7.0%). taesd-v2 (same VAE) ships v3's weights as
    taesd-v2-hyperprior-v3: the same codec fingerprint, bound to the new backbone."""
    from codec.evaluate import rate_study
    from codec.spec import CodecSpec

    assert CodecSpec().resolved_entropy() == ("channel-checkerboard", "taesd-v2-hyperprior-v3")
    entropy, weights = CodecSpec(backbone="taesd-v1").resolved_entropy()
    assert (entropy, weights) == ("channel-checkerboard", "taesd-v1-hyperprior-v3")
    v3 = CodecSpec(backbone="taesd-v1").build()
    v2 = load_codec("taesd-v1", codec_weights="taesd-v1-hyperprior-v2")
    v1 = load_codec("taesd-v1", codec_weights="taesd-v1-hyperprior")
    static = load_codec("taesd-v1", entropy="static")
    assert (v1.entropy.name, v2.entropy.name) == ("hyperprior", "checkerboard")
    assert v3.default_t == v2.default_t == v1.default_t == 40
    new = CodecSpec().build()
    assert new.fingerprint() == v3.fingerprint() and new.backbone.fingerprint() != v3.backbone.fingerprint()
    t = v3.default_t
    res = rate_study({"static": static, "v1": v1, "v2": v2, "v3": v3}, kodak_crops, (t,))
    print(f"\nKodak crops at t={t}: static {res['static'][t]:.4f} bpp, "
          + ", ".join(f"{k} {res[k][t]:.4f} ({100 * res['saving'][k][t]:.1f}% fewer)" for k in ("v1", "v2", "v3")))
    assert res["saving"]["v1"][t] >= 0.02
    assert res["saving"]["v2"][t] >= res["saving"]["v1"][t] + 0.01
    assert res["saving"]["v3"][t] >= res["saving"]["v2"][t] + 0.005  # crops: 7.0% vs 6.1%
    enc = v3.encode(kodak_crops[:1])[0]
    assert enc.t == t and v3.decode([enc.data], steps=1)[0].shape == kodak_crops[0].shape
