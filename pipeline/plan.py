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
`row_group` of `Plan.new_files` (an Arrow table, one row group per shard once written), so the
plan of a run of millions of new keys is a few hundred bytes a shard, not a Python list a key;
the job writes that table beside its books and each worker reads its own row group
(`slice_rows`).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import layout as L
from .catalog import Catalog
from .sources import LISTING_SCHEMA

MODES = ("extend", "sync")


@dataclass
class Plan:
    work: list[dict] = field(default_factory=list)
    records: list[L.CommitRecord] = field(default_factory=list)  # settled by the driver alone
    found: dict = field(default_factory=dict)  # new / vanished / changed / unchanged / retried counts
    # new image files (LISTING_SCHEMA, key order); shard i of them is rows [i * shard_size, ...)
    new_files: pa.Table | None = None
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
        """The [key, url, size, token] rows a work item encodes (its new-file slice included)."""
        rows = list(item.get("encode") or [])
        if item.get("new_rows"):
            rows += slice_rows(self.new_files.slice(item["row_group"] * self.shard_size, item["new_rows"]))
        return rows


NEW_FILE_COLUMNS = ("key", "url", "size", "token")


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


def _rows(table: pa.Table, cols: tuple[str, ...]) -> dict:
    """{first column: (other columns...)} of a (small) table."""
    vals = [table.column(c).to_pylist() for c in cols]
    return {v[0]: tuple(v[1:]) for v in zip(*vals)}


def plan_compress(listing: list[tuple] | pa.Table, cat: Catalog, shard_size: int, run_id: str, mode: str = "extend",
                  retry_failed: bool = False, max_shards: int | None = None,
                  hasher: Callable[[str], str | None] | None = None) -> Plan:
    """The work of one compress run. `listing` holds (key, url, kind, size, token) tuples, or is
    an Arrow table of those columns (`sources.list_entries_table`).

    The diff of the listing against the key index runs on Arrow columns (one hash lookup of
    the listed keys in the index, vectorised comparisons), so its memory is a few bytes per
    key beyond the two tables; Python objects are made only for keys that need work on
    existing shards (changed, vanished, failed); new files stay in `Plan.new_files`."""
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r} (choose {', '.join(MODES)})")
    shard_size = max(1, int(shard_size))
    lst = listing_table(listing)
    ents = cat.entries
    n_listed = lst.num_rows
    pos = pc.index_in(lst.column("key"), value_set=ents.column("entry")) if ents.num_rows else \
        pa.nulls(n_listed, pa.int32())
    known = pc.is_valid(pos)
    seen = np.zeros(ents.num_rows, dtype=bool)
    seen[pos.filter(known).to_numpy(zero_copy_only=False)] = True
    # the index's columns the diff needs, aligned with the listing (null for new keys): no copy
    # of whole tables, a few bytes a key
    at = {c: (pc.take(ents.column(c), pos) if ents.num_rows else pa.nulls(n_listed, ents.schema.field(c).type))
          for c in ("size", "token", "failed")}
    # suspect: the index has a token and the listing's token or (known) size differs from it
    tok_ne = pc.fill_null(pc.not_equal(at["token"], lst.column("token")), True)
    sz_ne = pc.and_(pc.is_valid(at["size"]), pc.fill_null(pc.not_equal(at["size"], lst.column("size")), True))
    differs = pc.and_(pc.is_valid(at["token"]), pc.or_(tok_ne, sz_ne))
    was_failed = pc.fill_null(pc.not_equal(at["failed"], 0), False)
    want = pc.or_(differs, was_failed) if retry_failed else differs
    del at, tok_ne, sz_ne
    # only these keys become Python objects
    cols = ("entry", "shard", "size", "token", "sha256", "failed")
    idx = _rows(ents.take(pos.filter(want)), cols) if ents.num_rows else {}
    gone_rows = ents.filter(pa.array(~seen)) if ents.num_rows else ents
    vanished = gone_rows.column("entry").to_pylist()
    idx.update(_rows(gone_rows, cols))
    new_t = lst.filter(pc.invert(known))
    listed = _rows(lst.filter(want), tuple(LISTING_SCHEMA.names))  # only keys with work on old shards
    is_file = pc.equal(new_t.column("kind"), "files")
    new_files = new_t.filter(is_file).select(list(NEW_FILE_COLUMNS))
    new_containers = _rows(new_t.filter(pc.invert(is_file)), tuple(LISTING_SCHEMA.names))
    suspect = lst.filter(differs).column("key").to_pylist()
    plan = Plan(new_files=new_files, shard_size=shard_size)
    changed, same = [], []
    if mode == "sync":
        todo = [k for k in suspect if listed[k][1] == "files" and idx[k][3]]
        with ThreadPoolExecutor(16) as pool:
            hashes = dict(zip(todo, pool.map(lambda k: hasher(listed[k][0]) if hasher else None, todo)))
        for k in suspect:
            (same if k in hashes and hashes[k] == idx[k][3] else changed).append(k)
    failed = lst.filter(was_failed).column("key").to_pylist() if retry_failed else []
    n_new = new_t.num_rows
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
        rows = ents.filter(pc.is_in(ents.column("shard"), value_set=pa.array(sorted(touched), pa.string())))
        for r in rows.to_pylist():
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

    for g, i in enumerate(range(0, new_files.num_rows, shard_size)):
        plan.work.append({"shard": next_id(), "kind": "files", "row_group": g,
                          "new_rows": min(shard_size, new_files.num_rows - i)})
    for k, (url, kind, size, token) in new_containers.items():
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
