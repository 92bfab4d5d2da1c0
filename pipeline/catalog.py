"""A dataset's books: read them (either layout), commit a shard, fold and compact the commit log,
reconcile what a killed run left behind, write the manifest.

State = the compacted catalog (two Parquet files) + the loose commit records written since,
folded in commit order. Folding is idempotent (keyed by shard id), so a crash anywhere during
compaction leaves books that fold to the same state. Reads are few and concurrent (`fs.cat`
over every loose record at once), so starting a run costs a handful of round trips.
"""
from __future__ import annotations

import json
import logging
import posixpath
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import keyorder
from . import layout as L
from .storage import join, read_bytes, write_atomic, write_parquet_atomic

log = logging.getLogger("fcodec")

SHARDS_SCHEMA = pa.schema([("shard", pa.string()), ("record", pa.string())])


SPILL_ROWS = 1 << 14  # folded index rows kept in memory before they go to a sorted run on local disk
SPILL_FAN_IN = 32  # spilled runs merged into one once this many of a size are there
# The compacted index file's row groups: what a reader holds of it at a time (the planner, the
# next compaction), and what compaction buffers before a group is encoded. 64k-row groups cost
# a 200k-key run's driver ~25 MB at compaction (docs/performance.md); 8k keep the footer small
# (~1.2k groups at 10M keys).
INDEX_GROUP_ROWS = keyorder.READ_ROWS


@dataclass
class IndexPart:
    """One sorted source of key-index rows: the books' compacted file, a table in memory, or a
    run of folded rows this process spilled to local disk. `dead`: shards whose rows here were
    superseded or dropped since (filtered out when streamed)."""

    stream: Callable[[], Iterator[pa.Table]]
    table: pa.Table | None = None  # set when the part is a table in memory
    dead: set = field(default_factory=set)

    @classmethod
    def of_table(cls, table: pa.Table) -> "IndexPart":
        t = table.cast(L.ENTRIES_SCHEMA).sort_by("entry")
        return cls(stream=lambda: keyorder.slices(t), table=t)


def _live_rows(stream: Iterator[pa.Table], live: set, dead: set) -> Iterator[pa.Table]:
    """The rows of a part whose shard is live and not superseded since the part was written.
    (Checked on each batch's few distinct shards: a hash of every live shard id per batch cost
    more than reading the index.)"""
    for t in stream:
        bad = [s for s in pc.unique(t.column("shard")).to_pylist() if s not in live or s in dead]
        if bad:
            t = t.filter(pc.invert(pc.is_in(t.column("shard"), value_set=pa.array(bad, pa.string()))))
        if t.num_rows:
            yield t


@dataclass
class Catalog:
    """The live state of a dataset: its shards (commit records) and the key index."""

    layout: int
    shards: dict[str, L.CommitRecord] = field(default_factory=dict)
    loose: list[str] = field(default_factory=list)  # loose record paths folded in (compaction removes them)
    manifest: L.Manifest | None = None
    # The key index is never held whole by a run: sorted parts (the compacted file, streamed from
    # the store; the folded rows spilled to sorted runs on local disk, merged with bounded fan-in
    # by a keyorder.Spill) plus the rows folded since, per shard. `index_stream` merges them in
    # key order a batch at a time; `entries` is the whole index in memory, for small datasets and tests.
    parts: list[IndexPart] = field(default_factory=list, repr=False)
    add: dict = field(default_factory=dict, repr=False)
    add_rows: int = field(default=0, repr=False)
    folded: keyorder.Spill | None = field(default=None, repr=False)

    def index_stream(self) -> Iterator[pa.Table]:
        """The key index (ENTRIES_SCHEMA, live shards only) in key order, a small table at a time."""
        live = set(self.shards)
        streams = [_live_rows(p.stream(), live, p.dead) for p in self.parts]
        if self.add:
            streams.append(keyorder.slices(pa.concat_tables(list(self.add.values())).sort_by("entry")))
        return keyorder.merge(streams, "entry")

    @property
    def entries(self) -> pa.Table:
        """The key index as one table in memory (small datasets, tests, repairs)."""
        if not (len(self.parts) == 1 and self.parts[0].table is not None and not self.parts[0].dead and not self.add):
            self.entries = pa.concat_tables([L.ENTRIES_SCHEMA.empty_table(), *self.index_stream()])
        return self.parts[0].table

    @entries.setter
    def entries(self, table: pa.Table) -> None:
        self.release_spills()
        self.parts, self.add, self.add_rows = [IndexPart.of_table(table)], {}, 0

    def rows_of_shards(self, shards) -> pa.Table:
        """The index rows of some shards (streamed: the whole index is never held)."""
        want = pa.array(sorted(shards), pa.string())
        got = [t.filter(pc.is_in(t.column("shard"), value_set=want)) for t in self.index_stream()]
        return pa.concat_tables([L.ENTRIES_SCHEMA.empty_table(), *got])

    def spill(self) -> None:
        """Move the folded rows to a sorted run on local disk (memory stays flat over a long run).
        All spilled rows are one part (its runs merged SPILL_FAN_IN at a time as they accumulate), so the
        merge at compaction has a bounded number of inputs however long the run."""
        if not self.add:
            return
        if self.folded is None:
            self.folded = sp = keyorder.Spill(L.ENTRIES_SCHEMA, "entry", run_rows=1, fan_in=SPILL_FAN_IN)  # a spill = a run
            weakref.finalize(self, sp.close)
            self.parts.append(IndexPart(stream=sp.sorted))
        self.folded.add(pa.concat_tables(list(self.add.values())))
        self.add, self.add_rows = {}, 0

    def release_spills(self) -> None:
        """Remove the spilled runs (after compaction wrote them into the books' file)."""
        if self.folded is not None:
            self.folded.close()
            self.folded = None

    def totals(self) -> dict:
        """Dataset totals over the live shards."""
        tot = {k: sum(getattr(s, k) for s in self.shards.values())
               for k in ("rows", "ok", "failed", "skipped", "input_bytes", "output_bytes", "pixels")}
        tot["shards"] = len(self.shards)
        tot["mean_bpp"] = sum(s.bpp_sum for s in self.shards.values()) / tot["ok"] if tot["ok"] else None
        tot["ratio"] = tot["input_bytes"] / tot["output_bytes"] if tot["output_bytes"] else None
        errors: dict[str, int] = {}
        for s in self.shards.values():
            for k, v in s.errors.items():
                errors[k] = errors.get(k, 0) + v
        tot["errors"] = dict(sorted(errors.items()))
        return tot

    def entry_shards(self) -> dict[str, str]:
        """entry -> shard (small datasets, tests)."""
        return dict(zip(self.entries.column("entry").to_pylist(), self.entries.column("shard").to_pylist()))


class Books:
    """The bookkeeping files of one dataset root on one filesystem."""

    def __init__(self, fs, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")

    def path(self, rel: str) -> str:
        return join(self.root, rel)

    def _refresh(self) -> None:
        try:
            self.fs.invalidate_cache()
        except Exception:  # noqa: BLE001 - not every filesystem caches listings
            pass

    def _ls(self, rel: str) -> list[str]:
        p = self.path(rel)
        try:
            return sorted(x for x in self.fs.ls(p, detail=False) if x.rstrip("/") != p)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _cat(self, paths: list[str]) -> dict[str, bytes]:
        """Many small objects in one concurrent call (s3fs fetches them in parallel)."""
        if not paths:
            return {}
        got = self.fs.cat(paths, on_error="return")
        out = {}
        for p, v in got.items():
            if isinstance(v, BaseException):
                raise OSError(f"could not read {p}: {type(v).__name__}: {v}")
            out[p] = v
        return out

    # ------------------------------------------------------------------ reading
    def layout(self) -> int | None:
        """2, 1 (release 0.1.0 books), or None when no dataset is here yet."""
        self._refresh()
        if self.fs.exists(self.path(L.MANIFEST)) or self.fs.exists(self.path(L.COMMITS)):
            return 2
        if self.fs.exists(self.path(L.V1_MANIFEST)) or self.fs.exists(self.path(L.V1_COMMITS)):
            return 1
        return None

    def read_manifest(self) -> L.Manifest | None:
        for rel in (L.MANIFEST, L.V1_MANIFEST):
            p = self.path(rel)
            if self.fs.exists(p):
                return L.Manifest.from_dict(L.loads_json(read_bytes(self.fs, p), p), p)
        return None

    def read(self) -> Catalog:
        """The dataset's live state (an empty catalog when nothing is here yet)."""
        lay = self.layout()
        cat = Catalog(layout=lay or L.LAYOUT_VERSION)
        if lay is None:
            return cat
        cat.manifest = self.read_manifest()
        if lay == 1:
            return self._read_v1(cat)
        sp, ep = self.path(L.CATALOG_SHARDS), self.path(L.CATALOG_ENTRIES)
        if self.fs.exists(sp):
            t = self._read_parquet(sp)
            for sid, rec in zip(t.column("shard").to_pylist(), t.column("record").to_pylist()):
                cat.shards[sid] = L.CommitRecord.from_dict(L.loads_json(rec.encode(), sp), f"{sp}: shard {sid}")
        if self.fs.exists(ep):
            # streamed when read, never loaded whole; keys of shards no longer live (a compaction
            # stopped between its two files) are stale and left out then
            cat.parts = [self._index_part(ep)]
        loose = [p for p in self._ls(L.COMMITS) if p.endswith(".json") and not posixpath.basename(p).startswith(".")]
        recs = [L.CommitRecord.from_dict(L.loads_json(b, p), p) for p, b in self._cat(loose).items()]
        fold(cat, recs)
        cat.loose = loose
        return cat

    def _index_part(self, p: str) -> IndexPart:
        """The compacted key index as a part streamed from the store. Compaction writes it sorted
        by key; a file whose row groups are not in key order (by their statistics) is read whole
        and sorted instead."""
        with self.fs.open(p, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        col = meta.schema.names.index("entry") if "entry" in meta.schema.names else None
        stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)] if col is not None else []
        bounds = [(s.min, s.max) for s in stats if s is not None and s.has_min_max]
        if len(bounds) != meta.num_row_groups or any(a[1] > b[0] for a, b in zip(bounds, bounds[1:])):
            log.warning("%s is not in key order: read whole and sorted", p)
            return IndexPart.of_table(self._read_parquet(p))
        return self._streamed_part(p)

    def _streamed_part(self, p: str) -> IndexPart:
        """A key-index file known to be in key order, as a part read a row group at a time."""
        def stream() -> Iterator[pa.Table]:
            with self.fs.open(p, "rb") as f:
                yield from keyorder.parquet_stream(f, L.ENTRIES_SCHEMA)

        return IndexPart(stream=stream)

    def _read_parquet(self, p: str) -> pa.Table:
        with self.fs.open(p, "rb") as f:
            return pq.read_table(f)

    def _read_v1(self, cat: Catalog) -> Catalog:
        paths = [p for p in self._ls(L.V1_COMMITS) if p.endswith(".json") and not posixpath.basename(p).startswith(".")]
        rows = []
        for p, b in sorted(self._cat(paths).items()):
            sid = posixpath.basename(p)[: -len(".json")]
            rec = L.CommitRecord.from_v1(sid, L.loads_json(b, p), p)
            cat.shards[sid] = rec
            rows.extend({"entry": e.entry, "shard": sid, "size": None, "token": None, "sha256": None, "failed": 0}
                        for e in rec.entries)
        if cat.manifest is None or cat.manifest.kind == L.BITSTREAM_KIND:
            rows = self._v1_file_entries(cat, rows)
        cat.entries = pa.Table.from_pylist(rows, schema=L.ENTRIES_SCHEMA)
        return cat

    def _v1_file_entries(self, cat: Catalog, rows: list[dict]) -> list[dict]:
        """Layout 1 kept file shards' keys only in the parts: read their key columns."""
        for sid, rec in cat.shards.items():
            if rec.kind != "files" or not rec.file:
                continue
            t = self.read_columns(self.path(rec.file), ["key", "source_sha256", "status"])
            for k, sha, st in zip(*(t.column(c).to_pylist() for c in ("key", "source_sha256", "status"))):
                rows.append({"entry": k, "shard": sid, "size": None, "token": None, "sha256": sha,
                             "failed": int(st != "ok")})
        return rows

    def read_columns(self, p: str, cols: list[str] | None = None) -> pa.Table:
        """A part's columns (all when cols is None)."""
        with self.fs.open(p, "rb") as f:
            return pq.read_table(f, columns=cols)

    # ------------------------------------------------------------------ writing
    def commit(self, rec: L.CommitRecord) -> None:
        """Persist one shard's commit record (the shard counts from now on)."""
        # compact JSON: a machine file, written once per shard by the driver (indenting doubled its cost)
        data = (json.dumps(rec.to_dict(), separators=(",", ":"), default=str) + "\n").encode()
        write_atomic(self.fs, self.path(f"{L.COMMITS}/{rec.shard}.json"), data)

    def write_manifest(self, m: L.Manifest) -> None:
        write_atomic(self.fs, self.path(L.MANIFEST), L.dumps_json(m.to_dict()))

    def compact(self, cat: Catalog) -> None:
        """Fold the loose records into the catalog files, then remove them (crash-safe: folding
        the same records twice gives the same state)."""
        shards = pa.table({"shard": list(cat.shards),
                           "record": [json.dumps({**r.to_dict(), "entries": []}, sort_keys=True) for r in cat.shards.values()]},
                          schema=SHARDS_SCHEMA)
        write_parquet_atomic(self.fs, self.root, L.CATALOG_SHARDS, shards, tmp_dir=L.TMP)
        # the index is merged from its sorted parts straight into the new file, a batch at a time
        write_parquet_atomic(self.fs, self.root, L.CATALOG_ENTRIES, cat.index_stream(), tmp_dir=L.TMP,
                             schema=L.ENTRIES_SCHEMA, group_rows=INDEX_GROUP_ROWS)
        cat.release_spills()
        # written in key order just now: no need to read its footer back to check
        cat.parts, cat.add, cat.add_rows = [self._streamed_part(self.path(L.CATALOG_ENTRIES))], {}, 0
        self.remove(cat.loose)
        cat.loose = []

    def remove(self, paths: list[str]) -> None:
        if paths:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                for p in paths:
                    if self.fs.exists(p):
                        self.fs.rm(p)

    def migrate_v1(self, cat: Catalog) -> None:
        """Move layout-1 books to layout 2 (catalog files first, the old markers last)."""
        self.compact(cat)
        if cat.manifest is not None:
            cat.manifest.layout = L.LAYOUT_VERSION
            self.write_manifest(cat.manifest)
        self.remove([p for p in self._ls(L.V1_COMMITS)] + [self.path(L.V1_MANIFEST)] * self.fs.exists(self.path(L.V1_MANIFEST)))
        cat.layout = L.LAYOUT_VERSION
        log.info("moved the books of %s to layout %d", self.root, L.LAYOUT_VERSION)

    def clean_tmp(self) -> int:
        """Remove temp files of any kind a killed run left: the tmp folders and hidden
        `.name.<id>.part` files beside the books. Returns how many were removed."""
        n = 0
        for rel in (L.TMP, L.V1_TMP):
            p = self.path(rel)
            if self.fs.exists(p):
                n += len(self.fs.find(p))
                self.fs.rm(p, recursive=True)
        for rel in (L.META, L.COMMITS, L.V1_COMMITS, ""):
            for p in self._ls(rel):
                if posixpath.basename(p).startswith(".") and p.endswith(".part"):
                    self.fs.rm(p)
                    n += 1
        return n

    def part_files(self) -> list[str]:
        """Names of the part files present under the root."""
        return sorted(posixpath.basename(p) for p in self._ls("") if L.shard_of_part(p))


def fold(cat: Catalog, recs: list[L.CommitRecord]) -> None:
    """Apply commit records, oldest first, to `cat` (idempotent)."""
    if not recs:
        return
    recs = sorted(recs, key=lambda r: (r.committed_at or "", r.shard))
    for r in recs:
        for s in [*r.supersedes, r.shard]:
            gone = cat.add.pop(s, None)  # rows folded earlier, still in memory
            cat.add_rows -= gone.num_rows if gone is not None else 0
            # rows in the sorted parts: left out when streamed; only a shard live before has any
            if cat.shards.pop(s, None) is not None:
                for p in cat.parts:
                    p.dead.add(s)
        if r.file or r.rows:  # a record without rows only drops the shards it supersedes
            e = r.entries
            cat.shards[r.shard] = replace(r, entries=[])  # its entries live in the key index only
            cat.add[r.shard] = pa.table([[x.entry for x in e], [r.shard] * len(e), [x.size for x in e],
                                         [x.token for x in e], [x.sha256 for x in e], [x.failed for x in e]],
                                        schema=L.ENTRIES_SCHEMA)
            cat.add_rows += len(e)
    if cat.add_rows >= SPILL_ROWS:
        cat.spill()


def dataset_codec(m: L.Manifest | None, given, where: str):
    """The `CodecSpec` to run on a dataset with: the one its manifest names, with the options a
    user `given` (a CodecSpec; defaults count as not given). A given option that contradicts the
    dataset is an error naming both, before any row is attempted. A backbone that was a local
    folder may be given at another path (it moved); the workers check its fingerprint.
    Layout-1 manifests named built-in aliases (`nano`): resolved by the recorded fingerprint."""
    from codec.spec import CodecSpec

    if m is None or not m.codec:
        return given.pinned()
    from codec.registry import backbone_for_fingerprint, lookup

    codec = dict(m.codec)
    named = codec.get("backbone")
    if (m.codec_fingerprint and named and lookup(named) is not None and not codec.get("vae")
            and not codec.get("baseline")):
        builtin = backbone_for_fingerprint(m.codec_fingerprint[:16])
        if builtin is not None:
            codec["backbone"] = builtin.name
    keys = CodecSpec.dataset_keys()
    if m.backbone.get("folder"):
        keys = tuple(k for k in keys if k != "backbone")
    defaults = CodecSpec()
    changed = {k: v for k, v in given.to_dict().items() if v is not None and v != getattr(defaults, k)}
    return CodecSpec.from_dict(codec, f"{where} manifest").merged_with(changed, keys=keys, where=where).pinned()


def part_record(fs, path: str) -> L.CommitRecord | None:
    """The commit record a worker embedded in a part's footer (None: not one of ours / unreadable)."""
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        raw = meta.get(L.PART_META_KEY)
        return L.CommitRecord.from_dict(json.loads(raw), path) if raw else None
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply not adoptable
        return None


def read_dataset(url: str, opts=None, columns: list[str] | None = None) -> pa.Table:
    """A dataset's live rows as one table (tests, audits and small datasets; large ones read
    part by part from `Books(...).read().shards`)."""
    from .schema import BITSTREAM_SCHEMA, DECODED_SCHEMA
    from .storage import get_fs

    fs, root = get_fs(url, opts)
    books = Books(fs, root)
    cat = books.read()
    tables = [books.read_columns(books.path(s.file), columns) for _, s in sorted(cat.shards.items()) if s.file]
    if tables:
        return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    kind = cat.manifest.kind if cat.manifest else L.BITSTREAM_KIND
    schema = DECODED_SCHEMA if kind == L.DECODED_KIND else BITSTREAM_SCHEMA
    return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
