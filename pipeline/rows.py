"""Row helpers every stage shares: batches as row dicts, tables with the internal columns, the
decoded-output naming rule, hashing, one-line error text."""
from __future__ import annotations

import hashlib
import re
from typing import Any

import pyarrow as pa

from .layout import INTERNAL_COLUMNS
from .schema import STATUS_FAILED, STATUS_OK
from .storage import join, safe_key_path, write_atomic


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_of(batch: Any) -> list[dict]:
    """A pyarrow Table, a dict of columns or a list of dicts -> list of row dicts."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if isinstance(batch, dict):
        cols = {k: list(v) for k, v in batch.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return list(batch)


def table_of(rows: list[dict], schema: pa.Schema, internal: bool = True) -> pa.Table:
    """Rows -> a table of `schema`'s columns (plus the internal `_` columns unless internal=False)."""
    full = pa.schema(list(schema) + ([pa.field(n, t) for n, t in INTERNAL_COLUMNS] if internal else []))
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in full}, schema=full)


def failed(row: dict, error: str, **extra) -> dict:
    return {**row, "status": STATUS_FAILED, "error": error, **extra}


def clean_message(msg: str) -> str:
    """Drop object reprs (<_io.BytesIO object at 0x...>) that make messages differ run to run."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", msg)


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return clean_message(f"{type(e).__name__}: {msg}" if msg else type(e).__name__)


def error_class(error: str | None) -> str:
    """The class of a failure message for the per-shard histogram: its leading words up to ':'."""
    if not error:
        return "unknown"
    head = error.split(":", 1)[0].strip()
    return head[:60] or "unknown"


IMAGE_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}


def output_key(key: str, fmt: str = "png") -> str:
    """Where `decompress` writes a key: the key itself when it already ends in .<fmt>, else key +
    '.<fmt>'. Raises ValueError for keys that would escape the output folder. Two keys can map
    to one name ('x.jpg' and 'x.jpg.png'); the decoder fails the second one, never overwrites."""
    safe_key_path(key)
    return key if key.lower().endswith("." + fmt) else f"{key}.{fmt}"


def encode_image(px, gray: bool, fmt: str = "png") -> bytes:
    """Decoded pixels as PNG (lossless, the default), WebP or JPEG (quality 95) bytes."""
    if fmt == "png":
        from codec import to_png

        return to_png(px, gray=gray)
    import io

    from PIL import Image

    im = Image.fromarray(px).convert("L") if gray else Image.fromarray(px)
    buf = io.BytesIO()
    im.save(buf, format=IMAGE_FORMATS[fmt], quality=95)
    return buf.getvalue()


def finish_decoded(row: dict, px, gray: bool, dest: str | None, fs=None, root: str | None = None,
                   fmt: str = "png") -> dict:
    """Encode decoded pixels into `row` and write them to `root/dest` on `fs` (or keep the
    image bytes in the row when fs is None); a failed write makes a failed row."""
    png = encode_image(px, gray, fmt)
    row.update(image_sha256=sha256_hex(png), status=STATUS_OK, error=None, _out_bytes=len(png))
    if fs is None:
        row["image"] = {"bytes": png, "path": dest}
        return row
    try:
        write_atomic(fs, join(root, dest), png)
    except Exception as e:  # noqa: BLE001 - one unwritable output fails alone
        return failed(row, f"could not write {dest}: {one_line(e)}")
    return row
