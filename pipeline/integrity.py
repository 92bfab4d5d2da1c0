"""Tamper evidence for archives in shared storage: HMAC-SHA256 over records and over the books.

CRC32 and sha256 catch accidents; anyone who can write the archive can recompute them. With a
secret key, this module signs

* each record: `sign_record(key, record_bytes)` (a v2 record carries its key and source tags,
  so the signature also binds it to its row), stored in the row's `RECORD_HMAC_COLUMN`;
* the books: `sign_books(key, parts)` over the sorted list of (part file, row count, sha256 of
  the part file's bytes), stored in `_manifest.json` under `MANIFEST_FIELD`, so deleting rows
  or whole shards and fixing the markers and totals is still caught.

The key comes from `$FCODEC_HMAC_KEY` (the key itself, UTF-8) or `$FCODEC_HMAC_KEY_FILE` (a file
holding it); `load_key()` returns None without one, and `fcodec verify` then says
"authenticity not checked (no key)". The key is never written anywhere.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os

ENV_KEY, ENV_KEY_FILE = "FCODEC_HMAC_KEY", "FCODEC_HMAC_KEY_FILE"
RECORD_HMAC_COLUMN = "record_hmac"
MANIFEST_FIELD = "integrity"  # {"algorithm": ALGORITHM, "books_hmac": hex}
ALGORITHM = "hmac-sha256"
_RECORD, _BOOKS = b"fdc-record\0", b"fdc-books\0"  # domain separation: a record MAC is never a books MAC


class IntegrityError(ValueError):
    """A key that cannot be used (empty, unreadable file)."""


def load_key(env: dict | None = None) -> bytes | None:
    """The archive key from the environment (`FCODEC_HMAC_KEY`, else the file named by
    `FCODEC_HMAC_KEY_FILE`), or None when neither is set."""
    env = os.environ if env is None else env
    if env.get(ENV_KEY):
        return env[ENV_KEY].encode("utf-8")
    path = env.get(ENV_KEY_FILE)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise IntegrityError(f"cannot read the HMAC key file named by ${ENV_KEY_FILE} ({type(e).__name__})") from None
    if not key:
        raise IntegrityError(f"the HMAC key file named by ${ENV_KEY_FILE} is empty")
    return key


def sign_record(key: bytes, record_bytes: bytes) -> str:
    """HMAC-SHA256 (hex) of one bitstream record."""
    return hmac.new(_key(key), _RECORD + bytes(record_bytes), hashlib.sha256).hexdigest()


def verify_record(key: bytes, record_bytes: bytes, mac_hex: str | None) -> bool:
    """True when `mac_hex` is the record's HMAC under `key` (constant-time comparison)."""
    return isinstance(mac_hex, str) and hmac.compare_digest(sign_record(key, record_bytes), mac_hex.lower())


def books_entries(parts: list[dict]) -> list[list]:
    """The canonical, sorted list the books signature covers: [file, rows, sha256] per part.

    Each part is a dict with `file` (the part file's name), `rows` (int) and `checksum`
    (sha256 hex of the part file's bytes)."""
    out = []
    for p in parts:
        if not isinstance(p, dict) or not {"file", "rows", "checksum"} <= set(p):
            raise IntegrityError(f"a books entry needs file, rows and checksum, got {p!r}")
        out.append([str(p["file"]), int(p["rows"]), str(p["checksum"]).lower()])
    return sorted(out)


def sign_books(key: bytes, parts: list[dict]) -> str:
    """HMAC-SHA256 (hex) over `books_entries(parts)` as canonical JSON."""
    blob = json.dumps(books_entries(parts), separators=(",", ":")).encode()
    return hmac.new(_key(key), _BOOKS + blob, hashlib.sha256).hexdigest()


def verify_books(key: bytes, parts: list[dict], mac_hex: str | None) -> bool:
    """True when `mac_hex` signs exactly these parts (names, row counts, checksums)."""
    return isinstance(mac_hex, str) and hmac.compare_digest(sign_books(key, parts), mac_hex.lower())


def file_sha256(f, chunk: int = 1 << 20) -> str:
    """sha256 hex of an open binary file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    while True:
        b = f.read(chunk)
        if not b:
            return h.hexdigest()
        h.update(b)


def _key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise IntegrityError("an HMAC key must be non-empty bytes")
    return bytes(key)


__all__ = ["ALGORITHM", "ENV_KEY", "ENV_KEY_FILE", "IntegrityError", "MANIFEST_FIELD", "RECORD_HMAC_COLUMN",
           "books_entries", "file_sha256", "load_key", "sign_books", "sign_record", "verify_books", "verify_record"]
