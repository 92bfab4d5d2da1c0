"""Image stages in Ray tasks beside the actors: compress decodes source bytes to RGB pixels in
the read tasks (`decode_sources`); decompress PNG-encodes and writes the actors' decoded pixels
in tasks after them (`encode_outputs`). Which jobs use them: run.JobConfig.image_stage.

Decoding a PNG/JPEG (inflate, EXIF rotation, colour conversion) needs no model, so it runs in
the read tasks' CPU pool, where it overlaps with the actors' model compute instead of delaying
it; the actors receive raw pixels. A file that does not decode becomes a row with
`decode_error` set, which the actor turns into a recorded failure, so one bad file fails alone.

The raw pixels are larger than the compressed source (~3 bytes a pixel), which is what the
object store carries between this stage and the actors; the read stage's chunking (rows and
bytes per chunk) bounds how much is in flight.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

# Columns the decode actors add for `encode_outputs` (emit_pixels=True).
PIXEL_COLUMNS = [("pixels", pa.large_binary()), ("px_h", pa.int32()), ("px_w", pa.int32()), ("gray", pa.bool_()),
                 ("_dest", pa.string())]

# Columns this stage adds (and `data`, the source bytes, which it drops once hashed).
DECODED_COLUMNS = [("source_sha256", pa.string()), ("_source_bytes", pa.int64()), ("pixels", pa.large_binary()),
                   ("px_h", pa.int32()), ("px_w", pa.int32()), ("gray", pa.bool_()), ("alpha", pa.bool_()),
                   ("decode_error", pa.string())]


def decode_sources(batch: pa.Table, max_pixels: int | None = None) -> pa.Table:
    """Read-stage rows {key, source_uri, data, read_error, _...} -> the same rows with `data`
    replaced by decoded pixels (or `decode_error`). Sentinel rows pass through."""
    from codec.images import DEFAULT_MAX_PIXELS, load_image

    cap = int(max_pixels or DEFAULT_MAX_PIXELS)
    data = batch.column("data").to_pylist()
    sentinel = batch.column("_sentinel").fill_null(False).to_pylist()
    new = {name: [] for name, _ in DECODED_COLUMNS}
    for raw, is_sentinel in zip(data, sentinel):
        vals = dict.fromkeys(new)
        if not is_sentinel and raw is not None:
            vals["source_sha256"] = hashlib.sha256(raw).hexdigest()
            vals["_source_bytes"] = len(raw)
            try:
                img = load_image(raw, max_pixels=cap)
                vals.update(pixels=img.pixels.tobytes(), px_h=img.pixels.shape[0], px_w=img.pixels.shape[1],
                            gray=img.gray, alpha=img.alpha)
            except Exception as e:  # ImageError and anything a hostile file provokes
                vals["decode_error"] = str(e)
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


def encode_outputs(batch: pa.Table, out_url: str | None = None, opts=None) -> pa.Table:
    """Decode actors' rows with raw `pixels` -> finished decoded rows: PNG bytes in the row, or
    the PNG written to `out_url/<dest>` (atomically). Other rows (failures, sentinels) pass."""
    import numpy as np

    from .actors import _table, finish_decoded
    from .schema import DECODED_SCHEMA
    from .storage import get_fs

    fs, root = get_fs(out_url, opts) if out_url is not None else (None, None)
    out = []
    for r in batch.to_pylist():
        px, h, w, gray, dest = (r.pop(k, None) for k in ("pixels", "px_h", "px_w", "gray", "_dest"))
        if px is not None:
            r = finish_decoded(r, np.frombuffer(px, dtype=np.uint8).reshape(h, w, 3), bool(gray), dest, fs, root)
        out.append(r)
    return _table(out, DECODED_SCHEMA)
