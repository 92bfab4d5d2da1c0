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


def output_key(key: str, fmt: str = "png") -> str:
    """Where `decompress` writes a key: the key itself when it already ends in .png, else key +
    '.png' (one-to-one, so 'a.jpg' and 'a.png' cannot collide). Raises ValueError for keys that
    would escape the output folder."""
    safe_key_path(key)
    return key if key.lower().endswith(".png") else key + ".png"


def finish_decoded(row: dict, px, gray: bool, dest: str | None, fs=None, root: str | None = None) -> dict:
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
    except Exception as e:  # noqa: BLE001 - one unwritable output fails alone
        return failed(row, f"could not write {dest}: {one_line(e)}")
    return row
