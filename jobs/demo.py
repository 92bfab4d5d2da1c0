"""`fcodec demo`: the main job end to end on embedded defaults (offline, no setup).

Copies the shipped photographs (or writes synthetic samples) to a folder, `compress`es them with
a local Ray into a Parquet bitstream dataset, `decompress`es that back to PNGs, prints the job
stats and each image's rate and quality, and writes `side_by_side.png` (original | ours | JPEG at
no more bytes) and `rd.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from .common import add_codec_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run the main job end to end on built-in sample photos (local Ray)",
                       description="Compress the shipped sample photos with a local Ray into a Parquet bitstream "
                                   "dataset, decompress it back to PNGs, print the stats (bpp, ratio, PSNR, MS-SSIM, "
                                   "images/s) and write a side-by-side PNG against JPEG at the same rate.")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--samples", choices=["photos", "synthetic"], default="photos",
                   help="the 4 shipped photographs (licences in jobs/sample_photos/NOTICE.md), or synthetic images "
                        "(default: %(default)s)")
    p.add_argument("--n", type=int, default=None, help="number of images (default: every photo; 24 synthetic)")
    p.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else half the CPUs)")
    p.add_argument("--no-ray", action="store_true", help="run the stages inline instead of on a local Ray")
    add_codec_args(p)
    return p


def _fresh(d: Path) -> None:
    """Start the demo's own output folders clean (only folders this job wrote: they hold _manifest.json)."""
    if d.is_dir() and any((d / n).exists() for n in ("__fcodec__", "_manifest.json", "_commits")):
        shutil.rmtree(d)


def run(args: argparse.Namespace) -> int:
    import json

    from pipeline.raystart import ray_session
    from pipeline.run import JobConfig, compress, decompress

    from .options import codec_given
    from .samples import write_photos, write_samples

    out = Path(args.out)
    originals, archive, decoded = out / "originals", out / "bitstreams", out / "decoded"
    for d in (archive, decoded):
        _fresh(d)
    shutil.rmtree(originals, ignore_errors=True)  # the demo's own copies of its samples
    if args.samples == "photos":
        paths = write_photos(originals, args.n)
    else:
        paths = write_samples(originals, n=args.n or 24)
    spec = codec_given(args)
    if spec.get("backbone") == "tiny":
        print("note: the tiny backbone has random weights: it is for trying the system, not for quality")
    with ray_session(None) if not args.no_ray else contextlib.nullcontext():
        c = compress(JobConfig(src=str(originals), dst=str(archive), codec=spec, workers=args.workers, shard_size=8),
                     use_ray=not args.no_ray)
        d = decompress(JobConfig(src=str(archive), dst=str(decoded), workers=args.workers,
                                 codec={k: v for k, v in spec.items() if k in ("steps", "device", "precision", "batch_size")}),
                       use_ray=not args.no_ray)
    rows = _measure(paths, archive, decoded)
    for r in rows:
        print(f"  {r['key']}: {r['width']}x{r['height']}  ours {r['bpp']:.3f} bpp, {r['psnr']:.2f} dB, MS-SSIM {r['ms_ssim']:.3f}"
              f"  | JPEG {r['jpeg_bpp']:.3f} bpp, {r['jpeg_psnr']:.2f} dB, MS-SSIM {r['jpeg_ms_ssim']:.3f}")
    sheet = _side_by_side(rows, out / "side_by_side.png")
    (out / "rd.json").write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], indent=2))
    mean = lambda k: sum(r[k] for r in rows) / max(1, len(rows))  # noqa: E731
    cr, dr = c["run"], d["run"]
    print(f"demo: {cr['ok']}/{cr['rows']} images compressed, {dr['ok']} decoded; {cr['input_bytes']} -> {cr['output_bytes']} bytes "
          f"(ratio {cr['ratio']:.1f}:1), mean {cr['mean_bpp']:.3f} bpp, mean PSNR {mean('psnr'):.2f} dB, "
          f"MS-SSIM {mean('ms_ssim'):.3f} (JPEG at no more bytes, or q1: {mean('jpeg_psnr'):.2f} dB, {mean('jpeg_ms_ssim'):.3f}); "
          f"compress {cr['images_per_s'] or 0:.1f} img/s, decompress {dr['images_per_s'] or 0:.1f} img/s")
    print(f"demo: originals in {originals}/, Parquet dataset in {archive}/, PNGs in {decoded}/, "
          f"side by side in {sheet}, numbers in {out / 'rd.json'}")
    return 0 if cr["failed"] == 0 and dr["failed"] == 0 else 1


def _measure(paths: list[Path], archive: Path, decoded: Path) -> list[dict]:
    """Per image: our rate (from the dataset's records) and quality, and JPEG's at no more bytes."""
    import numpy as np
    from PIL import Image

    from codec.baselines import PillowCodec
    from codec.metrics import ms_ssim, psnr
    from pipeline.catalog import read_dataset
    from pipeline.rows import output_key

    bpp = {r["key"]: r["bpp"] for r in read_dataset(str(archive), columns=["key", "bpp"]).to_pylist()}
    jpeg, rows = PillowCodec("jpeg"), []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"))
        b = np.asarray(Image.open(decoded / output_key(p.name)).convert("RGB"))
        enc = jpeg.encode([a], target_bpp=bpp[p.name])[0]
        j = jpeg.decode([enc.data])[0]
        rows.append({"key": p.name, "width": a.shape[1], "height": a.shape[0], "bpp": bpp[p.name],
                     "psnr": psnr(a, b), "ms_ssim": ms_ssim(a, b), "jpeg_quality": int(enc.t), "jpeg_bpp": enc.bpp,
                     "jpeg_psnr": psnr(a, j), "jpeg_ms_ssim": ms_ssim(a, j), "_px": (a, b, j)})
    return rows


def _side_by_side(rows: list[dict], path: Path) -> Path:
    """One row per image: original | ours | JPEG, each captioned with its rate and PSNR."""
    import numpy as np
    from PIL import Image, ImageDraw

    cap, gap = 14, 4
    h = sum(r["height"] + cap + gap for r in rows)
    w = max(r["width"] for r in rows) * 3 + 2 * gap
    sheet = Image.new("RGB", (w, max(1, h)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for r in rows:
        labels = ("original", f"ours {r['bpp']:.3f} bpp {r['psnr']:.1f} dB",  # JPEG: q1 when even q1 is larger
                  f"JPEG q{r['jpeg_quality']} {r['jpeg_bpp']:.3f} bpp {r['jpeg_psnr']:.1f} dB")
        for i, (px, label) in enumerate(zip(r["_px"], labels)):
            x = i * (r["width"] + gap)
            draw.text((x + 2, y + 1), label, fill="black")
            sheet.paste(Image.fromarray(np.ascontiguousarray(px)), (x, y + cap))
        y += r["height"] + cap + gap
    sheet.save(path)
    return path
