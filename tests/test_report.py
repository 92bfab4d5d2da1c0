"""report.html rendering, BD-rate, and (slow) a real headless Chromium opening the report."""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from pipeline.report import bd_rate, render_report, summarize


def test_bd_rate_known_shift():
    # PSNR linear in log10(rate) (PCHIP reproduces it exactly): the test codec needs 0.8x the
    # rate for equal PSNR everywhere, sampled at other points than the anchor -> exactly -20 %.
    q = lambda r: 30 + 12 * np.log10(r)  # noqa: E731
    anchor = [(r, q(r)) for r in (0.1, 0.2, 0.4, 0.8, 1.6)]
    test = [(0.8 * r, q(r)) for r in (0.12, 0.25, 0.5, 0.9, 1.5, 2.0)]
    assert bd_rate(anchor, test) == pytest.approx(-20.0, abs=1e-9)
    assert bd_rate(test, anchor) == pytest.approx(25.0, abs=1e-9)
    assert bd_rate(anchor, anchor[::-1]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bd_rate(anchor, test[:1]))  # one point: no curve
    assert math.isnan(bd_rate(anchor, [(5.0, 60.0), (6.0, 61.0)]))  # no overlap in quality


def _frame(rng) -> pd.DataFrame:
    rows = []
    for codec, gain in (("jpeg", 0.0), ("ours", 2.0)):
        for s, rate in (("q10", 0.2), ("q50", 0.6), ("q90", 1.5)):
            for i in range(4):
                bpp = rate * rng.uniform(0.8, 1.2)
                rows.append(dict(key=f"img{i}", codec=codec, setting=s, bpp=bpp, psnr=30 + 8 * np.log10(bpp) + gain,
                                 ssim=0.9, ms_ssim=0.95 + 0.01 * np.log10(bpp), status="ok", error=""))
    rows.append(dict(key="broken<1>", codec="ours", setting="q50", bpp=np.nan, psnr=np.nan, ssim=np.nan,
                     ms_ssim=np.nan, status="failed", error="BitstreamError: CRC mismatch"))
    return pd.DataFrame(rows)


def test_render_report_self_contained(tmp_path):
    rng = np.random.default_rng(0)
    df = _frame(rng)
    summary = {"groups": summarize(df, {("ours", "q50"): {"fid": 12.5, "kid": 0.01}}), "notes": ["LPIPS skipped: weights not found at /x"]}
    g = {(x["codec"], x["setting"]): x for x in summary["groups"]}
    assert g[("ours", "q50")]["n_ok"] == 4 and g[("ours", "q50")]["n_failed"] == 1 and g[("ours", "q50")]["fid"] == 12.5
    orig = rng.integers(0, 255, (40, 60, 3)).astype(np.uint8)
    worst = [dict(key="img3", codec="ours", setting="q10", bpp=0.2, psnr=21.0, orig=orig, dec=orig[::-1].copy())]
    p = render_report(df, summary, tmp_path / "out" / "report.html", worst=worst, anchor="jpeg")
    page = p.read_text()
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page)
    # histogram + (scatter + RD) for psnr, ms_ssim, ssim + 3 thumbnails
    assert len(imgs) == 1 + 2 * 3 + 3 == page.count("<img")
    assert "http://" not in page and "https://" not in page and "<link" not in page
    bd = re.search(r"<td class='l'>ours</td><td>([+-][0-9.]+)%</td>", page)
    assert bd and float(bd.group(1)) < -20  # +2 dB at equal rate is a large saving over the anchor
    assert "broken&lt;1&gt;" in page and "CRC mismatch" in page and "LPIPS skipped" in page
    assert "Failed rows (1)" in page


def browser_console(path) -> tuple[str, list[str]]:
    """Open a file in headless Chromium; returns (DOM after load, console lines)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        pytest.skip("chromium is absent (Debian: apt-get install -y chromium)")
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
                        "--v=0", "--virtual-time-budget=5000", f"--user-data-dir={path.parent / '.chromium'}",
                        "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    return r.stdout, [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.slow
def test_report_opens_in_headless_chromium_without_console_errors(tmp_path):
    rng = np.random.default_rng(1)
    df = _frame(rng)
    orig = rng.integers(0, 255, (40, 60, 3)).astype(np.uint8)
    worst = [dict(key="img3", codec="ours", setting="q10", bpp=0.2, psnr=21.0, orig=orig, dec=orig)]
    p = render_report(df, {"groups": summarize(df)}, tmp_path / "report.html", worst=worst)
    dom, console = browser_console(p)
    assert console == []
    assert 'data-images-ok="10/10"' in dom
    # the check itself catches a broken page (a bad embedded image logs a console error)
    bad = tmp_path / "bad.html"
    bad.write_text(p.read_text().replace("base64,", "base64,AAAA", 1))
    dom, console = browser_console(bad)
    assert any("image failed" in ln for ln in console) and 'data-images-ok="9/10"' in dom


def test_report_of_only_failed_rows_still_renders(tmp_path):
    df = pd.DataFrame([{"key": "a", "codec": "x", "setting": "", "bpp": None, "psnr": None, "status": "failed", "error": "boom"}])
    page = render_report(df, {"groups": summarize(df)}, tmp_path / "r.html").read_text()
    assert "Failed rows (1)" in page and "0 decoded images measured" in page and page.count("<img") == 1
