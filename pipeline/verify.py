"""Verify a bitstream dataset (`fcodec compress` output) without decoding it.

Checks, in order of cost:

* layout: `_manifest.json` present and `complete`, one readable `_commits/<shard>.json` per
  part file, no part file without a marker (orphans from a dead run are visible to readers),
  no marker whose part file is missing;
* every part file: readable Parquet with the bitstream schema, row counts equal to its marker;
* every row: a key (unique across the dataset), a status; `ok` rows carry a bitstream whose
  length is `n_bytes`, whose sha256 is `bitstream_sha256`, which parses (`codec.bitstream.parse`:
  magic, version, CRC, lengths, pixel cap), whose size matches `width`/`height` and whose
  backbone + codec fingerprints equal the row's `codec_fingerprint` (one value per dataset,
  equal to the manifest's); `failed` rows carry an error and no bitstream;
* totals: rows/ok/failed/shards/output bytes of the markers against `_manifest.json`;
* optionally (`decode_sample=N`): N random `ok` rows decoded with the dataset's codec, each
  checked for its stored size.

Memory is bounded by one Parquet row group plus the set of keys. Only `codec.bitstream` (pure
Python, no model) is needed unless a decode sample is asked for.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import random
from typing import Callable

import pyarrow.parquet as pq

from . import storage as st
from .schema import BITSTREAM_SCHEMA, STATUS_FAILED, STATUS_OK, check_schema

MAX_LISTED = 200  # problems kept verbatim; the count is always exact


class Report:
    """Collects problems (each one line naming the shard/key) and counters."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.n_problems = 0
        self.warnings: list[str] = []
        self.counts = {"shards": 0, "rows": 0, "ok_rows": 0, "failed_rows": 0, "bitstreams_checked": 0, "output_bytes": 0,
                       "decoded": 0}

    def bad(self, msg: str) -> None:
        self.n_problems += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(msg)


def verify_dataset(url: str, opts: st.StorageOptions | None = None, decode_sample: int = 0, seed: int = 0,
                   codec_spec: dict | None = None, max_pixels: int | None = None,
                   echo: Callable[[str], None] = lambda s: None) -> dict:
    """Check every record of the bitstream dataset at `url`; returns a dict with `ok` (True only
    when the archive is whole), `problems` (one line each), `warnings` and counters."""
    from codec import bitstream as bs

    rep = Report()
    fs, root = st.get_fs(url, opts)
    try:
        fs.invalidate_cache()
    except Exception:
        pass
    if not fs.exists(root):
        raise ValueError(f"{url} does not exist")
    manifest = None
    try:
        manifest = st.read_manifest(fs, root)
    except (ValueError, OSError) as e:
        rep.bad(f"_manifest.json is unreadable ({e})")
    if manifest is None and not rep.problems:
        rep.bad("no _manifest.json: the compress job never finished (rerun it to resume)")
    elif manifest is not None and not manifest.get("complete"):
        rep.bad("_manifest.json says the dataset is incomplete: rerun `fcodec compress` with the same SRC/DST to finish it")
    codec = (manifest or {}).get("config", {}).get("codec", {}) or {}
    max_pixels = max_pixels or codec.get("max_pixels") or bs.DEFAULT_MAX_PIXELS

    # --- layout: markers vs visible part files
    markers = _read_markers(fs, root, rep)
    visible = {posixpath.basename(p) for p in fs.glob(st.join(root, "*.parquet"))}
    claimed = {m.get("file") for m in markers.values()}
    for name in sorted(visible - claimed):
        rep.bad(f"{name}: part file without a commit marker (orphan of an interrupted run; readers see its rows)")
    for sid, m in sorted(markers.items()):
        if m.get("file") not in visible:
            rep.bad(f"shard {sid}: committed but its part file {m.get('file')} is missing")
    if fs.exists(st.join(root, st.TMP)):
        rep.warnings.append(f"{st.TMP}/ holds temp files of an interrupted run (invisible to readers; the next run removes them)")

    # --- every row of every committed part file
    keys: set[str] = set()
    fingerprints: dict[str, int] = {}
    sample: list[tuple[float, bytes, int, int, str]] = []  # (priority, bitstream, w, h, key) reservoir
    rng = random.Random(seed)
    for sid, m in sorted(markers.items()):
        if m.get("file") not in visible:
            continue
        rep.counts["shards"] += 1
        got = _check_part(fs, root, sid, m, rep, keys, fingerprints, max_pixels, bs, sample, decode_sample, rng)
        for k in ("rows", "ok", "failed"):
            if got is not None and m.get(k) is not None and got[k] != m[k]:
                rep.bad(f"shard {sid}: marker says {k} = {m[k]}, the part file has {got[k]}")
        if got is not None and m.get("output_bytes") is not None and got["output_bytes"] != m["output_bytes"]:
            rep.bad(f"shard {sid}: marker says {m['output_bytes']} output bytes, part file has {got['output_bytes']}")
        echo(f"shard {sid}: {got['rows'] if got else '?'} rows checked")

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
                rep.bad(f"_manifest.json totals.{k} = {tot.get(k)}, the commit markers add up to {v}")
        if rep.counts["rows"] != tot.get("rows"):
            rep.bad(f"_manifest.json counts {tot.get('rows')} rows, the part files hold {rep.counts['rows']}")
        if manifest.get("shards_planned") is not None and manifest.get("complete") and len(markers) < manifest["shards_planned"]:
            rep.bad(f"_manifest.json plans {manifest['shards_planned']} shards, {len(markers)} are committed")

    if decode_sample and sample:
        _decode_sample(sample, codec_spec if codec_spec is not None else codec, rep, max_pixels)
    out = {"ok": rep.n_problems == 0, "url": url, "problems": rep.problems, "n_problems": rep.n_problems,
           "warnings": rep.warnings, "codec_fingerprint": next(iter(fingerprints), None), **rep.counts}
    return out


def _read_markers(fs, root: str, rep: Report) -> dict[str, dict]:
    d = st.join(root, st.COMMITS)
    out: dict[str, dict] = {}
    if not fs.exists(d):
        return out
    for p in sorted(fs.glob(st.join(d, "*.json"))):
        sid = posixpath.basename(p)[: -len(".json")]
        try:
            m = json.loads(st.read_bytes(fs, p))
            if not isinstance(m, dict) or "file" not in m:
                raise ValueError("not a commit marker (no 'file')")
        except (ValueError, OSError) as e:
            rep.bad(f"shard {sid}: commit marker unreadable ({e})")
            continue
        if m["file"] != st.part_name(sid):
            rep.bad(f"shard {sid}: marker names {m['file']!r}, expected {st.part_name(sid)!r}")
        out[sid] = m
    return out


def _check_part(fs, root, sid, marker, rep, keys, fingerprints, max_pixels, bs, sample, n_sample, rng) -> dict | None:
    name = marker["file"]
    got = {"rows": 0, "ok": 0, "failed": 0, "output_bytes": 0}
    try:
        with fs.open(st.join(root, name), "rb") as f:
            pf = pq.ParquetFile(f)
            check_schema(pf.schema_arrow, BITSTREAM_SCHEMA)
            for rb in pf.iter_batches(batch_size=256):
                for r in rb.to_pylist():
                    _check_row(name, r, rep, keys, fingerprints, max_pixels, bs, got, sample, n_sample, rng)
    except Exception as e:  # unreadable Parquet, wrong schema, truncated file
        rep.bad(f"{name}: cannot be read as a bitstream dataset part ({type(e).__name__}: {e})")
        return None
    return got


def _check_row(name, r, rep, keys, fingerprints, max_pixels, bs, got, sample, n_sample, rng) -> None:
    key, status = r.get("key"), r.get("status")
    where = f"{name}: key {key!r}"
    got["rows"] += 1
    rep.counts["rows"] += 1
    if key is None:
        rep.bad(f"{name}: a row without a key")
    elif key in keys:
        rep.bad(f"{where}: duplicate key (already in another row)")
    else:
        keys.add(key)
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
    if data is None:
        rep.bad(f"{where}: ok row without a bitstream")
        return
    got["output_bytes"] += r.get("n_bytes") or 0
    rep.counts["output_bytes"] += len(data)
    rep.counts["bitstreams_checked"] += 1
    if r.get("n_bytes") != len(data):
        rep.bad(f"{where}: n_bytes = {r.get('n_bytes')}, the bitstream has {len(data)} bytes")
    if hashlib.sha256(data).hexdigest() != r.get("bitstream_sha256"):
        rep.bad(f"{where}: bitstream_sha256 does not match the bitstream")
    try:
        rec = bs.parse(data, max_pixels=max_pixels)
    except bs.BitstreamError as e:
        rep.bad(f"{where}: {e}")
        return
    if (rec.width, rec.height) != (r.get("width"), r.get("height")):
        rep.bad(f"{where}: record is {rec.width}x{rec.height}, the row says {r.get('width')}x{r.get('height')}")
    fp = rec.backbone_fp.hex() + rec.codec_fp.hex()
    if fp != r.get("codec_fingerprint"):
        rep.bad(f"{where}: record fingerprints {fp} differ from the row's codec_fingerprint {r.get('codec_fingerprint')}")
    fingerprints[fp] = fingerprints.get(fp, 0) + 1
    if n_sample:  # reservoir sampling by random priority: a uniform sample in one pass
        item = (rng.random(), data, rec.width, rec.height, key)
        sample.append(item)
        if len(sample) > n_sample:
            sample.remove(min(sample, key=lambda x: x[0]))


def _decode_sample(sample, spec: dict, rep: Report, max_pixels: int) -> None:
    from .actors import load_codec_from_spec

    codec = load_codec_from_spec({**spec, "max_pixels": max_pixels})
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
    verdict = "OK: the archive is whole" if rep["ok"] else f"FAILED: {rep['n_problems']} problems"
    lines = [f"{verdict} -- {rep['url']}",
             f"  {rep['shards']} shards, {rep['rows']} rows ({rep['ok_rows']} ok, {rep['failed_rows']} failed), "
             f"{rep['bitstreams_checked']} bitstreams parsed and hashed, {rep['output_bytes']} bitstream bytes"
             + (f", {rep['decoded']} decoded" if rep.get("decoded") else "")
             + (f"; codec {rep['codec_fingerprint']}" if rep.get("codec_fingerprint") else "")]
    lines += [f"  warning: {w}" for w in rep["warnings"]]
    lines += [f"  problem: {p}" for p in rep["problems"][:limit]]
    if rep["n_problems"] > limit:
        lines.append(f"  ... {rep['n_problems'] - limit} more problems")
    return lines
