"""`fcodec audit ORIGINALS BITSTREAMS OUT`: per-image quality of a bitstream dataset, FID/KID,
and a report (OUT/metrics.parquet, OUT/summary.json, OUT/report.html)."""
from __future__ import annotations

import argparse

from .common import add_codec_args


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
                       description="Pair each bitstream row with its original, decode, and write per-image PSNR / "
                                   "SSIM / MS-SSIM (LPIPS/DISTS when weights are local), FID/KID on 256x256 patches, "
                                   "and a self-contained report.html under OUT.")
    p.add_argument("originals", help="folder / prefix / glob of the original images (local or s3://)")
    p.add_argument("bitstreams", help="bitstream dataset written by `fcodec compress`")
    p.add_argument("out", help="output folder (local or s3://)")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="the dataset was written by a baseline codec: jpeg | webp | avif | compressai:ARCH")
    p.add_argument("--quality", type=int, default=75, help="baseline quality (default: %(default)s)")
    p.add_argument("--label", default=None, help="codec name in the report (default: the codec's name)")
    p.add_argument("--workers", type=int, default=2, help="audit actors (default: %(default)s)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="Ray CPUs per actor (default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="Ray GPUs per actor, e.g. 1 or 0.5 (default: %(default)s)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else $FCODEC_S3_ENDPOINT)")
    add_metric_args(p)
    add_codec_args(p, encode=False, decode=True)
    p.set_defaults(_audit_parser=p)
    return p


# Options that must match the encoder: taken from the dataset's manifest unless given as flags.
DECODER_KEYS = ("backbone", "vae", "entropy", "codec_weights", "baseline", "quality")


def spec_with_manifest(args: argparse.Namespace, spec: dict) -> tuple[dict, str]:
    """Fill the decoder options the user left at their defaults from BITSTREAMS/_manifest.json
    (what `fcodec compress` used); returns (spec, setting label such as 't=100')."""
    from pipeline.storage import StorageOptions, get_fs, read_manifest

    fs, root = get_fs(args.bitstreams, StorageOptions.from_env(args.endpoint_url))
    prev = ((read_manifest(fs, root) or {}).get("config") or {}).get("codec") or {}
    parser = args._audit_parser
    for k in DECODER_KEYS:
        given = getattr(args, k, None)
        if k in prev and prev[k] is not None and (given is None or given == parser.get_default(k)):
            spec[k] = prev[k]
    if spec.get("baseline"):
        spec = {k: spec[k] for k in ("baseline", "quality") if k in spec}
        return spec, f"q{spec.get('quality')}"
    if prev.get("t") is not None:
        return spec, f"t={prev['t']}"
    if prev.get("target_bpp") is not None:
        return spec, f"target {prev['target_bpp']} bpp"
    return spec, ""


def codec_spec_from_args(args: argparse.Namespace) -> dict:
    """The pipeline codec spec (plain dict) the options describe."""
    if getattr(args, "baseline", None):
        return {"baseline": args.baseline, "quality": args.quality}
    return {"baseline": None, "quality": args.quality, "backbone": args.backbone, "vae": args.vae, "entropy": args.entropy, "codec_weights": args.codec_weights,
            "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "steps": args.steps, "threads": 1}


def run(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditConfig, run_audit
    from pipeline.storage import StorageOptions

    spec, setting = spec_with_manifest(args, codec_spec_from_args(args))
    cfg = AuditConfig(codec=spec, fid=args.fid, patch=args.patch, setting=setting,
                      weights={"lpips": args.lpips_weights, "dists": args.dists_weights}, label=args.label)
    s = run_audit(args.originals, args.bitstreams, args.out, cfg, StorageOptions.from_env(args.endpoint_url),
                  workers=args.workers, n_worst=args.worst, cpus_per_worker=args.cpus_per_worker,
                  ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker)
    g = s["groups"][0] if s["groups"] else {}
    fmt = lambda v, f: "n/a" if v is None or v != v else format(v, f)  # noqa: E731
    print(f"{s['n_rows']} rows: {s['n_ok']} measured, {s['n_failed']} failed; mean {fmt(g.get('bpp'), '.4f')} bpp, "
          f"PSNR {fmt(g.get('psnr'), '.2f')} dB, MS-SSIM {fmt(g.get('ms_ssim'), '.4f')}, FID {fmt(s.get('fid'), '.2f')} "
          f"-> {args.out}/report.html")
    for note in s["notes"]:
        print(f"note: {note}")
    return 0
