"""Storage I/O: fsspec filesystems from URLs (local, s3:// with any endpoint, gs://), pyarrow
glue, atomic writes, and the on-disk layout of a dataset the jobs write.

Dataset layout (a directory or an object-store prefix):

    DST/part-<shard>.parquet       one file per input shard (deterministic name)
    DST/_commits/<shard>.json      per-shard stats, written LAST: the shard's commit marker
    DST/_manifest.json             dataset totals and the resolved job config
    DST/_tmp/                      local temp files before their rename (ignored by readers)

Readers (pandas, pyarrow, DuckDB, Ray) skip names starting with `_` or `.`, so a shard is
visible only once its Parquet file is complete, and counted only once its marker exists.

Credentials: taken from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, or the provider's default chain) and never printed or written anywhere:
`StorageOptions.public()` is what goes into configs and manifests.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

COMMITS = "_commits"
MANIFEST = "_manifest.json"
TMP = "_tmp"


@dataclass
class StorageOptions:
    """How to reach object storage. Secrets are held in memory only (repr hides them)."""

    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, Ceph, R2, moto); None = AWS
    region: str | None = None
    anon: bool = False
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None, anon: bool = False) -> "StorageOptions":
        """Options from flags, falling back to FCODEC_S3_ENDPOINT / AWS_ENDPOINT_URL(_S3) and the
        standard AWS credential variables."""
        env = os.environ
        endpoint_url = endpoint_url or env.get("FCODEC_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(endpoint_url=endpoint_url or None, region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                   anon=anon, key=env.get("AWS_ACCESS_KEY_ID"), secret=env.get("AWS_SECRET_ACCESS_KEY"),
                   token=env.get("AWS_SESSION_TOKEN"))

    def public(self) -> dict:
        """The non-secret part, for printing and manifests."""
        return {"endpoint_url": self.endpoint_url, "region": self.region, "anon": self.anon,
                "credentials": "from environment" if self.key else "default chain"}

    def fsspec_kwargs(self, protocol: str) -> dict:
        """Keyword arguments for `fsspec.filesystem(protocol, ...)`."""
        if protocol in ("s3", "s3a"):
            kw: dict[str, Any] = {"anon": self.anon}
            if self.endpoint_url:
                kw["endpoint_url"] = self.endpoint_url
            if self.key and self.secret and not self.anon:
                kw.update(key=self.key, secret=self.secret)
                if self.token:
                    kw["token"] = self.token
            if self.region:
                kw["client_kwargs"] = {"region_name": self.region}
            return kw
        if protocol in ("gs", "gcs") and self.anon:
            return {"token": "anon"}
        return {}


def protocol_of(url: str) -> str:
    """'s3' for s3://b/k, 'file' for local paths."""
    return url.split("://", 1)[0] if "://" in url else "file"


def get_fs(url: str, opts: StorageOptions | None = None):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    import fsspec

    opts = opts or StorageOptions()
    proto = protocol_of(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts.fsspec_kwargs(proto))
    except ImportError as e:
        raise RuntimeError(f"cannot open {proto}:// URLs: {e} (install the fsspec backend, e.g. `pip install gcsfs` for gs://)") from None
    return fs, path


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def full_url(fs, path: str) -> str:
    """A URL another process can open: 's3://bucket/key' or an absolute local path."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str, *parts: str) -> str:
    """Join object-store style (always '/')."""
    return posixpath.join(root.rstrip("/"), *[p.strip("/") for p in parts])


def read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write bytes so readers see the whole object or nothing.

    Local: temp file beside the target, fsync, rename. Object stores publish an object only
    when its upload completes, so one PUT is already atomic there.
    """
    if is_local(fs):
        d = posixpath.dirname(path)
        os.makedirs(d or ".", exist_ok=True)
        tmp = posixpath.join(d, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.part")

        def write(p: str) -> None:
            with open(p, "wb") as f:
                f.write(data)

        _replace_atomically(tmp, path, write)
    else:
        def put() -> None:
            with fs.open(path, "wb") as f:
                f.write(data)

        with_retries(put, f"write {full_url(fs, path)}")


# Object-store writes (part files, commit markers, manifests, PNGs) are retried this many times
# with exponential backoff on top of botocore's own retries (~5-10 s per call), so an endpoint
# that is down for up to about a minute costs time, not the job; after that the error is raised
# and the shard stays uncommitted (a rerun redoes it).
WRITE_ATTEMPTS = 4
WRITE_BACKOFF_S = 2.0


def with_retries(fn, what: str, attempts: int | None = None, backoff_s: float | None = None):
    """Call fn(); on a transient error (network, endpoint down, throttling) retry with backoff
    2, 4, 8 s ... up to `attempts` calls; then raise OSError naming what failed and how often."""
    import time

    attempts = attempts or WRITE_ATTEMPTS
    backoff_s = WRITE_BACKOFF_S if backoff_s is None else backoff_s
    for i in range(attempts):
        try:
            return fn()
        except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise  # not transient: retrying cannot help
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            if i == attempts - 1:
                raise OSError(f"could not {what} after {attempts} attempts ({type(e).__name__}: {e}); "
                              f"is the object store reachable? Rerun the job to resume") from e
            logging.getLogger("fcodec").warning("could not %s (%s); retry %d of %d in %.0f s", what, type(e).__name__,
                                                i + 1, attempts - 1, backoff_s * 2**i)
            time.sleep(backoff_s * 2**i)


def _replace_atomically(tmp: str, final: str, write) -> None:
    """Local files: write(tmp), fsync, rename over `final`; the temp file never outlives a failure."""
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(fs, path: str, obj: Any) -> None:
    write_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_atomic(fs, root: str, name: str, table: pa.Table, **write_kwargs) -> str:
    """Write `table` to root/name so it appears complete or not at all; returns its path.

    Local: written under root/_tmp/ (which readers ignore), then renamed into place.
    """
    final = join(root, name)
    if is_local(fs):
        tmp_dir = join(root, TMP)
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = join(tmp_dir, f"{name}.{uuid.uuid4().hex[:8]}.part")
        _replace_atomically(tmp, final, lambda p: pq.write_table(table, p, **write_kwargs))
    else:
        def put() -> None:
            with fs.open(final, "wb") as f:
                pq.write_table(table, f, **write_kwargs)

        with_retries(put, f"write {full_url(fs, final)}")
    return final


def clean_tmp(fs, root: str) -> None:
    """Remove root/_tmp/ (temp files of a run that died before renaming them). Local only:
    object stores never hold temp objects (see write_parquet_atomic)."""
    import shutil

    if is_local(fs):
        shutil.rmtree(join(root, TMP), ignore_errors=True)


def arrow_fs(fs):
    """A pyarrow filesystem over an fsspec one (for ray.data.read_parquet(filesystem=...) etc.)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def safe_key_path(key: str) -> str:
    """`key` as a relative POSIX path that stays inside its root; raises ValueError otherwise.

    Refuses absolute paths, drive letters, backslashes, '..' components, NUL and empty keys:
    a dataset must never make `decompress` write outside DST.
    """
    if not key or "\x00" in key or "\\" in key:
        raise ValueError(f"refusing unsafe key {key!r}: empty, NUL or backslash")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":") or "://" in key:
        raise ValueError(f"refusing key {key!r}: absolute paths would escape the output folder")
    parts = key.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise ValueError(f"refusing key {key!r}: '..', '.' or empty components would escape the output folder")
    return key


# ---------------------------------------------------------------- dataset layout
def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def marker_path(root: str, shard_id: str) -> str:
    return join(root, COMMITS, f"{shard_id}.json")


def committed_shards(fs, root: str) -> dict[str, dict]:
    """shard id -> its stats JSON, for every committed shard under root."""
    try:
        fs.invalidate_cache()
    except Exception:
        pass
    d = join(root, COMMITS)
    if not fs.exists(d):
        return {}
    out = {}
    for p in sorted(fs.glob(join(d, "*.json"))):
        try:
            stats = json.loads(read_bytes(fs, p))
        except (ValueError, OSError):
            continue  # an unreadable marker = not committed; the shard is redone
        out[posixpath.basename(p)[: -len(".json")]] = stats
    return out


def read_manifest(fs, root: str) -> dict | None:
    p = join(root, MANIFEST)
    return json.loads(read_bytes(fs, p)) if fs.exists(p) else None


def read_dataset(url: str, opts: StorageOptions | None = None, columns: list[str] | None = None,
                 committed_only: bool = True) -> pa.Table:
    """Read a dataset written by the jobs into one table (committed shards only by default).

    Meant for tests, audits and small datasets; large ones read shard by shard with
    `committed_shards` + `pq.read_table(fs.open(join(root, stats['file'])))`.
    """
    fs, root = get_fs(url, opts)
    shards = committed_shards(fs, root)
    if committed_only:
        files = [join(root, s["file"]) for _, s in sorted(shards.items())]
    else:
        files = sorted(p for p in fs.glob(join(root, "*.parquet")))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        from .schema import BITSTREAM_SCHEMA

        schema = BITSTREAM_SCHEMA if columns is None else pa.schema([BITSTREAM_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)
