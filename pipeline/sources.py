"""List and shard inputs from fsspec URLs, and read a shard's source bytes.

Inputs (local paths, s3://, gs://, globs; recognised by extension):
* image files (.png .jpg .jpeg .webp .bmp .tif .tiff .gif .ppm .pgm .pnm): grouped `shard_size`
  at a time, in sorted key order; key = path relative to SRC;
* WebDataset-style tar shards (.tar, .tar.gz, .tgz): one shard per tar; each image member is
  one input, key = `<tar path>/<member name>`; the other members of its WebDataset key
  (`.json`, `.txt`, `.cls`, ...) travel with it byte for byte (`sidecars`);
* Parquet files with an image-bytes column (binary, or a struct with a `bytes` field as in
  Hugging Face datasets): one shard per file; key = `<file path>/<key column or row index>`;
  every other column travels with its Arrow type (`--keep-columns` chooses).

Shard ids are stable: the same listing gives the same ids, so a rerun finds its commits.
Reading never decodes images: it returns the bytes (or why they could not be read), and the
actors hash and decode them, so one bad file fails alone.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from . import keyorder
from .storage import StorageOptions, full_url, get_fs, is_local

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTS = (".parquet", ".pq")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes", "data")
KEY_COLUMNS = ("key", "__key__", "path", "filename", "file_name", "id")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One unit of work and of output: a group of files, one tar or one Parquet file."""

    id: str
    kind: str  # "files" | "tar" | "parquet"
    uris: tuple[str, ...]  # files: one URL per input; tar/parquet: the container's URL
    keys: tuple[str, ...]  # files: one key per input; tar/parquet: the container's key prefix
    size: int = 0  # source bytes, when the listing knows them

    @property
    def n_known(self) -> int | None:
        """Number of inputs when known before reading (file shards)."""
        return len(self.keys) if self.kind == "files" else None


# What each kind of input looks like, on the lower-cased path, in the order they are tried: the
# one definition behind `kind_of` (a name) and `kinds_of` (a listing page). "files": the
# extension as `posixpath.splitext` finds it (a basename's leading dots are not one).
KIND_PATTERNS = (
    ("tar", "(" + "|".join(re.escape(e) for e in TAR_EXTS) + ")$"),
    ("parquet", "(" + "|".join(re.escape(e) for e in PARQUET_EXTS) + ")$"),
    ("files", r"(^|/)\.*[^/.][^/]*(" + "|".join(re.escape(e) for e in sorted(IMAGE_EXTS)) + ")$"),
)
_KIND_RES = tuple((k, re.compile(rx)) for k, rx in KIND_PATTERNS)
HIDDEN_PATTERN = r"(^|/)[_.]"  # job metadata (_manifest.json, _books/) and hidden files, at any depth


def kind_of(path: str) -> str | None:
    """The input kind of a path ("files", "tar", "parquet") or None (not an input)."""
    p = path.lower()
    for kind, rx in _KIND_RES:
        if rx.search(p):
            return kind
    return None


def kinds_of(paths: pa.Array) -> pa.Array:
    """`kind_of` over a string array (null: not an input), in Arrow: listing pages of millions of
    keys would spend most of the driver's listing CPU on it per key."""
    low = pc.utf8_lower(paths)
    out = pa.nulls(len(paths), pa.string())
    for kind, rx in reversed(KIND_PATTERNS):  # the first pattern that matches wins
        out = pc.if_else(pc.match_substring_regex(low, rx), pa.scalar(kind), out)
    return out


def _hash8(*parts: str) -> str:
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=4).hexdigest()


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s[-48:] or "root"


def list_inputs(src: str, opts: StorageOptions | None = None) -> tuple[list[tuple[str, str, str, int]], int]:
    """All inputs under `src` as sorted (key, url, kind, size) plus the count of ignored files.

    `src` is a directory/prefix (listed recursively), a glob, or a single file. Keys are
    relative to the directory, the glob's fixed prefix, or the file's parent. Names starting
    with '_' or '.' (job metadata, hidden files) and unknown extensions are ignored.
    """
    entries, ignored = list_entries(src, opts)
    return [e[:4] for e in entries], ignored


LISTING_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("kind", pa.string()), ("size", pa.int64()),
                            ("token", pa.string())])


def list_entries(src: str, opts: StorageOptions | None = None) -> tuple[list[tuple[str, str, str, int, str]], int]:
    """Like `list_inputs`, with a change token per entry: (key, url, kind, size, token), where the
    token is what the store says changes with the content (ETag on S3, generation on GCS, mtime
    locally), so a rerun can tell changed sources from unchanged ones without reading them.

    A path that exists is taken literally, even with `[ ] * ?` in its name; only a path that
    does not exist is expanded as a glob. (`list_entries_table` is the same listing as an Arrow
    table, for listings too large for Python tuples.)
    """
    table, ignored = list_entries_table(src, opts)
    return list(zip(*(table.column(c).to_pylist() for c in LISTING_SCHEMA.names))), ignored


def _listed(fs, path: str) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(root the keys are relative to, (path, info) of every object), directory by directory."""
    if fs.exists(path):
        if not fs.isdir(path):
            return posixpath.dirname(path), iter([(path, fs.info(path))])

        def walk() -> Iterator[tuple[str, dict]]:
            for _dir, _subdirs, files in fs.walk(path, detail=True):
                for info in files.values():
                    yield info["name"], info

        return path, (_walk_local(path) if is_local(fs) else walk())
    if any(c in GLOB_CHARS for c in path):
        fixed = []
        for comp in path.split("/"):
            if any(c in GLOB_CHARS for c in comp):
                break
            fixed.append(comp)
        found = fs.glob(path, detail=True)
        return "/".join(fixed), ((p, i) for p, i in found.items() if i.get("type") != "directory")
    raise FileNotFoundError(f"no input at '{path}': give a folder, a glob (e.g. 's3://bucket/imgs/**/*.jpg') or a file")


def _walk_local(path: str) -> Iterator[tuple[str, dict]]:
    """Local folders: (path, info) of every non-directory under `path`, as fsspec's walk gives
    them (size through a link, mtime of the entry itself, real folders only recursed), straight
    from `os.scandir`. fsspec builds a full info dict per file, which made listing the larger
    part of the driver's CPU on a local job; the fields the listing reads are the same, so
    change tokens are unchanged across the switch."""
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:  # vanished or unreadable: fsspec's walk omits it too
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                        continue
                    st = e.stat(follow_symlinks=False)
                    size = st.st_size
                    if e.is_symlink():
                        try:
                            size = e.stat(follow_symlinks=True).st_size
                        except OSError:
                            size = 0
                except FileNotFoundError:
                    continue
                yield e.path, {"name": e.path, "size": size, "mtime": st.st_mtime}


def list_entries_sorted(src: str, opts: StorageOptions | None = None, exclude_prefix: str | None = None,
                        page: int = 8192) -> tuple[keyorder.Spill, int]:
    """The listing of `list_entries` as a `keyorder.Spill` of LISTING_SCHEMA rows (`.sorted()`
    streams them in key order; `.close()` removes its runs) and the count of ignored files. The
    store is walked directory by directory; rows are packed into Arrow a page at a time and
    sorted runs go to local disk, so listing millions of keys holds one run in memory, not the
    listing. URLs under `exclude_prefix` (the job's own output inside SRC) are left out."""
    fs, path = get_fs(src, opts)
    path = path.rstrip("/") or "/"
    try:
        root, items = _listed(fs, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no input at '{src}': give a folder, a glob (e.g. 's3://bucket/imgs/**/*.jpg') "
                                f"or a file") from None
    prefix = root.rstrip("/") + "/" if root else ""
    spill = keyorder.Spill(LISTING_SCHEMA, "key")
    ignored = 0

    local = is_local(fs)  # a local path is its own URL

    def flush() -> None:
        nonlocal ignored
        if not rels:
            return
        rel = pa.array(rels, pa.string())
        kind = kinds_of(rel)
        keep = pc.and_kleene(pc.invert(pc.match_substring_regex(rel, HIDDEN_PATTERN)), pc.is_valid(kind))
        urls = pa.array(paths if local else [full_url(fs, p) for p in paths], pa.string())
        t = pa.table([rel, urls, kind, pa.array(sizes, pa.int64()), pa.array(tokens, pa.string())], schema=LISTING_SCHEMA)
        t = t.filter(keep)
        ignored += len(rels) - t.num_rows
        if exclude_prefix:
            t = t.filter(pc.invert(pc.starts_with(t.column("url"), exclude_prefix)))
        spill.add(t)
        for c in (rels, paths, sizes, tokens):
            c.clear()

    rels: list[str] = []
    paths: list[str] = []
    sizes: list[int] = []
    tokens: list[str] = []
    try:
        for p, info in items:
            rels.append(p[len(prefix):] if prefix and p.startswith(prefix) else (posixpath.relpath(p, root) if root else p))
            paths.append(p)
            sizes.append(int(info.get("size") or 0))
            tokens.append(change_token(info))
            if len(rels) >= page:
                flush()
        flush()
    except BaseException:
        spill.close()
        raise
    return spill, ignored


def list_entries_table(src: str, opts: StorageOptions | None = None) -> tuple[pa.Table, int]:
    """The listing of `list_entries` as one Arrow table (LISTING_SCHEMA, sorted by key) and the
    count of ignored files (tens of bytes a key; jobs stream `list_entries_sorted` instead)."""
    spill, ignored = list_entries_sorted(src, opts)
    with spill:
        return pa.concat_tables([LISTING_SCHEMA.empty_table(), *spill.sorted()]), ignored


def change_token(info: dict) -> str:
    """What changes when an object's content does, per the listing (no read needed)."""
    for k in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(k):
            return str(info[k]).strip('"')
    m = info.get("mtime") or info.get("LastModified") or info.get("updated")
    return f"{info.get('size')}@{m.timestamp() if hasattr(m, 'timestamp') else m}"


def plan_shards(inputs: list[tuple[str, str, str, int]], shard_size: int = 256) -> list[Shard]:
    """Group listed inputs into shards with stable ids (sorted order in, same ids out).

    File shards: `f<index>-<hash of their keys>`; containers: `t-`/`p-` + path slug + hash.
    """
    shards: list[Shard] = []
    files = [x for x in inputs if x[2] == "files"]
    for i in range(0, len(files), max(1, shard_size)):
        chunk = files[i : i + shard_size]
        keys = tuple(k for k, _, _, _ in chunk)
        shards.append(Shard(f"f{i // shard_size:05d}-{_hash8(*keys)}", "files", tuple(u for _, u, _, _ in chunk),
                            keys, sum(s for *_, s in chunk)))
    for key, url, kind, size in inputs:
        if kind in ("tar", "parquet"):
            shards.append(Shard(f"{kind[0]}-{_slug(key)}-{_hash8(key)}", kind, (url,), (key,), size))
    return shards


# ---------------------------------------------------------------- reading
def _row(key: str, uri: str, data: bytes | None, error: str | None = None) -> dict:
    return {"key": key, "source_uri": uri, "data": data, "read_error": error}


def _read_one(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def read_shard(shard: Shard, opts: StorageOptions | None = None, only_keys: set[str] | None = None,
               image_column: str | None = None, chunk_rows: int = 32, chunk_bytes: int = 64 << 20,
               threads: int = 8, keep_columns: list[str] | None = None) -> Iterator[list[dict]]:
    """Yield the shard's inputs in chunks of rows {key, source_uri, data, read_error}.

    `data` is the source bytes (None when unreadable, with `read_error` saying why). A
    container that breaks mid-way yields the members read so far plus one failure row keyed
    by the container. `only_keys` restricts to those keys (used by --retry-failed).
    """
    rows: list[dict] = []
    size = 0
    for r in _iter_rows(shard, opts, only_keys, image_column, threads, keep_columns):
        rows.append(r)
        size += len(r["data"] or b"")
        if len(rows) >= chunk_rows or size >= chunk_bytes:
            yield rows
            rows, size = [], 0
    if rows:
        yield rows


def _iter_rows(shard: Shard, opts, only_keys, image_column, threads, keep_columns=None) -> Iterator[dict]:
    if shard.kind == "files":
        pairs = [(k, u) for k, u in zip(shard.keys, shard.uris) if only_keys is None or k in only_keys]
        if not pairs:
            return
        fs, _ = get_fs(pairs[0][1], opts)

        def fetch(pair):
            key, url = pair
            try:
                return _row(key, url, _read_one(fs, get_fs(url, opts)[1]))
            except Exception as e:  # missing, permission, network: this input fails alone
                return _row(key, url, None, f"could not read source ({type(e).__name__}: {e})")

        with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound: overlap object-store latency
            yield from pool.map(fetch, pairs)
    elif shard.kind == "tar":
        yield from _iter_tar(shard.uris[0], shard.keys[0], opts, only_keys)
    elif shard.kind == "parquet":
        yield from _iter_parquet(shard.uris[0], shard.keys[0], opts, only_keys, image_column, keep_columns)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


def wds_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: ('dir/000001', 'json') for 'dir/000001.json' (the key
    ends at the first dot of the last path component; the rest is the extension)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _iter_tar(url: str, prefix: str, opts, only_keys) -> Iterator[dict]:
    """A WebDataset-style tar in one streaming pass: each image member is a row, carrying the
    other members of its key (`.json`, `.txt`, `.cls`, ...) byte for byte as `sidecars`
    (members of one key are consecutive, as WebDataset writes them)."""
    import tarfile

    fs, path = get_fs(url, opts)
    n = 0
    group: list[tuple[str, bytes]] = []
    current = None

    def flush() -> Iterator[dict]:
        nonlocal n
        side = [{"ext": wds_key(nm)[1], "data": data} for nm, data in group if kind_of(nm) != "files"]
        for nm, data in group:
            if kind_of(nm) != "files":
                continue
            key = f"{prefix}/{nm}"
            if only_keys is not None and key not in only_keys:
                continue
            n += 1
            yield {**_row(key, f"tar://{nm}::{url}", data), "sidecars": side}

    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:  # streaming: one pass
            for m in tf:
                if not m.isfile():
                    continue
                k = wds_key(m.name)[0]
                if k != current:
                    yield from flush()
                    group, current = [], k
                member = tf.extractfile(m)
                group.append((m.name, member.read() if member else b""))
            yield from flush()
    except (tarfile.TarError, EOFError, OSError) as e:
        if only_keys is None or prefix in only_keys:
            yield _row(prefix, url, None, f"tar shard unreadable after {n} members ({type(e).__name__}: {e})")


def _pick_column(schema, wanted: str | None, names: tuple[str, ...], binary: bool):
    import pyarrow as pa

    def ok(t):
        if binary:
            return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
                pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)

    if wanted:
        if wanted not in schema.names:
            raise ValueError(f"column '{wanted}' not found; the file has {schema.names}")
        return wanted
    for n in names:
        if n in schema.names and ok(schema.field(n).type):
            return n
    cands = [f.name for f in schema if ok(f.type)] if binary else []
    return cands[0] if len(cands) == 1 else None


def carried_columns(schema, image_column: str, keep: list[str] | None = None) -> list[str]:
    """The non-image columns of a Parquet input that travel with its rows (all, or `keep`)."""
    names = [n for n in schema.names if n != image_column]
    if keep is not None:
        missing = sorted(set(keep) - set(names))
        if missing:
            raise ValueError(f"--keep-columns {missing} not found; the file has {schema.names}")
        names = [n for n in names if n in keep]
    return names


def _iter_parquet(url: str, prefix: str, opts, only_keys, image_column, keep_columns=None) -> Iterator[dict]:
    """Rows of a Parquet input: the image bytes, plus every other column (`--keep-columns`) as
    `extra`, with the columns' Arrow types in `extra_schema`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = get_fs(url, opts)
    try:
        f = fs.open(path, "rb")
        pf = pq.ParquetFile(f)
    except Exception as e:
        if only_keys is None or prefix in only_keys:
            yield _row(prefix, url, None, f"not a readable Parquet file ({type(e).__name__}: {e})")
        return
    with f:
        schema = pf.schema_arrow
        try:
            img = _pick_column(schema, image_column, IMAGE_COLUMNS, binary=True)
            if img is None:
                raise ValueError(f"no image-bytes column found among {schema.names}; pass --image-column")
        except ValueError as e:  # this file fails alone, as one row keyed by the file
            if only_keys is None or prefix in only_keys:
                yield _row(prefix, url, None, str(e))
            return
        keycol = _pick_column(schema, None, KEY_COLUMNS, binary=False)
        try:
            extra = carried_columns(schema, img, keep_columns)
        except ValueError as e:
            if only_keys is None or prefix in only_keys:
                yield _row(prefix, url, None, str(e))
            return
        extra_schema = pa.schema([schema.field(c) for c in extra])
        cols = [img] + [c for c in [keycol] if c and c not in extra] + extra
        i = 0
        for batch in pf.iter_batches(batch_size=64, columns=cols):
            arr = batch.column(img)
            if pa.types.is_struct(arr.type):
                arr = arr.field("bytes")
            datas = arr.to_pylist()
            names = batch.column(keycol).to_pylist() if keycol else [None] * len(datas)
            carried = batch.select(extra).to_pylist() if extra else [{}] * len(datas)
            for data, name, ex in zip(datas, names, carried):
                key = f"{prefix}/{name}" if name is not None else f"{prefix}/{i:08d}"
                if only_keys is None or key in only_keys:
                    yield {**_row(key, f"{url}#row={i}", data,
                                  None if data is not None else f"row {i} has a null '{img}' value"),
                           "extra": ex, "extra_schema": extra_schema}
                i += 1
