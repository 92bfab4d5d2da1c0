"""Stateful callable classes for Ray Data actor pools: the codec is loaded once, in `__init__`.

`EncodeActor` turns rows of source bytes into bitstream rows (hash, decode image, encode);
`DecodeActor` turns bitstream rows back into images (verify checksum, decode, PNG, write).
Both are plain classes: `EncodeActor(spec)(batch)` works without Ray, which is how tests and
other jobs (audit) can call them directly. Batches are `pyarrow.Table`s or dicts of lists.

Columns starting with '_' (shard bookkeeping) pass through untouched; rows with
`_sentinel = True` mark the end of a shard and are passed through as they are.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from typing import Any

import pyarrow as pa

from .schema import BITSTREAM_SCHEMA, DECODED_SCHEMA, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED
from .storage import StorageOptions, get_fs, join, safe_key_path, write_atomic
from .transform import PIXEL_COLUMNS, decode_source, decoded_image

# Codec loads in this process: tests and the manifest use it to prove "once per actor".
CODEC_LOADS = 0

INTERNAL = [("_shard", pa.string()), ("_sentinel", pa.bool_()), ("_shard_n", pa.int64()),
            ("_source_bytes", pa.int64()), ("_out_bytes", pa.int64()), ("_worker", pa.string()), ("_loads", pa.int64())]

CODEC_KEYS = ("backbone", "vae", "entropy", "codec_weights", "device", "precision", "batch_size", "t",
              "target_bpp", "steps", "threads", "max_pixels")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CODEC_DEFAULTS = {"backbone": "tiny", "entropy": "static", "precision": "auto", "batch_size": 8}


def normalize_codec(spec: dict) -> dict:
    """The spec with defaults filled in, so {} and {"entropy": "static"} compare equal."""
    return {**{k: None for k in CODEC_KEYS}, **CODEC_DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}


def load_codec_from_spec(spec: dict):
    """Build the codec a job's codec options describe (a plain dict, picklable to any node).

    Keys: backbone, vae, entropy, codec_weights, device (None: cuda if visible, else cpu),
    precision, batch_size, t, target_bpp, steps, threads (torch CPU threads), max_pixels.
    """
    global CODEC_LOADS
    import torch

    spec = normalize_codec(spec)
    if spec.get("baseline"):  # JPEG/WebP/AVIF/CompressAI behind the same API (codec/baselines.py)
        from codec.baselines import make_baseline

        CODEC_LOADS += 1
        return make_baseline(spec["baseline"], int(spec.get("quality") or 75))
    from codec import CodecConfig, load_codec

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = CodecConfig(batch_size=int(spec.get("batch_size") or 8), precision=spec.get("precision") or "auto")
    for k in ("t", "target_bpp", "steps", "max_pixels"):
        if spec.get(k) is not None:
            setattr(cfg, k, spec[k])
    device = spec.get("device") or ("cuda" if torch.cuda.is_available() else None)
    codec = load_codec(spec.get("backbone") or "tiny", vae=spec.get("vae"), entropy=spec.get("entropy") or "static",
                       codec_weights=spec.get("codec_weights"), device=device, config=cfg)
    CODEC_LOADS += 1
    return codec


def codec_fingerprint_hex(codec) -> str:
    """The `codec_fingerprint` column: backbone fingerprint + codec fingerprint, 32 hex digits."""
    return codec.backbone.fingerprint().hex() + codec.fingerprint().hex()


def worker_id() -> str:
    """host:ray-node:pid:CUDA_VISIBLE_DEVICES of this process (where an actor runs, which GPU it got)."""
    node = "-"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:
        pass
    return f"{socket.gethostname()}:{node}:{os.getpid()}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"


def rows_of(batch: Any) -> list[dict]:
    """A pyarrow Table, a dict of columns or a list of dicts -> list of row dicts."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if isinstance(batch, dict):
        cols = {k: list(v) for k, v in batch.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return list(batch)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    full = pa.schema(list(schema) + [pa.field(n, t) for n, t in INTERNAL])
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in full}, schema=full)


def _failed(row: dict, error: str, **extra) -> dict:
    return {**row, "status": STATUS_FAILED, "error": error, **extra}


def _clean(msg: str) -> str:
    """Drop object reprs (<_io.BytesIO object at 0x...>) that make messages differ run to run."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", msg)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class EncodeActor:
    """Source bytes -> bitstream rows. One codec per actor (per GPU when there are GPUs)."""

    def __init__(self, spec: dict) -> None:
        self.codec = load_codec_from_spec(spec)
        self.fingerprint = codec_fingerprint_hex(self.codec)
        from codec import CODEC_VERSION

        self.version = CODEC_VERSION
        self.worker = worker_id()

    def __call__(self, batch: Any) -> pa.Table:
        return _table(self.encode_rows(rows_of(batch)), BITSTREAM_SCHEMA)

    def encode_rows(self, rows: list[dict]) -> list[dict]:
        """Input rows {key, source_uri, data, read_error, _...} -> bitstream rows (same order).

        Rows may instead carry decoded pixels from the transform stage (`pixels`, `px_h`,
        `px_w`, `gray`, `alpha`, `source_sha256`, `decode_error`) in place of `data`."""
        out: list[dict | None] = [None] * len(rows)
        todo: list[tuple[int, Any]] = []
        for i, r in enumerate(rows):
            base = {k: v for k, v in r.items() if k.startswith("_")}
            base.update(key=r.get("key"), source_uri=r.get("source_uri"), codec_fingerprint=self.fingerprint,
                        codec_version=self.version, _worker=self.worker, _loads=CODEC_LOADS)
            if r.get("_sentinel"):
                out[i] = base
                continue
            if "pixels" in r:  # hashed and decoded by the transform stage
                facts = {k: r.get(k) for k in ("source_sha256", "_source_bytes", "decode_error")}
                img = decoded_image(r) if r.get("pixels") is not None else None
            else:  # source bytes: hash and decode here, the same way
                facts, img = decode_source(r.get("data"), self.codec.config.max_pixels)
            if facts.get("source_sha256") is None:
                out[i] = _failed(base, r.get("read_error") or "source could not be read", _source_bytes=0)
                continue
            base.update(source_sha256=facts["source_sha256"], _source_bytes=facts["_source_bytes"])
            if img is None:
                out[i] = _failed(base, _clean(f"not a usable image: {facts.get('decode_error')}"))
                continue
            h, w = img.pixels.shape[:2]
            base.update(width=w, height=h)
            out[i] = base
            todo.append((i, img))
        # Bucket by size (the codec batches equal padded sizes together); sorting keeps buckets full.
        todo.sort(key=lambda x: x[1].pixels.shape[:2])
        results = self._encode([img for _, img in todo])
        for (i, _), res in zip(todo, results):
            row = out[i]
            if isinstance(res, BaseException):
                out[i] = _failed(row, f"encoding failed: {_one_line(res)}")
            else:
                row.update(bitstream=res.data, bitstream_sha256=sha256_hex(res.data), n_bytes=len(res.data),
                           bpp=res.bpp, t=int(res.t), status=STATUS_OK, error=None)
        return out  # type: ignore[return-value]

    def _encode(self, images: list) -> list:
        if not images:
            return []
        try:
            return self.codec.encode(images, errors="return")
        except Exception:  # a batch-level failure (e.g. out of memory): retry one by one so it fails alone
            res = []
            for im in images:
                try:
                    res.append(self.codec.encode([im], errors="return")[0])
                except Exception as e:
                    res.append(e)
            return res


def finish_decoded(row: dict, px, gray: bool, dest: str, fs=None, root: str | None = None) -> dict:
    """PNG-encode decoded pixels into `row` and write them to `root/dest` on `fs` (or keep the
    PNG bytes in the row when fs is None); a failed write makes a failed row."""
    from codec import to_png

    png = to_png(px, gray=gray)
    row.update(png_sha256=sha256_hex(png), status=STATUS_OK, error=None, _out_bytes=len(png))
    if fs is None:
        row["png"] = png
        return row
    try:
        write_atomic(fs, join(root, dest), png)
    except Exception as e:
        return _failed(row, f"could not write {dest}: {_one_line(e)}")
    return row


def output_key(key: str, fmt: str = "png") -> str:
    """Where `decompress` writes a key: the key itself when it already ends in .png, else key +
    '.png' (one-to-one, so 'a.jpg' and 'a.png' cannot collide). Raises ValueError for keys that
    would escape the output folder."""
    safe_key_path(key)
    return key if key.lower().endswith(".png") else key + ".png"


class DecodeActor:
    """Bitstream rows -> PNGs (written under `out_url` by the actor itself) or PNG bytes rows."""

    def __init__(self, spec: dict, out_url: str | None = None, opts: StorageOptions | None = None,
                 emit_pixels: bool = False) -> None:
        self.codec = load_codec_from_spec(spec)
        self.steps = spec.get("steps")
        self.worker = worker_id()
        self.emit_pixels = emit_pixels  # leave PNG encoding + writing to transform.encode_outputs
        self.schema = (pa.schema(list(DECODED_SCHEMA) + [pa.field(n, t) for n, t in PIXEL_COLUMNS])
                       if emit_pixels else DECODED_SCHEMA)
        self.fs, self.root = get_fs(out_url, opts) if out_url is not None else (None, None)
        import hashlib

        from .quarantine import AttemptLedger  # bounded attempts per row across crashes ($FCODEC_LEDGER_DIR)

        self.ledger = AttemptLedger.from_env(job=hashlib.sha256(repr((spec, out_url)).encode()).hexdigest()[:16])

    def __call__(self, batch: Any) -> pa.Table:
        return _table(self.decode_rows(rows_of(batch)), self.schema)

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
            base.update(key=r.get("key"), width=r.get("width"), height=r.get("height"), _worker=self.worker, _loads=CODEC_LOADS)
            out.append(base)
            if r.get("_sentinel"):
                continue
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
                out[-1] = _failed(base, str(e))
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
                out[i] = _failed(row, f"decoding failed: {_one_line(px)}")
                continue
            h, w = px.shape[:2]
            if row.get("width") is not None and (w, h) != (row["width"], row["height"]):
                out[i] = _failed(row, f"decoded {w}x{h}, the row says {row['width']}x{row['height']}")
                continue
            row.update(width=w, height=h)
            if self.emit_pixels:  # PNG encoding and writing happen in tasks after the actors
                row.update(pixels=px.tobytes(), px_h=h, px_w=w, gray=gray, _dest=dest)
            else:
                out[i] = finish_decoded(row, px, gray, dest, self.fs, self.root)
        return out


__all__ = ["EncodeActor", "DecodeActor", "CODEC_LOADS", "load_codec_from_spec", "normalize_codec", "codec_fingerprint_hex",
           "finish_decoded", "output_key", "rows_of", "sha256_hex", "worker_id"]
