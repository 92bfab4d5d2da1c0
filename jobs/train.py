"""`fcodec train DATA OUT`: train the hyperprior and the γ/t estimator (backbone frozen) on Ray Train.

Running the same command again (same OUT / --storage-path and --name) resumes from the latest
checkpoint. OUT receives `codec_config.json` + safetensors for `--codec-weights OUT`.
`--train-steps` counts optimizer steps (`--steps` means DDIM steps in every other job).
"""
from __future__ import annotations

import argparse

from .options import add_positional, add_ray_options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train the entropy model and t/γ estimator on your images (Ray Train)",
        description="Train the codec's learned parts (hyperprior entropy model, γ/t estimator) with the backbone "
                    "frozen, on N Ray Train workers; export to OUT for `--codec-weights OUT`.")
    p.add_argument("data", nargs="?", default="", help="training images: folder, glob, tar shards or Parquet (local or s3://)")
    add_positional(p, "out", "export folder or URL (codec_config.json + safetensors)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=None, help="tiny | nano | hub id | snapshot folder (default: as other jobs)")
    g.add_argument("--vae", default=None, metavar="DIR", help="TAESD-style autoencoder folder used instead of the backbone's VAE")
    g.add_argument("--distortion", choices=["latent", "pixel"], default="latent",
                   help="latent MSE of the one-step x̂₀ (fast) or pixel MSE through the VAE decoder (default: %(default)s)")
    g.add_argument("--lam-min", type=float, default=0.1, help="smallest rate-distortion trade-off λ sampled (default: %(default)s)")
    g.add_argument("--lam-max", type=float, default=10.0, help="largest λ sampled (default: %(default)s)")
    g.add_argument("--no-estimator", action="store_true",
                   help="train only the hyperprior, at γ = (channel mean, 1) and t uniform in --t-range")
    g.add_argument("--t-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="t range for --no-estimator (default 1 400)")
    g.add_argument("--no-denoise", action="store_true", help="measure distortion on ẑ instead of the one-step x̂₀")
    g.add_argument("--default-t", type=int, default=None, metavar="N",
                   help="the t the exported weights encode at when none is given (default: the codec's, 100)")
    g.add_argument("--entropy-model", choices=["hyperprior", "checkerboard", "channel-checkerboard"],
                   default="hyperprior", help="hyperprior; checkerboard: the hyperprior plus a two-pass spatial context; "
                   "channel-checkerboard: that context over two channel groups in turn (four passes) (default: %(default)s)")
    g.add_argument("--init-weights", default=None, metavar="DIR",
                   help="start the entropy model from these codec weights (a folder or shipped name, same widths)")
    g.add_argument("--hp-hidden", type=int, default=64, metavar="N", help="hyperprior width (default: %(default)s)")
    g.add_argument("--hp-z-channels", type=int, default=8, metavar="N", help="hyperprior side-latent channels (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-decayed to 10%% over --train-steps (default: %(default)s)")
    r = p.add_argument_group("run")
    r.add_argument("--train-steps", type=int, default=1000, help="optimizer steps per worker (default: %(default)s)")
    # The old spelling, hidden: `--steps` means DDIM steps everywhere else.
    r.add_argument("--steps", type=int, default=None, dest="deprecated_steps", help=argparse.SUPPRESS)
    r.add_argument("--batch-size", type=int, default=8, help="crops per worker and step (default: %(default)s)")
    r.add_argument("--crop", type=int, default=256, help="random crop size in pixels, multiple of 8 (default: %(default)s)")
    r.add_argument("--max-side", type=int, default=None, metavar="PX",
                   help="downscale each training image to this longer side first (default: as it is)")
    r.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: %(default)s)")
    r.add_argument("--gpu", action="store_true", help="one GPU per worker")
    r.add_argument("--storage-path", default=None, help="checkpoints, local or s3:// (default: OUT/checkpoints)")
    r.add_argument("--name", default="fcodec-train", help="run name under the storage path; reuse it to resume (default: %(default)s)")
    r.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: %(default)s)")
    r.add_argument("--log-every", type=int, default=10, help="steps between metric reports (default: %(default)s)")
    r.add_argument("--max-failures", type=int, default=2, help="worker failures retried from the last checkpoint (default: %(default)s)")
    r.add_argument("--latent-cache", default=None, metavar="URL", help="train from this latent cache (Parquet) instead of images")
    r.add_argument("--build-cache", action="store_true", help="first encode DATA once with the VAE into --latent-cache")
    r.add_argument("--seed", type=int, default=0)
    add_ray_options(p, inline=False)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from codec import default_backbone
    from codec.training import CodecTrainConfig
    from pipeline.raystart import init_ray
    from pipeline.train import TrainJob, build_latent_cache, train

    if args.deprecated_steps is not None:
        print("warning: `fcodec train --steps` is deprecated, use --train-steps (optimizer steps)", file=sys.stderr)
        args.train_steps = args.deprecated_steps

    backbone = args.backbone or default_backbone()
    if args.build_cache and not args.latent_cache:
        raise ValueError("--build-cache needs --latent-cache URL (where to write the latents)")
    if not args.data and not args.latent_cache:
        raise ValueError("give training images (DATA) or --latent-cache URL")
    init_ray(args.ray_address)  # None: a local cluster, never one joined by accident
    if args.build_cache:
        n = build_latent_cache(args.data, args.latent_cache, backbone, args.vae, num_actors=args.workers, use_gpu=args.gpu,
                               max_side=args.max_side)
        print(f"latent cache: {n} images -> {args.latent_cache}")
    cfg = CodecTrainConfig(distortion=args.distortion, lam_min=args.lam_min, lam_max=args.lam_max,
                      train_estimator=not args.no_estimator, denoise=not args.no_denoise, lr=args.lr,
                      decay_steps=args.train_steps, hidden=args.hp_hidden, z_channels=args.hp_z_channels,
                      entropy_model=args.entropy_model, init_weights=args.init_weights)
    if args.t_range:
        cfg.t_range = tuple(args.t_range)
    job = TrainJob(data=args.data, out=args.out, backbone=backbone, vae=args.vae, latent_cache=args.latent_cache,
                   num_workers=args.workers, use_gpu=args.gpu, storage_path=args.storage_path, name=args.name,
                   train_steps=args.train_steps, batch_size=args.batch_size, crop=args.crop, checkpoint_every=args.checkpoint_every,
                   log_every=args.log_every, max_failures=args.max_failures, seed=args.seed, max_side=args.max_side,
                   default_t=args.default_t,
                   train=cfg.to_dict())
    res = train(job)
    last = res.history[-1] if res.history else {}
    print(f"{args.out}: trained {len(res.history)} steps; last bpp {last.get('bpp', float('nan')):.4f}, "
          f"distortion {last.get('distortion', float('nan')):.5f}, t {last.get('t', float('nan')):.1f}; "
          f"codec fingerprint {res.codec.fingerprint().hex()}")
    return 0
