"""`fcodec inspect FILE.fdc | DATASET`: what a record's header or a dataset's manifest says,
without loading any model (codec/inspect.py).

Print a record's header (format version, backbone name and fingerprint, entropy model, codec
fingerprint, t, γ, sizes, string lengths, CRC) or a local dataset's manifest summary (codec,
counts, shards, mean bpp, dates, the software version that wrote it). Exit 0: readable; 1: the
record's checksum is wrong; 2: not a record or dataset (truncated, unreadable).
"""
from __future__ import annotations

import argparse
import json

from .options import add_storage_options, job_parser, storage_options


def add_parser(sub) -> argparse.ArgumentParser:
    p = job_parser(sub, "inspect", help="show a .fdc record's header or a bitstream dataset's summary",
                   description=__doc__,
                   positionals=[("path", "a .fdc file or a bitstream dataset folder")])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_storage_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if "://" in args.path or Path(args.path).is_dir():
        from pipeline.summary import format_dataset, inspect_dataset

        info = inspect_dataset(args.path, storage_options(args))
        lines = format_dataset(info)
    else:
        from codec.inspect import format_report, inspect_file

        info = inspect_file(args.path)
        lines = format_report(info)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else "\n".join(lines))
    return 0 if info.get("crc_ok", True) else 1
