"""`fcodec compress` then `fcodec audit` end to end: the audit takes the decoder options from the
dataset's manifest, reports unreadable inputs as failed rows and writes all three outputs."""
from __future__ import annotations

import json

import pandas as pd

from jobs.cli import main


def test_compress_then_audit_cli(tmp_path, ray_local, capsys):
    from PIL import Image

    from jobs.samples import sample_image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.fromarray(sample_image(300 + i, 176, 176)).save(src / f"a{i}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    bits = tmp_path / "bits"
    # exit code 1: finished, one input failed (recorded as a failed row)
    assert main(["compress", str(src), str(bits), "--backbone", "tiny", "--t", "150", "--no-ray", "--no-progress"]) == 1
    out = tmp_path / "audit"
    # no --t/--backbone here: the decoder options come from the dataset's manifest
    rc = main(["audit", str(src), str(bits), str(out), "--steps", "1", "--fid", "seeded:8", "--patch", "64",
               "--workers", "2", "--worst", "1"])
    assert rc == 1  # the failed row is reported as such
    df = pd.read_parquet(out / "metrics.parquet")
    assert sorted(df["key"]) == ["a0.png", "a1.png", "a2.png", "a3.png", "broken.jpg"]
    ok = df[df["status"] == "ok"]
    assert len(ok) == 4 and (ok["t"] == 150).all() and (ok["setting"] == "t=150").all()
    assert ok["psnr"].between(3, 60).all() and ok["ms_ssim"].notna().all() and (ok["bpp"] > 0).all()
    bad = df[df["key"] == "broken.jpg"].iloc[0]
    assert bad["status"] == "failed" and bad["error"].startswith("compression had failed")
    s = json.loads((out / "summary.json").read_text())
    assert s["n_ok"] == 4 and s["n_failed"] == 1 and s["fid_patches"] == 4 * (4 + 4)  # 2x2 grid + shifted 2x2 of 64 px
    assert s["config"]["codec"]["backbone"] == "tiny" and s["fid"] is not None
    assert (out / "report.html").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "4 measured, 1 failed" in printed and "report.html" in printed
