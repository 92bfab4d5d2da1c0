"""`fcodec decode IN.fdc OUT.png`: one bitstream record back to an image."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_codec_args, atomic_write, codec_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("decode", help="decompress one .fdc bitstream to a PNG",
                       description="Decode a foundation-codec bitstream to PNG at the original size. "
                                   "Use the same --backbone/--vae/--entropy/--codec-weights as the encoder.")
    p.add_argument("bitstream", help="input .fdc file")
    p.add_argument("out", help="output image (.png)")
    add_codec_args(p, encode=False, decode=True)
    return p


def run(args: argparse.Namespace) -> int:
    from codec import bitstream, to_png

    data = Path(args.bitstream).read_bytes()
    codec = codec_from_args(args)
    px = codec.decode([data], steps=args.steps)[0]
    gray = bool(bitstream.parse(data).flags & bitstream.FLAG_GRAY)
    atomic_write(args.out, to_png(px, gray=gray))
    print(f"{args.out}: {px.shape[1]}x{px.shape[0]}")
    return 0
