"""Sorted streams (pipeline/keyorder.py) and the key index streamed from them: spilled runs come
back in key order, merges and alignments keep every row once, row groups are exact, a streamed
compaction writes the same index as sorting it whole, and a stream that fails mid-write leaves no
file (locally and on S3)."""
from __future__ import annotations

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import keyorder
from pipeline import layout as L
from pipeline.catalog import Books, fold
from pipeline.sources import LISTING_SCHEMA
from pipeline.storage import get_fs, write_parquet_atomic


def listing(keys: list[str]) -> pa.Table:
    n = len(keys)
    return pa.table([keys, [f"/src/{k}" for k in keys], ["files"] * n, list(range(n)), ["t"] * n],
                    schema=LISTING_SCHEMA)


def shuffled_keys(n: int, seed: int = 0) -> list[str]:
    keys = [f"d{i % 7}/img{i:07d}.png" for i in range(n)]
    random.Random(seed).shuffle(keys)
    return keys


@pytest.mark.parametrize("fan_in,runs_left", [(32, 9), (3, 1), (2, 2)])
def test_spill_sorts_across_runs_and_removes_them(monkeypatch, fan_in, runs_left):
    """Runs of 3000 rows (2 adds: a third would pass run_rows), 3000 rows left in memory; with a
    small fan-in, every `fan_in` runs of a size are merged into one of the next (3: 9 runs -> 3
    -> 1; 2: 9 runs -> sizes 8 + 1)."""
    monkeypatch.setattr(keyorder, "READ_ROWS", 1000)
    keys = shuffled_keys(30_000)
    sp = keyorder.Spill(LISTING_SCHEMA, "key", run_rows=4000, merge_rows=1000, fan_in=fan_in)
    for i in range(0, len(keys), 1500):
        sp.add(listing(keys[i:i + 1500]))
    assert sp.num_rows == 30_000 and len(sp.runs) == runs_left
    assert sorted(os.listdir(sp.dir)) == sorted(os.path.basename(p) for p in sp.runs)  # merged runs removed
    chunks = list(sp.sorted())
    got = [k for t in chunks for k in t.column("key").to_pylist()]
    assert got == sorted(keys)
    # a merge step holds at most one read batch a stream (the runs + the rows in memory), never a whole run
    assert max(t.num_rows for t in chunks) <= (runs_left + 1) * 1000
    d = sp.dir
    sp.close()
    assert not os.path.exists(d)


def test_spill_runs_never_pass_run_rows():
    """Pages one row short of a divisor of run_rows (a listing page with one ignored file): every
    run holds at most run_rows rows and at most a run's worth stays buffered, instead of runs a
    page longer (which took the 200k-input listing's peak up by ~6 MB)."""
    keys = shuffled_keys(5000)
    sp = keyorder.Spill(LISTING_SCHEMA, "key", run_rows=400)
    for i in range(0, len(keys), 99):
        sp.add(listing(keys[i:i + 99]))
        assert sp.buffered <= 400
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in sp.runs]
    assert sizes == [396] * 12 and sp.buffered == 5000 - 12 * 396
    assert [k for t in sp.sorted() for k in t.column("key").to_pylist()] == sorted(keys)
    sp.close()


def test_aligned_pairs_share_key_ranges():
    a = sorted(shuffled_keys(5000, 1))[::2]  # every other key
    b = sorted(shuffled_keys(5000, 1))[::3]
    left = (listing(a).slice(i, 700) for i in range(0, len(a), 700))
    ents = pa.table([b, ["s"] * len(b), [1] * len(b), ["t"] * len(b), [None] * len(b), [0] * len(b)],
                    schema=L.ENTRIES_SCHEMA)
    right = (ents.slice(i, 300) for i in range(0, len(b), 300))
    seen_a, seen_b, both = [], [], 0
    last = ""
    for x, y in keyorder.aligned(left, right, "key", "entry", LISTING_SCHEMA, L.ENTRIES_SCHEMA):
        ka, kb = x.column("key").to_pylist(), y.column("entry").to_pylist()
        assert all(k > last for k in ka + kb)  # ranges increase
        both += len(set(ka) & set(kb))
        seen_a += ka
        seen_b += kb
        last = max(ka + kb)
    assert seen_a == a and seen_b == b
    assert both == len(set(a) & set(b)) == len(range(0, 5000, 6))  # every common key met in one pair


def test_row_group_writer_exact_groups(tmp_path):
    p = tmp_path / "g.parquet"
    w = keyorder.RowGroupWriter(str(p), LISTING_SCHEMA, 256)
    keys = sorted(shuffled_keys(1000))
    for i, n in [(0, 100), (100, 300), (400, 7), (407, 593)]:
        w.write(listing(keys[i:i + n]))
    w.close()
    pf = pq.ParquetFile(p)
    assert [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)] == [256, 256, 256, 232]
    assert pf.read_row_group(2).column("key").to_pylist() == keys[512:768]


def entries_of(shard: str, keys: list[str]) -> list[L.Entry]:
    return [L.Entry(k, 10, "tok", "0" * 64, 0) for k in keys]


def record(shard: str, keys: list[str], when: str, supersedes=()) -> L.CommitRecord:
    return L.CommitRecord(shard=shard, file=L.part_name(shard), rows=len(keys), ok=len(keys),
                          entries=entries_of(shard, keys), supersedes=list(supersedes), committed_at=when)


def commit(books: Books, cat, rec: L.CommitRecord) -> None:
    """As the job commits a shard: the record written, folded, listed for compaction."""
    books.commit(rec)
    fold(cat, [rec])
    cat.loose.append(books.path(f"{L.COMMITS}/{rec.shard}.json"))


def test_folds_spill_and_compaction_streams_the_same_index(tmp_path, monkeypatch):
    """Many shards folded (spilled to local runs every SPILL_ROWS rows), some superseded after
    they were spilled, compacted by streaming, read back: the same index as folding in memory."""
    import pipeline.catalog as C

    monkeypatch.setattr(C, "SPILL_ROWS", 1000)
    monkeypatch.setattr(C, "SPILL_FAN_IN", 4)
    keys = shuffled_keys(12_000, 3)
    fs, root = get_fs(str(tmp_path / "ds"))
    books = Books(fs, root)
    cat = books.read()
    recs = [record(f"r1-{i:04d}", sorted(keys[i * 200:(i + 1) * 200]), f"2026-12-03T00:00:{i:02d}") for i in range(40)]
    for r in recs:
        commit(books, cat, r)
    # 8000 rows spilled 1000 at a time: 8 runs, merged 4 at a time into one part (bounded fan-in)
    assert cat.folded is not None and cat.folded.num_rows >= 7000 and len(cat.parts) == 1
    assert cat.folded.written >= 9 and len(cat.folded.runs) <= 3
    # supersede a spilled shard (drop half its keys) and drop another entirely
    kept = recs[0].entries[:100]
    commit(books, cat, record("r1-0100", [e.entry for e in kept], "2026-12-03T00:01:00", supersedes=["r1-0000"]))
    commit(books, cat, L.CommitRecord(shard="r1-0101", file=None, kind="files", supersedes=["r1-0001"],
                                      committed_at="2026-12-03T00:01:01"))
    want = sorted({k for r in recs[2:40] for k in (e.entry for e in r.entries)} | {e.entry for e in kept})
    streamed = [k for t in cat.index_stream() for k in t.column("entry").to_pylist()]
    assert streamed == want
    spill_dir = cat.folded.dir
    books.compact(cat)
    assert not os.path.exists(spill_dir)
    back = Books(fs, root).read()
    assert back.entries.column("entry").to_pylist() == want
    assert back.entry_shards()[kept[0].entry] == "r1-0100"
    f = pq.ParquetFile(books.path(L.CATALOG_ENTRIES))
    assert f.metadata.num_rows == len(want)
    assert f.metadata.row_group(0).num_rows == min(len(want), C.INDEX_GROUP_ROWS)  # what a reader holds at a time


def test_unsorted_index_file_is_read_whole(tmp_path):
    """An entries file not in key order (not one compaction wrote) is still read right."""
    fs, root = get_fs(str(tmp_path / "ds"))
    books = Books(fs, root)
    cat = books.read()
    commit(books, cat, record("a-0001", ["b.png", "c.png"], "2026-12-03T00:00:00"))
    commit(books, cat, record("a-0002", ["a.png"], "2026-12-03T00:00:01"))
    books.compact(cat)
    t = pq.read_table(books.path(L.CATALOG_ENTRIES))
    import pyarrow.compute as pc
    rev = t.take(pc.array_sort_indices(t.column("entry"), order="descending"))
    pq.write_table(rev, books.path(L.CATALOG_ENTRIES), row_group_size=1)
    back = books.read()
    assert back.entries.column("entry").to_pylist() == ["a.png", "b.png", "c.png"]


def failing_stream(n_ok: int):
    keys = sorted(shuffled_keys(3 * n_ok))
    ents = pa.table([keys, ["s"] * len(keys), [1] * len(keys), ["t"] * len(keys), [None] * len(keys),
                     [0] * len(keys)], schema=L.ENTRIES_SCHEMA)
    for i in range(0, 2 * n_ok, n_ok):
        yield ents.slice(i, n_ok)
    raise OSError("the index could not be read")


def test_failed_stream_leaves_no_file_locally(tmp_path):
    fs, root = get_fs(str(tmp_path / "ds"))
    with pytest.raises(OSError, match="could not be read"):
        write_parquet_atomic(fs, root, "x/entries.parquet", failing_stream(5000), schema=L.ENTRIES_SCHEMA,
                             group_rows=1000)
    assert not fs.exists(f"{root}/x/entries.parquet")
    assert not [p for p in fs.find(root) if p.endswith(".part")]


def test_failed_stream_leaves_no_object_on_s3(s3_bucket, s3_server):
    """A multipart upload cut by an error is aborted, never published as a torn object."""
    fs, root = get_fs(s3_bucket, s3_server["opts"])
    with pytest.raises(OSError, match="could not be read"):
        # two row groups written, then the error: closing the file as usual would publish them
        write_parquet_atomic(fs, root, "x/entries.parquet", failing_stream(20_000), schema=L.ENTRIES_SCHEMA,
                             group_rows=10_000)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/x/entries.parquet")
    ok = write_parquet_atomic(fs, root, "x/entries.parquet", iter([L.ENTRIES_SCHEMA.empty_table()]),
                              schema=L.ENTRIES_SCHEMA)
    fs.invalidate_cache()
    assert fs.exists(ok)
