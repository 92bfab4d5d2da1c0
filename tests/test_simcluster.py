"""The simulated-cluster section of `fcodec bench` at a small size (2 fake-GPU nodes, a few
hundred inputs), so it cannot rot: the real compress job runs on the stand-in codec, every input
is committed, and the section reports its figures. (No timing is asserted.)"""
from __future__ import annotations

import pytest

from codec.spec import CodecSpec
from codec.standin import StandinCodec, parse_standin
from pipeline.simcluster import bench_section, make_inputs, sustained_rate


def test_standin_codec_interface():
    c = CodecSpec(baseline="standin:0:5000", batch_size=4).build()
    assert isinstance(c, StandinCodec) and c.config.batch_size == 4 and c.config.max_pixels > 0
    import numpy as np

    out = c.encode([np.zeros((8, 6, 3), np.uint8)] * 9, errors="return")
    assert [len(e.data) for e in out] == [5000] * 9 and (out[0].width, out[0].height) == (6, 8)
    assert out[0].bpp == 5000 * 8 / 48 and c.batches == 3  # one sleep per batch of 4
    assert len(c.backbone.fingerprint() + c.fingerprint()) == 16
    assert parse_standin("standin") == (100.0, 5000) and parse_standin("standin:25:800") == (25.0, 800)
    with pytest.raises(ValueError, match="standin:LAT_MS:BYTES"):
        parse_standin("standin:fast")


def test_sustained_rate_window():
    recs = [(f"2026-12-02T00:00:{s:02d}+00:00", 10) for s in range(11)]  # 10 rows a second
    r = sustained_rate(recs)
    assert r["sustained_images_per_s"] == pytest.approx(10.0) and r["commit_span_s"] == 10


def test_sim_cluster_section_small(tmp_path):
    src = make_inputs(tmp_path / "inputs-300", 300)
    assert len(list(src.rglob("*.png"))) == 300
    res = bench_section(k=2, n_inputs=300, latency_ms=20, batch=8, workdir=tmp_path, shard_size=32, echo=lambda s: None)
    one, big = res["runs"][2], res["run_10x"]
    assert one["rows"] == one["ok"] == 300 and big["rows"] == big["ok"] == 3000
    assert one["ideal_images_per_s"] == 2 * 8 / 0.02
    assert one["pool"]["num_gpus"] == 1 and one["pool"]["max_size"] == 2 and 1 <= one["actors"] <= 2
    assert one["sustained_images_per_s"] > 0 and one["of_ideal"] > 0
    assert one["driver_cpu_ms_per_1000"] > 0 and one["driver_peak_rss_mb"] > 0 and res["driver_rss_growth"] > -1
