"""`fcodec decode IN.fdc OUT.png`: one bitstream record back to an image."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_codec_args, atomic_write, codec_from_args
from .options import add_positional

# Options the record itself names (by fingerprint and model id): left out, they come from it.
FROM_RECORD = {"backbone": "a built-in backbone (tiny, nano, nano-v1, ...), hub id or snapshot folder "
                           "(default: the built-in backbone whose fingerprint the record carries)",
               "entropy": "entropy model (default: the one the record names)",
               "codec_weights": "trained entropy model/estimator folder (default: none for the static model; "
                                "shipped weights with the record's codec fingerprint otherwise)"}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("decode", help="decompress one .fdc bitstream to a PNG",
                       description="Decode a foundation-codec bitstream to PNG at the original size. The backbone, "
                                   "entropy model and codec weights default to the built-in ones the record's "
                                   "fingerprints name; for others pass the same --backbone/--vae/--entropy/"
                                   "--codec-weights as the encoder.")
    add_positional(p, "bitstream", "input .fdc file")
    add_positional(p, "out", "output image (.png)")
    add_codec_args(p, encode=False, decode=True)
    for action in p._actions:
        if action.dest in FROM_RECORD:
            action.default, action.help = None, FROM_RECORD[action.dest]
    return p


def run(args: argparse.Namespace) -> int:
    from codec import bitstream, to_png
    from codec.resolve import options_for_record

    data = Path(args.bitstream).read_bytes()
    vars(args).update(options_for_record(data, args.backbone, args.vae, args.entropy, args.codec_weights))
    codec = codec_from_args(args)
    px = codec.decode([data], steps=args.steps)[0]
    gray = bool(bitstream.parse(data).flags & bitstream.FLAG_GRAY)
    atomic_write(args.out, to_png(px, gray=gray))
    print(f"{args.out}: {px.shape[1]}x{px.shape[0]}")
    return 0
