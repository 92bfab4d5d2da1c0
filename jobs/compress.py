"""`fcodec compress SRC DST`: archive an image dataset (folder, bucket, tar shards, Parquet) to a
Parquet bitstream dataset, as a Ray job (local Ray, or a cluster with --ray-address auto)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_codec_args

# Options of both Ray jobs (compress, decompress); a --config file may set any of them.
JOB_DESTS = ("config", "ray_address", "no_ray", "shard_size", "rows_per_batch", "workers", "actor_cpus", "read_cpus",
             "gpus", "retry_failed", "max_shards", "s3_endpoint", "s3_region", "anon", "no_progress")


def add_job_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `compress` and `decompress`."""
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file (path or URL, e.g. s3://bucket/job.yaml) with any of these options (src, dst, t, "
                   "backbone, shard_size, ...; dashes or underscores); flags given on the command line win")
    g = p.add_argument_group("cluster")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster ('auto' = the one this machine belongs to); default: start a local Ray")
    g.add_argument("--no-ray", action="store_true", help="run the stages inline in this process (debugging, tiny jobs)")
    g.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU; without GPUs half the CPUs)")
    g.add_argument("--gpus", choices=["auto", "off"], default="auto", help="auto: one actor per GPU when the cluster has GPUs")
    g.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs reserved per actor, fractions allowed (default: %(default)s)")
    g.add_argument("--read-cpus", type=float, default=0.5, help="CPUs per read task (default: %(default)s)")
    g.add_argument("--image-io", choices=["auto", "tasks", "actor"], default="auto",
                   help="where images are decoded (compress) or PNG-encoded and written (decompress): in Ray tasks beside "
                        "the actors, overlapping the model, or in the actors; auto: tasks for GPU actors, the actors "
                        "themselves for CPU actors (default: %(default)s)")
    g.add_argument("--rows-per-batch", type=int, default=32, help="images per actor call; larger amortizes Ray's per-call cost (default: %(default)s)")
    g.add_argument("--shard-size", type=int, default=256, help="image files per output shard (default: %(default)s)")
    g.add_argument("--max-shards", type=int, default=None, help="stop after N shards (a rerun continues)")
    g.add_argument("--retry-failed", action="store_true", help="redo only the rows that failed in committed shards")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("storage (credentials come from AWS_* environment variables, never from flags)")
    s.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3-compatible endpoint (MinIO, Ceph, R2); default $FCODEC_S3_ENDPOINT or $AWS_ENDPOINT_URL or AWS")
    s.add_argument("--s3-region", default=None)
    s.add_argument("--anon", action="store_true", help="anonymous access (public buckets)")


def load_config_file(path: str, opts=None) -> dict:
    """A TOML or YAML file (local path or URL such as s3://bucket/job.yaml) as a flat dict of
    option names (dashes -> underscores; [sections] are flattened)."""
    if "://" in path:
        from pipeline.storage import get_fs, read_bytes

        fs, p = get_fs(path, opts)
        text = read_bytes(fs, p).decode()
    else:
        text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        import tomllib

        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options")
    flat: dict = {}
    for k, v in data.items():
        if isinstance(v, dict):  # allow [codec] / [cluster] sections
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            flat[k.replace("-", "_")] = v
    return flat


def fill_from_config(args: argparse.Namespace, parser: argparse.ArgumentParser, opts=None) -> None:
    """Set every option still at its default from the file args.config names (flags win);
    unknown keys are an error, so a typo in a scheduled job's config never passes silently."""
    values = load_config_file(args.config, opts)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{args.config}: unknown options {unknown}")
    for k, v in values.items():
        if getattr(args, k, None) == parser.get_default(k):
            setattr(args, k, v)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options not given on the command line from --config (flags win over the file)."""
    if getattr(args, "config", None):
        from pipeline.storage import StorageOptions

        fill_from_config(args, args._parser, StorageOptions.from_env(args.s3_endpoint, args.s3_region, args.anon))
    if not args.src or not args.dst:
        raise ValueError("give SRC and DST (on the command line or as src/dst in --config)")
    return args


def codec_spec(args: argparse.Namespace) -> dict:
    """The codec options as the plain dict actors load from (see pipeline.actors)."""
    return {"backbone": args.backbone, "vae": args.vae, "entropy": args.entropy, "codec_weights": args.codec_weights,
            "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "t": getattr(args, "t", None), "target_bpp": getattr(args, "target_bpp", None), "steps": getattr(args, "steps", None)}


def job_config(args: argparse.Namespace, **extra):
    from pipeline.run import JobConfig
    from pipeline.storage import StorageOptions

    opts = StorageOptions.from_env(args.s3_endpoint, args.s3_region, args.anon)
    cfg = JobConfig(src=args.src, dst=args.dst, codec=codec_spec(args), shard_size=args.shard_size,
                    rows_per_batch=args.rows_per_batch, workers=args.workers, actor_cpus=args.actor_cpus,
                    read_cpus=args.read_cpus, gpus=args.gpus, retry_failed=args.retry_failed,
                    max_shards=args.max_shards, image_stage={"auto": None, "tasks": True, "actor": False}[args.image_io],
                    storage=opts.public(), **extra)
    return cfg, opts


def run_job(args: argparse.Namespace, which: str) -> dict:
    """Resolve config, print it, start/join Ray, run compress or decompress; returns its stats."""
    from pipeline import run as pr

    args = resolve_args(args)
    extra = {"image_column": args.image_column} if which == "compress" else {"format": args.format}
    cfg, opts = job_config(args, **extra)
    print("config: " + json.dumps({**cfg.public(), "ray_address": args.ray_address}, sort_keys=True), flush=True)
    started = False
    if not args.no_ray:
        started = pr.init_ray(args.ray_address)
    try:
        fn = pr.compress if which == "compress" else pr.decompress
        return fn(cfg, opts, use_ray=not args.no_ray, progress=not args.no_progress)
    finally:
        if started:
            import ray

            ray.shutdown()


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compress", help="archive a folder/bucket of images to a Parquet bitstream dataset (Ray job)",
                       description="Compress every image under SRC (local folder, s3://, gs://, glob; image files, "
                                   "WebDataset tar shards or Parquet with an image column) into a Parquet bitstream "
                                   "dataset at DST. Reruns resume; failed inputs become status='failed' rows.")
    p.add_argument("src", nargs="?", help="input folder, bucket prefix, glob or file")
    p.add_argument("dst", nargs="?", help="output dataset folder or bucket prefix")
    p.add_argument("--image-column", default=None, help="Parquet inputs: the image-bytes column (default: detected)")
    add_job_args(p)
    add_codec_args(p, encode=True, decode=False)
    p.set_defaults(_parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    res = run_job(args, "compress")
    return 0 if res["run"]["rows"] or res["totals"]["rows"] else 1
