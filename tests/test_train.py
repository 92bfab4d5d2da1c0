"""Training the learned parts: the loss in pure torch, and Ray Train with checkpoints and resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from codec.pixels import random_crop
from codec.training import CodecTrainConfig, RateDistortion, make_optimizer, train_step


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: torch's default thread pool fights the other processes and runs 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_latents(tiny_codec):
    from codec.training import encode_latents
    from jobs.samples import sample_image

    x = torch.stack([torch.from_numpy(sample_image(i, 64, 64)).permute(2, 0, 1) for i in range(8)]).float() / 127.5 - 1
    return encode_latents(tiny_codec.backbone, x)


def test_t_gets_gradients_and_loss_terms_are_real(tiny_codec, tiny_latents):
    torch.manual_seed(0)
    model = RateDistortion(tiny_codec.backbone, CodecTrainConfig())
    out = model(tiny_latents[:2], torch.tensor([1.0, 1.0]))
    out["loss"].backward()
    head = model.estimator.head[-1]
    # the t logit is the last output of the head: it gets a gradient through ᾱ(t) and the UNet
    assert head.weight.grad[-1].abs().sum() > 0 and head.bias.grad[-1].abs() > 0
    assert 0 < float(out["bpp"]) < 20 and float(out["distortion"]) > 0
    assert 1.0 <= float(out["t"]) <= 400.0
    assert not any(p.grad is not None for p in tiny_codec.backbone.unet.parameters())  # backbone frozen


def test_loss_decreases_in_torch(tiny_codec, tiny_latents):
    torch.manual_seed(0)
    cfg = CodecTrainConfig(lam_min=1.0, lam_max=1.0, lr=3e-3, z_warmup=1)
    model = RateDistortion(tiny_codec.backbone, cfg)
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    rd = [train_step(model, opt, tiny_latents, generator=g, step=s)["rd"] for s in range(40)]
    first, last = np.mean(rd[:5]), np.mean(rd[-5:])
    print(f"rate+λD: first 5 steps {first:.4f}, last 5 {last:.4f}")
    assert last < 0.8 * first


def test_random_crop_pads_small_inputs():
    z = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    g = torch.Generator().manual_seed(0)
    c = random_crop(z, 4, g)
    assert c.shape == (2, 4, 4)
    assert torch.equal(c[:, 3], c[:, 2])  # the missing row is the replicated edge


def test_train_cli_counts_train_steps_and_warns_on_the_old_spelling(capsys):
    """`--steps` means DDIM steps in every other job: train's optimizer steps are --train-steps;
    the old spelling still works, hidden, with a one-line warning."""
    from jobs.cli import build_parser, main

    args = build_parser().parse_args(["train", "data", "out", "--train-steps", "7"])
    assert args.train_steps == 7 and args.deprecated_steps is None
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "--train-steps" in shown and "--steps" not in shown
    assert main(["train", "", "out", "--steps", "3"]) != 0  # no DATA: fails after the warning
    err = capsys.readouterr().err
    assert "`fcodec train --steps` is deprecated, use --train-steps" in err and "give training images" in err


# ---------------------------------------------------------------- Ray Train
@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    # local: a multi-node test on another xdist worker leaves <tmp>/ray/ray_current_cluster naming
    # its live cluster, which a bare ray.init() would try to join
    ray.init(address="local", num_cpus=2, _temp_dir=str(tmp), include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    from jobs.samples import write_samples

    d = tmp_path_factory.mktemp("samples")
    write_samples(d, n=8)
    return d


@pytest.mark.slow
def test_ray_train_resume_and_export_roundtrip(ray_local, sample_dir, s3_server, s3_bucket, tmp_path):
    """2 CPU workers, checkpoints and export on an S3 endpoint (moto): stopped by a fault after a
    checkpoint, resumed from it, loss went down, two checkpoints kept there, and the exported
    folder encodes to the same bytes in a fresh process."""
    import s3fs
    from ray.train import TrainingFailedError

    from codec import load_image
    from pipeline.train import TrainJob, train

    cfg = CodecTrainConfig(lam_min=1.0, lam_max=1.0, lr=3e-3, z_warmup=1)
    job = TrainJob(data=str(sample_dir), out=f"{s3_bucket}/weights", backbone="tiny", num_workers=2,
                   storage_path=f"{s3_bucket}/runs", name="t1", train_steps=24, batch_size=4, crop=64,
                   checkpoint_every=8, log_every=4, train=cfg.to_dict())

    def fail_at_11(step: int, metrics: dict) -> None:  # nested: cloudpickle ships it to the workers by value
        if step >= 11:
            raise RuntimeError(f"fault injected at step {step}")

    with pytest.raises(TrainingFailedError, match="fault injected"):
        train(job, s3_server["opts"], on_step=fail_at_11)
    res = train(job, s3_server["opts"])  # same storage_path + name: resumes from the step-8 checkpoint
    steps = [h["step"] for h in res.history]
    assert steps == list(range(1, 25))
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = s3_bucket[len("s3://"):]
    ckpts = sorted(p for p in fs.find(f"{bucket}/runs/t1") if p.endswith("train_state.pt"))
    assert len(ckpts) == 2  # steps 16 and 24 (num_to_keep=2)
    (last,) = [c for c in ckpts if c.startswith(res.checkpoint_path.strip("/") + "/")]  # the result's checkpoint
    with fs.open(last, "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    assert state["resumes"] == [8] and state["step"] == 24
    rd = [h["rd"] for h in res.history]
    print(f"rate+λD: first 4 steps {np.mean(rd[:4]):.4f}, last 4 {np.mean(rd[-4:]):.4f}")
    assert np.mean(rd[-4:]) < np.mean(rd[:4])

    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/weights")) == [
        "codec_config.json", "entropy.safetensors", "estimator.safetensors"]
    out = tmp_path / "weights"
    fs.get(f"{bucket}/weights/", str(out), recursive=True)
    cfg_json = json.loads((out / "codec_config.json").read_text())
    assert cfg_json["entropy"] == "hyperprior" and cfg_json["codec_fingerprint"] == res.codec.fingerprint().hex()
    assert (out / "estimator.safetensors").is_file()
    img = sorted(sample_dir.glob("*.png"))[1]
    here = res.codec.encode([load_image(img.read_bytes())])[0]
    # float32 convolutions are bit-exact only at equal thread counts (the `one_thread` fixture has this
    # process at 1); across thread counts only --precision exact promises the same bytes.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "encode", str(img), str(tmp_path / "x.fdc"),
                        "--backbone", "tiny", "--codec-weights", str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "x.fdc").read_bytes() == here.data
    dec = res.codec.decode([here.data], steps=0)[0]
    assert dec.shape == load_image(img.read_bytes()).pixels.shape


def test_train_job_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train workers run in folders of their own: `--latent-cache hp-cache` once failed there
    with "no latent cache". Local paths become absolute; URLs, shipped names and hub ids do not."""
    from pipeline.train import TrainJob

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w0").mkdir()
    job = TrainJob(data="imgs", out="out", latent_cache="hp-cache", storage_path="s3://b/runs", vae="stabilityai/x",
                   train={"init_weights": "w0", "lr": 1e-3}).with_absolute_paths()
    assert (job.data, job.out, job.latent_cache) == tuple(str(tmp_path / p) for p in ("imgs", "out", "hp-cache"))
    assert job.storage_path == "s3://b/runs" and job.vae == "stabilityai/x"
    assert job.train == {"init_weights": str(tmp_path / "w0"), "lr": 1e-3}
    shipped = TrainJob(data="", out="s3://b/w", train={"init_weights": "taesd-v1-hyperprior-v2"}).with_absolute_paths()
    assert (shipped.data, shipped.out, shipped.latent_cache, shipped.train["init_weights"]) == (
        "", "s3://b/w", None, "taesd-v1-hyperprior-v2")


@pytest.mark.slow
def test_latent_cache_job_and_batches(ray_local, sample_dir, tmp_path, tiny_codec):
    """The Ray Data cache job writes one float16 latent row per image; training batches read it."""
    import pyarrow.parquet as pq

    from codec import load_image
    from codec.training import encode_latents
    from pipeline.train import TrainJob, _Batches, build_latent_cache

    n = build_latent_cache(str(sample_dir), str(tmp_path / "cache"), "tiny", num_actors=1)
    assert n == 8
    rows = pq.read_table(str(tmp_path / "cache")).to_pylist()
    row = next(r for r in rows if r["key"] == "sample_0001.png")  # 96x128 -> 12x16 latent
    assert (row["channels"], row["height"], row["width"]) == (4, 12, 16)
    assert row["encoder_fingerprint"] == tiny_codec.backbone.encoder_fingerprint().hex()
    px = torch.from_numpy(load_image((sample_dir / "sample_0001.png").read_bytes()).pixels.copy()).permute(2, 0, 1)[None]
    want = encode_latents(tiny_codec.backbone, px.float() / 127.5 - 1)[0].numpy()
    got = np.frombuffer(row["latent"], dtype="<f2").reshape(4, 12, 16).astype(np.float32)
    assert np.allclose(got, want, atol=2e-3 * max(1.0, float(np.abs(want).max())))

    job = TrainJob(data="", out=str(tmp_path / "w"), latent_cache=str(tmp_path / "cache"), batch_size=3, crop=64)
    batches = _Batches(tiny_codec.backbone, job, rank=1, world=2, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 4  # every 2nd of the 8 rows
    z, x = batches.next()
    assert z.shape == (3, 4, 8, 8) and x is None
    # Latents depend on the VAE alone: the cache serves a backbone with another UNet, not another VAE.
    from codec import Backbone

    other_unet = Backbone.tiny(0)
    other_unet.unet = Backbone.tiny(1).unet
    assert other_unet.fingerprint() != tiny_codec.backbone.fingerprint()
    assert len(_Batches(other_unet, job, rank=0, world=1, generator=torch.Generator())) == 8
    with pytest.raises(ValueError, match="made with the VAE"):
        _Batches(Backbone.tiny(1), job, rank=0, world=1, generator=torch.Generator())
    # From images with --max-side: decoded and downscaled once, then cropped per step.
    job = TrainJob(data=str(sample_dir), out=str(tmp_path / "w"), batch_size=2, crop=32, max_side=64)
    batches = _Batches(tiny_codec.backbone, job, rank=0, world=1, generator=torch.Generator().manual_seed(0))
    assert batches.decoded and len(batches) == 8 and max(max(im.shape[:2]) for im in batches.images) == 64
    z, x = batches.next()
    assert x.shape == (2, 3, 32, 32) and z.shape == (2, 4, 4, 4)


@pytest.mark.parametrize("model,strings", [("checkerboard", 3), ("channel-checkerboard", 5)])
def test_context_models_warm_start_from_a_hyperprior_and_roundtrip(tiny_codec, tiny_latents, tmp_path, model, strings):
    """`--entropy-model checkerboard|channel-checkerboard --init-weights DIR`: starts at exactly the
    hyperprior's rate (its context corrections are zero), trains, exports, and its 3- or 5-string
    records decode after a reload."""
    from codec.bitstream import parse
    from codec import load_codec
    from codec.training import export_codec, initial_entropy
    from jobs.samples import sample_image

    torch.manual_seed(0)
    cfg = CodecTrainConfig(train_estimator=False, denoise=False, t_range=(40, 40), lr=3e-3, z_warmup=1)
    hp = RateDistortion(tiny_codec.backbone, cfg)
    opt = make_optimizer(hp, cfg)
    for s in range(5):
        train_step(hp, opt, tiny_latents, step=s)
    export_codec(tiny_codec.backbone, hp, quantile_steps=50, default_t=40).save_pretrained(tmp_path / "hp")

    cb_cfg = CodecTrainConfig(**{**cfg.to_dict(), "entropy_model": model, "init_weights": str(tmp_path / "hp")})
    cb = RateDistortion(tiny_codec.backbone, cb_cfg)
    y = torch.round(tiny_latents / 0.5)
    with torch.no_grad():  # eval: the side latent rounded, not noised
        assert torch.allclose(cb.entropy.eval().likelihood_bits(y), hp.entropy.eval().likelihood_bits(y))
    opt = make_optimizer(cb, cb_cfg)
    for s in range(5):
        train_step(cb, opt, tiny_latents, step=s)
    codec = export_codec(tiny_codec.backbone, cb, quantile_steps=50, default_t=40)
    codec.save_pretrained(tmp_path / "cb")
    assert json.loads((tmp_path / "cb" / "codec_config.json").read_text())["entropy"] == model
    img = sample_image(3, 64, 64)
    rec = codec.encode([img])[0]
    assert len(parse(rec.data).strings) == strings
    again = load_codec("tiny", codec_weights=str(tmp_path / "cb"))
    assert again.fingerprint() == codec.fingerprint() and again.encode([img])[0].data == rec.data
    assert np.array_equal(again.decode([rec.data], steps=0)[0], codec.decode([rec.data], steps=0)[0])
    with pytest.raises(ValueError, match="widths"):
        initial_entropy(CodecTrainConfig(entropy_model=model, hidden=16, init_weights=str(tmp_path / "hp")), 4)
