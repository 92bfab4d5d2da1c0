"""`fcodec compare`: sweep several codecs' settings over one image set, measure every image the
way the audit does (`audit.Measurer.measure`), and write the audit's outputs: metrics.parquet,
summary.json and report.html with every rate–distortion curve and a BD-rate table.

In-process, one setting at a time with all images per call: comparisons are made on small
evaluation sets (Kodak, CLIC), where a Ray cluster would cost more than it saves.
"""
from __future__ import annotations

import heapq
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .audit import AuditConfig, Measurer, one_line, write_outputs
from .schema import STATUS_FAILED, STATUS_OK
from .storage import StorageOptions

OURS = "ours"


@dataclass
class CompareConfig:
    """One comparison: which images, which codecs at which settings, what to measure."""

    dataset: str  # folder / glob / tar / Parquet of images (local or s3://)
    out: str
    sweep: list[tuple[str, list[int]]]  # [(codec name, t values for ours / qualities)], see `sweep_plan`
    anchor: str = "jpeg"  # BD-rate anchor codec
    limit: int | None = None  # first N images (sorted by key)
    crop: str | None = None  # center crop 'WxH'
    steps: int | None = None  # DDIM steps when decoding ours (None: the codec's default)
    worst: int = 6  # worst images (by PSNR) shown in the report
    audit: AuditConfig = field(default_factory=AuditConfig)  # metrics, FID/KID extractor and patch


def sweep_plan(codecs: list[str], ts: list[int], qualities: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    """[(codec, values)]: t values for ours, the given or default qualities for baselines."""
    from codec.baselines import DEFAULT_COMPRESSAI_QUALITIES, DEFAULT_QUALITIES

    out = []
    for name in codecs:
        if name == OURS:
            out.append((name, list(ts)))
        elif name in DEFAULT_QUALITIES:
            out.append((name, qualities.get(name, DEFAULT_QUALITIES[name])))
        elif name.startswith("compressai"):
            out.append((name, qualities.get(name, DEFAULT_COMPRESSAI_QUALITIES)))
        else:
            raise ValueError(f"unknown codec '{name}' in --codecs (choose ours, jpeg, webp, avif, jxl, compressai:ARCH)")
    return out


def matched_rates(groups: list[dict], metrics: tuple[str, ...] = ("psnr", "ms_ssim", "colour_error")) -> list[dict]:
    """Each baseline at each of our settings' mean rate: its metrics linearly interpolated between
    its two settings around that bpp (NaN outside its swept range: never extrapolated)."""
    ours = [g for g in groups if g["codec"].startswith(OURS)]
    out = []
    for o in ours:
        for name in dict.fromkeys(g["codec"] for g in groups if not g["codec"].startswith(OURS)):
            pts = sorted(((g["bpp"], g) for g in groups if g["codec"] == name and np.isfinite(g["bpp"])),
                         key=lambda p: p[0])  # by rate only: two settings may share a bpp
            row = {"ours": f"{o['codec']} {o['setting']}", "bpp": o["bpp"], "codec": name}
            for m in metrics:
                xs = [b for b, g in pts if np.isfinite(g.get(m, np.nan))]
                ys = [g[m] for b, g in pts if np.isfinite(g.get(m, np.nan))]
                inside = len(xs) >= 2 and xs[0] <= o["bpp"] <= xs[-1]
                row[m] = float(np.interp(o["bpp"], xs, ys)) if inside else float("nan")
            out.append(row)
    return out


def load_dataset(url: str, limit: int | None = None, crop: str | None = None,
                 opts: StorageOptions | None = None) -> list[tuple[str, np.ndarray]]:
    """(key, uint8 array) of every readable image, sorted by key; unreadable inputs are skipped
    with a warning (compare measures codecs, not the dataset's health: that is `audit`)."""
    from codec import load_image
    from codec.pixels import center_crop

    from .sources import list_inputs, plan_shards, read_shard

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


def run_compare(cfg: CompareConfig, make_ours: Callable[[], object], opts: StorageOptions | None = None,
                echo: Callable[[str], None] = print) -> dict:
    """Encode, decode and measure every image with every codec setting; write OUT's files and
    return the summary. `make_ours()` builds our codec (called once, only if the sweep has it)."""
    import pandas as pd

    from codec import CodecError
    from codec.baselines import make_baseline
    from codec.metrics import fid, kid

    from .report import summarize

    images = load_dataset(cfg.dataset, cfg.limit, cfg.crop, opts)
    pixels = [px for _, px in images]
    m = Measurer(cfg.audit)
    notes = list(m.notes)
    real = m.new_stats()
    for key, px in images:
        m.add_features(real, key, px)

    rows, worst, scores, tick, ours = [], [], {}, 0, None
    for name, values in cfg.sweep:
        for v in values:
            t0 = time.perf_counter()
            if name == OURS:
                ours = ours or make_ours()
                codec, label, setting, t = ours, f"ours ({ours.backbone.name})", f"t={v}", v
            else:
                try:
                    codec, label, setting, t = make_baseline(name, v), name, f"q{v}", None
                except CodecError as e:  # e.g. CompressAI weights absent: note it, compare the rest
                    notes.append(f"{name} q{v} skipped: {e}")
                    continue
            enc = codec.encode(pixels, t=t, errors="return")
            ok = [i for i, e in enumerate(enc) if not isinstance(e, Exception)]
            dec = dict(zip(ok, codec.decode([enc[i].data for i in ok], steps=cfg.steps, errors="return")))
            fake = m.new_stats()
            for i, (key, px) in enumerate(images):
                row = {"key": key, "source_uri": key, "codec": label, "setting": setting,
                       "width": px.shape[1], "height": px.shape[0]}
                rows.append(row)
                if isinstance(enc[i], Exception):
                    row.update(status=STATUS_FAILED, error=f"encoding failed: {one_line(enc[i])}")
                    continue
                row.update(n_bytes=len(enc[i].data), bpp=enc[i].bpp, t=int(enc[i].t))
                m.measure(row, px, dec[i], fake=fake)
                if row["status"] == STATUS_OK:
                    tick += 1  # keep the N worst (original, decoded) pairs only
                    item = (-row["psnr"], tick, {"key": key, "codec": label, "setting": setting, "bpp": row["bpp"],
                                                  "psnr": row["psnr"], "orig": px, "dec": dec[i]})
                    heapq.heappush(worst, item) if len(worst) < cfg.worst else heapq.heappushpop(worst, item)
            if real is not None and real.n >= 2 and fake.n >= 2:
                scores[(label, setting)] = {"fid": fid(real, fake), "kid": kid(real, fake)}
            done = [r for r in rows[-len(images):] if r["status"] == STATUS_OK]
            mean = lambda k: np.mean([r[k] for r in done]) if done else float("nan")  # noqa: E731
            echo(f"{label} {setting}: {len(done)}/{len(images)} ok, mean {mean('bpp'):.4f} bpp, "
                 f"PSNR {mean('psnr'):.2f} dB ({time.perf_counter() - t0:.1f} s)")

    df = pd.DataFrame(rows)
    groups = summarize(df, scores)
    anchor = cfg.anchor if any(g["codec"] == cfg.anchor for g in groups) else None
    summary = {"dataset": cfg.dataset, "n_images": len(images), "crop": cfg.crop, "patch": cfg.audit.patch,
               "groups": groups, "notes": notes, "anchor": anchor or (groups[0]["codec"] if groups else None)}
    summary["matched"] = matched_rates(groups)
    for m in summary["matched"]:
        echo(f"at {m['ours']}'s {m['bpp']:.4f} bpp: {m['codec']} PSNR {m['psnr']:.2f} dB, MS-SSIM {m['ms_ssim']:.4f} "
             f"(interpolated)")
    worst_items = [w for _, _, w in sorted(worst, key=lambda x: x[0], reverse=True)]
    write_outputs(cfg.out, df, summary, worst_items, opts, anchor=anchor)
    return summary
