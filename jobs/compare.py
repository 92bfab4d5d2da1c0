"""`fcodec compare DATASET OUT --codecs ours,jpeg,webp,avif,jxl`: sweep each codec's settings on the
same images and write one report with every rate–distortion curve and a BD-rate table
(`pipeline.compare.run_compare` does the work, in-process)."""
from __future__ import annotations

import argparse

from .audit import add_metric_args
from .common import add_codec_args
from .options import add_positional, add_storage_options, storage_options

DEFAULT_TS = [25, 50, 100, 200]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare our codec with JPEG/WebP/AVIF/JPEG XL/CompressAI on a dataset (RD curves, BD-rate)",
                       description="Encode and decode DATASET with each codec at several settings, measure every image, "
                                   "and write OUT/metrics.parquet, OUT/summary.json and OUT/report.html.")
    add_positional(p, "dataset", "folder / glob / tar / Parquet of images (local or s3://)")
    add_positional(p, "out", "output folder")
    p.add_argument("--codecs", default="ours,jpeg,webp,avif,jxl",
                   help="comma list of: ours, jpeg, webp, avif, jxl (JPEG XL), compressai:ARCH (local weights only) (default: %(default)s)")
    p.add_argument("--ts", default=",".join(map(str, DEFAULT_TS)), help="t values swept for ours (default: %(default)s)")
    p.add_argument("--qualities", action="append", default=[], metavar="CODEC=Q1,Q2,...",
                   help="quality sweep of a baseline, e.g. jpeg=10,30,60,90 (repeatable; defaults per codec)")
    p.add_argument("--anchor", default="jpeg", help="BD-rate anchor codec (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by key)")
    p.add_argument("--crop", default=None, metavar="WxH", help="center-crop every image to WxH (smaller images are kept whole)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_storage_options(p)
    add_metric_args(p)
    add_codec_args(p, encode=False, decode=True)
    return p


def parse_qualities(values: list[str]) -> dict[str, list[int]]:
    """{codec: [qualities]} from repeated --qualities CODEC=Q1,Q2,... options."""
    given = {}
    for q in values:
        name, _, vals = q.partition("=")
        if not vals:
            raise ValueError(f"--qualities wants CODEC=Q1,Q2,... (got '{q}')")
        given[name.strip()] = [int(v) for v in vals.split(",") if v.strip()]
    return given


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.audit import AuditConfig
    from pipeline.compare import CompareConfig, run_compare, sweep_plan
    from .common import codec_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = sweep_plan([c.strip() for c in args.codecs.split(",") if c.strip()],
                       [int(v) for v in args.ts.split(",") if v.strip()], parse_qualities(args.qualities))
    cfg = CompareConfig(dataset=args.dataset, out=args.out, sweep=sweep, anchor=args.anchor, limit=args.limit,
                        crop=args.crop, steps=args.steps, worst=args.worst,
                        audit=AuditConfig(fid=args.fid, patch=args.patch,
                                          weights={"lpips": args.lpips_weights, "dists": args.dists_weights}))
    summary = run_compare(cfg, lambda: codec_from_args(args), storage_options(args))
    print(f"{summary['n_images']} images, {len(summary['groups'])} codec settings -> {args.out}/report.html")
    for n in summary["notes"]:
        print(f"note: {n}")
    return 0
