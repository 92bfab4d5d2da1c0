"""What travels with the images: WebDataset sidecars and Parquet columns through compress and
decompress (WebDataset tar shards, HF-style Parquet with an Image feature), exact duplicates,
and the per-shard error histogram. Real files, real Parquet, real tars, the moto S3 server."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.samples import sample_image
from pipeline import storage as st
from pipeline.catalog import read_dataset
from pipeline.run import JobConfig, compress, decompress

SPEC = {"backbone": "tiny", "steps": 0, "threads": 1, "t": 100}
quiet = {"use_ray": False, "progress": False, "echo": lambda s: None}


def encoded(seed: int, h: int, w: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(sample_image(seed, h, w)).save(buf, format=fmt)
    return buf.getvalue()


def make_wds(path: Path) -> dict:
    """A WebDataset shard: 4 samples (png or jpg + .json + .txt), one with a corrupt image."""
    samples = {}
    with tarfile.open(path, "w") as tf:
        for i in range(4):
            ext = "jpg" if i % 2 else "png"
            img = encoded(i, 24 + 8 * i, 32, "JPEG" if ext == "jpg" else "PNG") if i != 2 else b"\x89PNG broken"
            members = {f"{i:06d}.{ext}": img, f"{i:06d}.json": f'{{"id": {i}, "label": "cat{i}"}}'.encode(),
                       f"{i:06d}.txt": f"a caption for sample {i}\n".encode()}
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            samples[f"{path.name}/{i:06d}.{ext}"] = {"size": (24 + 8 * i, 32), "json": members[f"{i:06d}.json"],
                                                     "txt": members[f"{i:06d}.txt"], "ok": i != 2}
    return samples


def test_webdataset_sidecars_through_compress_and_decompress_on_s3(tmp_path, s3_server, s3_bucket):
    import s3fs

    local = tmp_path / "src"
    local.mkdir()
    samples = make_wds(local / "shard-000.tar")
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(local) + "/", f"{s3_bucket[5:]}/wds/", recursive=True)
    opts = s3_server["opts"]
    src, dst, out = f"{s3_bucket}/wds", f"{s3_bucket}/archive", f"{s3_bucket}/restored"
    res = compress(JobConfig(src=src, dst=dst, codec=SPEC), opts, **quiet)
    assert res["totals"]["ok"] == 3 and res["totals"]["failed"] == 1
    assert res["totals"]["errors"] == {"not a usable image": 1}  # the histogram, in the manifest too
    rows = {r["key"]: r for r in read_dataset(dst, opts).to_pylist()}
    assert set(rows) == set(samples)
    for key, s in samples.items():  # every row keeps its sidecars, the failed one too
        assert {sc["ext"]: sc["data"] for sc in rows[key]["sidecars"]} == {"json": s["json"], "txt": s["txt"]}
        assert (rows[key]["status"] == "ok") is s["ok"]

    d = decompress(JobConfig(src=dst, dst=out, format="webdataset"), opts, **quiet)
    assert d["run"]["ok"] == 3 and d["run"]["skipped"] == 1
    tars = [p for p in fs.find(out[5:]) if p.endswith(".tar")]
    from pipeline.catalog import Books

    (shard,) = Books(*st.get_fs(dst, opts)).read().shards  # one tar per bitstream shard, named after it
    assert [t.rsplit("/", 1)[1] for t in tars] == [f"{shard}.tar"]
    with tarfile.open(fileobj=io.BytesIO(fs.cat(tars[0]))) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    for key, s in samples.items():
        base = key.rsplit(".", 1)[0]
        if not s["ok"]:
            assert f"{base}.png" not in members
            continue
        h, w = s["size"]
        assert Image.open(io.BytesIO(members[f"{base}.png"])).size == (w, h)
        assert members[f"{base}.json"] == s["json"] and members[f"{base}.txt"] == s["txt"]  # byte for byte
    again = decompress(JobConfig(src=dst, dst=out, format="webdataset"), opts, **quiet)
    assert again["run"]["rows"] == 0


def test_parquet_columns_through_compress_and_decompress_as_hf_image_feature(tmp_path):
    import datasets

    src = tmp_path / "src"
    src.mkdir()
    imgs = [encoded(10 + i, 32, 24 + 8 * i) for i in range(3)]
    pq.write_table(pa.table({"id": pa.array([7, 8, 9], pa.int64()),
                             "caption": ["a red kite", "two cups", "the sea"],
                             "url": [f"https://example.org/{i}.png" for i in range(3)],
                             "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(imgs)]}),
                   src / "table.parquet")
    dst, out = tmp_path / "dst", tmp_path / "out"
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC), **quiet)
    t = read_dataset(str(dst))
    assert t.schema.field("id").type == pa.int64() and t.column("caption").to_pylist() == ["a red kite", "two cups", "the sea"]
    assert t.column("url").to_pylist()[2] == "https://example.org/2.png"
    only = tmp_path / "dst_only"
    compress(JobConfig(src=str(src), dst=str(only), codec=SPEC, keep_columns=["caption"]), **quiet)
    assert "caption" in read_dataset(str(only)).column_names and "url" not in read_dataset(str(only)).column_names

    decompress(JobConfig(src=str(dst), dst=str(out), format="parquet"), **quiet)
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert type(ds.features["image"]).__name__ == "Image"
    assert sorted(ds["caption"]) == ["a red kite", "the sea", "two cups"] and sorted(ds["id"]) == [7, 8, 9]
    by_id = {r["id"]: r for r in ds}
    for i, want in enumerate(imgs):
        got = np.asarray(by_id[7 + i]["image"])
        assert got.shape[:2] == np.asarray(Image.open(io.BytesIO(want))).shape[:2]


def test_decompress_image_format_and_colliding_output_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.jpg").write_bytes(encoded(1, 24, 24, "JPEG"))
    (src / "x.jpg.webp").write_bytes(encoded(2, 24, 24, "WEBP"))  # both want x.jpg.webp as output
    (src / "y.png").write_bytes(encoded(3, 16, 40))
    dst, out = tmp_path / "dst", tmp_path / "out"
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC), **quiet)
    d = decompress(JobConfig(src=str(dst), dst=str(out), image_format="webp"), **quiet)
    assert d["run"]["ok"] == 2 and d["run"]["failed"] == 1
    assert "collides with key" in d["run"]["failures"][0]["error"]
    assert sorted(p.name for p in out.glob("*.webp")) == ["x.jpg.webp", "y.png.webp"]
    assert Image.open(out / "y.png.webp").format == "WEBP" and Image.open(out / "y.png.webp").size == (40, 16)
    assert st.get_fs(str(out))[0].exists(str(out / "__fcodec__" / "manifest.json"))


def test_dedupe_stores_each_content_once_and_decompress_restores_every_key(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    uniques = [encoded(40 + i, 24, 24 + 8 * (i % 3)) for i in range(14)]
    for i, b in enumerate(uniques):
        (src / f"u{i:02d}.png").write_bytes(b)
    for j, i in enumerate((0, 3, 3, 7, 12, 13)):  # 6 copies = 30% of 20 files, spread over other shards
        (src / f"z{j}.png").write_bytes(uniques[i])
    (src / "bad1.png").write_bytes(b"broken")
    (src / "bad2.png").write_bytes(b"broken")  # a duplicate of a bad input fails the same way
    plain, dd = tmp_path / "plain", tmp_path / "dedup"
    rp = compress(JobConfig(src=str(src), dst=str(plain), codec=SPEC, shard_size=5), **quiet)
    assert rp["run"]["duplicates"] == 6 and rp["run"]["references"] == 0  # counted, stored as they are
    rd = compress(JobConfig(src=str(src), dst=str(dd), codec=SPEC, shard_size=5, dedupe=True), **quiet)
    assert rd["run"]["references"] == 6 and rd["totals"]["ok"] == 20 and rd["totals"]["failed"] == 2
    p = {r["key"]: r for r in read_dataset(str(plain)).to_pylist()}
    d = {r["key"]: r for r in read_dataset(str(dd)).to_pylist()}
    copies = [k for k in p if k.startswith("z")]
    assert all(d[k]["bitstream"] is None and d[k]["ref_key"].startswith("u") for k in copies)
    assert rd["totals"]["output_bytes"] == rp["totals"]["output_bytes"] - sum(p[k]["n_bytes"] for k in copies)
    assert rd["run"]["bytes_saved"] > 0

    out = tmp_path / "out"
    res = decompress(JobConfig(src=str(dd), dst=str(out)), **quiet)
    assert res["run"]["ok"] == 20 and res["run"]["skipped"] == 2
    ref_out = tmp_path / "ref_out"
    decompress(JobConfig(src=str(plain), dst=str(ref_out)), **quiet)
    for k in p:
        if p[k]["status"] == "ok":  # every key restored, copies exactly like their originals
            assert (out / f"{k}").read_bytes() == (ref_out / f"{k}").read_bytes()

    # resume and --retry-failed with references: a fixed input that duplicates a stored one
    again = compress(JobConfig(src=str(src), dst=str(dd), codec=SPEC, shard_size=5, dedupe=True), **quiet)
    assert again["run"]["rows"] == 0
    (src / "bad1.png").write_bytes(uniques[5])
    r = compress(JobConfig(src=str(src), dst=str(dd), codec=SPEC, shard_size=5, dedupe=True, retry_failed=True), **quiet)
    assert r["run"]["references"] >= 1
    rows = {x["key"]: x for x in read_dataset(str(dd)).to_pylist()}
    assert rows["bad1.png"]["ref_key"] == "u05.png" and rows["bad2.png"]["status"] == "failed"
    res = decompress(JobConfig(src=str(dd), dst=str(tmp_path / "out2")), **quiet)
    assert res["run"]["ok"] == 21, res["run"]["failures"]
    assert (tmp_path / "out2" / "bad1.png").read_bytes() == (ref_out / "u05.png").read_bytes()
    # the key index still knows every key (a shard whose references moved was re-committed whole)
    from pipeline.catalog import Books

    cat = Books(*st.get_fs(str(dd))).read()
    assert sorted(cat.entries.column("entry").to_pylist()) == sorted(rows)
    from pipeline.verify import verify_dataset

    rep = verify_dataset(str(dd), hmac_key=None)
    assert rep["ok"] and rep["references"] >= 7, rep["problems"]  # every reference names a stored bitstream
