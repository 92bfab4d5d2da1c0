"""`fcodec audit ORIGINALS BITSTREAMS OUT`: per-image quality of a bitstream dataset, FID/KID,
and a report (OUT/metrics.parquet, OUT/summary.json, OUT/report.html)."""
from __future__ import annotations

import argparse

from .common import EXIT_CODES_HELP, exit_code
from .options import (add_codec_options, add_config_option, add_positional, add_ray_options, add_storage_options,
                      codec_spec, storage_options)


def add_metric_args(p: argparse.ArgumentParser) -> None:
    """Metric options shared by `audit` and `compare`."""
    g = p.add_argument_group("metrics")
    g.add_argument("--fid", default="inception", metavar="EXTRACTOR",
                   help="FID/KID feature extractor: inception (weights from $FCODEC_INCEPTION_WEIGHTS or the torch "
                        "hub cache; skipped if absent, never downloaded) | seeded[:DIM[:SEED]] (a small random net, "
                        "for testing) | none (default: %(default)s)")
    g.add_argument("--patch", type=int, default=256, help="FID/KID patch side, HiFiC protocol (default: %(default)s)")
    g.add_argument("--lpips-weights", default=None, metavar="DIR",
                   help="folder with alexnet-owt-7be5be79.pth and alex.pth (else $FCODEC_LPIPS_WEIGHTS; skipped if absent)")
    g.add_argument("--dists-weights", default=None, metavar="DIR",
                   help="folder with vgg16-397923af.pth and weights.pt (else $FCODEC_DISTS_WEIGHTS; skipped if absent)")
    g.add_argument("--worst", type=int, default=6, help="worst images (by PSNR) shown in the report (default: %(default)s)")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="measure the quality of a compressed dataset against its originals",
                       description="Pair each bitstream row with its original, decode with the codec the dataset "
                                   "names (its manifest), and write per-image PSNR / SSIM / MS-SSIM (LPIPS/DISTS "
                                   "when weights are local), FID/KID on 256x256 patches, and a self-contained "
                                   "report.html under OUT.", epilog=EXIT_CODES_HELP)
    add_positional(p, "originals", "folder / prefix / glob of the original images (local or s3://)")
    add_positional(p, "bitstreams", "bitstream dataset written by `fcodec compress`")
    add_positional(p, "out", "output folder (local or s3://)")
    add_config_option(p)
    p.add_argument("--label", default=None, help="codec name in the report (default: the codec's name)")
    g = add_ray_options(p, inline=False)
    g.add_argument("--workers", type=int, default=2, help="audit actors (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=float, default=0.5, help="Ray CPUs per actor (default: %(default)s)")
    g.add_argument("--gpus-per-worker", type=float, default=0, help="Ray GPUs per actor, e.g. 1 or 0.5 (default: %(default)s)")
    add_storage_options(p)
    add_metric_args(p)
    add_codec_options(p, encode=False, decode=True, baseline=True)
    return p


def dataset_spec(args: argparse.Namespace):
    """The codec the dataset names, with the options given (contradictions are an error), and
    the setting label the report shows (e.g. 't=100')."""
    from pipeline.catalog import Books, dataset_codec
    from pipeline.storage import get_fs

    m = Books(*get_fs(args.bitstreams, storage_options(args))).read_manifest()
    spec = dataset_codec(m, codec_spec(args).replace(threads=1), args.bitstreams)
    if spec.baseline:
        return spec, f"q{spec.quality or 75}"
    if spec.t is not None:
        return spec, f"t={spec.t}"
    if spec.target_bpp is not None:
        return spec, f"target {spec.target_bpp} bpp"
    return spec, ""


def run(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditConfig, run_audit

    spec, setting = dataset_spec(args)
    cfg = AuditConfig(codec={k: v for k, v in spec.to_dict().items() if v is not None}, fid=args.fid, patch=args.patch, setting=setting,
                      weights={"lpips": args.lpips_weights, "dists": args.dists_weights}, label=args.label)
    s = run_audit(args.originals, args.bitstreams, args.out, cfg, storage_options(args),
                  workers=args.workers, n_worst=args.worst, cpus_per_worker=args.cpus_per_worker,
                  ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker)
    g = s["groups"][0] if s["groups"] else {}
    fmt = lambda v, f: "n/a" if v is None or v != v else format(v, f)  # noqa: E731
    print(f"{s['n_rows']} rows: {s['n_ok']} measured, {s['n_failed']} failed; mean {fmt(g.get('bpp'), '.4f')} bpp, "
          f"PSNR {fmt(g.get('psnr'), '.2f')} dB, MS-SSIM {fmt(g.get('ms_ssim'), '.4f')}, FID {fmt(s.get('fid'), '.2f')} "
          f"-> {args.out}/report.html")
    for note in s["notes"]:
        print(f"note: {note}")
    return exit_code({"rows": s["n_rows"], "ok": s["n_ok"], "failed": s["n_failed"]}, {})
