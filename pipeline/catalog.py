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
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout as L
from .storage import join, read_bytes, write_atomic, write_parquet_atomic

log = logging.getLogger("fcodec")

SHARDS_SCHEMA = pa.schema([("shard", pa.string()), ("record", pa.string())])


@dataclass
class Catalog:
    """The live state of a dataset: its shards (commit records) and the key index."""

    layout: int
    shards: dict[str, L.CommitRecord] = field(default_factory=dict)
    loose: list[str] = field(default_factory=list)  # loose record paths folded in (compaction removes them)
    manifest: L.Manifest | None = None
    # The key index, with the folds not yet applied to it: shards whose rows to drop, and new
    # rows per shard. A fold per commit only records them; `entries` applies them all at once
    # when next read, so committing a shard costs O(its keys), not O(the index).
    base: pa.Table = field(default_factory=L.ENTRIES_SCHEMA.empty_table, repr=False)
    drop: set = field(default_factory=set, repr=False)
    add: dict = field(default_factory=dict, repr=False)

    @property
    def entries(self) -> pa.Table:
        """The key index: one row per listing entry of a live shard (ENTRIES_SCHEMA)."""
        if self.drop or self.add:
            ents = self.base
            if self.drop and ents.num_rows:
                gone = pa.array(sorted(self.drop), pa.string())
                ents = ents.filter(pc.invert(pc.is_in(ents.column("shard"), value_set=gone)))
            self.base = pa.concat_tables([ents, *self.add.values()])
            self.drop, self.add = set(), {}
        return self.base

    @entries.setter
    def entries(self, table: pa.Table) -> None:
        self.base, self.drop, self.add = table, set(), {}

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
            ents = self._read_parquet(ep).cast(L.ENTRIES_SCHEMA)
            # keys of shards no longer live (a compaction stopped between its two files) are stale
            live = pc.is_in(ents.column("shard"), value_set=pa.array(sorted(cat.shards), pa.string()))
            cat.entries = ents if pc.all(live).as_py() in (True, None) else ents.filter(live)
        loose = [p for p in self._ls(L.COMMITS) if p.endswith(".json") and not posixpath.basename(p).startswith(".")]
        recs = [L.CommitRecord.from_dict(L.loads_json(b, p), p) for p, b in self._cat(loose).items()]
        fold(cat, recs)
        cat.loose = loose
        return cat

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
        write_parquet_atomic(self.fs, self.root, L.CATALOG_ENTRIES, cat.entries.sort_by("entry"), tmp_dir=L.TMP)
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
            cat.add.pop(s, None)  # rows folded earlier but not yet applied
            # rows in the applied index (dropped once, on the next read of `entries`); only a shard
            # live before has any there (Books.read keeps the index to live shards)
            if cat.shards.pop(s, None) is not None:
                cat.drop.add(s)
        if r.file or r.rows:  # a record without rows only drops the shards it supersedes
            e = r.entries
            cat.shards[r.shard] = replace(r, entries=[])  # its entries live in the key index only
            cat.add[r.shard] = pa.table([[x.entry for x in e], [r.shard] * len(e), [x.size for x in e],
                                         [x.token for x in e], [x.sha256 for x in e], [x.failed for x in e]],
                                        schema=L.ENTRIES_SCHEMA)


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
