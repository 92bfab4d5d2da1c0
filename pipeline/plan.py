"""Plan a run: the source listing diffed against the dataset's key index -> work items.

A key's shard never changes once written: new keys go to new shards (at most
ceil(new / shard_size) of them), and an existing shard is only ever replaced as a whole by a
new one that supersedes it (its kept rows carried over), never renamed. What changed at the
source is handled per `mode`:

* `extend` (default, the safe one): add new sources; keep the rows of vanished ones; report
  changed ones without touching them;
* `sync`: also drop the rows of vanished sources and recompress changed ones. A change is
  detected from the listing (size, mtime / ETag) and confirmed with the content hash, so a
  touched-but-identical file is not recompressed.

A work item is a JSON-able dict a shard worker runs (workers.py); items the driver can settle
alone (a shard whose rows all vanished, new change tokens for identical files) come back as
ready commit records instead. A shard of new files does not carry its keys: it names row group
`row_group` of `Plan.new_files` (a local Parquet file, one row group per shard), so the plan of
a run of millions of new keys is a few hundred bytes a shard, not a Python list a key; the job
uploads that file beside its books and each worker reads its own row group (`slice_rows`).
Listing and key index are walked side by side in key order, so planning holds a few batches of
each, never either whole.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import keyorder
from . import layout as L
from .catalog import Catalog
from .sources import LISTING_SCHEMA

MODES = ("extend", "sync")


@dataclass
class Plan:
    work: list[dict] = field(default_factory=list)
    records: list[L.CommitRecord] = field(default_factory=list)  # settled by the driver alone
    found: dict = field(default_factory=dict)  # new / vanished / changed / unchanged / retried counts
    # new image files (NEW_FILE_COLUMNS, key order) in a local Parquet file, one row group per
    # shard: shard i of them is row group i; `close` removes it
    new_files: str | None = None
    shard_size: int = 256

    @property
    def n_images(self) -> int | None:
        """Images the work will encode, when known from the listing (file shards)."""
        n = 0
        for w in self.work:
            if w["kind"] != "files":
                return None
            n += len(w.get("encode") or []) + int(w.get("new_rows") or 0)
        return n

    def rows_of(self, item: dict) -> list[list]:
        """The [key, url, size, token] rows a work item encodes (its new-file row group included)."""
        rows = list(item.get("encode") or [])
        if item.get("new_rows"):
            rows += slice_rows(pq.ParquetFile(self.new_files).read_row_group(item["row_group"]))
        return rows

    def close(self) -> None:
        """Remove the local new-files file (once the job has uploaded it)."""
        if self.new_files:
            shutil.rmtree(os.path.dirname(self.new_files), ignore_errors=True)
            self.new_files = None


NEW_FILE_COLUMNS = ("key", "url", "size", "token")
NEW_FILES_SCHEMA = pa.schema([LISTING_SCHEMA.field(c) for c in NEW_FILE_COLUMNS])


def slice_rows(table: pa.Table) -> list[list]:
    """A new-files slice (LISTING_SCHEMA columns) as the [key, url, size, token] rows of `encode`."""
    return [list(r) for r in zip(*(table.column(c).to_pylist() for c in NEW_FILE_COLUMNS))]


def file_sha256(url: str, opts) -> str | None:
    """Hex sha256 of a source (None when it cannot be read)."""
    from .storage import get_fs

    try:
        fs, p = get_fs(url, opts)
        h = hashlib.sha256()
        with fs.open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except Exception:  # noqa: BLE001 - an unreadable source counts as changed
        return None


def listing_table(listing) -> pa.Table:
    """A listing as an Arrow table (LISTING_SCHEMA): given as one, or as (key, url, kind, size,
    token) tuples."""
    if isinstance(listing, pa.Table):
        return listing.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA)
    rows = list(listing)
    cols = list(zip(*rows)) if rows else [[] for _ in LISTING_SCHEMA]
    return pa.table([pa.array(list(c), f.type) for c, f in zip(cols, LISTING_SCHEMA)], schema=LISTING_SCHEMA)


def listing_stream(listing) -> Iterator[pa.Table]:
    """A listing as a stream of small tables in key order: a table or tuples (sorted here), or
    already such a stream (the `.sorted()` of `sources.list_entries_sorted`'s spill)."""
    if isinstance(listing, (pa.Table, list, tuple)):
        t = listing_table(listing).sort_by("key")
        return keyorder.slices(t)
    return (t.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA) for t in listing)


def _rows(table: pa.Table, cols: tuple[str, ...]) -> dict:
    """{first column: (other columns...)} of a (small) table."""
    vals = [table.column(c).to_pylist() for c in cols]
    return {v[0]: tuple(v[1:]) for v in zip(*vals)}


@dataclass
class _Diff:
    """What the listing-against-index diff keeps: Python objects only for keys with work on
    existing shards (changed, vanished, failed) and new containers; counts for the rest."""

    listed: dict = field(default_factory=dict)  # key -> (url, kind, size, token), keys with work on old shards
    idx: dict = field(default_factory=dict)  # key -> (shard, size, token, sha256, failed), same keys + vanished
    suspect: list = field(default_factory=list)
    vanished: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    new_containers: dict = field(default_factory=dict)
    n_listed: int = 0
    n_new: int = 0

    def add(self, lst: pa.Table, ents: pa.Table, retry_failed: bool, new_files: keyorder.RowGroupWriter) -> None:
        """Diff one key range: `lst` (the listing's rows in it) against `ents` (the index's)."""
        cols = ("entry", "shard", "size", "token", "sha256", "failed")
        n = lst.num_rows
        self.n_listed += n
        if ents.num_rows:
            gone = ents.filter(pc.invert(pc.is_in(ents.column("entry"), value_set=lst.column("key")))) if n else ents
            self.vanished += gone.column("entry").to_pylist()
            self.idx.update(_rows(gone, cols))
        if not n:
            return
        pos = pc.index_in(lst.column("key"), value_set=ents.column("entry")) if ents.num_rows else pa.nulls(n, pa.int32())
        known = pc.is_valid(pos)
        # the index's columns the diff needs, aligned with the listing (null for new keys)
        at = {c: (pc.take(ents.column(c), pos) if ents.num_rows else pa.nulls(n, ents.schema.field(c).type))
              for c in ("size", "token", "failed")}
        # suspect: the index has a token and the listing's token or (known) size differs from it
        tok_ne = pc.fill_null(pc.not_equal(at["token"], lst.column("token")), True)
        sz_ne = pc.and_(pc.is_valid(at["size"]), pc.fill_null(pc.not_equal(at["size"], lst.column("size")), True))
        differs = pc.and_(pc.is_valid(at["token"]), pc.or_(tok_ne, sz_ne))
        was_failed = pc.fill_null(pc.not_equal(at["failed"], 0), False)
        want = pc.or_(differs, was_failed) if retry_failed else differs
        if ents.num_rows:
            self.idx.update(_rows(ents.take(pos.filter(want)), cols))
        self.listed.update(_rows(lst.filter(want), tuple(LISTING_SCHEMA.names)))
        self.suspect += lst.filter(differs).column("key").to_pylist()
        if retry_failed:
            self.failed += lst.filter(was_failed).column("key").to_pylist()
        new_t = lst.filter(pc.invert(known))
        self.n_new += new_t.num_rows
        is_file = pc.equal(new_t.column("kind"), "files")
        new_files.write(new_t.filter(is_file).select(list(NEW_FILE_COLUMNS)))
        self.new_containers.update(_rows(new_t.filter(pc.invert(is_file)), tuple(LISTING_SCHEMA.names)))


def plan_compress(listing, cat: Catalog, shard_size: int, run_id: str, mode: str = "extend",
                  retry_failed: bool = False, max_shards: int | None = None,
                  hasher: Callable[[str], str | None] | None = None) -> Plan:
    """The work of one compress run. `listing` holds (key, url, kind, size, token) tuples, or is
    an Arrow table of those columns, or a stream of such tables in key order
    (`sources.list_entries_sorted`).

    The listing and the key index are both in key order, so the diff walks them side by side a
    key range at a time (`keyorder.aligned`): a hash lookup of the range's listed keys in its
    index rows, vectorised comparisons. Memory is a few batches of each, whatever the number of
    keys; Python objects are made only for keys that need work on existing shards (changed,
    vanished, failed); new files go to `Plan.new_files` (a local file) as they are found."""
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r} (choose {', '.join(MODES)})")
    shard_size = max(1, int(shard_size))
    plan = Plan(new_files=os.path.join(tempfile.mkdtemp(prefix="fcodec-plan-"), "new-files.parquet"),
                shard_size=shard_size)
    d = _Diff()
    writer = keyorder.RowGroupWriter(plan.new_files, NEW_FILES_SCHEMA, shard_size)
    try:
        for lst, ents in keyorder.aligned(listing_stream(listing), cat.index_stream(), "key", "entry",
                                          LISTING_SCHEMA, L.ENTRIES_SCHEMA):
            d.add(lst, ents, retry_failed, writer)
    except BaseException:
        writer.close()
        plan.close()
        raise
    writer.close()
    n_new_files = writer.num_rows
    listed, idx, suspect, vanished, failed = d.listed, d.idx, d.suspect, d.vanished, d.failed
    changed, same = [], []
    if mode == "sync":
        todo = [k for k in suspect if listed[k][1] == "files" and idx[k][3]]
        with ThreadPoolExecutor(16) as pool:
            hashes = dict(zip(todo, pool.map(lambda k: hasher(listed[k][0]) if hasher else None, todo)))
        for k in suspect:
            (same if k in hashes and hashes[k] == idx[k][3] else changed).append(k)
    n_listed, n_new = d.n_listed, d.n_new
    plan.found = {"listed": n_listed, "new": n_new, "vanished": len(vanished),
                  "changed": len(suspect) - len(same), "unchanged": n_listed - n_new - len(suspect) + len(same),
                  "retried": 0, "dropped": 0, "mode": mode}

    seq = iter(range(1 << 30))
    next_id = lambda: f"{run_id}-{next(seq):05d}"  # noqa: E731
    touched: dict[str, dict] = {}  # old shard -> {encode, drop, retoken}
    for k in (changed if mode == "sync" else []):
        touched.setdefault(idx[k][0], {"encode": set(), "drop": set(), "retoken": set()})["encode"].add(k)
    for k in (vanished if mode == "sync" else []):
        touched.setdefault(idx[k][0], {"encode": set(), "drop": set(), "retoken": set()})["drop"].add(k)
    for k in failed:
        touched.setdefault(idx[k][0], {"encode": set(), "drop": set(), "retoken": set()})["encode"].add(k)
    for k in same:
        touched.setdefault(idx[k][0], {"encode": set(), "drop": set(), "retoken": set()})["retoken"].add(k)

    by_shard: dict[str, list[dict]] = {}
    if touched:
        for r in cat.rows_of_shards(touched).to_pylist():
            by_shard.setdefault(r.pop("shard"), []).append(r)
    for sid, t in sorted(touched.items()):
        old = cat.shards.get(sid)
        if old is None:
            continue
        plan.found["retried"] += len([k for k in t["encode"] if k in failed])
        plan.found["dropped"] += len(t["drop"])
        if not t["encode"] and not t["drop"]:  # identical content, new tokens: re-commit with them
            rec = L.CommitRecord.from_dict({**old.to_dict(), "entries": [
                {**e, "token": listed[e["entry"]][3] if e["entry"] in t["retoken"] else e["token"]} for e in by_shard[sid]]})
            plan.records.append(rec)
            continue
        new_id = next_id()
        if old.kind == "files":
            encode = sorted(t["encode"])
            keep = [e for e in by_shard[sid] if e["entry"] not in t["drop"] and e["entry"] not in t["encode"]]
            for e in keep:
                if e["entry"] in t["retoken"]:
                    e["token"] = listed[e["entry"]][3]
            if not encode and not keep:
                plan.records.append(L.CommitRecord(shard=new_id, file=None, kind="files", supersedes=[sid], run_id=run_id))
                continue
            plan.work.append({"shard": new_id, "kind": "files", "supersedes": [sid],
                              "encode": [[k, *listed[k][:1], listed[k][2], listed[k][3]] for k in encode],
                              "carry": {"file": old.file, "drop_keys": sorted(t["drop"] | t["encode"])} if keep else None,
                              "carry_entries": keep, "carry_input_bytes": sum(e["size"] or 0 for e in keep)})
        else:  # a container shard: one entry
            (entry,) = [e["entry"] for e in by_shard[sid]] or [None]
            if entry in t["drop"]:
                plan.records.append(L.CommitRecord(shard=new_id, file=None, kind=old.kind, supersedes=[sid], run_id=run_id))
            elif entry in t["encode"] and entry not in failed:  # changed: the whole container again
                plan.work.append({"shard": new_id, "kind": old.kind, "supersedes": [sid],
                                  "container": [entry, *listed[entry][:1], listed[entry][2], listed[entry][3]]})
            else:  # retry the failed members, carry the rest
                bad = sorted(f["key"] for f in old.failures)
                plan.work.append({"shard": new_id, "kind": old.kind, "supersedes": [sid], "only_keys": bad,
                                  "container": [entry, *listed[entry][:1], listed[entry][2], listed[entry][3]],
                                  "carry": {"file": old.file, "drop_keys": bad}})

    for g, i in enumerate(range(0, n_new_files, shard_size)):
        plan.work.append({"shard": next_id(), "kind": "files", "row_group": g,
                          "new_rows": min(shard_size, n_new_files - i)})
    for k, (url, kind, size, token) in d.new_containers.items():
        plan.work.append({"shard": next_id(), "kind": kind, "container": [k, url, size, token]})
    plan.found["planned_shards"] = len(plan.work)
    if max_shards is not None:
        plan.work = plan.work[: max(0, max_shards)]
    return plan


def plan_decompress(source: Catalog, done: Catalog, src_root_url: Callable[[str], str],
                    retry_failed: bool = False, max_shards: int | None = None) -> Plan:
    """The work of one decompress run: every live source shard not yet decoded (and, with
    `retry_failed`, the failed rows of decoded ones)."""
    plan = Plan()
    for sid, rec in sorted(source.shards.items()):
        if not rec.file:
            continue
        item = {"shard": sid, "kind": "decode", "url": src_root_url(rec.file), "source_file": rec.file}
        prev = done.shards.get(sid)
        if prev is not None:
            bad = [f["key"] for f in prev.failures]
            if not (retry_failed and bad):
                continue
            item["only_keys"] = bad
            item["retry_of"] = sid
        plan.work.append(item)
    stale = sorted(set(done.shards) - set(source.shards))
    plan.found = {"source_shards": len(source.shards), "decoded": len(done.shards) - len(stale),
                  "stale": len(stale), "todo": len(plan.work)}
    if max_shards is not None:
        plan.work = plan.work[: max(0, max_shards)]
    return plan
