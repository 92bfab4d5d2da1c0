"""The on-disk contract of a dataset the jobs write, typed: where things live, the manifest, the
shard commit record, the key index and the internal row columns. The writer (run, commit),
verify, audit and inspect all read it through this module.

Layout 2 (this version writes it):

    DST/part-<shard>.parquet        one file per shard, data only (what outside readers see)
    DST/__fcodec__/manifest.json    `Manifest`: the codec that wrote the dataset, totals, last run
    DST/__fcodec__/commits/<shard>.json   `CommitRecord`s not yet folded into the catalog
    DST/__fcodec__/catalog/shards.parquet  folded commit records, one row per live shard
    DST/__fcodec__/catalog/entries.parquet the key index: listing entry -> shard, size, change token
    DST/__fcodec__/lease.json       the writer's lease (one writer per dataset)
    DST/__fcodec__/tmp/             local temp files before their rename

Why `__fcodec__`: pyarrow (pandas, Ray) skips names starting with `_`; Hugging Face `datasets`
skips those starting with `__` (it read `_commits/*.json` as Parquet); DuckDB and polars read
the documented glob `DST/*.parquet`. So every outside reader sees exactly the parts.

Layout 1 (release 0.1.0: `_manifest.json`, `_commits/<shard>.json`) is still read everywhere;
the first compress run into a layout-1 dataset moves its books to layout 2.

Every record read from disk is validated: a wrong shape is a one-line `LayoutError` naming the
file and the field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa

LAYOUT_VERSION = 2
META = "__fcodec__"
MANIFEST = f"{META}/manifest.json"
COMMITS = f"{META}/commits"
CATALOG_SHARDS = f"{META}/catalog/shards.parquet"
CATALOG_ENTRIES = f"{META}/catalog/entries.parquet"
LEASE = f"{META}/lease.json"
TMP = f"{META}/tmp"
PART_GLOB = "*.parquet"  # what outside readers (DuckDB, polars) should scan: DST/*.parquet
PART_PREFIX = "part-"
# Layout 1 names (read for old datasets, removed once migrated)
V1_MANIFEST, V1_COMMITS, V1_TMP = "_manifest.json", "_commits", "_tmp"
# Parquet footer key holding the part's own commit record (what reconcile adopts an orphan by)
PART_META_KEY = b"fcodec.commit"

BITSTREAM_KIND = "foundation-codec bitstream dataset"
DECODED_KIND = "foundation-codec decoded dataset"

# Internal row columns: shard bookkeeping between stages, never written to a part.
INTERNAL_COLUMNS = [("_shard", pa.string()), ("_source_bytes", pa.int64()), ("_out_bytes", pa.int64()),
                    ("_worker", pa.string())]

# The key index (catalog/entries.parquet): one row per listing entry (an image file, or a tar /
# Parquet container) -> the shard holding its rows and what the listing said about it then.
ENTRIES_SCHEMA = pa.schema([
    pa.field("entry", pa.string(), nullable=False),   # key of a file, or the container's key
    pa.field("shard", pa.string(), nullable=False),
    pa.field("size", pa.int64()),                      # source bytes per the listing
    pa.field("token", pa.string()),                    # mtime / ETag per the listing: cheap change detection
    pa.field("sha256", pa.string()),                   # files: hex sha256 of the source (null if unreadable)
    pa.field("failed", pa.int32()),                    # rows of this entry that failed
])


class LayoutError(ValueError):
    """A manifest, commit record or catalog file that is not of the expected shape."""


def part_name(shard_id: str) -> str:
    return f"{PART_PREFIX}{shard_id}.parquet"


def shard_of_part(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    if base.startswith(PART_PREFIX) and base.endswith(".parquet"):
        return base[len(PART_PREFIX):-len(".parquet")]
    return None


# ---------------------------------------------------------------- typed records
def _check(d: Any, where: str, spec: dict[str, tuple]) -> dict:
    """Check a JSON object's fields against {name: (types, required)}; one-line errors."""
    if not isinstance(d, dict):
        raise LayoutError(f"{where}: expected a JSON object, found {type(d).__name__}")
    for name, (types, required) in spec.items():
        if name not in d or d[name] is None:
            if required:
                raise LayoutError(f"{where}: field '{name}' is missing")
            continue
        if not isinstance(d[name], types) or (isinstance(d[name], bool) and bool not in _tuple(types)):
            raise LayoutError(f"{where}: field '{name}' should be {_names(types)}, found {type(d[name]).__name__}")
    return d


def _tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _names(types) -> str:
    return " or ".join(t.__name__ for t in _tuple(types))


NUM = (int, float)


class _Record:
    """A JSON-shaped record: `to_dict()`, and the checked fields of a dict (`_SPEC`)."""

    _SPEC: dict = {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def _known(cls, d: Any, where: str) -> dict:
        _check(d, where, cls._SPEC)
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in d.items() if k in names and v is not None}


@dataclass
class Entry:
    """One listing entry a shard holds: a file's key, or a container's key."""

    entry: str
    size: int = 0
    token: str | None = None
    sha256: str | None = None
    failed: int = 0


@dataclass
class CommitRecord(_Record):
    """A shard's commit: what it holds and its stats. Written into the part's Parquet footer by
    the worker (so an orphan part can be adopted) and into `__fcodec__/commits/` by the driver."""

    shard: str
    file: str | None = None  # None: no part (rows all dropped; or a decoded shard of PNG files)
    kind: str = "files"  # files | tar | parquet (of the source) ; decoded: png | parquet
    rows: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    bpp_sum: float = 0.0
    pixels: int = 0
    codec_fingerprint: str | None = None
    entries: list[Entry] = field(default_factory=list)
    supersedes: list[str] = field(default_factory=list)  # shards whose rows this one replaces
    depends_on: list[str] = field(default_factory=list)  # shards holding rows this one's references point to
    duplicates: int = 0  # rows whose source bytes another row already has (stored as references with --dedupe)
    refs: int = 0  # rows stored as references (no bitstream of their own)
    part_sha256: str | None = None  # sha256 of the part file's bytes (what the books signature covers)
    failures: list[dict] = field(default_factory=list)  # [{key, error}] of failed rows
    errors: dict[str, int] = field(default_factory=dict)  # failed rows per error class
    run_id: str | None = None
    writer: str | None = None  # host:node:pid of the worker that wrote the part
    committed_at: str | None = None
    source_file: str | None = None  # decoded datasets: the bitstream part decoded

    _SPEC = {"shard": (str, True), "file": (str, False), "kind": (str, False), "rows": (int, False),
             "ok": (int, False), "failed": (int, False), "skipped": (int, False), "input_bytes": (int, False),
             "output_bytes": (int, False), "bpp_sum": (NUM, False), "pixels": (int, False),
             "codec_fingerprint": (str, False), "entries": (list, False), "supersedes": (list, False),
             "depends_on": (list, False), "duplicates": (int, False), "refs": (int, False),
             "part_sha256": (str, False),
             "failures": (list, False), "errors": (dict, False), "run_id": (str, False), "writer": (str, False),
             "committed_at": (str, False), "source_file": (str, False)}

    def to_dict(self) -> dict:
        # what asdict() gives, built directly: asdict's recursive deep copy cost ~1.5 ms for a
        # 256-entry record, per shard, on the driver
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(entries=[dict(vars(e)) for e in self.entries], supersedes=list(self.supersedes),
                 depends_on=list(self.depends_on), failures=[dict(x) for x in self.failures], errors=dict(self.errors))
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "commit record") -> "CommitRecord":
        kw = cls._known(d, where)
        ents = []
        for i, e in enumerate(kw.pop("entries", [])):
            _check(e, f"{where}: entries[{i}]", {"entry": (str, True), "size": (int, False), "token": (str, False),
                                                  "sha256": (str, False), "failed": (int, False)})
            ents.append(Entry(**{k: v for k, v in e.items() if v is not None}))
        for i, f in enumerate(kw.get("failures", [])):
            _check(f, f"{where}: failures[{i}]", {"key": (str, True), "error": (str, False)})
        rec = cls(**kw, entries=ents)
        rec.bpp_sum = float(rec.bpp_sum)
        return rec

    @classmethod
    def from_v1(cls, shard: str, d: Any, where: str) -> "CommitRecord":
        """A layout-1 marker (`_commits/<shard>.json` of release 0.1.0)."""
        _check(d, where, {"file": (str, False), "rows": (int, False), "ok": (int, False), "failed": (int, False)})
        srcs = d.get("sources") or []
        return cls(shard=shard, file=d.get("file"), kind=d.get("kind") or "files", rows=int(d.get("rows") or 0),
                   ok=int(d.get("ok") or 0), failed=int(d.get("failed") or 0), skipped=int(d.get("skipped") or 0),
                   input_bytes=int(d.get("input_bytes") or 0), output_bytes=int(d.get("output_bytes") or 0),
                   bpp_sum=float(d.get("bpp_sum") or 0.0), pixels=int(d.get("pixels") or 0),
                   codec_fingerprint=d.get("codec_fingerprint"), entries=[Entry(s) for s in srcs],
                   failures=[f for f in d.get("failures") or [] if isinstance(f, dict) and "key" in f],
                   committed_at=d.get("committed_at"), source_file=d.get("source_file"))


@dataclass
class Manifest(_Record):
    """`__fcodec__/manifest.json`: what a dataset is, the codec that wrote it, totals."""

    kind: str
    layout: int = LAYOUT_VERSION
    codec: dict = field(default_factory=dict)  # CodecSpec.to_dict() of the writer
    backbone: dict = field(default_factory=dict)  # backbone_origin(): name, folder, revision
    codec_fingerprint: str | None = None  # hex: backbone (8 B) + codec (8 B)
    software_version: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    totals: dict = field(default_factory=dict)
    complete: bool = False
    source: str | None = None  # decoded datasets: the bitstream dataset
    format: str | None = None  # decoded datasets: png | parquet
    config: dict = field(default_factory=dict)  # the job's resolved options (no secrets)
    last_run: dict = field(default_factory=dict)
    columns: list = field(default_factory=list)
    integrity: dict = field(default_factory=dict)  # with an HMAC key: {"algorithm", "books_hmac"} (pipeline/integrity.py)
    shards_planned: int | None = None  # layout 1 recorded it

    _SPEC = {"kind": (str, True), "layout": (int, False), "codec": (dict, False), "backbone": (dict, False),
             "codec_fingerprint": (str, False), "software_version": (str, False), "created_at": (str, False),
             "updated_at": (str, False), "totals": (dict, False), "complete": (bool, False), "source": (str, False),
             "format": ((str, int), False), "config": (dict, False), "last_run": (dict, False), "columns": (list, False),
             "integrity": (dict, False), "shards_planned": (int, False)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Manifest":
        m = cls(**cls._known(d, where))
        if m.layout == 1 or "layout" not in d:  # release 0.1.0: codec options under config.codec
            m.layout = 1
            cfg = d.get("config") if isinstance(d.get("config"), dict) else {}
            m.codec = dict(cfg.get("codec") or {}) if isinstance(cfg.get("codec") or {}, dict) else {}
            if isinstance(m.format, int):  # 0.1.0's bitstream manifests said "format": 1
                m.format = None
        elif m.layout > LAYOUT_VERSION:
            raise LayoutError(f"{where}: dataset layout {m.layout} is newer than this fcodec reads "
                              f"({LAYOUT_VERSION}); upgrade foundation-codec")
        return m


def loads_json(data: bytes, where: str) -> Any:
    """Parse JSON bytes; a syntax error is a one-line LayoutError naming the file."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise LayoutError(f"{where}: not valid JSON ({e})") from None


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
