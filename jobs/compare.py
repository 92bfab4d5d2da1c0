"""`fcodec compare DATASET OUT --codecs ours,jpeg,webp,avif`: sweep each codec's settings on the
same images and write one report with every rate–distortion curve and a BD-rate table.

Runs in-process (one setting at a time, all images per call): comparisons are made on small
evaluation sets (Kodak, CLIC), where a Ray cluster would cost more than it saves.
"""
from __future__ import annotations

import argparse

from .audit import add_metric_args
from .common import add_codec_args

DEFAULT_TS = [25, 50, 100, 200]
DEFAULT_COMPRESSAI_QUALITIES = [1, 2, 3, 4, 5, 6]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="compare our codec with JPEG/WebP/AVIF/CompressAI on a dataset (RD curves, BD-rate)",
                       description="Encode and decode DATASET with each codec at several settings, measure every image, "
                                   "and write OUT/metrics.parquet, OUT/summary.json and OUT/report.html.")
    p.add_argument("dataset", help="folder / glob / tar / Parquet of images (local or s3://)")
    p.add_argument("out", help="output folder")
    p.add_argument("--codecs", default="ours,jpeg,webp,avif",
                   help="comma list of: ours, jpeg, webp, avif, compressai:ARCH (local weights only) (default: %(default)s)")
    p.add_argument("--ts", default=",".join(map(str, DEFAULT_TS)), help="t values swept for ours (default: %(default)s)")
    p.add_argument("--qualities", action="append", default=[], metavar="CODEC=Q1,Q2,...",
                   help="quality sweep of a baseline, e.g. jpeg=10,30,60,90 (repeatable; defaults per codec)")
    p.add_argument("--anchor", default="jpeg", help="BD-rate anchor codec (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by key)")
    p.add_argument("--crop", default=None, metavar="WxH", help="center-crop every image to WxH (smaller images are kept whole)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else $FCODEC_S3_ENDPOINT)")
    add_metric_args(p)
    add_codec_args(p, encode=False, decode=True)
    return p


def load_dataset(url: str, limit: int | None = None, crop: str | None = None, opts=None) -> list[tuple[str, object]]:
    """(key, uint8 array) of every readable image, sorted by key; unreadable inputs are skipped
    with a warning (compare measures codecs, not the dataset's health: that is `audit`)."""
    import sys

    from codec import load_image
    from pipeline.sources import list_inputs, plan_shards, read_shard

    inputs, _ = list_inputs(url, opts)
    out = []
    for shard in plan_shards(inputs):
        for rows in read_shard(shard, opts):
            for r in rows:
                try:
                    px = load_image(r["data"]).pixels if r["data"] is not None else None
                except ValueError as e:
                    px = None
                    r["read_error"] = str(e)
                if px is None:
                    print(f"warning: skipping {r['key']}: {r['read_error']}", file=sys.stderr)
                    continue
                out.append((r["key"], center_crop(px, crop)))
    out.sort(key=lambda x: x[0])
    if not out:
        raise FileNotFoundError(f"no readable images under '{url}'")
    return out[:limit] if limit else out


def center_crop(px, crop: str | None):
    """Center crop to 'WxH' where the image is large enough (per side)."""
    if not crop:
        return px
    w, h = (int(v) for v in crop.lower().split("x"))
    H, W = px.shape[:2]
    y, x = max(0, (H - h) // 2), max(0, (W - w) // 2)
    return px[y : y + min(h, H), x : x + min(w, W)].copy()


def settings(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """[(codec name, sweep values)] from the options."""
    from codec.baselines import DEFAULT_QUALITIES

    given = {}
    for q in args.qualities:
        name, _, vals = q.partition("=")
        if not vals:
            raise ValueError(f"--qualities wants CODEC=Q1,Q2,... (got '{q}')")
        given[name.strip()] = [int(v) for v in vals.split(",") if v.strip()]
    out = []
    for name in [c.strip() for c in args.codecs.split(",") if c.strip()]:
        if name == "ours":
            out.append((name, [int(v) for v in args.ts.split(",") if v.strip()]))
        elif name in DEFAULT_QUALITIES:
            out.append((name, given.get(name, DEFAULT_QUALITIES[name])))
        elif name.startswith("compressai"):
            out.append((name, given.get(name, DEFAULT_COMPRESSAI_QUALITIES)))
        else:
            raise ValueError(f"unknown codec '{name}' in --codecs (choose ours, jpeg, webp, avif, compressai:ARCH)")
    return out


def run(args: argparse.Namespace) -> int:
    import heapq
    import time

    import numpy as np
    import pandas as pd
    import torch

    from codec import CodecError
    from codec.baselines import make_baseline
    from codec.metrics import fid, kid
    from pipeline.audit import AuditConfig, Measurer, write_outputs
    from pipeline.storage import StorageOptions

    from .common import codec_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = StorageOptions.from_env(args.endpoint_url)
    sweep = settings(args)
    images = load_dataset(args.dataset, args.limit, args.crop, opts)
    m = Measurer(AuditConfig(fid=args.fid, patch=args.patch, weights={"lpips": args.lpips_weights, "dists": args.dists_weights}))
    notes = list(m.notes)
    real = m.new_stats()
    for key, px in images:
        m.add_features(real, key, px)

    rows, worst, scores, tick = [], [], {}, 0
    ours = None
    for name, values in sweep:
        for v in values:
            t0 = time.perf_counter()
            if name == "ours":
                ours = ours or codec_from_args(args)
                codec, label, setting = ours, f"ours ({ours.backbone.name})", f"t={v}"
                enc = codec.encode([px for _, px in images], t=v, errors="return")
            else:
                try:
                    codec = make_baseline(name, v)
                except CodecError as e:  # e.g. CompressAI weights absent: note it, compare the rest
                    notes.append(f"{name} q{v} skipped: {e}")
                    continue
                label, setting = name, f"q{v}"
                enc = codec.encode([px for _, px in images], errors="return")
            ok = [i for i, e in enumerate(enc) if not isinstance(e, Exception)]
            dec = dict(zip(ok, codec.decode([enc[i].data for i in ok], steps=args.steps, errors="return")))
            fake = m.new_stats()
            for i, (key, px) in enumerate(images):
                row = {"key": key, "source_uri": key, "codec": label, "setting": setting,
                       "width": px.shape[1], "height": px.shape[0], "status": "ok", "error": None}
                e, d = enc[i], dec.get(i)
                if isinstance(e, Exception) or isinstance(d, Exception):
                    row.update(status="failed", error=f"{type(e if isinstance(e, Exception) else d).__name__}: {e if isinstance(e, Exception) else d}")
                else:
                    row.update(n_bytes=len(e.data), bpp=e.bpp, t=int(e.t), **m.metrics(px, d))
                    row["n_patches"] = m.add_features(fake, key, d[: px.shape[0], : px.shape[1]])
                    tick += 1  # keep the N worst (original, decoded) pairs only
                    item = (-row["psnr"], tick, {"key": key, "codec": label, "setting": setting, "bpp": e.bpp,
                                                  "psnr": row["psnr"], "orig": px, "dec": d})
                    heapq.heappush(worst, item) if len(worst) < args.worst else heapq.heappushpop(worst, item)
                rows.append(row)
            if real is not None and real.n >= 2 and fake.n >= 2:
                scores[(label, setting)] = {"fid": fid(real, fake), "kid": kid(real, fake)}
            done = [r for r in rows[-len(images):] if r["status"] == "ok"]
            print(f"{label} {setting}: {len(done)}/{len(images)} ok, mean {np.mean([r['bpp'] for r in done]) if done else float('nan'):.4f} bpp, "
                  f"PSNR {np.mean([r['psnr'] for r in done]) if done else float('nan'):.2f} dB ({time.perf_counter() - t0:.1f} s)")

    from pipeline.report import summarize

    df = pd.DataFrame(rows)
    groups = summarize(df, scores)
    anchor = args.anchor if any(g["codec"] == args.anchor for g in groups) else None
    summary = {"dataset": args.dataset, "n_images": len(images), "crop": args.crop, "patch": args.patch, "groups": groups,
               "notes": notes, "anchor": anchor or (groups[0]["codec"] if groups else None)}
    worst_items = [w for _, _, w in sorted(worst, key=lambda x: x[0], reverse=True)]
    write_outputs(args.out, df, summary, worst_items, opts, anchor=anchor)
    print(f"{len(images)} images, {len(groups)} codec settings -> {args.out}/report.html")
    for n in notes:
        print(f"note: {n}")
    return 0
