"""Image work on rows: decode source bytes to RGB pixels (`decode_source`, `decode_sources`) and
and back (`rows.finish_decoded`). The shard workers (workers.py) run
them in their I/O threads, beside the model, so the model never waits on PNG/JPEG work.

A file that does not decode becomes a row with `decode_error` set, which the encoder turns into
a recorded failure, so one bad file fails alone. Hashing happens here too: the sha256 of the
source bytes is taken before decoding, so even an undecodable input has one.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

# Columns the decode actors add for the workers' image encoding (emit_pixels=True).
PIXEL_COLUMNS = [("pixels", pa.large_binary()), ("px_h", pa.int32()), ("px_w", pa.int32()), ("gray", pa.bool_()),
                 ("_dest", pa.string())]

# Columns this stage adds (and `data`, the source bytes, which it drops once hashed).
DECODED_COLUMNS = [("source_sha256", pa.string()), ("_source_bytes", pa.int64()), ("pixels", pa.large_binary()),
                   ("px_h", pa.int32()), ("px_w", pa.int32()), ("gray", pa.bool_()), ("alpha", pa.bool_()),
                   ("decode_error", pa.string())]


def decode_source(raw: bytes | None, max_pixels: int | None = None):
    """Hash and decode one source: ({source_sha256, _source_bytes[, decode_error]}, LoadedImage or
    None). Both the transform stage and actors that decode for themselves call this."""
    from codec.images import DEFAULT_MAX_PIXELS, load_image

    if raw is None:
        return {}, None
    facts = {"source_sha256": hashlib.sha256(raw).hexdigest(), "_source_bytes": len(raw)}
    try:
        return facts, load_image(raw, max_pixels=int(max_pixels or DEFAULT_MAX_PIXELS))
    except Exception as e:  # ImageError and anything a hostile file provokes
        return {**facts, "decode_error": str(e)}, None


def decode_sources(batch: pa.Table, max_pixels: int | None = None) -> pa.Table:
    """Read-stage rows {key, source_uri, data, read_error, _...} -> the same rows with `data`
    replaced by decoded pixels (or `decode_error`)."""
    data = batch.column("data").to_pylist()
    new = {name: [] for name, _ in DECODED_COLUMNS}
    for raw in data:
        vals = dict.fromkeys(new)
        facts, img = decode_source(raw, max_pixels)
        vals.update(facts)
        if img is not None:
            vals.update(pixels=img.pixels.tobytes(), px_h=img.pixels.shape[0], px_w=img.pixels.shape[1],
                        gray=img.gray, alpha=img.alpha)
        for k, v in vals.items():
            new[k].append(v)
    out = batch.drop_columns([c for c in ["data", *new] if c in batch.column_names])
    for name, typ in DECODED_COLUMNS:
        out = out.append_column(pa.field(name, typ), pa.array(new[name], typ))
    return out


def decoded_image(row: dict):
    """The `LoadedImage` of a transformed row (a read-only view of its pixel bytes)."""
    import numpy as np

    from codec.images import LoadedImage

    px = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(int(row["px_h"]), int(row["px_w"]), 3)
    return LoadedImage(px, gray=bool(row.get("gray")), alpha=bool(row.get("alpha")))
