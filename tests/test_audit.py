"""`fcodec audit` on a real bitstream dataset (tiny codec, real Parquet, real local Ray),
with failed rows of every kind: they are reported, and the audit does not crash."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

# float64 ("exact"): decoded pixels do not depend on how rows were batched across actors
SPEC = {"backbone": "tiny", "steps": 2, "threads": 1, "precision": "exact"}


def _write_dataset(tmp_path, n: int = 6):
    """Originals (176x208 and 192x168: big enough for MS-SSIM) + a 2-part bitstream dataset in
    release 0.1.0's layout (parts + `_commits/` markers, still read everywhere), made with the
    pipeline's own EncodeActor."""
    from PIL import Image

    from jobs.samples import sample_image
    from pipeline.actors import EncodeActor
    from pipeline.schema import BITSTREAM_SCHEMA, parquet_write_kwargs, to_table
    from pipeline.sources import list_inputs, plan_shards, read_shard
    from pipeline.storage import get_fs, join, write_json_atomic, write_parquet_atomic

    src = tmp_path / "orig"
    src.mkdir()
    for i in range(n):
        h, w = ((176, 208), (192, 168))[i % 2]
        Image.fromarray(sample_image(100 + i, h, w)).save(src / f"img{i}.png")
    (src / "notes.png").write_bytes(b"this is not an image")  # fails at compression
    actor = EncodeActor(SPEC)
    fs, root = get_fs(str(tmp_path / "bits"))
    shards = plan_shards(list_inputs(str(src))[0], shard_size=4)
    assert len(shards) == 2
    for sh in shards:
        rows = [r for chunk in read_shard(sh) for r in actor.encode_rows(chunk)]
        for r in rows:
            if r["key"] == "img2.png":  # corrupt payload, consistent sha: only the decoder can tell
                import hashlib

                b = bytearray(r["bitstream"])
                b[len(b) // 2] ^= 0xFF
                r["bitstream"], r["bitstream_sha256"] = bytes(b), hashlib.sha256(bytes(b)).hexdigest()
        table = to_table(rows, BITSTREAM_SCHEMA)
        write_parquet_atomic(fs, root, f"part-{sh.id}.parquet", table, **parquet_write_kwargs(table))
        write_json_atomic(fs, join(root, "_commits", f"{sh.id}.json"), {"file": f"part-{sh.id}.parquet", "rows": len(rows)})
    (src / "img4.png").unlink()  # original gone since compression
    im = np.asarray(Image.open(src / "img5.png")).copy()
    im[0, 0] ^= 1
    Image.fromarray(im).save(src / "img5.png")  # original changed since compression
    return src, tmp_path / "bits"


def test_audit_reports_failed_rows_and_merges_fid_statistics(tmp_path, ray_local):
    from codec import CodecConfig, load_codec
    from codec.metrics import psnr
    from pipeline.audit import AuditConfig, AuditWorker, dataset_scores, list_originals, run_audit
    from pipeline.catalog import read_dataset

    src, bits = _write_dataset(tmp_path)
    cfg = AuditConfig(codec=SPEC, fid="seeded:8:0", patch=64, label="tiny")
    s = run_audit(str(src), str(bits), str(tmp_path / "out"), cfg, workers=2, n_worst=2)

    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert {"key", "bpp", "psnr", "ms_ssim", "ssim", "status", "error"} <= set(df.columns)
    assert len(df) == 7 and s["n_rows"] == 7
    st = dict(zip(df["key"], df["status"]))
    err = dict(zip(df["key"], df["error"]))
    assert [k for k, v in sorted(st.items()) if v == "ok"] == ["img0.png", "img1.png", "img3.png"]
    assert err["notes.png"].startswith("compression had failed: not a usable image")
    assert "decoding failed" in err["img2.png"]
    assert "not readable" in err["img4.png"] and "source_sha256 mismatch" in err["img5.png"]
    assert s["n_failed"] == 4 and {f["key"] for f in s["failed"]} == {"notes.png", "img2.png", "img4.png", "img5.png"}

    # per-image numbers are the real ones: decode here and compare
    table = read_dataset(str(bits)).to_pylist()
    codec = load_codec("tiny", config=CodecConfig(precision="exact"))
    from PIL import Image

    for r in table:
        if st[r["key"]] == "ok":
            dec = codec.decode([r["bitstream"]], steps=2)[0]
            want = psnr(np.asarray(Image.open(src / r["key"]).convert("RGB")), dec)
            row = df[df["key"] == r["key"]].iloc[0]
            assert row["psnr"] == pytest.approx(want, abs=1e-9)
            assert row["bpp"] == pytest.approx(r["bpp"]) and 0 < row["ms_ssim"] <= 1 and not math.isnan(row["ms_ssim"])
            assert row["n_patches"] == 10  # 3x2 grid + 2x2 grid shifted by 32 px, 64-px patches

    # FID/KID merged from two actors' partial sums == one worker over all rows
    one = AuditWorker(cfg, list_originals(str(src)))
    one.process_rows(table)
    ref = dataset_scores(one.real, one.fake)
    assert s["fid_patches"] == ref["fid_patches"] == 30
    assert s["fid"] == pytest.approx(ref["fid"], rel=1e-6) and s["fid"] > 0
    assert s["kid"] == pytest.approx(ref["kid"], rel=1e-6)

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_failed"] == 4 and summary["groups"][0]["n_ok"] == 3
    assert any("LPIPS skipped: weights not found" in n for n in summary["notes"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Failed rows (4)" in page and "source_sha256 mismatch" in page
    assert page.count("<img") == 1 + 2 * 4 + 2 * 3  # histogram, scatter+RD x 4 metrics (with colour_error), 2 worst x 3 thumbnails


def test_audit_of_an_empty_location_says_what_to_do(tmp_path):
    from pipeline.audit import dataset_parts

    with pytest.raises(FileNotFoundError, match="fcodec compress"):
        dataset_parts(str(tmp_path))


def test_outputs_land_on_s3(s3_server, s3_bucket):
    """OUT may be an object-store prefix: metrics.parquet, summary.json and report.html go there."""
    import s3fs

    from pipeline.audit import write_outputs
    from pipeline.report import summarize

    df = pd.DataFrame([{"key": f"k{i}", "codec": "jpeg", "setting": "q50", "bpp": 0.5 + i / 10, "psnr": 30.0 + i,
                        "ssim": 0.9, "ms_ssim": 0.95, "status": "ok", "error": None} for i in range(3)]
                      + [{"key": "bad", "codec": "jpeg", "setting": "q50", "status": "failed", "error": "boom"}])
    summary = {"groups": summarize(df, {("jpeg", "q50"): {"fid": float("nan")}}), "notes": []}
    write_outputs(f"{s3_bucket}/audit", df, summary, [], s3_server["opts"])
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    got = pd.read_parquet(f"{s3_bucket}/audit/metrics.parquet", storage_options=s3_server["storage_options"])
    assert list(got["key"]) == ["k0", "k1", "k2", "bad"] and list(got["psnr"].iloc[:3]) == [30.0, 31.0, 32.0]
    assert pd.isna(got["psnr"].iloc[3])
    assert got.loc[got["key"] == "bad", "error"].item() == "boom"
    s = json.loads(fs.cat(f"{s3_bucket}/audit/summary.json"))
    assert s["groups"][0]["n_ok"] == 3 and s["groups"][0]["fid"] is None  # NaN -> null: strict JSON
    assert b"Failed rows (1)" in fs.cat(f"{s3_bucket}/audit/report.html")
