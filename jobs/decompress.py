"""`fcodec decompress SRC DST`: a Parquet bitstream dataset back to PNGs under DST (original keys),
or to a Parquet dataset of PNG bytes, as a Ray job.

Decode every committed row of a `fcodec compress` dataset at SRC with the codec the dataset
names (its manifest); codec flags are only needed for a different device or speed, and must
agree with the dataset. PNGs are written under DST with the original keys (key + '.png' unless
it ends in .png); checksums are verified and keys that would escape DST are refused.
"""
from __future__ import annotations

import argparse

from .common import EXIT_CODES_HELP
from .compress import add_dataset_job_args, run_dataset_job
from .options import add_codec_options, job_parser


def add_parser(sub) -> argparse.ArgumentParser:
    p = job_parser(sub, "decompress", help="decode a Parquet bitstream dataset to PNGs (Ray job)",
                   description=__doc__,
                   epilog=EXIT_CODES_HELP,
                   positionals=[("src", "bitstream dataset folder or bucket prefix"), ("dst", "output folder or bucket prefix")])
    p.add_argument("--format", choices=["files", "png", "webdataset", "parquet"], default="files",
                   help="files (or png): one image file per key; webdataset: one tar shard per bitstream shard with "
                        "<key>.<image-format> and the key's original sidecars; parquet: part files whose `image` column "
                        "Hugging Face datasets reads as an Image feature, plus the carried columns (default: %(default)s)")
    p.add_argument("--image-format", choices=["png", "webp", "jpg"], default="png",
                   help="how decoded images are stored (default: %(default)s, lossless)")
    add_dataset_job_args(p)
    add_codec_options(p, encode=False, decode=True)
    return p


def run(args: argparse.Namespace) -> int:
    return run_dataset_job(args, "decompress")
