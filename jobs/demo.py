"""`fcodec demo`: the main job end to end on embedded defaults (offline, no setup).

Writes sample images to a folder, `compress`es them with a local Ray into a Parquet bitstream
dataset, `decompress`es that back to PNGs, and prints the job stats and the quality.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from .common import add_codec_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run the main job end to end on built-in sample images (local Ray)",
                       description="Generate sample images, compress them with a local Ray into a Parquet bitstream "
                                   "dataset, decompress it back to PNGs, print the stats (bpp, ratio, PSNR, images/s).")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--n", type=int, default=24, help="number of sample images (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else half the CPUs)")
    p.add_argument("--no-ray", action="store_true", help="run the stages inline instead of on a local Ray")
    add_codec_args(p)
    return p


def _fresh(d: Path) -> None:
    """Start the demo's own output folders clean (only folders this job wrote: they hold _manifest.json)."""
    if d.is_dir() and any((d / n).exists() for n in ("__fcodec__", "_manifest.json", "_commits")):
        shutil.rmtree(d)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from codec import psnr
    from pipeline.raystart import ray_session
    from pipeline.rows import output_key
    from pipeline.run import JobConfig, compress, decompress

    from .options import codec_given
    from .samples import write_samples

    out = Path(args.out)
    originals, archive, decoded = out / "originals", out / "bitstreams", out / "decoded"
    for d in (archive, decoded):
        _fresh(d)
    paths = write_samples(originals, n=args.n)
    spec = codec_given(args)
    if spec.get("backbone") == "tiny":
        print("note: the tiny backbone has random weights: it is for trying the system, not for quality")
    with ray_session(None) if not args.no_ray else contextlib.nullcontext():
        c = compress(JobConfig(src=str(originals), dst=str(archive), codec=spec, workers=args.workers, shard_size=8),
                     use_ray=not args.no_ray)
        d = decompress(JobConfig(src=str(archive), dst=str(decoded), workers=args.workers,
                                 codec={k: v for k, v in spec.items() if k in ("steps", "device", "precision", "batch_size")}),
                       use_ray=not args.no_ray)
    scores = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"))
        b = np.asarray(Image.open(decoded / output_key(p.name)).convert("RGB"))
        scores.append(psnr(a, b))
    cr, dr = c["run"], d["run"]
    print(f"demo: {cr['ok']}/{cr['rows']} images compressed, {dr['ok']} decoded; {cr['input_bytes']} -> {cr['output_bytes']} bytes "
          f"(ratio {cr['ratio']:.1f}:1), mean {cr['mean_bpp']:.3f} bpp, mean PSNR {np.mean(scores):.2f} dB; "
          f"compress {cr['images_per_s'] or 0:.1f} img/s, decompress {dr['images_per_s'] or 0:.1f} img/s")
    print(f"demo: originals in {originals}/, Parquet dataset in {archive}/, PNGs in {decoded}/")
    return 0 if cr["failed"] == 0 and dr["failed"] == 0 else 1
