"""Verify a bitstream dataset (`fcodec compress` output) without decoding it.

Checks, in order of cost:

* layout (the books, read through `catalog.Books`, either layout): a manifest present and
  `complete`, a commit record per part file, no part file without one (an orphan of a dead run
  is visible to readers), no committed shard whose part file is missing; a manifest or commit
  record of the wrong JSON shape is one line naming the file and the field;
* every part file: readable Parquet with the bitstream schema, row counts equal to its record;
* every row: a key (unique across the dataset, and safe as a path: no `..` component, not
  absolute, no NUL, at most `MAX_KEY_CHARS`), a status; `ok` rows carry a bitstream whose
  length is `n_bytes` (at most `max_bitstream_bytes`: a larger one is reported, not loaded), whose
  sha256 is `bitstream_sha256`, which parses (`codec.bitstream.parse`: magic, version, CRC,
  lengths, pixel cap), whose width, height and t match the row's columns, whose v2 binding tags
  match the row's `key` and `source_sha256` (a swapped or moved bitstream), and whose backbone +
  codec fingerprints equal the row's `codec_fingerprint` (one value per dataset, equal to the
  manifest's); `failed` rows carry an error and no bitstream; a `--dedupe` reference names a
  row of this dataset that holds a bitstream of the same source sha256;
* with an HMAC key (`pipeline.integrity.load_key`: `$FCODEC_HMAC_KEY` or a key file): every
  record's `record_hmac` and the manifest's signature of the books (part files, row counts,
  sha256 of each part file), so rows or shards deleted with the books fixed are caught; without
  a key the report says "authenticity not checked (no key)";
* totals: rows/ok/failed/shards/output bytes of the commit records against the manifest;
* optionally (`decode_sample=N`): N random `ok` rows decoded with the dataset's codec, each
  checked for its stored size.

Memory is bounded by one Parquet row group (a row group whose bitstreams add up to more than
`ROW_GROUP_FACTOR` x `max_bitstream_bytes` is reported, not loaded) plus the set of keys. The
pixel cap is the caller's or `codec.limits`' default, never the manifest's. Only
`codec.bitstream` (pure Python, no model) is needed unless a decode sample is asked for.
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import integrity
from . import storage as st
from .schema import BITSTREAM_SCHEMA, STATUS_FAILED, STATUS_OK, check_schema

MAX_LISTED = 200  # problems kept verbatim; the count is always exact
MAX_KEY_CHARS = 1024
ROW_GROUP_FACTOR = 4  # a row group's bitstream column may hold up to 4 x max_bitstream_bytes
KEY_FROM_ENV = object()  # verify_dataset's default: the key from the environment
class Report:
    """Collects problems (each one line naming the shard/key) and counters."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.n_problems = 0
        self.warnings: list[str] = []
        self.counts = {"shards": 0, "rows": 0, "ok_rows": 0, "failed_rows": 0, "bitstreams_checked": 0, "output_bytes": 0,
                       "decoded": 0, "bound_rows": 0, "unbound_rows": 0, "hmac_checked": 0}

    def bad(self, msg: str) -> None:
        self.n_problems += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(msg)


def verify_dataset(url: str, opts: st.StorageOptions | None = None, decode_sample: int = 0, seed: int = 0,
                   codec_spec: dict | None = None, max_pixels: int | None = None,
                   echo: Callable[[str], None] = lambda s: None, hmac_key=KEY_FROM_ENV,
                   max_bitstream_bytes: int | None = None) -> dict:
    """Check every record of the bitstream dataset at `url`; returns a dict with `ok` (True only
    when the archive is whole), `problems` (one line each), `warnings`, `authenticity`
    ("checked" or "not checked (no key)") and counters.

    `hmac_key`: bytes, None (no authenticity check), or by default `integrity.load_key()`.
    `max_pixels`, `max_bitstream_bytes`: the caller's caps (default `codec.limits`), never the
    dataset's."""
    from codec import bitstream as bs
    from codec import limits

    key = integrity.load_key() if hmac_key is KEY_FROM_ENV else hmac_key
    cap = int(max_bitstream_bytes or limits.MAX_VERIFY_BITSTREAM_BYTES)
    rep = Report()
    fs, root = st.get_fs(url, opts)
    try:
        fs.invalidate_cache()
    except Exception:
        pass
    if not fs.exists(root):
        raise ValueError(f"{url} does not exist")
    manifest, markers, visible = read_books(fs, root, rep)
    # the caller's cap or the software's; a dataset cannot raise the cap applied to itself
    max_pixels = min(int(max_pixels or bs.DEFAULT_MAX_PIXELS), limits.DECODE_MAX_PIXELS)

    # --- every row of every committed part file
    keys: set[str] = set()
    fingerprints: dict[str, int] = {}
    sample: list[tuple[float, bytes, int, int, str]] = []  # (priority, bitstream, w, h, key) reservoir
    rng = random.Random(seed)
    books: list[dict] = []
    ctx = {"rep": rep, "keys": keys, "fingerprints": fingerprints, "max_pixels": max_pixels, "bs": bs, "sample": sample,
           "n_sample": decode_sample, "rng": rng, "cap": cap, "hmac_key": key, "refs": [], "owners": {}}
    for sid, m in sorted(markers.items()):
        if m["file"] not in visible:
            continue
        rep.counts["shards"] += 1
        got = _check_part(fs, root, sid, m, ctx)
        if key is not None and got is not None:
            books.append({"file": m["file"], "rows": got["rows"], "checksum": got["sha256"]})
        for k in ("rows", "ok", "failed"):
            if got is not None and m.get(k) is not None and got[k] != m[k]:
                rep.bad(f"shard {sid}: its commit record says {k} = {m[k]}, the part file has {got[k]}")
        if got is not None and m.get("output_bytes") is not None and got["output_bytes"] != m["output_bytes"]:
            rep.bad(f"shard {sid}: its commit record says {m['output_bytes']} output bytes, the part file has "
                    f"{got['output_bytes']}")
        echo(f"shard {sid}: {got['rows'] if got else '?'} rows checked")

    for where, ref, sha in ctx["refs"]:  # every reference names a stored bitstream of the same content
        if ref not in ctx["owners"]:
            rep.bad(f"{where}: refers to {ref!r}, which holds no bitstream in this dataset")
        elif ctx["owners"][ref] != sha:
            rep.bad(f"{where}: refers to {ref!r}, whose source_sha256 differs")
    rep.counts["references"] = len(ctx["refs"])

    # --- fingerprints and totals
    if len(fingerprints) > 1:
        rep.bad(f"rows from {len(fingerprints)} different codecs in one dataset: {dict(sorted(fingerprints.items()))}")
    mfp = (manifest or {}).get("codec_fingerprint")
    if mfp and fingerprints and set(fingerprints) != {mfp}:
        rep.bad(f"manifest codec_fingerprint {mfp} differs from the records' {sorted(fingerprints)}")
    if manifest is not None:
        tot = manifest.get("totals", {})
        want = {"shards": len(markers), "rows": sum(m.get("rows", 0) for m in markers.values()),
                "ok": sum(m.get("ok", 0) for m in markers.values()), "failed": sum(m.get("failed", 0) for m in markers.values()),
                "output_bytes": sum(m.get("output_bytes", 0) for m in markers.values())}
        for k, v in want.items():
            if tot.get(k) != v:
                rep.bad(f"manifest totals.{k} = {tot.get(k)}, the commit records add up to {v}")
        if rep.counts["rows"] != tot.get("rows"):
            rep.bad(f"the manifest counts {tot.get('rows')} rows, the part files hold {rep.counts['rows']}")


    authenticity = "not checked (no key)"
    if key is not None:
        authenticity = "checked"
        sig = ((manifest or {}).get(integrity.MANIFEST_FIELD) or {}).get("books_hmac")
        if not sig:
            rep.bad(f"the manifest carries no books signature ({integrity.MANIFEST_FIELD}.books_hmac) although a key was given")
        elif not integrity.verify_books(key, books, sig):
            rep.bad("the manifest's books signature does not match the part files, their row counts and checksums "
                    "(rows or shards deleted, added or edited)")
    if decode_sample and sample:
        from codec.spec import CodecSpec

        from .catalog import dataset_codec

        given = CodecSpec.from_dict(codec_spec or {})  # options given must agree with the dataset's
        spec = dataset_codec((manifest or {}).get("_manifest"), given, url).replace(max_pixels=max_pixels)
        _decode_sample(sample, spec, rep)
    if manifest is not None:
        manifest.pop("_manifest", None)
    out = {"ok": rep.n_problems == 0, "url": url, "problems": rep.problems, "n_problems": rep.n_problems,
           "warnings": rep.warnings, "codec_fingerprint": next(iter(fingerprints), None), "authenticity": authenticity,
           **rep.counts}
    return out


def unsafe_key(key: str) -> str | None:
    """Why a key cannot safely name an output file (None when it can): a '..' component, an
    absolute path, a NUL character, or more than MAX_KEY_CHARS characters."""
    if len(key) > MAX_KEY_CHARS:
        return f"longer than {MAX_KEY_CHARS} characters ({len(key)})"
    if "\0" in key:
        return "contains a NUL character"
    if key.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", key):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", key):
        return "has a '..' component"
    return None


def read_books(fs, root: str, rep: Report) -> tuple[dict | None, dict[str, dict], set[str]]:
    """The layout-specific part of verify, in one place (through `catalog.Books`, either
    layout): the manifest (a checked dict, or None), the committed shards by id (dicts with
    file/rows/ok/failed/output_bytes) and the names of the visible part files; layout problems
    (no or incomplete manifest, unreadable books, orphans, missing parts, temp leftovers) go to
    `rep`. Everything else verify checks is layout-independent."""
    from . import layout as L
    from .catalog import Books

    books = Books(fs, root)
    manifest = None
    try:
        m = books.read_manifest()
        if m is not None:
            manifest = {**m.to_dict(), "_manifest": m}
    except (ValueError, OSError) as e:
        rep.bad(f"manifest unreadable: {e}")
    if manifest is None and not rep.problems:
        rep.bad("no manifest: the compress job never finished (rerun it to resume)")
    elif manifest is not None and not manifest.get("complete"):
        rep.bad("the manifest says the dataset is incomplete: rerun `fcodec compress` with the same SRC/DST to finish it")
    markers: dict[str, dict] = {}
    try:
        for sid, r in books.read().shards.items():
            if r.file:
                markers[sid] = {"file": r.file, "rows": r.rows, "ok": r.ok, "failed": r.failed,
                                "output_bytes": r.output_bytes, "refs": r.refs}
                if r.file != L.part_name(sid):
                    rep.bad(f"shard {sid}: its commit names {r.file!r}, expected {L.part_name(sid)!r}")
    except (ValueError, OSError) as e:
        rep.bad(f"the commit records are unreadable: {e}")
    visible = set(books.part_files())
    claimed = {m["file"] for m in markers.values()}
    for name in sorted(visible - claimed):
        rep.bad(f"{name}: part file without a commit record (orphan of an interrupted run; readers see its rows; "
                f"the next compress run adopts or removes it)")
    for sid, m in sorted(markers.items()):
        if m["file"] not in visible:
            rep.bad(f"shard {sid}: committed but its part file {m['file']} is missing")
    for tmp in (L.TMP, L.V1_TMP):
        if fs.exists(st.join(root, tmp)):
            rep.warnings.append(f"{tmp}/ holds temp files of an interrupted run (invisible to readers; the next run "
                                "removes them)")
    return manifest, markers, visible


def _check_part(fs, root, sid, marker, ctx) -> dict | None:
    """Stream one part file's rows through `_check_row`; with a key, also hash the file's bytes."""
    rep, cap = ctx["rep"], ctx["cap"]
    name = marker["file"]
    got = {"rows": 0, "ok": 0, "failed": 0, "output_bytes": 0, "sha256": None}
    try:
        with fs.open(st.join(root, name), "rb") as f:
            pf = pq.ParquetFile(f)
            check_schema(pf.schema_arrow, BITSTREAM_SCHEMA)
            has_mac = integrity.RECORD_HMAC_COLUMN in pf.schema_arrow.names
            if ctx["hmac_key"] is not None and not has_mac:
                rep.bad(f"{name}: no {integrity.RECORD_HMAC_COLUMN} column although a key was given (unsigned part)")
            col = pf.schema_arrow.get_field_index("bitstream")
            for g in range(pf.metadata.num_row_groups):
                size = pf.metadata.row_group(g).column(col).total_uncompressed_size
                columns = None
                if size > ROW_GROUP_FACTOR * cap:  # report, do not load: the other columns only
                    rep.bad(f"{name}: row group {g} holds {size} bitstream bytes, over the verify cap of "
                            f"{ROW_GROUP_FACTOR * cap}; its bitstreams were not loaded")
                    columns = [c for c in pf.schema_arrow.names if c != "bitstream"]
                for rb in pf.iter_batches(batch_size=16, row_groups=[g], columns=columns):
                    lengths = pc.binary_length(rb.column("bitstream")).to_pylist() if columns is None else [None] * rb.num_rows
                    small = rb.drop_columns(["bitstream"]) if columns is None else rb
                    for j, r in enumerate(small.to_pylist()):
                        n = lengths[j]
                        if columns is not None:
                            r["bitstream"], n = _NOT_LOADED, -1
                        elif n is not None and n > cap:
                            r["bitstream"] = _NOT_LOADED
                        else:
                            r["bitstream"] = rb.column("bitstream")[j].as_py()
                        _check_row(name, r, n, got, ctx)
        if ctx["hmac_key"] is not None:
            with fs.open(st.join(root, name), "rb") as f:
                got["sha256"] = integrity.file_sha256(f)
    except Exception as e:  # unreadable Parquet, wrong schema, truncated file
        rep.bad(f"{name}: cannot be read as a bitstream dataset part ({type(e).__name__}: {e})")
        return None
    return got


_NOT_LOADED = object()  # a bitstream over the verify cap: reported, never read into memory


def _check_row(name, r, n_data, got, ctx) -> None:
    rep, keys, bs = ctx["rep"], ctx["keys"], ctx["bs"]
    key, status = r.get("key"), r.get("status")
    where = f"{name}: key {key!r}"[:300]
    got["rows"] += 1
    rep.counts["rows"] += 1
    if key is None:
        rep.bad(f"{name}: a row without a key")
    elif key in keys:
        rep.bad(f"{where}: duplicate key (already in another row)")
    else:
        keys.add(key)
        why = unsafe_key(key)
        if why:
            rep.bad(f"{where}: unsafe key ({why}): decompress would refuse it")
    if status == STATUS_FAILED:
        got["failed"] += 1
        rep.counts["failed_rows"] += 1
        if not r.get("error"):
            rep.bad(f"{where}: failed row without an error message")
        if r.get("bitstream") is not None:
            rep.bad(f"{where}: failed row carries a bitstream")
        return
    if status != STATUS_OK:
        rep.bad(f"{where}: unknown status {status!r}")
        return
    got["ok"] += 1
    rep.counts["ok_rows"] += 1
    data = r.get("bitstream")
    if data is None and r.get("ref_key"):  # --dedupe: refers to the row that holds these bytes' bitstream
        ctx["refs"].append((where, r["ref_key"], r.get("source_sha256")))
        return
    if data is None:
        rep.bad(f"{where}: ok row without a bitstream")
        return
    ctx["owners"][key] = r.get("source_sha256")
    got["output_bytes"] += r.get("n_bytes") or 0
    if data is _NOT_LOADED:
        rep.bad(f"{where}: bitstream of {n_data if n_data >= 0 else 'unknown'} bytes over the verify cap of {ctx['cap']} "
                "bytes (not loaded; a codec record is far smaller)")
        return
    rep.counts["output_bytes"] += len(data)
    rep.counts["bitstreams_checked"] += 1
    if r.get("n_bytes") != len(data):
        rep.bad(f"{where}: n_bytes = {r.get('n_bytes')}, the bitstream has {len(data)} bytes")
    if hashlib.sha256(data).hexdigest() != r.get("bitstream_sha256"):
        rep.bad(f"{where}: bitstream_sha256 does not match the bitstream")
    mac_key = ctx["hmac_key"]
    if mac_key is not None and integrity.RECORD_HMAC_COLUMN in r:
        rep.counts["hmac_checked"] += 1
        if not integrity.verify_record(mac_key, data, r.get(integrity.RECORD_HMAC_COLUMN)):
            rep.bad(f"{where}: record HMAC does not match (the record was forged or replaced)")
    try:
        rec = bs.parse(data, max_pixels=ctx["max_pixels"])
    except bs.BitstreamError as e:
        rep.bad(f"{where}: {e}")
        return
    for col, val in (("width", rec.width), ("height", rec.height), ("t", rec.t)):
        if r.get(col) != val:
            rep.bad(f"{where}: record has {col} = {val}, the row says {r.get(col)}")
    try:
        checked = bs.check_binding(rec, key, r.get("source_sha256"))
    except bs.BindingError as e:
        rep.bad(f"{where}: {e}")
    else:
        rep.counts["bound_rows" if checked else "unbound_rows"] += 1
    fp = rec.backbone_fp.hex() + rec.codec_fp.hex()
    if fp != r.get("codec_fingerprint"):
        rep.bad(f"{where}: record fingerprints {fp} differ from the row's codec_fingerprint {r.get('codec_fingerprint')}")
    ctx["fingerprints"][fp] = ctx["fingerprints"].get(fp, 0) + 1
    if ctx["n_sample"]:  # reservoir sampling by random priority: a uniform sample in one pass
        sample = ctx["sample"]
        sample.append((ctx["rng"].random(), data, rec.width, rec.height, key))
        if len(sample) > ctx["n_sample"]:
            sample.remove(min(sample, key=lambda x: x[0]))


def _decode_sample(sample, spec, rep: Report) -> None:
    """Decode the sampled records with `spec` (the dataset's codec, the caller's pixel cap)."""
    codec = spec.build()
    sample = sorted(sample, key=lambda x: x[4])
    outs = codec.decode([s[1] for s in sample], errors="return")
    for (_, _, w, h, key), px in zip(sample, outs):
        if isinstance(px, BaseException):
            rep.bad(f"key {key!r}: decoding failed ({type(px).__name__}: {px})")
        elif px.shape[:2] != (h, w):
            rep.bad(f"key {key!r}: decoded {px.shape[1]}x{px.shape[0]}, the record says {w}x{h}")
        else:
            rep.counts["decoded"] += 1


def format_report(rep: dict, limit: int = 50) -> list[str]:
    """Human-readable summary lines: the verdict first, then the problems."""
    if not rep["ok"]:
        verdict = f"FAILED: {rep['n_problems']} problems"
    elif rep.get("failed_rows"):
        verdict = f"OK: the archive is whole, but with {rep['failed_rows']} failed rows (inputs that could not be encoded)"
    else:
        verdict = "OK: the archive is whole"
    lines = [f"{verdict} -- {rep['url']}",
             f"  {rep['shards']} shards, {rep['rows']} rows ({rep['ok_rows']} ok, {rep['failed_rows']} failed), "
             f"{rep['bitstreams_checked']} bitstreams parsed and hashed, {rep['output_bytes']} bitstream bytes"
             + (f", {rep['decoded']} decoded" if rep.get("decoded") else "")
             + (f"; codec {rep['codec_fingerprint']}" if rep.get("codec_fingerprint") else "")]
    auth = rep.get("authenticity", "not checked (no key)")
    lines.append(f"  authenticity {auth}" + (f": {rep.get('hmac_checked', 0)} record HMACs and the books signature"
                                            if auth == "checked" else "; set $FCODEC_HMAC_KEY to check it"))
    if rep.get("bound_rows") or rep.get("unbound_rows"):
        lines.append(f"  {rep.get('bound_rows', 0)} records bound to their key and source (format v2), "
                     f"{rep.get('unbound_rows', 0)} unbound (v1 or written without keys)")
    lines += [f"  warning: {w}" for w in rep["warnings"]]
    lines += [f"  problem: {p}" for p in rep["problems"][:limit]]
    if rep["n_problems"] > limit:
        lines.append(f"  ... {rep['n_problems'] - limit} more problems")
    return lines
