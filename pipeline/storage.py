"""Storage I/O: fsspec filesystems from URLs (local, s3:// with any endpoint, gs://), pyarrow
glue, atomic writes, and the on-disk layout of a dataset the jobs write.

Where a dataset's files go and what they mean is `layout.py`; this module only moves bytes.

Credentials: taken from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, or the provider's default chain) and never printed or written anywhere:
`StorageOptions.public()` is what goes into configs and manifests.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .keyorder import RowGroupWriter
from .layout import TMP

# One retry policy for object storage: botocore's adaptive mode (exponential backoff plus
# client-side rate limiting when the store answers SlowDown), at most this many attempts per
# request, with connect/read timeouts. A refused endpoint is retried for about 75 s on average
# (backoff capped at 20 s a try); the worst case, an endpoint that accepts and then stalls, is
# bounded by attempts x (connect + read timeout) + backoff, about 6 minutes. s3fs's own retry
# loop is set to a single pass, so retries are never stacked. botocore's policy ends where a
# response's headers arrive: a connection cut while the body streams is not retried there, so
# `clear_errors` sends such a read again once (through the whole policy again).
S3_MAX_ATTEMPTS = 10
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 20


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
            kw["config_kwargs"] = {"retries": {"mode": "adaptive", "total_max_attempts": S3_MAX_ATTEMPTS},
                                   "connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_READ_TIMEOUT_S}
            return kw
        if protocol in ("gs", "gcs") and self.anon:
            return {"token": "anon"}
        return {}


def protocol_of(url: str) -> str:
    """'s3' for s3://b/k, 'file' for local paths."""
    return url.split("://", 1)[0] if "://" in url else "file"


def absolute_local(url: str) -> str:
    """A local path made absolute (Ray workers run in folders of their own, where a relative
    path names nothing); URLs and "" are returned as they are."""
    if not url or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def get_fs(url: str, opts: StorageOptions | None = None):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    import fsspec

    opts = opts or StorageOptions()
    proto = protocol_of(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts.fsspec_kwargs(proto))
    except ImportError as e:
        raise RuntimeError(f"cannot open {proto}:// URLs: {e} (install the fsspec backend, e.g. `pip install gcsfs` for gs://)") from None
    if proto in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop off: botocore's adaptive retries are the one policy
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
    else:  # one PUT (botocore retries it per the policy above)
        clear_errors(lambda: _put_whole(fs, path, lambda f: f.write(data)), f"write {full_url(fs, path)}")


# A response cut while its body streams (the store went away mid-transfer): aiohttp's and
# urllib3's names for it, matched by name so that local-only installs need neither package.
BODY_CUT_ERRORS = frozenset({"ClientPayloadError", "ContentLengthError", "IncompleteRead"})


def is_body_cut(e: BaseException) -> bool:
    """True when `e`, or an exception it was raised from, is a response body cut mid-transfer."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if type(e).__name__ in BODY_CUT_ERRORS:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def clear_errors(fn, what: str):
    """Call fn(); an object-store failure that outlived the retry policy becomes one OSError that
    says what failed and what to do (permission and not-found errors, and data errors such as a
    corrupt Parquet file's ArrowInvalid, a ValueError, pass as they are). A body
    cut mid-transfer, which botocore never sees, is tried once more: fn must be safe to repeat
    (a whole read, or a whole-object PUT)."""
    for last in (False, True):
        try:
            return fn()
        except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            if not last and is_body_cut(e):
                continue
            raise OSError(f"could not {what} after {S3_MAX_ATTEMPTS} attempts ({type(e).__name__}: {e}); "
                          f"is the object store reachable? Rerun the job to resume") from e


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


def write_parquet_atomic(fs, root: str, name: str, table, tmp_dir: str = TMP, schema: pa.Schema | None = None,
                         group_rows: int = 1 << 16, **write_kwargs) -> str:
    """Write `table` to root/name so it appears complete or not at all; returns its path.
    `table` is a pa.Table, or a stream of tables of `schema` (written as they come, row groups
    of `group_rows`, never held whole).

    Local: written under root/<tmp_dir>/ (which readers ignore), then renamed into place. Object
    stores publish an object only once its upload completes.
    """
    final = join(root, name)

    def write(dest) -> None:
        if isinstance(table, pa.Table):
            pq.write_table(table, dest, **write_kwargs)
            return
        w = RowGroupWriter(dest, schema, group_rows)
        try:
            for t in table:
                w.write(t)
        finally:
            w.close()  # on an error too, before the upload is discarded (not later, from a finaliser)

    if is_local(fs):
        tmp_root = join(root, tmp_dir)
        os.makedirs(tmp_root, exist_ok=True)
        os.makedirs(posixpath.dirname(final) or ".", exist_ok=True)
        tmp = join(tmp_root, f"{posixpath.basename(name)}.{uuid.uuid4().hex[:8]}.part")
        _replace_atomically(tmp, final, write)
    else:
        clear_errors(lambda: _put_whole(fs, final, write), f"write {full_url(fs, final)}")
    return final


def _put_whole(fs, path: str, write) -> None:
    """Upload what write(file) writes; an error on the way aborts the upload, so no object (not
    a torn one, which closing the file would publish) appears."""
    f = fs.open(path, "wb")
    try:
        write(f)
    except BaseException:
        f.discard()
        f.closed = True  # the file's close (or its finaliser) would otherwise upload the part written
        raise
    f.close()


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
