"""`fcodec verify` on a real compressed dataset (tiny codec, inline pipeline) and on copies of it
with one fault each: a flipped byte inside a bitstream, a wrong sha256, a missing part file, an
orphan part file, a manifest count off by one, a duplicated key; local and on moto's S3."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main as fcodec
from pipeline.run import JobConfig, compress
from pipeline.schema import BITSTREAM_SCHEMA
from pipeline.verify import format_report, verify_dataset
from test_pipeline import make_corrupt, make_images

SPEC = {"backbone": "tiny", "steps": 1, "threads": 1}
N_IMAGES, N_BAD = 12, 3


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """12 images + 3 corrupt inputs compressed into 4 shards (inline: no Ray needed here)."""
    root = tmp_path_factory.mktemp("verify")
    make_images(root / "src", N_IMAGES, seed=21)
    make_corrupt(root / "src")
    compress(JobConfig(src=str(root / "src"), dst=str(root / "dst"), codec=SPEC, shard_size=4), use_ray=False,
             progress=False, echo=lambda s: None)
    return root / "dst"


@pytest.fixture
def ds(clean, tmp_path) -> Path:
    """A private copy of the clean dataset to damage."""
    return Path(shutil.copytree(clean, tmp_path / "ds"))


def parts(ds: Path) -> list[Path]:
    return sorted(ds.glob("part-*.parquet"))


def rewrite(part: Path, fn) -> None:
    """Read a part file's rows, let fn edit them (list of dicts), write them back."""
    rows = pq.read_table(part).to_pylist()
    fn(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=BITSTREAM_SCHEMA), part)


def first_ok(rows: list[dict]) -> dict:
    return next(r for r in rows if r["status"] == "ok")


def test_clean_dataset_passes_with_a_decoded_sample(clean, capsys):
    rep = verify_dataset(str(clean), decode_sample=3)
    assert rep["ok"], rep["problems"]
    assert rep["n_problems"] == 0 and rep["warnings"] == []
    assert rep["shards"] == 4 and rep["rows"] == N_IMAGES + N_BAD
    assert rep["ok_rows"] == rep["bitstreams_checked"] == N_IMAGES and rep["failed_rows"] == N_BAD
    assert rep["decoded"] == 3
    manifest = json.loads((clean / "_manifest.json").read_text())
    assert rep["output_bytes"] == manifest["totals"]["output_bytes"] > 0
    assert rep["codec_fingerprint"] == manifest["codec_fingerprint"]
    assert fcodec(["verify", str(clean)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: the archive is whole") and f"{N_IMAGES + N_BAD} rows ({N_IMAGES} ok, {N_BAD} failed)" in out


def test_flipped_byte_inside_a_bitstream_fails_the_crc(ds, capsys):
    def flip(rows):
        r = first_ok(rows)
        b = bytearray(r["bitstream"])
        b[len(b) // 2] ^= 0x10
        r["bitstream"] = bytes(b)
        r["bitstream_sha256"] = hashlib.sha256(b).hexdigest()  # the hash was recomputed: only the CRC can tell

    rewrite(parts(ds)[0], flip)
    rep = verify_dataset(str(ds))
    assert not rep["ok"] and rep["n_problems"] == 1
    assert "checksum mismatch" in rep["problems"][0]
    assert fcodec(["verify", str(ds)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: 1 problems") and "checksum mismatch" in out


def test_sha256_mismatch(ds):
    def bad_hash(rows):
        first_ok(rows)["bitstream_sha256"] = "0" * 64

    rewrite(parts(ds)[1], bad_hash)
    rep = verify_dataset(str(ds))
    assert rep["n_problems"] == 1 and "bitstream_sha256 does not match" in rep["problems"][0]


def test_missing_part_file(ds):
    gone = parts(ds)[2]
    gone.unlink()
    rep = verify_dataset(str(ds))
    assert not rep["ok"]
    assert any(f"its part file {gone.name} is missing" in p for p in rep["problems"])
    assert any("the part files hold" in p for p in rep["problems"])  # manifest rows vs what is there


def test_orphan_part_file_without_commit_marker(ds):
    shutil.copy(parts(ds)[0], ds / "part-deadbeef.parquet")  # as a run killed between Parquet and marker
    rep = verify_dataset(str(ds))
    assert rep["n_problems"] == 1
    assert "part-deadbeef.parquet: part file without a commit marker" in rep["problems"][0]


def test_manifest_count_mismatch(ds):
    m = json.loads((ds / "_manifest.json").read_text())
    m["totals"]["rows"] += 1
    (ds / "_manifest.json").write_text(json.dumps(m))
    rep = verify_dataset(str(ds))
    assert not rep["ok"]
    assert any(f"totals.rows = {N_IMAGES + N_BAD + 1}, the commit markers add up to {N_IMAGES + N_BAD}" in p
               for p in rep["problems"])


def test_duplicate_keys_across_shards(ds):
    p0, p1 = parts(ds)[:2]
    key = first_ok(pq.read_table(p0).to_pylist())["key"]

    def dup(rows):
        first_ok(rows)["key"] = key

    rewrite(p1, dup)
    rep = verify_dataset(str(ds))
    assert rep["n_problems"] == 1 and f"key {key!r}: duplicate key" in rep["problems"][0]


def test_incomplete_manifest_and_tmp_leftovers(ds):
    m = json.loads((ds / "_manifest.json").read_text())
    m["complete"] = False
    (ds / "_manifest.json").write_text(json.dumps(m))
    (ds / "_tmp").mkdir()
    (ds / "_tmp" / "part-x.parquet.1234.part").write_bytes(b"half a file")
    rep = verify_dataset(str(ds))
    assert rep["n_problems"] == 1 and "incomplete" in rep["problems"][0]
    assert len(rep["warnings"]) == 1 and "_tmp/" in rep["warnings"][0]
    assert "warning: _tmp/" in "\n".join(format_report(rep))


def test_unreadable_part_file(ds):
    p = parts(ds)[0]
    p.write_bytes(p.read_bytes()[:100])  # truncated: not Parquet any more
    rep = verify_dataset(str(ds))
    assert not rep["ok"] and any(f"{p.name}: cannot be read" in x for x in rep["problems"])


def test_pixel_cap_applies_to_parsed_records(clean):
    """A decoder (or verifier) with a small pixel cap refuses records above it at parse time,
    before any entropy decoding or allocation."""
    rep = verify_dataset(str(clean), max_pixels=32 * 32 - 1)
    assert rep["n_problems"] == N_IMAGES  # every image is at least 32x32
    assert all("outside the limit of 1023 pixels" in p for p in rep["problems"])


def test_s3_dataset(clean, s3_server, s3_bucket, monkeypatch, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(clean) + "/", f"{s3_bucket[5:]}/archive/", recursive=True)
    rep = verify_dataset(f"{s3_bucket}/archive", s3_server["opts"])
    assert rep["ok"], rep["problems"]
    assert rep["rows"] == N_IMAGES + N_BAD and rep["bitstreams_checked"] == N_IMAGES
    fs.rm(f"{s3_bucket[5:]}/archive/{parts(clean)[0].name}")
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    assert fcodec(["verify", f"{s3_bucket}/archive"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and f"{parts(clean)[0].name} is missing" in out
    assert "testing" not in out  # the credentials never show


def test_row_dropped_from_a_part_file(ds):
    p = parts(ds)[0]
    n = pq.read_metadata(p).num_rows
    rewrite(p, lambda rows: rows.pop())
    rep = verify_dataset(str(ds))
    assert not rep["ok"] and rep["rows"] == N_IMAGES + N_BAD - 1
    assert any(f"marker says rows = {n}, the part file has {n - 1}" in x for x in rep["problems"])
    assert any(f"_manifest.json counts {N_IMAGES + N_BAD} rows, the part files hold {N_IMAGES + N_BAD - 1}" in x
               for x in rep["problems"])
