"""The compress/decompress pipeline on real components: Parquet, fsspec, moto's S3 server, local Ray.

Fast tests: small images (32-64 px), the tiny backbone, 1 DDIM step. The big acceptance runs
(>= 200 images, Kodak, kill -9, multi-node) are in test_pipeline_cluster.py (slow).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.samples import sample_image
from pipeline import storage as st
from pipeline.actors import DecodeActor, EncodeActor
from pipeline.catalog import Books, read_dataset
from pipeline.rows import output_key, sha256_hex
from pipeline.run import JobConfig, compress, decompress
from pipeline.schema import BITSTREAM_SCHEMA, parquet_write_kwargs
from pipeline.sources import list_inputs, plan_shards, read_shard

SPEC = {"backbone": "tiny", "steps": 1, "threads": 1}
SIZES = ((32, 32), (48, 40), (40, 56), (64, 48))


def make_images(folder: Path, n: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """n sample PNG/JPEG images in folder (half in a subfolder); returns key -> (h, w)."""
    keys = {}
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        sub = "a/" if i % 2 else ""
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        key = f"{sub}img_{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        p = folder / key
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(sample_image(seed * 1000 + i, h, w)).save(buf, format=fmt)
        p.write_bytes(buf.getvalue())
        keys[key] = (h, w)
    return keys


def make_corrupt(folder: Path) -> dict[str, str]:
    """Zero-byte, truncated and not-an-image inputs; returns key -> expected error fragment."""
    good = io.BytesIO()
    Image.fromarray(sample_image(99, 48, 48)).save(good, format="PNG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good.getvalue()[:150])
    (folder / "notes.jpg").write_bytes(b"these are my holiday notes, not a picture\n")
    return {"zero.png": "empty file (0 bytes)", "truncated.png": "truncated", "notes.jpg": "cannot identify image"}


def png_of(seed: int, h: int = 32, w: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(sample_image(seed, h, w)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder():
    return EncodeActor(SPEC)


@pytest.fixture(scope="module")
def decoder():
    return DecodeActor(SPEC)


# ---------------------------------------------------------------- sources and storage
def test_sources_list_files_tar_parquet_with_stable_shards(tmp_path):
    src = tmp_path / "src"
    keys = make_images(src, 7)
    (src / "README.txt").write_text("not an input")
    (src / "_manifest.json").write_text("{}")
    with tarfile.open(src / "shard-000.tar", "w") as tf:  # WebDataset style: image + json siblings
        for i in range(3):
            for name, data in ((f"{i:06d}.png", png_of(i)), (f"{i:06d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["x", "y"], "image": [{"bytes": png_of(7), "path": "x"}, {"bytes": png_of(8), "path": "y"}]}),
                   src / "table.parquet")

    inputs, ignored = list_inputs(str(src))
    assert ignored == 2
    assert [k for k, _, kind, _ in inputs if kind == "files"] == sorted(keys)
    shards = plan_shards(inputs, shard_size=3)
    assert [s.kind for s in shards] == ["files", "files", "files", "tar", "parquet"]
    assert [s.id for s in shards] == [s.id for s in plan_shards(list_inputs(str(src))[0], shard_size=3)]
    rows = {s.kind: [r for chunk in read_shard(s, chunk_rows=2) for r in chunk] for s in shards}
    nope = [r for c in read_shard(shards[-1], image_column="missing") for r in c]
    assert [r["key"] for r in nope] == ["table.parquet"] and "column 'missing' not found" in nope[0]["read_error"]
    assert [r["key"] for r in rows["tar"]] == [f"shard-000.tar/{i:06d}.png" for i in range(3)]
    assert rows["tar"][1]["data"] == png_of(1)
    assert rows["tar"][0]["source_uri"].startswith("tar://000000.png::")
    assert [r["key"] for r in rows["parquet"]] == ["table.parquet/x", "table.parquet/y"]
    assert rows["parquet"][1]["data"] == png_of(8)
    # globs: keys relative to the fixed prefix
    g, _ = list_inputs(str(src / "a" / "*.png"))
    assert sorted(k for k, *_ in g) == sorted(Path(k).name for k in keys if k.startswith("a/") and k.endswith(".png"))


def test_local_listing_gives_the_same_entries_as_fsspecs_walk(tmp_path):
    """Local folders are walked with os.scandir (cheaper on the driver than fsspec's per-file info
    dicts); the keys, sizes and change tokens must be exactly what fsspec's walk gives, or a
    rerun after the switch would see every source as changed."""
    import fsspec

    from pipeline.sources import change_token, list_entries

    src = tmp_path / "src"
    make_images(src, 5)
    (src / "deep" / "er").mkdir(parents=True)
    (src / "deep" / "er" / "x.png").write_bytes(png_of(3))
    (src / "empty").mkdir()
    (src / "_meta").mkdir()
    (src / "_meta" / "skip.png").write_bytes(png_of(4))
    (src / ".hidden.png").write_bytes(png_of(5))
    os.symlink(src / "deep" / "er" / "x.png", src / "link.png")
    os.utime(src / "deep" / "er" / "x.png", (1_700_000_000.5, 1_700_000_000.5))

    got, ignored = list_entries(str(src))
    fs = fsspec.filesystem("file")
    want = {}
    for _d, _sub, files in fs.walk(str(src), detail=True):
        for info in files.values():
            rel = os.path.relpath(info["name"], src)
            if not (rel.startswith(("_", ".")) or "/_" in rel or "/." in rel):
                want[rel] = (int(info["size"]), change_token(info))
    assert ignored == 2 and len(got) == 7
    assert {k: (size, token) for k, _url, _kind, size, token in got} == want
    assert dict((k, s) for k, _u, _k, s, _t in got)["link.png"] == len(png_of(3))  # size through the link
    assert dict((k, t) for k, _u, _k, _s, t in got)["deep/er/x.png"].endswith("@1700000000.5")


def test_kinds_of_a_listing_page_match_kind_of():
    """The listing classifies a page in Arrow; a name gets the same kind as `kind_of` gives it,
    with the extension as posixpath.splitext finds it (a basename's leading dots are not one)."""
    from pipeline.sources import kind_of, kinds_of

    want = {"a.png": "files", "A/B.PNG": "files", "a/b..png": "files", "..x.jpg": "files", "x.TIFF": "files",
            "a/b.c.jpeg": "files", "s.tar": "tar", "s.TAR.GZ": "tar", "y/.tar": "tar", "t.tgz": "tar",
            "p.parquet": "parquet", "z.pq": "parquet", ".png": None, "a/.png": None, "a/..png": None,
            "a.b/c": None, "q.png.txt": None, "png": None, "README": None, "x.tar.png": "files"}
    names = list(want)
    assert [kind_of(n) for n in names] == list(want.values())
    assert kinds_of(pa.array(names)).to_pylist() == list(want.values())


def test_read_shard_reports_missing_files_and_broken_tars(tmp_path):
    src = tmp_path / "src"
    make_images(src, 2)
    shards = plan_shards(list_inputs(str(src))[0], 10)
    (src / shards[0].keys[0]).unlink()
    rows = [r for c in read_shard(shards[0]) for r in c]
    assert rows[0]["data"] is None and "could not read source" in rows[0]["read_error"]
    assert rows[1]["data"] is not None
    bad = tmp_path / "bad"
    bad.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(2):
            info = tarfile.TarInfo(f"{i}.png")
            data = png_of(i)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    member2_data = 512 + -(-len(png_of(0)) // 512) * 512 + 512
    (bad / "broken.tar").write_bytes(buf.getvalue()[: member2_data + 300])  # cut inside member 2's bytes
    rows = [r for s in plan_shards(list_inputs(str(bad))[0]) for c in read_shard(s) for r in c]
    assert rows[0]["key"] == "broken.tar/0.png" and rows[0]["data"] == png_of(0)
    assert rows[-1]["key"] == "broken.tar" and "tar shard unreadable after 1 members" in rows[-1]["read_error"]


@pytest.mark.parametrize("key", ["../x.png", "a/../../x.png", "/etc/passwd", "C:/x.png", "a\\b.png", "", "a//b.png", "./x.png"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(ValueError, match="refus"):
        output_key(key)


def test_output_keys_are_one_to_one():
    assert output_key("a/b.png") == "a/b.png"
    assert output_key("a/b.jpg") == "a/b.jpg.png"
    assert output_key("t.tar/0001") == "t.tar/0001.png"


def test_parquet_options_keep_blobs_raw():
    t = pa.Table.from_pylist([{"key": str(i), "source_uri": "u", "bitstream": bytes(1000), "status": "ok"} for i in range(10)],
                             schema=BITSTREAM_SCHEMA)
    kw = parquet_write_kwargs(t)
    assert kw["compression"]["bitstream"] == "NONE" and kw["compression"]["key"] == "ZSTD"
    assert "bitstream" not in kw["use_dictionary"]
    assert kw["row_group_size"] > 10_000  # ~32 MB of ~1 kB rows per group


# ---------------------------------------------------------------- actors without Ray
def test_encode_actor_fails_bad_inputs_alone_and_loads_once(tmp_path, encoder):
    src = tmp_path / "src"
    good = make_images(src, 5)
    bad = make_corrupt(src)
    shard = plan_shards(list_inputs(str(src))[0], 100)[0]
    rows = [r for c in read_shard(shard) for r in c]
    codec = encoder.codec
    out = encoder(rows[:4]).to_pylist() + encoder(rows[4:]).to_pylist()
    assert encoder.codec is codec  # two batches, one codec
    by_key = {r["key"]: r for r in out}
    assert set(by_key) == set(good) | set(bad)
    for k, frag in bad.items():
        assert by_key[k]["status"] == "failed" and frag in by_key[k]["error"], by_key[k]["error"]
        assert by_key[k]["bitstream"] is None
    assert by_key["zero.png"]["source_sha256"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for k, (h, w) in good.items():
        r = by_key[k]
        assert r["status"] == "ok" and r["error"] is None and (r["height"], r["width"]) == (h, w)
        assert r["n_bytes"] == len(r["bitstream"]) > 40 and abs(r["bpp"] - r["n_bytes"] * 8 / (h * w)) < 1e-9
        assert r["source_sha256"] == sha256_hex((src / k).read_bytes())
        assert len(r["codec_fingerprint"]) == 32 and r["t"] == 100


def test_decode_actor_verifies_checksums_and_refuses_escaping_keys(tmp_path, encoder, decoder):
    rows = encoder([{"key": "ok.png", "source_uri": "x", "data": png_of(1, 40, 56)},
                    {"key": "tampered.png", "source_uri": "x", "data": png_of(2)},
                    {"key": "../../escape.png", "source_uri": "x", "data": png_of(3)}]).to_pylist()
    rows[1]["bitstream"] = rows[1]["bitstream"][:-1] + bytes([rows[1]["bitstream"][-1] ^ 1])
    out_dir = tmp_path / "out"
    writer = DecodeActor.__new__(DecodeActor)  # reuse the loaded codec, write under out_dir
    writer.__dict__.update(decoder.__dict__, out_url=str(out_dir))
    writer.fs, writer.root = st.get_fs(str(out_dir))
    res = {r["key"]: r for r in writer(rows).to_pylist()}
    assert res["ok.png"]["status"] == "ok" and (res["ok.png"]["width"], res["ok.png"]["height"]) == (56, 40)
    assert Image.open(out_dir / "ok.png").size == (56, 40)
    assert "bitstream_sha256 does not match" in res["tampered.png"]["error"]
    assert "refusing key" in res["../../escape.png"]["error"]
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["ok.png"]


# ---------------------------------------------------------------- whole job, inline (no Ray)
def _read(dst) -> pa.Table:
    return read_dataset(str(dst))


def test_transform_stage_decodes_outside_the_actor_with_the_same_rows(tmp_path, encoder):
    from pipeline.transform import decode_sources

    src = tmp_path / "src"
    good = make_images(src, 5)
    bad = make_corrupt(src)
    shard = plan_shards(list_inputs(str(src))[0], 100)[0]
    raw = pa.Table.from_pylist([r for c in read_shard(shard) for r in c])
    dec = decode_sources(raw)
    assert "data" not in dec.column_names and dec.num_rows == raw.num_rows == len(good) + len(bad)
    rows = {r["key"]: r for r in dec.to_pylist()}
    for k, (h, w) in good.items():
        assert (rows[k]["px_h"], rows[k]["px_w"]) == (h, w) and len(rows[k]["pixels"]) == h * w * 3
    assert rows["truncated.png"]["pixels"] is None and "truncated" in rows["truncated.png"]["decode_error"]
    # The actor turns decoded rows into exactly the rows it makes from source bytes.
    via_stage = {r["key"]: r for r in encoder(dec).to_pylist()}
    direct = {r["key"]: r for r in encoder(raw).to_pylist()}
    for k in set(good) | set(bad):
        for col in ("status", "error", "bitstream", "source_sha256", "width", "height", "_source_bytes"):
            assert via_stage[k][col] == direct[k][col], (k, col)
    assert sum(r["status"] == "ok" for r in via_stage.values()) == len(good)


def test_transform_stage_respects_the_pixel_cap(tmp_path):
    from pipeline.transform import decode_sources

    t = pa.table({"key": ["big.png"], "data": [png_of(1, 64, 64)]})
    out = decode_sources(t, max_pixels=1000).to_pylist()[0]
    assert out["pixels"] is None and "exceeds the cap of 1000 pixels" in out["decode_error"]
    assert out["source_sha256"] == sha256_hex(t.column("data")[0].as_py()) and out["_source_bytes"] > 0


def test_decompress_inline_and_on_ray_write_the_same_files(tmp_path, ray_local):
    """decompress gives the same files inline and on a Ray actor pool (exact mode: identical
    pixels whatever the batch composition), and the same PNGs inside Parquet; the workers on
    Ray, not the driver, write the outputs."""
    import os

    spec = {**SPEC, "precision": "exact"}
    src, dst = tmp_path / "src", tmp_path / "dst"
    good = make_images(src, 7)
    (src / "broken.png").write_bytes(b"not a png")
    compress(JobConfig(src=str(src), dst=str(dst), codec=spec, shard_size=4), use_ray=False, progress=False, echo=lambda s: None)
    files = {}
    for name, use_ray in (("inline", False), ("ray", True)):
        out = tmp_path / name
        res = decompress(JobConfig(src=str(dst), dst=str(out), rows_per_batch=3), use_ray=use_ray, progress=False,
                         echo=lambda s: None)
        assert res["run"]["ok"] == len(good) and res["run"]["skipped"] == 1 and res["run"]["shards"] == 2
        files[name] = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.png")}
        writers = {int(w.split(":")[2]) for w in res["run"]["workers"]}
        assert (writers == {os.getpid()}) is (not use_ray)  # on Ray the outputs are written by the actor
    assert set(files["inline"]) == {k if k.endswith(".png") else k + ".png" for k in good}
    assert files["ray"] == files["inline"]
    par = decompress(JobConfig(src=str(dst), dst=str(tmp_path / "par"), format="parquet"), use_ray=False, progress=False,
                     echo=lambda s: None)
    t = read_dataset(str(tmp_path / "par"))
    pngs = {r["key"]: r["image"]["bytes"] for r in t.to_pylist() if r["status"] == "ok"}
    assert par["run"]["ok"] == len(good) and pngs == {
        k: files["inline"][k if k.endswith(".png") else k + ".png"] for k in good}


def test_job_reports_start_up_and_steady_rate(tmp_path):
    src = tmp_path / "src"
    make_images(src, 10)
    cfg = JobConfig(src=str(src), dst=str(tmp_path / "dst"), codec=SPEC, shard_size=2)
    lines = []
    run = compress(cfg, use_ray=False, progress=False, echo=lines.append)["run"]
    # five shards arrive one after another: the first marks the end of start-up, the rest give the rate
    assert run["first_output_s"] > 0 and run["steady_images_per_s"] > 0
    summary = next(s for s in lines if s.startswith("compressed "))
    assert "start-up" in summary and "images/s" in summary
    one = compress(JobConfig(src=str(src), dst=str(tmp_path / "dst1"), codec=SPEC, shard_size=100),
                   use_ray=False, progress=False, echo=lambda s: None)["run"]
    assert one["steady_images_per_s"] is None  # one output: no rate to speak of


def test_compress_resume_kill_states_and_retry_failed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    good = make_images(src, 10)
    bad = make_corrupt(src)
    cfg = JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=4, max_shards=1)
    r1 = compress(cfg, use_ray=False, progress=False, echo=lambda s: None)
    assert r1["run"]["shards"] == 1 and r1["totals"]["rows"] == 4 and not r1["manifest"]["complete"]

    # Simulate a job killed mid-write: a temp file and a part file whose commit never came
    # (here: a shard of the second run written, its record taken out of the books).
    compress(cfg, use_ray=False, progress=False, echo=lambda s: None)  # one more shard
    books = Books(*st.get_fs(str(dst)))
    cat = books.read()
    assert len(cat.shards) == 2
    last = max(cat.shards.values(), key=lambda r: r.committed_at)
    del cat.shards[last.shard]
    cat.entries = cat.entries.filter(pa.compute.not_equal(cat.entries.column("shard"), last.shard))
    books.compact(cat)
    (dst / "__fcodec__" / "tmp").mkdir(exist_ok=True)
    (dst / "__fcodec__" / "tmp" / "part-x.parquet.1234.part").write_bytes(b"PAR1 half written")
    (dst / "__fcodec__" / "commits" / ".x.json.ab12.part").write_bytes(b"{")
    assert len(_read(dst)) == 4  # the uncommitted shard does not count

    cfg.max_shards = None
    lines: list[str] = []
    r3 = compress(cfg, use_ray=False, progress=False, echo=lines.append)
    assert r3["run"]["reconciled"] == {"temp_files": 2, "adopted": 1, "removed": 0}
    t = _read(dst)
    keys = t.column("key").to_pylist()
    assert sorted(keys) == sorted(set(good) | set(bad)) and len(keys) == len(set(keys)) == 13
    assert r3["manifest"]["complete"] and r3["run"]["shards"] == 2  # the adopted shard was not redone
    assert not (dst / "__fcodec__" / "tmp").exists() and not list(dst.rglob(".*.part"))
    assert r3["totals"]["ok"] == 10 and r3["totals"]["failed"] == 3
    import pandas as pd

    df = pd.read_parquet(dst)  # plain readers see only complete part files (not __fcodec__/)
    assert len(df) == 13 and list(df.columns) == [*BITSTREAM_SCHEMA.names, "sidecars", "ref_key"]

    # A rerun has nothing to do.
    r4 = compress(cfg, use_ray=False, progress=False, echo=lambda s: None)
    assert r4["run"]["rows"] == 0 and len(_read(dst)) == 13

    # Fix one bad input, then --retry-failed redoes only the failed rows.
    (src / "zero.png").write_bytes(png_of(5))
    cfg.retry_failed = True
    r5 = compress(cfg, use_ray=False, progress=False, echo=lambda s: None)
    assert r5["run"]["found"]["retried"] == 3 and r5["run"]["ok"] - r5["run"]["rows"] + r5["run"]["failed"] == 0
    assert r5["run"]["failed"] == 2
    t = _read(dst)
    rows = {r["key"]: r for r in t.to_pylist()}
    assert len(t) == 13 and rows["zero.png"]["status"] == "ok" and rows["zero.png"]["width"] == 32
    assert r5["totals"]["ok"] == 11 and r5["totals"]["failed"] == 2

    # Other codec options on the same DST are refused (rows would mix codecs).
    with pytest.raises(ValueError, match="written with other codec options"):
        compress(JobConfig(src=str(src), dst=str(dst), codec={**SPEC, "t": 300}), use_ray=False, progress=False, echo=lambda s: None)


def test_cli_config_file_flags_win_and_no_secrets(tmp_path, capsys, monkeypatch):
    from jobs.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_images(src, 3)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRET-do-not-print")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-do-not-print")
    cfgfile = tmp_path / "job.toml"
    cfgfile.write_text(f'src = "{src}"\ndst = "{dst}"\nshard-size = 2\n[codec]\nt = 200\nbackbone = "tiny"\n')
    assert main(["compress", "--config", str(cfgfile), "--no-ray", "--t", "150", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"shard_size": 2' in out and '"t": 150' in out and "compressed 3 images: 3 ok" in out
    manifest = (dst / "__fcodec__" / "manifest.json").read_text()
    assert json.loads(manifest)["config"]["shard_size"] == 2 and json.loads(manifest)["codec"]["t"] == 150
    for secret in ("SUPERSECRET", "AKIA-do-not"):
        assert secret not in out and secret not in manifest
        assert not any(secret.encode() in p.read_bytes() for p in (dst / "__fcodec__").rglob("*") if p.is_file())
    assert set(pq.read_table(dst / next(iter(sorted(p.name for p in dst.glob("part-*")))) ).column("t").to_pylist()) == {150}

    bad = tmp_path / "bad.yaml"
    bad.write_text("srcc: x\n")
    assert main(["compress", "--config", str(bad), "--no-ray"]) == 2
    assert "unknown options ['srcc']" in capsys.readouterr().err


# ---------------------------------------------------------------- S3 + Ray, end to end
def test_compress_decompress_s3_with_ray(tmp_path, s3_server, s3_bucket, ray_local):
    import pandas as pd
    import s3fs

    local = tmp_path / "src"
    good = make_images(local, 16)
    bad = make_corrupt(local)
    with tarfile.open(local / "wds-000.tar", "w") as tf:
        for i in range(3):
            data = png_of(50 + i, 40, 40)
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": [png_of(60, 32, 48), png_of(61, 48, 32)]}), local / "table.parquet")
    expected = {**good, **{f"wds-000.tar/{i:06d}.png": (40, 40) for i in range(3)},
                "table.parquet/00000000": (32, 48), "table.parquet/00000001": (48, 32)}
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(local) + "/", f"{s3_bucket[5:]}/images/", recursive=True)
    opts = s3_server["opts"]
    src, dst = f"{s3_bucket}/images", f"{s3_bucket}/archive"
    cfg = JobConfig(src=src, dst=dst, codec=SPEC, shard_size=5, rows_per_batch=4, workers=1, storage=opts.public())
    res = compress(cfg, opts, use_ray=True, progress=False, echo=lambda s: None)
    assert res["totals"]["rows"] == len(expected) + len(bad) and res["totals"]["failed"] == len(bad)
    assert res["manifest"]["complete"] and res["run"]["pool"]["max_size"] == 1 and len(res["run"]["workers"]) == 1
    (writer,) = res["run"]["workers"]  # one actor wrote every part: the codec loaded once, not per shard
    assert int(writer.split(":")[2]) != os.getpid() and res["run"]["workers"][writer]["shards"] == res["run"]["shards"] > 1

    df = pd.read_parquet(dst, storage_options=s3_server["storage_options"])
    assert list(df.columns) == [*BITSTREAM_SCHEMA.names, "sidecars", "ref_key"] and len(df) == len(expected) + len(bad)
    assert df["key"].is_unique and set(df.loc[df.status == "failed", "key"]) == set(bad)
    assert df.loc[df.status == "ok", "error"].isna().all()
    first = sorted(r.file for r in Books(fs, dst[5:]).read().shards.values())[0]
    with fs.open(f"{dst[5:]}/{first}") as f:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.field("bitstream").type == pa.large_binary()
        col = pf.metadata.row_group(0).column(pf.schema_arrow.get_field_index("bitstream"))
        assert col.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings
    manifest = json.loads(fs.cat(f"{dst[5:]}/__fcodec__/manifest.json"))
    assert manifest["totals"]["ok"] == len(expected) and manifest["config"]["storage"]["endpoint_url"] == opts.endpoint_url
    assert "testing" not in json.dumps(manifest)  # moto's credentials are not stored

    out = f"{s3_bucket}/decoded"
    dres = decompress(JobConfig(src=dst, dst=out, rows_per_batch=4, workers=1), opts, use_ray=True, progress=False,
                      echo=lambda s: None)
    assert dres["run"]["ok"] == len(expected) and dres["run"]["skipped"] == len(bad) and dres["run"]["failed"] == 0
    for key, (h, w) in expected.items():
        img = Image.open(io.BytesIO(fs.cat(f"{out[5:]}/{output_key(key)}")))
        assert img.size == (w, h)
    again = decompress(JobConfig(src=dst, dst=out, codec=SPEC), opts, use_ray=True, progress=False, echo=lambda s: None)
    assert again["run"]["rows"] == 0  # resumed: every shard already decoded


def test_decompress_to_parquet_inline(tmp_path):
    src, dst, out = tmp_path / "src", tmp_path / "dst", tmp_path / "dec"
    good = make_images(src, 4)
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC), use_ray=False, progress=False, echo=lambda s: None)
    decompress(JobConfig(src=str(dst), dst=str(out), codec=SPEC, format="parquet"), use_ray=False, progress=False, echo=lambda s: None)
    t = pq.read_table(next(out.glob("part-*.parquet")))
    assert sorted(t.column("key").to_pylist()) == sorted(good)
    for r in t.to_pylist():
        px = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])))
        assert px.shape[:2] == good[r["key"]] and r["status"] == "ok"


def test_config_file_from_s3(s3_server, s3_bucket):
    import s3fs

    from jobs.options import load_config_file

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.pipe(f"{s3_bucket[5:]}/jobs/nightly.yaml", b"src: s3://in/x\ndst: s3://out/y\nshard-size: 64\ncodec:\n  t: 120\n")
    assert load_config_file(f"{s3_bucket}/jobs/nightly.yaml", s3_server["opts"]) == \
        {"src": "s3://in/x", "dst": "s3://out/y", "shard_size": 64, "t": 120}


def test_decompress_takes_the_codec_from_the_manifest_and_refuses_contradicting_flags(tmp_path):
    src, dst, out = tmp_path / "src", tmp_path / "dst", tmp_path / "dec"
    good = make_images(src, 5)
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=3), use_ray=False, progress=False, echo=lambda s: None)
    for wrong in ({"entropy": "hyperprior"}, {"backbone": "nano"}, {"t": 20}):
        with pytest.raises(ValueError, match="written with other codec options"):  # before any row is attempted
            decompress(JobConfig(src=str(dst), dst=str(out), codec=wrong), use_ray=False, progress=False, echo=lambda s: None)
        assert not list(out.rglob("*.png")) and not (out / "__fcodec__" / "commits").exists()
    r = decompress(JobConfig(src=str(dst), dst=str(out), codec={"steps": 1}), use_ray=False, progress=False, echo=lambda s: None)
    assert r["run"]["ok"] == 5 and r["totals"]["failed"] == 0 and r["manifest"]["codec"]["backbone"] == "tiny"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(output_key(k) for k in good)
    again = decompress(JobConfig(src=str(dst), dst=str(out)), use_ray=False, progress=False, echo=lambda s: None)
    assert again["run"]["rows"] == 0  # resumed: every shard decoded


def test_rerun_after_the_listing_changed_writes_each_key_once(tmp_path):
    src = tmp_path / "src"
    dst = src / "archive"  # DST inside SRC: the job must not read its own output
    keys = make_images(src, 6)
    cfg = JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=3)
    compress(cfg, use_ray=False, progress=False, echo=lambda s: None)
    (src / "aaa_first.png").write_bytes(png_of(77))  # sorts first: every file shard's id changes
    res = compress(cfg, use_ray=False, progress=False, echo=lambda s: None)
    got = read_dataset(str(dst), columns=["key"]).column("key").to_pylist()
    assert sorted(got) == sorted([*keys, "aaa_first.png"]) and len(got) == len(set(got))
    assert res["run"]["rows"] == 1 and res["totals"]["rows"] == 7


def test_cli_s3_endpoint_and_credentials_from_environment(tmp_path, s3_server, s3_bucket, monkeypatch, capsys):
    import s3fs

    from jobs.cli import main

    local = tmp_path / "src"
    good = make_images(local, 4)
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(local) + "/", f"{s3_bucket[5:]}/in/", recursive=True)
    for k, v in {**s3_server["env"], "AWS_ACCESS_KEY_ID": "AKIDEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "wJalrSECRETvalue"}.items():
        monkeypatch.setenv(k, v)  # moto accepts any credentials; these must never be echoed
    assert main(["compress", f"{s3_bucket}/in", f"{s3_bucket}/out", "--no-ray", "--no-progress"]) == 0
    assert main(["decompress", f"{s3_bucket}/out", f"{s3_bucket}/dec", "--no-ray", "--no-progress", "--steps", "0"]) == 0
    out = capsys.readouterr().out
    assert s3_server["endpoint_url"] in out and "compressed 4 images: 4 ok" in out and "decompressed 4 images: 4 ok" in out
    assert "AKIDEXAMPLEKEY" not in out and "wJalrSECRETvalue" not in out
    stored = b"".join(fs.cat(p) for p in fs.find(f"{s3_bucket[5:]}/out") if p.endswith(".json"))
    assert b"AKIDEXAMPLEKEY" not in stored and b"wJalrSECRETvalue" not in stored
    assert sorted(p.split("/dec/", 1)[1] for p in fs.find(f"{s3_bucket[5:]}/dec") if p.endswith(".png")) == \
        sorted(output_key(k) for k in good)


@pytest.mark.slow
def test_demo_runs_the_main_job_end_to_end(tmp_path, ray_local, capsys):
    """The README's main command on its defaults: the shipped photos through the default backbone
    on a local Ray, a side-by-side PNG against JPEG at no more bytes, and the numbers."""
    from PIL import Image

    from jobs.cli import main
    from jobs.samples import sample_photos

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "1", "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "demo: 1/1 images compressed, 1 decoded" in text and "mean PSNR" in text and "JPEG" in text
    assert len(read_dataset(str(out / "bitstreams"))) == 1
    rd = json.loads((out / "rd.json").read_text())
    assert [r["key"] for r in rd] == [p.name for p in sample_photos()[:1]]
    for r in rd:  # a recognisable photo, and JPEG held to no more bytes than ours (or at its lowest quality)
        assert 0.02 < r["bpp"] < 0.3 and r["psnr"] > 19.0
        assert r["jpeg_bpp"] <= r["bpp"] + 1e-9 or r["jpeg_quality"] == 1
    sheet = Image.open(out / "side_by_side.png")
    assert sheet.width >= 3 * max(r["width"] for r in rd) and sheet.height > sum(r["height"] for r in rd)
    # synthetic samples, inline, into the same folder: a second run starts clean
    assert main(["demo", "--out", str(out), "--samples", "synthetic", "--n", "6", "--steps", "1", "--no-ray",
                 "--backbone", "tiny"]) == 0
    assert len(read_dataset(str(out / "bitstreams"))) == 6
    assert sorted(p.name for p in (out / "decoded").glob("*.png")) == sorted(p.name for p in (out / "originals").glob("*.png"))
