"""`fcodec demo`: the main job end to end on embedded defaults (no downloads, no setup).

Writes sample images, compresses them, decompresses them and prints rate and quality.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import add_codec_args, atomic_write, codec_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run the whole codec end to end on built-in sample images",
                       description="Generate sample images, compress and decompress them, print bpp and PSNR.")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--n", type=int, default=12, help="number of sample images (default: %(default)s)")
    add_codec_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from codec import load_image, psnr, to_png

    from .samples import write_samples

    out = Path(args.out)
    paths = write_samples(out / "originals", n=args.n)
    codec = codec_from_args(args)
    if codec.backbone.name.startswith("tiny"):
        print("note: the tiny backbone has random weights: it is for trying the system, not for quality")
    images = [load_image(p.read_bytes()) for p in paths]
    t0 = time.perf_counter()
    enc = codec.encode(images)
    t1 = time.perf_counter()
    dec = codec.decode([e.data for e in enc])
    t2 = time.perf_counter()
    for p, e, d, im in zip(paths, enc, dec, images):
        atomic_write(out / "bitstreams" / (p.stem + ".fdc"), e.data)
        atomic_write(out / "decoded" / (p.stem + ".png"), to_png(d))
    bpp = float(np.mean([e.bpp for e in enc]))
    q = float(np.mean([psnr(im.pixels, d) for im, d in zip(images, dec)]))
    print(f"{len(enc)} images: mean {bpp:.3f} bpp, mean PSNR {q:.2f} dB, "
          f"encode {len(enc) / (t1 - t0):.1f} img/s, decode {len(enc) / (t2 - t1):.1f} img/s -> {out}/")
    return 0
