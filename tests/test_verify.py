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
    """A private copy of the clean dataset to damage, its books as one commit record per shard
    (`__fcodec__/commits/<shard>.json`, as during a run) so a test can edit them as an attacker would."""
    d = Path(shutil.copytree(clean, tmp_path / "ds"))
    from pipeline.catalog import Books
    from pipeline.storage import get_fs

    books = Books(*get_fs(str(d)))
    cat = books.read()
    for rec in cat.shards.values():
        ents = [e for e in cat.entries.to_pylist() if e["shard"] == rec.shard]
        books.commit(type(rec).from_dict({**rec.to_dict(), "entries": [{k: v for k, v in e.items() if k != "shard"}
                                                                         for e in ents]}))
    shutil.rmtree(d / "__fcodec__" / "catalog")
    return d


MANIFEST = Path("__fcodec__") / "manifest.json"


def markers(ds: Path) -> list[Path]:
    return sorted((ds / "__fcodec__" / "commits").glob("*.json"))


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
    manifest = json.loads((clean / MANIFEST).read_text())
    assert rep["output_bytes"] == manifest["totals"]["output_bytes"] > 0
    assert rep["codec_fingerprint"] == manifest["codec_fingerprint"]
    assert fcodec(["verify", str(clean)]) == 1  # whole, but with failed rows (the corrupt inputs)
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
    assert fcodec(["verify", str(ds)]) == 3  # not whole
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
    assert "part-deadbeef.parquet: part file without a commit record" in rep["problems"][0]


def test_manifest_count_mismatch(ds):
    m = json.loads((ds / MANIFEST).read_text())
    m["totals"]["rows"] += 1
    (ds / MANIFEST).write_text(json.dumps(m))
    rep = verify_dataset(str(ds))
    assert not rep["ok"]
    assert any(f"totals.rows = {N_IMAGES + N_BAD + 1}, the commit records add up to {N_IMAGES + N_BAD}" in p
               for p in rep["problems"])


def test_duplicate_keys_across_shards(ds):
    p0, p1 = parts(ds)[:2]
    key = first_ok(pq.read_table(p0).to_pylist())["key"]

    def dup(rows):
        first_ok(rows)["key"] = key

    rewrite(p1, dup)
    rep = verify_dataset(str(ds))
    assert rep["n_problems"] == 2 and f"key {key!r}: duplicate key" in rep["problems"][0]
    assert "bound to another key" in rep["problems"][1]  # its record was written for the row's own key


def test_incomplete_manifest_and_tmp_leftovers(ds):
    m = json.loads((ds / MANIFEST).read_text())
    m["complete"] = False
    (ds / MANIFEST).write_text(json.dumps(m))
    (ds / "__fcodec__" / "tmp").mkdir()
    (ds / "__fcodec__" / "tmp" / "part-x.parquet.1234.part").write_bytes(b"half a file")
    rep = verify_dataset(str(ds))
    assert rep["n_problems"] == 1 and "incomplete" in rep["problems"][0]
    assert len(rep["warnings"]) == 1 and "__fcodec__/tmp/" in rep["warnings"][0]
    assert "warning: __fcodec__/tmp/" in "\n".join(format_report(rep))


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
    assert fcodec(["verify", f"{s3_bucket}/archive"]) == 3  # not whole
    out = capsys.readouterr().out
    assert "FAILED" in out and f"{parts(clean)[0].name} is missing" in out
    assert "testing" not in out  # the credentials never show


def test_row_dropped_from_a_part_file(ds):
    p = parts(ds)[0]
    n = pq.read_metadata(p).num_rows
    rewrite(p, lambda rows: rows.pop())
    rep = verify_dataset(str(ds))
    assert not rep["ok"] and rep["rows"] == N_IMAGES + N_BAD - 1
    assert any(f"commit record says rows = {n}, the part file has {n - 1}" in x for x in rep["problems"])
    assert any(f"the manifest counts {N_IMAGES + N_BAD} rows, the part files hold {N_IMAGES + N_BAD - 1}" in x
               for x in rep["problems"])


# ---------------------------------------------------------------- issue 19: columns, binding, keys, shapes, caps, HMAC
def bind(rows: list[dict]) -> None:
    """Re-pack every ok row's record with its key and source tags (what an encoder given `keys`
    and `source_sha256` writes), sha256 updated: the archive as the wired pipeline writes it."""
    from codec import bitstream as bs

    for r in rows:
        if r["status"] == "ok":
            rec = bs.parse(r["bitstream"])
            rec.key_tag, rec.source_tag = bs.binding_tag(r["key"]), bs.binding_tag(r["source_sha256"])
            r["bitstream"] = bs.pack(rec)
            r["bitstream_sha256"] = hashlib.sha256(r["bitstream"]).hexdigest()


def test_clean_report_separates_failed_rows(clean):
    rep = verify_dataset(str(clean), hmac_key=None)
    lines = format_report(rep)
    assert lines[0].startswith(f"OK: the archive is whole, but with {N_BAD} failed rows")
    assert "  authenticity not checked (no key); set $FCODEC_HMAC_KEY to check it" in lines


def test_t_column_checked_against_the_record(ds):
    def forge(rows):
        first_ok(rows)["t"] += 7

    rewrite(parts(ds)[0], forge)
    rep = verify_dataset(str(ds), hmac_key=None)
    assert rep["n_problems"] == 1 and "record has t = " in rep["problems"][0]


def test_swapped_bitstreams_are_caught_by_the_binding_tags(ds):
    for p in parts(ds):
        rewrite(p, bind)
    assert verify_dataset(str(ds), hmac_key=None)["ok"]
    assert verify_dataset(str(ds), hmac_key=None)["bound_rows"] == N_IMAGES

    def swap(rows):
        a, b = [r for r in rows if r["status"] == "ok"][:2]
        for col in ("bitstream", "bitstream_sha256", "n_bytes", "width", "height", "t", "bpp"):
            a[col], b[col] = b[col], a[col]  # each row self-consistent, just in the other's place

    p = next(p for p in parts(ds) if sum(r["status"] == "ok" for r in pq.read_table(p).to_pylist()) >= 2)
    rewrite(p, swap)
    rep = verify_dataset(str(ds), hmac_key=None)
    assert rep["n_problems"] == 2 and all("bound to another key" in x for x in rep["problems"]), rep["problems"]


def test_unsafe_keys_are_flagged(ds):
    bad = ["../x.png", "/etc/passwd", "a\0b.png", "k" * 5000]

    def rename(rows):
        for r, k in zip(rows, bad):
            r["key"] = k

    rewrite(parts(ds)[0], rename)
    rep = verify_dataset(str(ds), hmac_key=None)
    unsafe = [p for p in rep["problems"] if "unsafe key" in p]
    assert len(unsafe) == 4, rep["problems"]
    assert all(len(p) < 400 for p in unsafe)  # a 5000-character key does not flood the report


@pytest.mark.parametrize("target,content,msg", [
    ("manifest", "[1, 2]", "manifest.json: expected a JSON object, found list"),
    ("manifest", '{"kind": "foundation-codec bitstream dataset", "layout": 2, "complete": true, "totals": []}',
     "manifest.json: field 'totals' should be dict, found list"),
    ("marker", '["x"]', ".json: expected a JSON object, found list"),
    ("marker", '{"shard": "x", "file": "part-x.parquet", "rows": "12"}', "field 'rows' should be int, found str"),
])
def test_wrong_json_shapes_are_one_line_errors(ds, capsys, target, content, msg):
    path = ds / MANIFEST if target == "manifest" else markers(ds)[0]
    path.write_text(content)
    rep = verify_dataset(str(ds), hmac_key=None)
    assert not rep["ok"] and any(msg in p for p in rep["problems"]), rep["problems"]
    assert fcodec(["verify", str(ds)]) == 3
    err = capsys.readouterr()
    assert "AttributeError" not in err.out + err.err and "Traceback" not in err.err


def test_bitstreams_over_the_cap_are_reported_not_loaded(clean):
    rep = verify_dataset(str(clean), hmac_key=None, max_bitstream_bytes=64)
    over = [p for p in rep["problems"] if "over the verify cap" in p]
    assert len(over) >= N_IMAGES and rep["bitstreams_checked"] == 0, rep["problems"][:3]


def test_decode_cap_is_never_taken_from_the_manifest(ds):
    m = json.loads((ds / MANIFEST).read_text())
    m["codec"]["max_pixels"] = 10  # the old verify parsed with this cap (and a large one raised it)
    (ds / MANIFEST).write_text(json.dumps(m))
    assert verify_dataset(str(ds), hmac_key=None)["ok"]


KEY = b"test-archive-key-0123456789"


def sign(ds: Path, key: bytes = KEY) -> None:
    """What the writer does with a key: a record HMAC per row, then the books signature."""
    from pipeline import integrity

    def add(rows):
        for r in rows:
            r[integrity.RECORD_HMAC_COLUMN] = integrity.sign_record(key, r["bitstream"]) if r["bitstream"] else None

    schema = BITSTREAM_SCHEMA.append(pa.field(integrity.RECORD_HMAC_COLUMN, pa.string()))
    for p in parts(ds):
        rows = pq.read_table(p).to_pylist()
        add(rows)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), p)
    resign_books(ds, key)


def resign_books(ds: Path, key: bytes) -> None:
    from pipeline import integrity

    books = [{"file": p.name, "rows": pq.read_metadata(p).num_rows, "checksum": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in parts(ds)]
    m = json.loads((ds / MANIFEST).read_text())
    m[integrity.MANIFEST_FIELD] = {"algorithm": integrity.ALGORITHM, "books_hmac": integrity.sign_books(key, books)}
    (ds / MANIFEST).write_text(json.dumps(m))


def fix_books(ds: Path) -> None:
    """An attacker without the key: markers and manifest totals made to add up again."""
    m = json.loads((ds / MANIFEST).read_text())
    tot = {"rows": 0, "ok": 0, "failed": 0, "output_bytes": 0}
    for mk in markers(ds):
        d = json.loads(mk.read_text())
        rows = pq.read_table(ds / d["file"]).to_pylist() if (ds / d["file"]).exists() else None
        if rows is None:
            mk.unlink()
            continue
        d.update(rows=len(rows), ok=sum(r["status"] == "ok" for r in rows), failed=sum(r["status"] == "failed" for r in rows),
                 output_bytes=sum(r["n_bytes"] or 0 for r in rows if r["status"] == "ok"))
        mk.write_text(json.dumps(d))
        for k in tot:
            tot[k] += d[k]
    m["totals"].update(tot, shards=len(markers(ds)))
    (ds / MANIFEST).write_text(json.dumps(m))


def test_hmac_signed_archive_passes_with_the_key_and_says_so_without(ds, monkeypatch, capsys):
    sign(ds)
    rep = verify_dataset(str(ds), hmac_key=KEY)
    assert rep["ok"], rep["problems"]
    assert rep["authenticity"] == "checked" and rep["hmac_checked"] == N_IMAGES
    monkeypatch.setenv("FCODEC_HMAC_KEY", KEY.decode())
    assert fcodec(["verify", str(ds)]) == 1  # whole (failed rows aside), authentic
    assert "authenticity checked: 12 record HMACs and the books signature" in capsys.readouterr().out
    monkeypatch.delenv("FCODEC_HMAC_KEY")
    assert verify_dataset(str(ds))["authenticity"] == "not checked (no key)"
    assert not verify_dataset(str(ds), hmac_key=b"another key")["ok"]


@pytest.mark.parametrize("attack", ["row_deleted_books_fixed", "shard_removed_books_fixed", "forged_t", "resigned_wrong_key"])
def test_tampering_caught_only_with_the_key(ds, attack):
    from codec import bitstream as bs

    sign(ds)
    p = parts(ds)[1]
    if attack == "row_deleted_books_fixed":
        rows = pq.read_table(p).to_pylist()
        rows.pop()
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(p)), p)
        fix_books(ds)
    elif attack == "shard_removed_books_fixed":
        p.unlink()
        fix_books(ds)
    elif attack == "forged_t":  # CRC, sha256 and the t column recomputed: self-consistent
        rows = pq.read_table(p).to_pylist()
        r = first_ok(rows)
        rec = bs.parse(r["bitstream"])
        rec.t += 5
        r["bitstream"] = bs.pack(rec)
        r["bitstream_sha256"], r["t"] = hashlib.sha256(r["bitstream"]).hexdigest(), rec.t
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(p)), p)
    else:
        resign_books(ds, b"attacker's key")
    no_key = verify_dataset(str(ds), hmac_key=None)
    assert no_key["ok"], no_key["problems"]  # self-consistent: CRC, sha256 and the books add up
    with_key = verify_dataset(str(ds), hmac_key=KEY)
    assert not with_key["ok"]
    want = "record HMAC does not match" if attack == "forged_t" else "books signature does not match"
    assert any(want in x for x in with_key["problems"]), with_key["problems"]
