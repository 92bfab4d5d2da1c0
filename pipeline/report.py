"""`report.html`: one self-contained page (plots as base64 PNG, no external files or scripts).

Sections: summary table per codec/setting (rate, quality, FID/KID, failures), bpp histogram,
metric-vs-bpp scatter, rate–distortion curves per codec, BD-rate table against an anchor
(`bjontegaard` package, PCHIP interpolation), the N worst images as original / decoded /
difference thumbnails, and the failed rows. A 10-line inline script only checks that every
embedded image decoded (a browser test reads its verdict from the DOM).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np

QUALITY = [("psnr", "PSNR (dB)"), ("ms_ssim", "MS-SSIM"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("dists", "DISTS"),
           ("colour_error", "colour error (levels)")]


def label(codec: str, setting: str | None = None) -> str:
    return f"{codec} {setting}" if setting else str(codec)


# ---------------------------------------------------------------------------- BD-rate
def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """Bjøntegaard delta rate in % (negative = test saves bits) from (bpp, quality) points.

    Points are sorted by quality and equal-quality duplicates dropped (PCHIP needs strictly
    increasing abscissae); NaN when either curve has < 2 usable points or they don't overlap.
    """
    from bjontegaard import bd_rate as _bd_rate

    a, t = _curve(anchor), _curve(test)
    if len(a) < 2 or len(t) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns on partial overlap; NaN covers none
        v = _bd_rate(a[:, 0], a[:, 1], t[:, 0], t[:, 1], method="pchip", require_matching_points=False, min_overlap=0)
    return float(v)


def _curve(points: list[tuple[float, float]]) -> np.ndarray:
    p = np.array([(r, q) for r, q in points if r > 0 and np.isfinite(r) and np.isfinite(q)], dtype=float).reshape(-1, 2)
    p = p[np.argsort(p[:, 1], kind="stable")]
    keep = np.concatenate([[True], np.diff(p[:, 1]) > 0]) if len(p) else np.zeros(0, bool)
    return p[keep]


# ---------------------------------------------------------------------------- plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img_tag(b64: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{b64}">'


def _thumb(px: np.ndarray, max_side: int = 256) -> str:
    from PIL import Image

    im = Image.fromarray(px)
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty dataset has nothing to label
        ax.legend(**kw)


def _plots(df, groups: dict, metrics: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    out = {}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = np.linspace(0, max(float(ok["bpp"].max()) if len(ok) else 1.0, 1e-3) * 1.05, 40)
    for codec, sub in ok.groupby("codec", sort=False):
        ax.hist(sub["bpp"], bins=bins, alpha=0.55, label=str(codec))
    ax.set(xlabel="bits per pixel", ylabel="images", title="Rate distribution")
    _legend(ax, fontsize=8)
    out["bpp_hist"] = _png(fig)

    for m in metrics:
        name = dict(QUALITY)[m]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for (codec, setting), sub in ok.groupby(["codec", "setting"], sort=False):
            ax.scatter(sub["bpp"], sub[m], s=10, alpha=0.7, label=label(codec, setting))
        ax.set(xlabel="bits per pixel", ylabel=name, title=f"{name} vs rate, per image")
        if ok.groupby(["codec", "setting"]).ngroups <= 16:
            _legend(ax, fontsize=7, ncol=2)
        out[f"scatter_{m}"] = _png(fig)

        fig, ax = plt.subplots(figsize=(7, 3.8))
        for codec, pts in groups.items():
            p = sorted((g["bpp"], g[m]) for g in pts if np.isfinite(g.get(m, np.nan)))
            if p:
                ax.plot(*zip(*p), marker="o", label=str(codec))
        ax.set(xlabel="mean bits per pixel", ylabel=f"mean {name}", title=f"Rate–distortion: {name}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
        out[f"rd_{m}"] = _png(fig)
    return out


# ---------------------------------------------------------------------------- page
def render_report(df, summary: dict, out_path: str | Path, worst: list[dict] | None = None,
                  anchor: str | None = None, title: str = "foundation-codec quality report") -> Path:
    """Write `render_html(...)` to a local path (temp file + rename); returns the path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.part")
    tmp.write_text(render_html(df, summary, worst, anchor, title), encoding="utf-8")
    os.replace(tmp, out_path)  # readers never see half a report
    return out_path


def render_html(df, summary: dict, worst: list[dict] | None = None, anchor: str | None = None,
                title: str = "foundation-codec quality report") -> str:
    """The report page from per-image rows (pandas DataFrame with key, codec, setting, bpp,
    status, error and metric columns) and the summary dict (`summary["groups"]` per setting).

    `worst`: dicts with key, codec, setting, bpp, psnr, orig, dec (uint8 arrays) for thumbnails.
    """
    df = df.copy()
    for col, default in (("codec", "codec"), ("setting", ""), ("status", "ok"), ("error", "")):
        if col not in df:
            df[col] = default
    df["setting"] = df["setting"].fillna("").astype(str)
    metrics = [m for m, _ in QUALITY if m in df and df.loc[df["status"] == "ok", m].notna().any()]
    groups: dict[str, list[dict]] = {}
    for g in summary.get("groups", []):  # None (from JSON) reads as NaN
        groups.setdefault(g["codec"], []).append({k: (np.nan if v is None else v) for k, v in g.items()})
    plots = _plots(df, groups, metrics)

    css = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}"
           "table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:right;font-size:13px}th{background:#f3f3f3}td.l{text-align:left}"
           ".grid{display:flex;flex-wrap:wrap;gap:10px}.note{color:#666;font-size:13px}figure{margin:4px}"
           "figcaption{font-size:12px;color:#444}")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    n_ok, n_fail = int((df["status"] == "ok").sum()), int((df["status"] != "ok").sum())
    patch = int(summary.get("patch") or (summary.get("config") or {}).get("patch") or 256)
    parts.append(f"<p>{n_ok} decoded images measured ({df['key'].nunique()} originals × "
                 f"{df.groupby(['codec', 'setting']).ngroups} codec settings), {n_fail} failed. Quality metrics are "
                 f"computed on each original's unpadded size; FID/KID on {patch}×{patch} patches (HiFiC protocol: "
                 "non-overlapping grid plus the grid shifted by half a patch).</p>")
    for note in summary.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")

    # summary table
    cols = ["n_ok", "n_failed", "bpp"] + metrics + ["fid", "kid"]
    parts.append("<h2>Summary</h2><table><tr><th>codec</th><th>setting</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    for g in summary.get("groups", []):
        cells = "".join(f"<td>{_fmt(g.get(c))}</td>" for c in cols)
        parts.append(f"<tr><td class='l'>{html.escape(str(g['codec']))}</td><td class='l'>{html.escape(str(g.get('setting', '')))}</td>{cells}</tr>")
    parts.append("</table>")

    parts.append("<h2>Rate</h2>" + _img_tag(plots["bpp_hist"], "bpp histogram"))
    parts.append("<h2>Quality vs rate, per image</h2>" + "".join(_img_tag(plots[f"scatter_{m}"], f"{m} scatter") for m in metrics))
    parts.append("<h2>Rate–distortion curves</h2>" + "".join(_img_tag(plots[f"rd_{m}"], f"{m} RD curve") for m in metrics))

    # BD-rate table
    parts.append("<h2>BD-rate</h2>")
    if len(groups) < 2:
        parts.append("<p class='note'>BD-rate needs at least two codecs (run <code>fcodec compare</code>).</p>")
    else:
        anchor = anchor if anchor in groups else next(iter(groups))
        bd_metrics = [m for m in metrics if m in ("psnr", "ms_ssim", "ssim")]
        parts.append(f"<p>Anchor: <b>{html.escape(anchor)}</b>. Negative = fewer bits than the anchor at equal quality "
                     "(Bjøntegaard delta, PCHIP; n/a where curves do not overlap or have &lt; 2 points).</p>")
        parts.append("<table><tr><th>codec</th>" + "".join(f"<th>BD-rate {m}</th>" for m in bd_metrics) + "</tr>")
        for codec, pts in groups.items():
            if codec == anchor:
                continue
            cells = ""
            for m in bd_metrics:
                v = bd_rate([(g["bpp"], g.get(m, np.nan)) for g in groups[anchor]], [(g["bpp"], g.get(m, np.nan)) for g in pts])
                cells += f"<td>{'n/a' if not math.isfinite(v) else f'{v:+.1f}%'}</td>"
            parts.append(f"<tr><td class='l'>{html.escape(codec)}</td>{cells}</tr>")
        parts.append("</table>")

    # worst images
    if worst:
        parts.append(f"<h2>{len(worst)} worst images by PSNR</h2><p class='note'>original · decoded · |difference| ×4</p>")
        for w in worst:
            diff = np.clip(np.abs(w["orig"].astype(np.int16) - w["dec"][: w["orig"].shape[0], : w["orig"].shape[1]].astype(np.int16)) * 4, 0, 255).astype(np.uint8)
            cap = f"{w['key']} — {label(w.get('codec', ''), w.get('setting'))}: {w['bpp']:.3f} bpp, {w['psnr']:.2f} dB"
            figs = "".join(f"<figure>{_img_tag(_thumb(a), str(w['key']) + ' ' + n)}<figcaption>{n}</figcaption></figure>"
                           for n, a in (("original", w["orig"]), ("decoded", w["dec"]), ("difference", diff)))
            parts.append(f"<h3 style='font-size:14px'>{html.escape(cap)}</h3><div class='grid'>{figs}</div>")

    # failures
    failed = df[df["status"] != "ok"]
    parts.append(f"<h2>Failed rows ({len(failed)})</h2>")
    if len(failed):
        parts.append("<table><tr><th>key</th><th>codec</th><th>setting</th><th>error</th></tr>")
        for _, r in failed.head(200).iterrows():
            parts.append(f"<tr><td class='l'>{html.escape(str(r['key']))}</td><td class='l'>{html.escape(str(r['codec']))}</td>"
                         f"<td class='l'>{html.escape(str(r['setting']))}</td><td class='l'>{html.escape(str(r['error']))}</td></tr>")
        parts.append("</table>")
    parts.append(
        "<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
        "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){ok++}else{console.error('image failed: '+im[i].alt)}}"
        "document.body.setAttribute('data-images-ok',ok+'/'+im.length);});</script></body></html>")
    return "\n".join(parts)


def summarize(df, dataset_stats: dict | None = None) -> list[dict]:
    """Per (codec, setting): counts and mean rate/quality over ok rows, plus FID/KID if given
    (`dataset_stats[(codec, setting)] = {"fid": ..., "kid": ...}`)."""
    out = []
    for (codec, setting), sub in df.groupby(["codec", "setting"], sort=False):
        ok = sub[sub["status"] == "ok"]
        g = {"codec": str(codec), "setting": str(setting), "n_ok": int(len(ok)), "n_failed": int(len(sub) - len(ok)),
             "bpp": float(ok["bpp"].mean()) if len(ok) else float("nan")}
        for m, _ in QUALITY:
            if m in ok:
                vals = ok[m].astype(float)
                vals = vals[np.isfinite(vals)]
                g[m] = float(vals.mean()) if len(vals) else float("nan")
        g.update((dataset_stats or {}).get((codec, setting), {}))
        out.append(g)
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if not math.isfinite(f):
        return "–"
    return f"{f:.4f}" if abs(f) < 10 else f"{f:.2f}"
