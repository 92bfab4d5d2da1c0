"""Shard workers: the Ray actors of compress and decompress. One call = one shard.

A worker reads its shard's inputs in I/O threads (fetch and image decoding overlap the model),
runs the row engine (actors.py), writes the shard's part file itself — where the rows are — and
returns only the shard's `CommitRecord`. So bitstream bytes never travel to the driver, which
just keeps the books (run.py, catalog.py). The record is also embedded in the part's Parquet
footer, so a part whose commit a killed driver never wrote can be adopted by the next run.

Workers are plain classes: `ShardEncoder(...).run(item)` works without Ray (inline mode, tests).
"""
from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout as L
from .actors import DecodeActor, EncodeActor, worker_id
from .rows import error_class, finish_decoded
from .dedupe import ENCODE, SELF, call
from .schema import (BITSTREAM_SCHEMA, DECODED_SCHEMA, REF_KEY_FIELD, SIDECARS_FIELD, STATUS_FAILED, STATUS_OK,
                     STATUS_SKIPPED, carried_name, hf_features_metadata, parquet_write_kwargs)
from .plan import NEW_FILE_COLUMNS, slice_rows
from .sources import Shard, read_shard
from .storage import StorageOptions, clear_errors, full_url, get_fs, join, write_atomic
from .transform import decode_source

BITSTREAM_READ_COLUMNS = ["key", "bitstream", "bitstream_sha256", "width", "height", "status", "error"]
# every layout-2 part; Parquet inputs add their own columns after these
PART_SCHEMA = pa.schema(list(BITSTREAM_SCHEMA) + [SIDECARS_FIELD, REF_KEY_FIELD])
PREFETCH_CHUNKS = 2  # chunks read and decoded ahead of the model


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Progress:
    """Images done, counted by the workers (a tiny Ray actor in Ray runs; the driver polls it)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n

    def init_args(self) -> tuple:
        """Constructor arguments of a fresh counter (run.run_workers makes a Ray actor of it)."""
        return ()


def _report(progress, n: int) -> None:
    if progress is None or not n:
        return
    if callable(progress):
        progress(n)
    else:  # a Ray actor handle: fire and forget
        progress.add.remote(n)


def prefetch(chunks: Iterator, fn: Callable, depth: int = PREFETCH_CHUNKS) -> Iterator:
    """Yield fn(chunk) for each chunk, computed in a background thread `depth` chunks ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for c in chunks:
                q.put(fn(c))
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=produce, name="fcodec-prefetch", daemon=True).start()
    while True:
        got = q.get()
        if got is done:
            return
        if isinstance(got, BaseException):
            raise got
        yield got


def write_part(fs, root: str, table: pa.Table, rec: L.CommitRecord) -> None:
    """Write a shard's part (atomically) with its commit record in the Parquet footer; sets
    `rec.part_sha256` to the sha256 of the bytes written (what the books signature covers)."""
    import hashlib
    import io

    meta = {L.PART_META_KEY: json.dumps(rec.to_dict(), sort_keys=True).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_write_kwargs(table))
    data = buf.getvalue()
    write_atomic(fs, join(root, rec.file), data)
    rec.part_sha256 = hashlib.sha256(data).hexdigest()


def stats_of(table: pa.Table, key_col: str = "key") -> dict:
    """rows/ok/failed/bytes/bpp/pixels and the error histogram of a bitstream table."""
    ok = pc.equal(table.column("status"), STATUS_OK)
    okt = table.filter(ok)
    fails = table.filter(pc.equal(table.column("status"), STATUS_FAILED))
    errors: dict[str, int] = {}
    for e in fails.column("error").to_pylist():
        errors[error_class(e)] = errors.get(error_class(e), 0) + 1
    out = {"rows": table.num_rows, "ok": okt.num_rows, "failed": fails.num_rows,
           "failures": [{"key": k, "error": e} for k, e in zip(fails.column(key_col).to_pylist(),
                                                                 fails.column("error").to_pylist())],
           "errors": dict(sorted(errors.items()))}
    if "n_bytes" in table.column_names:
        w = okt.column("width").cast(pa.int64())
        h = okt.column("height").cast(pa.int64())
        out.update(output_bytes=int(pc.sum(okt.column("n_bytes")).as_py() or 0),
                   bpp_sum=float(pc.sum(okt.column("bpp")).as_py() or 0.0),
                   pixels=int(pc.sum(pc.multiply(w, h)).as_py() or 0),
                   codec_fingerprint=okt.column("codec_fingerprint")[0].as_py() if okt.num_rows else None)
    return out


class ShardEncoder:
    """compress: a shard's sources -> `part-<shard>.parquet` of bitstream rows + its record."""

    def __init__(self, spec, dst: str, opts: StorageOptions | None = None, image_column: str | None = None,
                 run_id: str | None = None, progress=None, io_threads: int = 4,
                 keep_columns: list[str] | None = None, claims=None, dedupe: bool = False) -> None:
        from .integrity import load_key

        self.engine = EncodeActor(spec)
        self.claims, self.dedupe = claims, dedupe
        self.hmac_key = load_key()  # from this worker's environment; never passed around
        self.fs, self.root = get_fs(dst, opts)
        self.opts, self.image_column, self.run_id, self.progress = opts, image_column, run_id, progress
        self.keep_columns = keep_columns
        self.pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="fcodec-io")
        self.writer = worker_id()
        self.max_pixels = getattr(getattr(self.engine.codec, "config", None), "max_pixels", None)

    def _decode(self, rows: list[dict]) -> list[dict]:
        def one(r: dict) -> dict:
            facts, img = decode_source(r.get("data"), self.max_pixels)
            return {k: v for k, v in r.items() if k != "data"} | facts | {"image": img}

        return list(self.pool.map(one, rows))

    def run(self, item: dict) -> L.CommitRecord:
        """Encode one work item (see plan.py) and write its part; returns its commit record."""
        if item.get("new_rows"):
            item = {**item, "encode": [*(item.get("encode") or []), *self._new_files(item)], "new_rows": 0}
        enc = item.get("encode") or []
        shard = Shard(item["shard"], item["kind"], tuple(e[1] for e in enc), tuple(e[0] for e in enc))
        if item["kind"] != "files":
            shard = Shard(item["shard"], item["kind"], (item["container"][1],), (item["container"][0],))
        only = set(item["only_keys"]) if item.get("only_keys") is not None else None
        parts = [self._carried(item["carry"])] if item.get("carry") else []
        chunks = (read_shard(shard, self.opts, only_keys=only, image_column=self.image_column,
                             keep_columns=self.keep_columns) if (enc or item["kind"] != "files") else [])
        self.deps, self.dups = set(), 0
        for rows in prefetch(iter(chunks), self._decode):
            out = self._encode_chunk(rows, item["shard"])
            parts.append(self._with_carried_columns(rows, out))
            _report(self.progress, len(out))
        table = (pa.concat_tables(parts, promote_options="permissive").sort_by("key") if parts
                 else PART_SCHEMA.empty_table())
        return self._finish(item, table)

    def _encode_chunk(self, rows: list[dict], shard: str) -> list[dict]:
        """Encode a chunk; with claims, inputs whose content another row has are counted, and with
        --dedupe stored as references to it (pipeline/dedupe.py)."""
        if self.claims is None:
            return self.engine.encode_rows(rows)
        first, follows = {}, {}
        for i, r in enumerate(rows):
            if r.get("source_sha256") and r.get("image") is not None:
                if r["source_sha256"] in first:
                    follows[i] = first[r["source_sha256"]]
                else:
                    first[r["source_sha256"]] = i
        leaders = list(first.values())
        try:
            answers = call(self.claims, "claim", [(rows[i]["source_sha256"], rows[i]["key"]) for i in leaders], shard)
        except Exception:  # noqa: BLE001 - without --dedupe the registry only counts: never fail a shard for it
            if self.dedupe:
                raise
            return self.engine.encode_rows(rows)
        ref = {i: tuple(a) for i, a in zip(leaders, answers) if isinstance(a, list)}
        self.dups += len(ref) + len(follows) + sum(a == ENCODE for a in answers)
        skip = set(ref) | set(follows) if self.dedupe else set()
        todo = [i for i in range(len(rows)) if i not in skip]
        out: list = [None] * len(rows)
        for i, o in zip(todo, self.engine.encode_rows([rows[i] for i in todo])):
            out[i] = o
        try:
            call(self.claims, "confirm", [(rows[i]["source_sha256"], rows[i]["key"], shard, out[i]["status"] == STATUS_OK)
                                          for i, a in zip(leaders, answers) if a == SELF])
        except Exception:  # noqa: BLE001 - an unconfirmed owner is only never referred to
            if self.dedupe:
                raise
        for i in sorted(skip):
            lead = follows.get(i)
            if lead is not None and lead not in ref and out[lead]["status"] != STATUS_OK:
                out[i] = {**out[lead], "key": rows[i]["key"], "source_uri": rows[i]["source_uri"]}  # same bytes, same failure
                continue
            owner = ref.get(i) or ref.get(lead) or (rows[lead]["key"], shard)
            if owner[1] != shard:
                self.deps.add(owner[1])
            out[i] = self._reference(rows[i], owner[0])
        return out

    def _reference(self, r: dict, owner: str) -> dict:
        h, w = r["image"].pixels.shape[:2]
        return {"key": r["key"], "source_uri": r.get("source_uri"), "source_sha256": r["source_sha256"], "width": w,
                "height": h, "bitstream": None, "bitstream_sha256": None, "n_bytes": 0, "bpp": 0.0, "t": None,
                "codec_fingerprint": self.engine.fingerprint, "codec_version": self.engine.version,
                "status": STATUS_OK, "error": None, "ref_key": owner, "_source_bytes": r.get("_source_bytes")}

    @staticmethod
    def _with_carried_columns(rows: list[dict], out: list[dict]) -> pa.Table:
        """Bitstream rows plus what travels with each input: its WebDataset sidecars, and a
        Parquet input's other columns (with their Arrow types; renamed where they would clash)."""
        schema = PART_SCHEMA
        extra = next((r["extra_schema"] for r in rows if r.get("extra_schema") is not None), None)
        for o, r in zip(out, rows):
            o["sidecars"] = r.get("sidecars")
            for k, v in (r.get("extra") or {}).items():
                o[carried_name(k)] = v
        if extra is not None:
            schema = pa.schema(list(schema) + [f.with_name(carried_name(f.name)) for f in extra])
        return pa.Table.from_pylist(out, schema=schema)

    def _new_files(self, item: dict) -> list[list]:
        """The new files a work item names: its row group of the run's new-files table, which the
        job wrote beside the books (`item["listing"]`, relative to DST)."""
        path = join(self.root, item["listing"])

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read_row_group(item["row_group"], columns=list(NEW_FILE_COLUMNS))

        t = clear_errors(read, f"read {full_url(self.fs, path)}")  # a store gone away: one clear error
        if t.num_rows != item["new_rows"]:
            raise ValueError(f"{item['listing']}: row group {item['row_group']} holds {t.num_rows} files, the plan "
                             f"says {item['new_rows']} (the run's listing was overwritten: run the job again)")
        return slice_rows(t)

    def _carried(self, carry: dict) -> pa.Table:
        """Rows of an old part this shard keeps (all but those it re-encodes or drops)."""
        path = join(self.root, carry["file"])

        def read() -> pa.Table:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f).replace_schema_metadata(None)

        t = clear_errors(read, f"read {full_url(self.fs, path)}")
        if SIDECARS_FIELD.name not in t.column_names:  # a layout-1 part
            t = t.append_column(SIDECARS_FIELD, pa.nulls(t.num_rows, SIDECARS_FIELD.type))
        drop = carry.get("drop_keys") or []
        return t.filter(pc.invert(pc.is_in(t.column("key"), value_set=pa.array(drop, pa.string())))) if drop else t

    def _finish(self, item: dict, table: pa.Table) -> L.CommitRecord:
        st = stats_of(table)
        by_key = {}
        if table.num_rows:
            by_key = dict(zip(table.column("key").to_pylist(),
                              zip(table.column("source_sha256").to_pylist(), table.column("status").to_pylist())))
        if item["kind"] == "files":
            entries = []
            for e in item.get("carry_entries") or []:
                if e["entry"] in by_key:
                    entries.append(L.Entry(**e))
            for key, _url, size, token in item.get("encode") or []:
                sha, status = by_key.get(key, (None, STATUS_FAILED))
                entries.append(L.Entry(key, size, token, sha, int(status != STATUS_OK)))
        else:
            key, _url, size, token = item["container"]
            entries = [L.Entry(key, size, token, None, st["failed"])]
        refs = int(pc.sum(pc.is_valid(table.column("ref_key"))).as_py() or 0) if "ref_key" in table.column_names else 0
        old_deps = set(item.get("carry_depends_on") or [])
        rec = L.CommitRecord(shard=item["shard"], file=L.part_name(item["shard"]) if table.num_rows else None,
                             kind=item["kind"], entries=entries, supersedes=list(item.get("supersedes") or []),
                             depends_on=sorted((getattr(self, "deps", set()) | old_deps) - {item["shard"]}),
                             duplicates=getattr(self, "dups", 0), refs=refs,
                             run_id=self.run_id, writer=self.writer, committed_at=now(),
                             input_bytes=int(item.get("carry_input_bytes") or 0) + sum(e[2] for e in item.get("encode") or []) +
                             (item["container"][2] if item["kind"] != "files" else 0), **st)
        if rec.file:
            if self.hmac_key is not None:  # each record signed (tamper evidence, pipeline/integrity.py)
                from .integrity import RECORD_HMAC_COLUMN, sign_record

                macs = [sign_record(self.hmac_key, b) if b is not None else None
                        for b in table.column("bitstream").to_pylist()]
                table = table.append_column(RECORD_HMAC_COLUMN, pa.array(macs, pa.string()))
            write_part(self.fs, self.root, table, rec)
        return rec


OUTPUT_FORMATS = ("files", "webdataset", "parquet")


class ShardDecoder:
    """decompress: one bitstream part -> image files under DST, a WebDataset tar shard
    (`<shard>.tar`: `<key>.<image-format>` + the key's sidecars), or a Parquet part whose `image`
    column Hugging Face `datasets` reads as an Image feature (+ the carried columns)."""

    def __init__(self, spec, dst: str, fmt: str = "files", opts: StorageOptions | None = None, run_id: str | None = None,
                 progress=None, expect_fingerprint: str | None = None, io_threads: int = 4, chunk_rows: int = 32,
                 image_format: str = "png") -> None:
        self.engine = DecodeActor(spec, emit_pixels=True)
        if expect_fingerprint and self.engine.fingerprint != expect_fingerprint:
            raise ValueError(f"the codec options build a codec with fingerprint {self.engine.fingerprint}, but the "
                             f"dataset was written by {expect_fingerprint}: pass the options it was compressed with")
        self.fs, self.root = get_fs(dst, opts)
        self.fmt = "files" if fmt == "png" else fmt
        self.opts, self.run_id, self.progress, self.chunk_rows = opts, run_id, progress, chunk_rows
        self.image_format = image_format
        self.pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="fcodec-io")
        self.writer = worker_id()

    def _chunks(self, item: dict) -> Iterator[tuple[list[dict], pa.Schema]]:
        only = set(item["only_keys"]) if item.get("only_keys") is not None else None
        fs, path = get_fs(item["url"], self.opts)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            carried = [n for n in pf.schema_arrow.names if n not in BITSTREAM_SCHEMA.names]
            extra = pa.schema([pf.schema_arrow.field(n) for n in carried if n != REF_KEY_FIELD.name])
            for rb in pf.iter_batches(batch_size=self.chunk_rows, columns=BITSTREAM_READ_COLUMNS + carried):
                rows = [r for r in rb.to_pylist() if only is None or r["key"] in only]
                if rows:
                    yield rows, extra

    def _name(self, key: str) -> str:
        """The output name of a key: its image file, or its tar member."""
        from .rows import output_key
        from .sources import wds_key

        if self.fmt == "webdataset":
            output_key(key)  # refuses unsafe keys
            base = wds_key(key)[0] if "." in key.rsplit("/", 1)[-1] else key
            return f"{base}.{self.image_format}"
        return output_key(key, self.image_format)

    def _finish_row(self, r: dict) -> dict:
        px = r.pop("pixels", None)
        h, w, gray = r.pop("px_h", None), r.pop("px_w", None), bool(r.pop("gray", False))
        dest = r.pop("_dest", None)
        if px is None:
            return r
        import numpy as np

        arr = np.frombuffer(px, dtype=np.uint8).reshape(int(h), int(w), 3)
        fs = self.fs if self.fmt == "files" else None
        return finish_decoded(r, arr, gray, dest, fs, self.root, self.image_format)

    def _resolve_references(self, item: dict, rows: list[dict]) -> None:
        """--dedupe rows hold no bitstream, only the key of the row that has it (in this part or
        a part it depends on): decode that bitstream for them."""
        want = {r["ref_key"] for r in rows if r.get("ref_key")}
        if not want:
            return
        found: dict[str, dict] = {}
        for url in [item["url"], *item.get("deps", [])]:
            fs, path = get_fs(url, self.opts)
            with fs.open(path, "rb") as f:
                t = pq.read_table(f, columns=["key", "bitstream", "bitstream_sha256"],
                                  filters=[("key", "in", sorted(want - set(found)))])
            found.update({r["key"]: r for r in t.to_pylist() if r["bitstream"] is not None})
            if want <= set(found):
                break
        for r in rows:
            if r.get("ref_key"):
                o = found.get(r["ref_key"])
                if o is None:
                    r.update(status=STATUS_FAILED, error=f"refers to {r['ref_key']}, which holds no bitstream")
                else:
                    r.update(bitstream=o["bitstream"], bitstream_sha256=o["bitstream_sha256"])

    def run(self, item: dict) -> L.CommitRecord:
        out, in_bytes, extra, taken = [], 0, pa.schema([]), {}
        for rows, extra in self._chunks(item):
            self._resolve_references(item, rows)
            decoded = self.engine.decode_rows(rows)
            for r, d in zip(rows, decoded):
                if r.get("status") == STATUS_FAILED and r.get("ref_key") and d.get("status") == STATUS_SKIPPED:
                    d.update(status=STATUS_FAILED, error=r["error"])
                for k, v in r.items():  # what travels with the image
                    if k not in BITSTREAM_SCHEMA.names and k != REF_KEY_FIELD.name:
                        d[k] = v
                if d.get("status") in (STATUS_FAILED, STATUS_SKIPPED) or "pixels" not in d:
                    continue
                name = self._name(d["key"])
                if name in taken:  # two keys, one output name: never overwrite
                    d.update(status=STATUS_FAILED, error=f"output name {name} collides with key {taken[name]}")
                    for c in ("pixels", "px_h", "px_w", "gray", "_dest"):
                        d.pop(c, None)
                    continue
                taken[name] = d["key"]
                d["_dest"] = name
            in_bytes += sum(len(r.get("bitstream") or b"") for r in rows)
            out.extend(self.pool.map(self._finish_row, decoded))
            _report(self.progress, len(rows))
        schema = pa.schema(list(DECODED_SCHEMA) + list(extra))
        table = pa.Table.from_pylist(out, schema=schema) if out else schema.empty_table()
        st = stats_of(table)
        rec = L.CommitRecord(shard=item["shard"], file=None, kind=self.fmt, run_id=self.run_id, writer=self.writer,
                             committed_at=now(), source_file=item.get("source_file"), input_bytes=in_bytes,
                             skipped=int(pc.sum(pc.equal(table.column("status"), STATUS_SKIPPED)).as_py() or 0)
                             if table.num_rows else 0,
                             output_bytes=sum(int(r.get("_out_bytes") or 0) for r in out), **st)
        if self.fmt == "parquet" and table.num_rows:
            rec.file = L.part_name(item["shard"])
            table = table.replace_schema_metadata(hf_features_metadata(table.schema))
            write_part(self.fs, self.root, table.sort_by("key"), rec)
        elif self.fmt == "webdataset" and st["ok"]:
            rec.file = f"{item['shard']}.tar"
            write_atomic(self.fs, join(self.root, rec.file), self._tar(out))
        return rec

    def _tar(self, rows: list[dict]) -> bytes:
        """A deterministic WebDataset shard: per ok key, its image and its sidecars (sorted)."""
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for r in sorted((r for r in rows if r.get("status") == STATUS_OK), key=lambda r: r["key"]):
                name = r["image"]["path"]
                base = name[: -len(self.image_format) - 1]
                members = [(name, r["image"]["bytes"])] + sorted((f"{base}.{sc['ext']}", sc["data"])
                                                                 for sc in r.get("sidecars") or [])
                for mname, data in members:
                    info = tarfile.TarInfo(mname)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()
