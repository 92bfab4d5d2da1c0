"""`fcodec compress SRC DST`: archive an image dataset (folder, bucket, tar shards, Parquet) to a
Parquet bitstream dataset, as a Ray job (local Ray, or a cluster with --ray-address auto).

Compress every image under SRC (local folder, s3://, gs://, glob; image files, WebDataset tar
shards or Parquet with an image column) into a Parquet bitstream dataset at DST. Reruns add
what is new (resume); failed inputs become status='failed' rows. One run writes a DST at a time
(a lease).
"""
from __future__ import annotations

import argparse
import json

from .common import EXIT_CODES_HELP, exit_code
from .options import (add_codec_options, add_config_option, add_pool_options, add_ray_options, add_storage_options,
                      codec_given, job_parser, ray_starter, storage_options)


def add_dataset_job_args(p: argparse.ArgumentParser) -> None:
    """Options of both dataset jobs (compress, decompress); a --config file may set any of them."""
    add_config_option(p)
    g = add_ray_options(p)
    add_pool_options(g)
    g.add_argument("--max-shards", type=int, default=None, help="stop after N shards (a rerun continues)")
    g.add_argument("--retry-failed", action="store_true", help="redo only the rows that failed in committed shards")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    add_storage_options(p)


def job_config(args: argparse.Namespace, **extra):
    """(JobConfig, StorageOptions) from the parsed options."""
    from pipeline.run import JobConfig

    opts = storage_options(args)
    cfg = JobConfig(src=args.src, dst=args.dst, codec=codec_given(args), rows_per_batch=args.rows_per_batch,
                    workers=args.workers, actor_cpus=args.actor_cpus, io_threads=args.io_threads, gpus=args.gpus,
                    actor_start_timeout_s=args.actor_start_timeout, retry_failed=args.retry_failed,
                    max_shards=args.max_shards, storage=opts.public(), **extra)
    return cfg, opts


def run_dataset_job(args: argparse.Namespace, which: str) -> int:
    """Print the resolved config, run compress or decompress, return the exit code."""
    from pipeline import run as pr

    extra = ({"image_column": args.image_column, "shard_size": args.shard_size, "mode": args.mode,
              "keep_columns": [c for c in args.keep_columns.split(",") if c] if args.keep_columns is not None else None,
              "dedupe": args.dedupe}
             if which == "compress" else {"format": args.format, "image_format": args.image_format})
    cfg, opts = job_config(args, **extra)
    print("config: " + json.dumps({**cfg.public(), "ray_address": args.ray_address}, sort_keys=True), flush=True)
    fn = pr.compress if which == "compress" else pr.decompress
    try:
        res = fn(cfg, opts, use_ray=not args.no_ray, progress=not args.no_progress, start_ray=ray_starter(args))
    finally:
        from pipeline.raystart import shutdown_if_started

        shutdown_if_started()
    return exit_code(res["run"], res["totals"])


def add_parser(sub) -> argparse.ArgumentParser:
    p = job_parser(sub, "compress", help="archive a folder/bucket of images to a Parquet bitstream dataset (Ray job)",
                   description=__doc__,
                   epilog=EXIT_CODES_HELP,
                   positionals=[("src", "input folder, bucket prefix, glob or file"), ("dst", "output dataset folder or bucket prefix")])
    p.add_argument("--image-column", default=None, help="Parquet inputs: the image-bytes column (default: detected)")
    p.add_argument("--keep-columns", default=None, metavar="A,B,...",
                   help="Parquet inputs: the other columns carried into the dataset (default: all; '' for none)")
    p.add_argument("--shard-size", type=int, default=256, help="image files per new shard (default: %(default)s)")
    p.add_argument("--mode", choices=["extend", "sync"], default="extend",
                   help="what to do when sources changed since the last run: extend (default, safe) adds new sources "
                        "and keeps the rows of vanished or changed ones; sync also drops the rows of vanished sources "
                        "and recompresses changed ones (detected by size/mtime/ETag, confirmed by hash)")
    p.add_argument("--dedupe", action="store_true",
                   help="store one bitstream per distinct source content (sha256); later copies refer to the first "
                        "(decompress writes every key). Without it, duplicates are only counted")
    add_dataset_job_args(p)
    add_codec_options(p, encode=True, decode=False)
    return p


def run(args: argparse.Namespace) -> int:
    return run_dataset_job(args, "compress")
