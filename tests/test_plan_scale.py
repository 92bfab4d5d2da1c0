"""Bounded bookkeeping: a compress run's books at 10M keys (no images), under a stated memory
bound, measured as the peak RSS of a fresh subprocess.

The synthetic dataset: real books in a folder (the compacted catalog: a key index of N entries
in 256-key shards, ENTRIES_SCHEMA with sha256 and change tokens, sorted by key as compaction
writes it; N/256 shard records) and a listing of the same N keys in shuffled order, as a walk of
the store yields it, with 0.1% changed, 0.1% vanished and 0.1% new keys. Measured: the books
read (`Books.read`), the listing spilled to sorted runs (`keyorder.Spill`, as
`sources.list_entries_sorted` does), `plan_compress` in the default `extend` mode, the planned
shards' commit records folded, and the compaction that writes the new index. The bound: all of
that adds at most RUN_BOUND_MB to a fresh interpreter (a planner that held the listing and the
index as Arrow tables took ~1.0 GB beyond their 2.6 GB; one of Python objects ~10 GB).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_BOUND_MB = 400  # books read + listing + plan + fold + compaction, beyond a fresh interpreter, at 10M keys


def synthetic(n: int, seed: int = 0):
    """(catalog, listing table) for N keys; built with vectorised Arrow/numpy (no per-key objects)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline import layout as L
    from pipeline.sources import LISTING_SCHEMA

    rng = np.random.default_rng(seed)
    i = pa.array(np.arange(n, dtype=np.int64))
    pad = lambda a, w: pc.utf8_lpad(pc.cast(a, pa.string()), w, "0")  # noqa: E731
    keys = pc.binary_join_element_wise("d", pad(pc.divide(i, 1000), 5), "/img", pad(i, 8), ".png", "")
    shard_no = pc.divide(i, 256)
    shards = pc.binary_join_element_wise("20261201T000000-abcd-", pad(shard_no, 5), "")
    sizes = pa.array(rng.integers(100, 200_000, n))
    tokens = pc.binary_join_element_wise(pc.cast(sizes, pa.string()), "@1764547200.", pad(i, 6), "")
    hexd = np.frombuffer(b"0123456789abcdef", np.uint8)[rng.integers(0, 16, (n, 64), dtype=np.uint8)]
    sha = pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 64 * (n + 1), 64, dtype=np.int32)),
                                      pa.py_buffer(hexd.reshape(-1)))
    del hexd
    failed = pa.array(np.zeros(n, np.int32))
    entries = pa.table([keys, shards, sizes, tokens, sha, failed], schema=L.ENTRIES_SCHEMA)
    # the listing: every key but 0.1% vanished, 0.1% with a new token (changed), 0.1% new keys
    r = rng.random(n)
    keep = pa.array(r >= 0.001)
    tok = pc.if_else(pa.array((r >= 0.001) & (r < 0.002)), pc.binary_join_element_wise(tokens, "x", ""), tokens)
    m = max(1, n // 1000)
    j = pa.array(np.arange(n, n + m, dtype=np.int64))
    new_keys = pc.binary_join_element_wise("d", pad(pc.divide(j, 1000), 5), "/img", pad(j, 8), ".png", "")
    lst = pa.table([keys, pc.binary_join_element_wise("/data/src/", keys, ""), pa.array(["files"] * n),
                    sizes, tok], schema=LISTING_SCHEMA).filter(keep)
    new = pa.table([new_keys, pc.binary_join_element_wise("/data/src/", new_keys, ""), pa.array(["files"] * m),
                    pa.array(np.full(m, 1000, np.int64)), pa.array(["1000@1"] * m)], schema=LISTING_SCHEMA)
    return entries, pa.concat_tables([lst, new]).combine_chunks()


def make(folder: str, n: int) -> None:
    """Write the synthetic dataset's books (compacted catalog, sorted index) and its listing
    (shuffled) as Parquet."""
    import json as _json
    import os as _os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import layout as L
    from pipeline.catalog import INDEX_GROUP_ROWS, SHARDS_SCHEMA

    entries, lst = synthetic(n)
    ds = f"{folder}/ds"
    _os.makedirs(f"{ds}/{L.COMMITS}", exist_ok=True)
    _os.makedirs(f"{ds}/{L.CATALOG_ENTRIES}".rsplit("/", 1)[0], exist_ok=True)
    pq.write_table(entries, f"{ds}/{L.CATALOG_ENTRIES}", row_group_size=INDEX_GROUP_ROWS)  # as compaction writes
    sids = [f"20261201T000000-abcd-{s:05d}" for s in range((n + 255) // 256)]
    recs = [_json.dumps(L.CommitRecord(shard=sid, file=L.part_name(sid), rows=min(256, n - 256 * i),
                                       ok=min(256, n - 256 * i), committed_at="2026-12-01T00:00:00").to_dict(),
                        sort_keys=True) for i, sid in enumerate(sids)]
    pq.write_table(pa.table({"shard": sids, "record": recs}, schema=SHARDS_SCHEMA), f"{ds}/{L.CATALOG_SHARDS}")
    order = np.random.default_rng(1).permutation(lst.num_rows)  # the walk's order, not the keys'
    pq.write_table(lst.take(pa.array(order)), f"{folder}/listing.parquet", row_group_size=1 << 16)


def reset_peak() -> None:
    """Reset this process's peak RSS (Linux: VmHWM), so the peak measured after is the planner's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since `reset_peak`) of this process, in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(folder: str, n: int, mode: str = "extend") -> dict:
    """Read the books, spill the listing, plan, fold, compact; RSS before and peak after (this
    process)."""
    import gc
    import resource
    import time

    import pyarrow.parquet as pq

    from pipeline import keyorder
    from pipeline import layout as L
    from pipeline.catalog import Books, fold
    from pipeline.plan import plan_compress
    from pipeline.sources import LISTING_SCHEMA
    from pipeline.storage import get_fs

    gc.collect()
    reset_peak()
    base_mb = rss_mb("VmRSS")
    t0 = time.perf_counter()
    fs, root = get_fs(f"{folder}/ds")
    books = Books(fs, root)
    cat = books.read()
    read_mb = rss_mb("VmHWM")
    listing = keyorder.Spill(LISTING_SCHEMA, "key")
    for page in keyorder.parquet_stream(f"{folder}/listing.parquet", rows=8192):  # pages of a walk
        listing.add(page)
    n_listed = listing.num_rows
    list_mb = rss_mb("VmHWM")
    plan = plan_compress(listing.sorted(), cat, 256, "20261202T000000-beef", mode=mode, hasher=lambda url: None)
    listing.close()
    t_plan = time.perf_counter() - t0
    plan_rss_mb = rss_mb("VmHWM")
    for w in plan.work:  # what the workers would return for the planned shards, committed one at a time
        ents = [L.Entry(k, size, tok, "0" * 64, 0) for k, _u, size, tok in plan.rows_of(w)]
        ents += [L.Entry(**e) for e in w.get("carry_entries") or []]
        fold(cat, [L.CommitRecord(shard=w["shard"], file=L.part_name(w["shard"]), rows=len(ents), ok=len(ents),
                                  entries=ents, supersedes=w.get("supersedes") or [], committed_at="2026-12-02T00:00:00")])
    for r in plan.records:
        fold(cat, [r])
    new_items = [len(json.dumps(w)) for w in plan.work if not w.get("supersedes")]
    plan.close()
    books.compact(cat)
    t_all = time.perf_counter() - t0
    index_rows_after = pq.ParquetFile(books.path(L.CATALOG_ENTRIES)).metadata.num_rows
    return {"keys": n, "mode": mode, "listed": n_listed, "found": plan.found, "work": len(plan.work),
            "max_new_item_bytes": max(new_items, default=0),
            "index_rows_after": index_rows_after, "shards_after": len(cat.shards),
            "base_rss_mb": base_mb, "after_read_rss_mb": read_mb, "after_listing_rss_mb": list_mb,
            "after_plan_rss_mb": plan_rss_mb, "peak_rss_mb": rss_mb("VmHWM"),
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "plan_s": t_plan, "plan_fold_compact_s": t_all}


def run_measure(folder, n: int, mode: str = "extend") -> dict:
    """make + measure, each in a fresh subprocess (the measured one never held the generator's memory)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = None
    for step in (["make", str(folder), str(n)], ["measure", str(folder), str(n), mode]):
        p = subprocess.run([sys.executable, __file__, *step], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out = p.stdout
    return json.loads(out.strip().splitlines()[-1])


def check(res: dict, n: int) -> None:
    f = res["found"]
    m = max(1, n // 1000)
    assert f["new"] == m and res["listed"] == n - f["vanished"] + m
    assert 0 < f["vanished"] < 2 * m and 0 < f["changed"] < 2 * m  # ~0.1% each
    assert f["unchanged"] == res["listed"] - f["new"] - f["changed"]
    # a shard of 256 new keys names a row group of the plan's new-files table, not its keys (~25 KB)
    assert 0 < res["max_new_item_bytes"] < 200
    if res["mode"] == "sync":  # every listed key is in the index once afterwards; vanished ones are gone
        assert res["index_rows_after"] == res["listed"]
    else:  # extend: the new keys added in new shards; changed and vanished ones kept as they were
        assert res["index_rows_after"] == n + m and res["work"] == -(-m // 256)


@pytest.mark.parametrize("mode", ["extend", "sync"])
def test_plan_and_fold_small_matches_counts(tmp_path, mode):
    check(run_measure(tmp_path, 20_000, mode), 20_000)


@pytest.mark.slow
def test_plan_and_fold_10m_keys_memory_bound(tmp_path):
    n = 10_000_000
    res = run_measure(tmp_path, n)
    check(res, n)
    extra = res["peak_rss_mb"] - res["base_rss_mb"]
    print(json.dumps(res))
    assert extra < RUN_BOUND_MB, f"the run's books took {extra:.0f} MB at 10M keys ({json.dumps(res)})"


if __name__ == "__main__":  # the subprocesses run_measure starts
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), *sys.argv[4:])))
