"""`fcodec compare`: our codec against JPEG/WebP/AVIF in one report (synthetic images always;
Kodak with TAESD in a slow test that also opens the report in headless Chromium)."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from jobs.cli import main
from test_report import browser_console  # tests/ is on sys.path (pytest's rootless test dirs)

def test_compare_synthetic_all_codecs(tmp_path, capsys):
    from PIL import Image

    from jobs.samples import sample_image

    src = tmp_path / "data"
    src.mkdir()
    for i in range(3):
        Image.fromarray(sample_image(200 + i, 176, 208)).save(src / f"s{i}.png")
    out = tmp_path / "out"
    rc = main(["compare", str(src), str(out), "--codecs", "ours,jpeg,webp,avif,compressai:bmshj2018-factorized",
               "--backbone", "tiny", "--ts", "50,200", "--steps", "1", "--qualities", "jpeg=20,80",
               "--qualities", "webp=20,80", "--qualities", "avif=30,80", "--qualities", "compressai:bmshj2018-factorized=1",
               "--fid", "seeded:8", "--patch", "64", "--worst", "2", "--threads", "1"])
    assert rc == 0
    df = pd.read_parquet(out / "metrics.parquet")
    assert len(df) == 3 * 8 and set(df["status"]) == {"ok"}
    assert {"key", "bpp", "psnr", "ms_ssim"} <= set(df.columns) and df["ms_ssim"].notna().all()
    mean = df.groupby(["codec", "setting"])[["bpp", "psnr"]].mean()
    for c, lo, hi in (("jpeg", "q20", "q80"), ("webp", "q20", "q80"), ("avif", "q30", "q80")):
        assert mean.loc[(c, lo), "bpp"] < mean.loc[(c, hi), "bpp"] and mean.loc[(c, lo), "psnr"] < mean.loc[(c, hi), "psnr"]
    assert mean.loc[("ours (tiny-0)", "t=50"), "bpp"] > mean.loc[("ours (tiny-0)", "t=200"), "bpp"]
    s = json.loads((out / "summary.json").read_text())
    assert len(s["groups"]) == 8 and s["anchor"] == "jpeg"
    assert all(g["fid"] is not None and g["fid"] >= 0 for g in s["groups"])
    assert any("compressai:bmshj2018-factorized q1 skipped: CompressAI weights not found" in n for n in s["notes"])
    page = (out / "report.html").read_text()
    assert page.count("<img") == 1 + 4 + 4 + 2 * 3  # histogram, scatter and RD for psnr, ms_ssim, ssim, colour_error, worst
    bd = dict(re.findall(r"<tr><td class='l'>(\w+)</td><td>([^<]+)</td>", page))
    assert set(bd) >= {"webp", "avif"}
    assert "skipped" in capsys.readouterr().out


@pytest.fixture(scope="module")
def kodak_compare(kodak, taesd_dir, tmp_path_factory):
    """4 Kodak images (center 256x256) through ours (tiny + TAESD), JPEG, WebP and AVIF."""
    out = tmp_path_factory.mktemp("kodak_compare")
    rc = main(["compare", str(kodak[0].parent), str(out), "--limit", "4", "--crop", "256x256",
               "--codecs", "ours,jpeg,webp,avif", "--backbone", "tiny", "--vae", str(taesd_dir), "--ts", "50,200",
               "--steps", "2", "--qualities", "jpeg=10,40,80", "--qualities", "webp=10,40,80", "--qualities", "avif=20,50,80",
               "--fid", "seeded:16", "--patch", "128", "--worst", "4", "--threads", "2"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_compare_on_kodak_writes_report_with_all_plots(kodak_compare):
    out = kodak_compare
    df = pd.read_parquet(out / "metrics.parquet")
    assert len(df) == 4 * 11 and (df["status"] == "ok").all() and df["ms_ssim"].notna().all()
    s = json.loads((out / "summary.json").read_text())
    g = {(x["codec"], x["setting"]): x for x in s["groups"]}
    ours = [v for k, v in g.items() if k[0].startswith("ours")]
    assert len(ours) == 2 and all(0 < o["bpp"] < 0.5 and 12 < o["psnr"] < 35 for o in ours)  # real TAESD numbers
    assert g[("jpeg", "q80")]["psnr"] > g[("jpeg", "q10")]["psnr"] + 5
    assert all(x["fid"] is not None and math.isfinite(x["fid"]) for x in s["groups"])
    page = (out / "report.html").read_text()
    for alt in ("bpp histogram", "psnr scatter", "ms_ssim scatter", "psnr RD curve", "ms_ssim RD curve"):
        assert f'alt="{alt}"' in page
    assert page.count("<img") == 1 + 4 + 4 + 4 * 3
    rows = dict(re.findall(r"<tr><td class='l'>(\w+)</td><td>([^<]+)</td>", page))
    assert re.fullmatch(r"[+-]\d+\.\d%", rows["webp"]) and re.fullmatch(r"[+-]\d+\.\d%", rows["avif"])


@pytest.mark.slow
def test_kodak_report_opens_in_headless_chromium(kodak_compare):
    dom, console = browser_console(kodak_compare / "report.html")
    assert console == []
    assert 'data-images-ok="19/19"' in dom
