"""Shared CLI plumbing: codec options, one-line errors, atomic writes."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# Known, user-facing failures: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError)


def add_codec_args(p: argparse.ArgumentParser, encode: bool = True, decode: bool = True) -> None:
    """The codec options every job shares (`fcodec encode`, `compress`, `audit`, ...)."""
    from codec import default_backbone

    g = p.add_argument_group("codec")
    g.add_argument("--backbone", default=default_backbone(),
                   help="tiny (random, for trying the system, not quality) | nano (the project's own small "
                        "trained backbone) | a hub id (stabilityai/stable-diffusion-2-1) | a local snapshot folder "
                        "(default: %(default)s)")
    g.add_argument("--vae", default=None, metavar="DIR",
                   help="a TAESD-style autoencoder folder (taesd_encoder/decoder .safetensors or .pth) used instead of the backbone's VAE")
    g.add_argument("--entropy", choices=["static", "hyperprior"], default="static",
                   help="entropy model: static (training-free, per-channel Gaussian) or hyperprior (needs --codec-weights to be good)")
    g.add_argument("--codec-weights", default=None, metavar="DIR", help="trained entropy model/estimator folder from `fcodec train`")
    g.add_argument("--device", default=None, help="torch device for the VAE/UNet (default: cuda if available, else cpu)")
    g.add_argument("--precision", default="auto", choices=["auto", "float32", "exact", "float64", "bfloat16", "float16"],
                   help="network precision; auto = bfloat16 on a GPU, float32 on the CPU (the entropy path is always "
                        "exact); 'exact' (float64) makes decoded pixels identical across batch sizes and thread counts, "
                        "at a large CPU cost (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="images per model call (default: %(default)s)")
    if encode:
        r = g.add_mutually_exclusive_group()
        r.add_argument("--t", type=int, default=None, metavar="N",
                       help="diffusion step whose noise the quantization matches (1..999; larger = fewer bits; default 100 or the trained estimator's choice)")
        r.add_argument("--target-bpp", type=float, default=None, metavar="X", help="search t per image to meet X bits per pixel (within 5%% where the image allows)")
    if decode:
        g.add_argument("--steps", type=int, default=None, metavar="K",
                       help="decoder DDIM budget: at most K UNet calls from t to 0; 0 = no denoising (default 8)")


def codec_from_args(args: argparse.Namespace):
    """Build the codec the options describe."""
    import torch

    from codec import CodecConfig, load_codec

    cfg = CodecConfig(batch_size=args.batch_size, precision=args.precision)
    if getattr(args, "t", None) is not None:
        cfg.t = args.t
    if getattr(args, "target_bpp", None) is not None:
        cfg.target_bpp = args.target_bpp
    if getattr(args, "steps", None) is not None:
        cfg.steps = args.steps
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    return load_codec(args.backbone, vae=args.vae, entropy=args.entropy, codec_weights=args.codec_weights,
                      device=device, config=cfg)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file so readers never see half of it (pipeline.storage.write_atomic)."""
    from pipeline.storage import get_fs, write_atomic

    fs, p = get_fs(str(Path(path).resolve()))
    write_atomic(fs, p, data)


def run_guarded(fn, args: argparse.Namespace) -> int:
    """Run a job; known failures become one line on stderr (traceback only with --debug)."""
    try:
        rc = fn(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("fcodec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's single place that turns errors into messages
        if getattr(args, "debug", False):
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, USER_ERRORS):
            msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
        print(f"fcodec: error: {msg}", file=sys.stderr)
        return 2
