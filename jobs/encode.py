"""`fcodec encode IMAGE OUT.fdc`: one image to one bitstream record."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_codec_args, atomic_write, codec_from_args
from .options import add_positional


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("encode", help="compress one image file to a .fdc bitstream",
                       description="Compress one image (PNG, JPEG, WebP, ...) to a foundation-codec bitstream.")
    add_positional(p, "image", "input image file")
    add_positional(p, "out", "output bitstream (.fdc)")
    add_codec_args(p, encode=True, decode=False)
    return p


def run(args: argparse.Namespace) -> int:
    from codec import load_image

    data = Path(args.image).read_bytes()
    img = load_image(data)
    codec = codec_from_args(args)
    enc = codec.encode([img], t=args.t, target_bpp=args.target_bpp)[0]
    atomic_write(args.out, enc.data)
    print(f"{args.out}: {len(enc.data)} bytes, {enc.bpp:.4f} bpp, t={enc.t}, {enc.width}x{enc.height}")
    return 0
