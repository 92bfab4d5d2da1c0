"""The row engines of the pipeline: `EncodeActor` turns rows of source bytes (or decoded pixels)
into bitstream rows, `DecodeActor` turns bitstream rows back into images. The codec is built
once, in `__init__`, from a `CodecSpec`.

Both are plain classes: `EncodeActor(spec).encode_rows(rows)` works without Ray, which is how
the shard workers (workers.py), audit and tests use them. Columns starting with '_' (shard
bookkeeping) pass through untouched.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import pyarrow as pa

from codec.spec import CodecSpec, codec_fingerprint_hex

from .rows import clean_message, failed, finish_decoded, one_line, output_key, rows_of, sha256_hex, table_of
from .schema import BITSTREAM_SCHEMA, DECODED_SCHEMA, STATUS_OK, STATUS_SKIPPED
from .storage import StorageOptions, get_fs
from .transform import PIXEL_COLUMNS, decode_source, decoded_image


def as_spec(spec: CodecSpec | dict | None) -> CodecSpec:
    """A `CodecSpec` from a spec or a plain dict (picklable job configs, old manifests)."""
    return spec if isinstance(spec, CodecSpec) else CodecSpec.from_dict(spec)


def worker_id() -> str:
    """host:ray-node:pid:CUDA_VISIBLE_DEVICES of this process (where an actor runs, which GPU it got)."""
    node = "-"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - outside Ray there is no node id
        pass
    return f"{socket.gethostname()}:{node}:{os.getpid()}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"


class EncodeActor:
    """Source bytes -> bitstream rows. One codec per actor (per GPU when there are GPUs)."""

    def __init__(self, spec: CodecSpec | dict) -> None:
        self.codec = as_spec(spec).build()
        self.fingerprint = codec_fingerprint_hex(self.codec)
        self.binds = hasattr(self.codec, "entropy")  # ours (a baseline has no records to bind)
        from codec.version import CODEC_VERSION  # not `codec`: that loads torch (model.py)

        self.version = CODEC_VERSION
        self.worker = worker_id()

    def __call__(self, batch: Any) -> pa.Table:
        return table_of(self.encode_rows(rows_of(batch)), BITSTREAM_SCHEMA)

    def encode_rows(self, rows: list[dict]) -> list[dict]:
        """Input rows {key, source_uri, data, read_error, _...} -> bitstream rows (same order).

        Rows may instead carry decoded pixels from the transform stage (`pixels`, `px_h`,
        `px_w`, `gray`, `alpha`, `source_sha256`, `decode_error`) in place of `data`."""
        out: list[dict | None] = [None] * len(rows)
        todo: list[tuple[int, Any]] = []
        for i, r in enumerate(rows):
            base = {k: v for k, v in r.items() if k.startswith("_")}
            base.update(key=r.get("key"), source_uri=r.get("source_uri"), codec_fingerprint=self.fingerprint,
                        codec_version=self.version, _worker=self.worker)
            if "image" in r:  # hashed and decoded by the worker's I/O threads
                facts = {k: r.get(k) for k in ("source_sha256", "_source_bytes", "decode_error")}
                img = r["image"]
            elif "pixels" in r:  # hashed and decoded by the transform stage
                facts = {k: r.get(k) for k in ("source_sha256", "_source_bytes", "decode_error")}
                img = decoded_image(r) if r.get("pixels") is not None else None
            else:  # source bytes: hash and decode here, the same way
                facts, img = decode_source(r.get("data"), self.codec.config.max_pixels)
            if facts.get("source_sha256") is None:
                out[i] = failed(base, r.get("read_error") or "source could not be read", _source_bytes=0)
                continue
            base.update(source_sha256=facts["source_sha256"], _source_bytes=facts["_source_bytes"])
            if img is None:
                out[i] = failed(base, clean_message(f"not a usable image: {facts.get('decode_error')}"))
                continue
            h, w = img.pixels.shape[:2]
            base.update(width=w, height=h)
            out[i] = base
            todo.append((i, img))
        # Bucket by size (the codec batches equal padded sizes together); sorting keeps buckets full.
        todo.sort(key=lambda x: x[1].pixels.shape[:2])
        results = self._encode([img for _, img in todo], [out[i]["key"] for i, _ in todo],
                               [out[i]["source_sha256"] for i, _ in todo])
        for (i, _), res in zip(todo, results):
            row = out[i]
            if isinstance(res, BaseException):
                out[i] = failed(row, f"encoding failed: {one_line(res)}")
            else:
                row.update(bitstream=res.data, bitstream_sha256=sha256_hex(res.data), n_bytes=len(res.data),
                           bpp=res.bpp, t=int(res.t), status=STATUS_OK, error=None)
        return out  # type: ignore[return-value]

    def _encode(self, images: list, keys: list[str] | None = None, shas: list[str] | None = None) -> list:
        """Encode a batch; our codec binds each record to its key and source (format v2)."""
        if not images:
            return []
        bind = {"keys": keys, "source_sha256": shas} if self.binds and keys is not None else {}
        try:
            return self.codec.encode(images, errors="return", **bind)
        except Exception:  # a batch-level failure (e.g. out of memory): retry one by one so it fails alone
            res = []
            for j, im in enumerate(images):
                one = {k: [v[j]] for k, v in bind.items()}
                try:
                    res.append(self.codec.encode([im], errors="return", **one)[0])
                except Exception as e:
                    res.append(e)
            return res


class DecodeActor:
    """Bitstream rows -> PNGs (written under `out_url` by the actor itself) or PNG bytes rows."""

    def __init__(self, spec: CodecSpec | dict, out_url: str | None = None, opts: StorageOptions | None = None,
                 emit_pixels: bool = False) -> None:
        spec = as_spec(spec)
        self.codec = spec.build()
        self.fingerprint = codec_fingerprint_hex(self.codec)
        self.steps = spec.steps
        self.worker = worker_id()
        self.emit_pixels = emit_pixels  # leave image encoding + writing to the caller (workers.ShardDecoder)
        self.schema = (pa.schema(list(DECODED_SCHEMA) + [pa.field(n, t) for n, t in PIXEL_COLUMNS])
                       if emit_pixels else DECODED_SCHEMA)
        self.fs, self.root = get_fs(out_url, opts) if out_url is not None else (None, None)
        import hashlib

        from .quarantine import AttemptLedger  # bounded attempts per row across crashes ($FCODEC_LEDGER_DIR)

        self.ledger = AttemptLedger.from_env(job=hashlib.sha256(repr((spec, out_url)).encode()).hexdigest()[:16])

    def __call__(self, batch: Any) -> pa.Table:
        return table_of(self.decode_rows(rows_of(batch)), self.schema)

    def decode_rows(self, rows: list[dict]) -> list[dict]:
        """Rows {key, bitstream, bitstream_sha256, width, height, status, _...} -> decoded rows.

        Checks each bitstream against its sha256 before decoding and the decoded size against
        the row; with `out_url` writes `<out_url>/<output_key(key)>` atomically and returns rows
        without the PNG bytes.
        """
        from codec import bitstream as bs

        out: list[dict] = []
        todo: list[tuple[int, bytes, bool]] = []
        for r in rows:
            base = {k: v for k, v in r.items() if k.startswith("_")}
            base.update(key=r.get("key"), width=r.get("width"), height=r.get("height"), _worker=self.worker)
            out.append(base)
            data = r.get("bitstream")
            try:
                if r.get("status") != STATUS_OK or data is None:
                    out[-1] = {**base, "status": STATUS_SKIPPED, "error": f"not decoded: compression had failed ({r.get('error')})"}
                    continue
                dest = output_key(r["key"])
                if r.get("bitstream_sha256") and sha256_hex(data) != r["bitstream_sha256"]:
                    raise ValueError("bitstream_sha256 does not match the stored bitstream (corrupt dataset)")
                gray = bool(bs.parse(data).flags & bs.FLAG_GRAY)
            except Exception as e:
                out[-1] = failed(base, str(e))
                continue
            base["_dest"] = dest
            base["_source_bytes"] = len(data)
            todo.append((len(out) - 1, data, gray))
        try:
            from .quarantine import guarded_decode

            decoded = guarded_decode(self.ledger, [out[i]["key"] for i, _, _ in todo], [d for _, d, _ in todo],
                                     lambda ds: self.codec.decode(ds, steps=self.steps, errors="return"))
        except Exception as e:  # batch-level failure: decode one by one
            decoded = []
            for _, d, _ in todo:
                try:
                    decoded.append(self.codec.decode([d], steps=self.steps, errors="return")[0])
                except Exception as e1:
                    decoded.append(e1)
            del e
        for (i, _, gray), px in zip(todo, decoded):
            row = out[i]
            dest = row.pop("_dest")
            if isinstance(px, BaseException):
                out[i] = failed(row, f"decoding failed: {one_line(px)}")
                continue
            h, w = px.shape[:2]
            if row.get("width") is not None and (w, h) != (row["width"], row["height"]):
                out[i] = failed(row, f"decoded {w}x{h}, the row says {row['width']}x{row['height']}")
                continue
            row.update(width=w, height=h)
            if self.emit_pixels:  # PNG encoding and writing happen in tasks after the actors
                row.update(pixels=px.tobytes(), px_h=h, px_w=w, gray=gray, _dest=dest)
            else:
                out[i] = finish_decoded(row, px, gray, dest, self.fs, self.root)
        return out


__all__ = ["EncodeActor", "DecodeActor", "as_spec", "worker_id"]
