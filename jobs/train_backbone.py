"""`fcodec train-backbone`: train the nano backbone (VAE, then UNet) on a folder of photos, on a CPU.

    fcodec train-backbone --data ../shared/data/photos --max-side 1024 --out nano-out          # both stages
    fcodec train-backbone --data ... --out nano-out --stage vae                # VAE only
    fcodec train-backbone --data ... --out nano-out --stage unet               # reuse its VAE
    fcodec train-backbone ... --eval ../shared/data/usc_sipi                   # + held-out numbers
    fcodec train-backbone --data ../shared/data/photos --vae ../shared/models/taesd --max-side 1024 \
        --out taesd-out                                                        # UNet on frozen TAESD
    fcodec train-backbone --data ../shared/data/photos --finetune taesd-v1 --max-side 1024 \
        --out taesd-v2-out                                                     # its UNet, judged in pixels

The output folder is a diffusers SD snapshot (`--backbone nano-out` loads it); the committed
`codec/weights/nano-v1/` was made this way (see its MODEL_CARD.md for the exact command).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    from codec.nano import BackboneTrainConfig  # torch-free: --help stays fast

    d = BackboneTrainConfig()
    p = sub.add_parser("train-backbone", help="train the small 'nano' VAE + UNet backbone on a CPU",
                       description="Train the nano backbone: the VAE on random crops of --data, then the UNet "
                                   "on its latents for t in [1, --t-max], with a fixed seed.")
    p.add_argument("--data", default="../shared/data/photos",
                   help="folder of training photos; never Kodak or USC-SIPI, the held-out sets (default: %(default)s)")
    p.add_argument("--out", default="nano-out", help="output snapshot folder (default: %(default)s)")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a TAESD folder: keep it frozen as the VAE and train only the UNet on its latents "
                        "(the SD latent space; the snapshot ships the TAESD weights and licence)")
    p.add_argument("--finetune", default=None, metavar="BACKBONE",
                   help="a TAESD backbone (taesd-v1, or a `--vae` output folder): fine-tune its UNet as a one-step "
                        "denoiser scored in pixels through the frozen TAESD decoder (1 − MS-SSIM + MSE); "
                        "the snapshot decodes with 1 step by default (how taesd-v2 was made)")
    p.add_argument("--max-side", type=int, default=d.max_side, metavar="PX",
                   help="downscale training photos to this longer side first (default: as they are)")
    p.add_argument("--stage", choices=["all", "vae", "unet"], default="all",
                   help="all; vae only; or unet only, reusing OUT/vae_trained.pt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--vae-crop", type=int, default=d.vae_crop, help="training crop in pixels")
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument("--unet-batch", type=int, default=d.unet_batch)
    p.add_argument("--unet-crop", type=int, default=d.unet_crop, help="training crop in latent pixels (x8 image pixels)")
    p.add_argument("--vae-stop-at", type=int, default=None, metavar="N", help="stop the VAE after N steps of its --vae-steps schedule")
    p.add_argument("--unet-stop-at", type=int, default=None, metavar="N", help="stop the UNet after N steps of its --unet-steps schedule")
    p.add_argument("--colour-weight", type=float, default=d.colour_weight,
                   help="weight of each crop's mean-colour error beside the per-pixel MSE in VAE training (default: %(default)s)")
    p.add_argument("--pixel-steps", type=int, default=d.pixel_steps, help="--finetune: steps (default: %(default)s)")
    p.add_argument("--pixel-batch", type=int, default=d.pixel_batch, help="--finetune: crops per step (default: %(default)s)")
    p.add_argument("--pixel-crop", type=int, default=d.pixel_crop,
                   help="--finetune: crop side in pixels, > 160 for MS-SSIM (default: %(default)s)")
    p.add_argument("--pixel-lr", type=float, default=d.pixel_lr, help="--finetune: Adam rate (default: %(default)s)")
    p.add_argument("--t-max", type=int, default=d.t_max, help="largest diffusion step trained (default: %(default)s)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=d.prediction_type)
    p.add_argument("--small", action="store_true", help="tiny model sizes (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval", default=None, metavar="DIR", help="held-out photos: write OUT/metrics.json with the issue's numbers")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from codec.nano import BackboneTrainConfig
    from codec.pixels import load_folder
    from codec.train_backbone import train_backbone

    torch.set_num_threads(max(1, args.threads))
    cfg = BackboneTrainConfig(seed=args.seed, vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_crop=args.vae_crop,
                      unet_steps=args.unet_steps, unet_batch=args.unet_batch, unet_crop=args.unet_crop,
                      t_max=args.t_max, prediction_type=args.prediction_type, small=args.small,
                      log_every=args.log_every, vae_stop_at=args.vae_stop_at, unet_stop_at=args.unet_stop_at,
                      max_side=args.max_side, colour_weight=args.colour_weight, pixel_steps=args.pixel_steps,
                      pixel_batch=args.pixel_batch, pixel_crop=args.pixel_crop, pixel_lr=args.pixel_lr)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.finetune:
        if args.vae or args.stage != "all":
            raise ValueError("--finetune trains only the given backbone's UNet: drop --vae and --stage")
        from codec.registry import lookup
        from codec.train_backbone import finetune_denoiser

        found = lookup(args.finetune)
        src = found.path if found is not None and found.path is not None else Path(args.finetune)
        if not (src / "model_index.json").is_file():
            raise ValueError(f"--finetune {args.finetune}: not a built-in TAESD backbone or a snapshot folder")
        out = finetune_denoiser(src, args.data, args.out, cfg, log=log)
    elif args.vae:
        if args.stage == "vae":
            raise ValueError("--vae DIR keeps that autoencoder frozen: there is no VAE stage to run")
        from codec.train_backbone import train_denoiser

        out = train_denoiser(args.data, args.vae, args.out, cfg, log=log)
    else:
        out = train_backbone(args.data, args.out, cfg, log=log, stage=args.stage)
    if args.stage == "vae":
        print(f"{out}: VAE trained; run again with --stage unet")
        return 0
    from codec.registry import write_weight_sums

    sums = write_weight_sums(out)  # what `codec/weights/<name>-v<N>/` ships and the tests check
    print(f"{out}: backbone fingerprint {sums['backbone_fingerprint']}")
    if args.eval:
        from codec import load_backbone
        from codec.evaluate import evaluate

        res = evaluate(load_backbone(str(out)), load_folder(args.eval))
        (Path(out) / "metrics.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
    print(f"{out}: backbone written (use --backbone {out})")
    return 0
