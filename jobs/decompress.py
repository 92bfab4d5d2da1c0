"""`fcodec decompress SRC DST`: a Parquet bitstream dataset back to PNGs under DST (original keys),
or to a Parquet dataset of PNG bytes, as a Ray job."""
from __future__ import annotations

import argparse

from .common import add_codec_args
from .compress import add_job_args, run_job


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("decompress", help="decode a Parquet bitstream dataset to PNGs (Ray job)",
                       description="Decode every committed row of a `fcodec compress` dataset at SRC. PNGs are "
                                   "written under DST with the original keys (key + '.png' unless it ends in .png); "
                                   "checksums are verified and keys that would escape DST are refused. Pass the "
                                   "codec options the dataset was compressed with.")
    p.add_argument("src", nargs="?", help="bitstream dataset folder or bucket prefix")
    p.add_argument("dst", nargs="?", help="output folder or bucket prefix")
    p.add_argument("--format", choices=["png", "parquet"], default="png",
                   help="png: one file per key; parquet: part files with a `png` bytes column (default: %(default)s)")
    add_job_args(p)
    add_codec_args(p, encode=False, decode=True)
    p.set_defaults(_parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    res = run_job(args, "decompress")
    return 0 if res["run"]["failed"] == 0 else 1
