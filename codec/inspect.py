"""What an archive says about itself: one record's header, or a bitstream dataset's manifest.

No torch and no Ray: records are read with `codec.bitstream` (numpy), datasets with plain JSON
(`_manifest.json`, `_commits/*.json`) and pyarrow (only the `codec_version` column of the part
files). Models are named through `codec.registry`, so a record of `nano-v1` says so.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from . import bitstream, registry


class InspectError(ValueError):
    """Something that is neither a readable record nor a bitstream dataset; the message says why."""


def inspect_record(data: bytes, source: str | None = None) -> dict:
    """The header of one record as plain data; `crc_ok` False when only the checksum is wrong.

    A record whose layout does not hold (truncated, not a record, unknown version) raises
    `InspectError` with the parser's reason.
    """
    data = bytes(data)
    crc_ok = len(data) >= 4 and zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0]
    try:
        # With a bad CRC, parse the layout anyway (CRC recomputed) to show what the header claims.
        rec = bitstream.parse(data if crc_ok else data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])))
    except bitstream.BitstreamError as e:
        where = f"{source}: " if source else ""
        raise InspectError(f"{where}not a readable record ({len(data)} bytes): {e}") from None
    bb = registry.backbone_for_fingerprint(rec.backbone_fp)
    entropy = registry.ENTROPY_NAMES.get(rec.entropy_id, f"unknown id {rec.entropy_id}")
    return {
        "kind": "record", "source": source, "n_bytes": len(data), "bpp": len(data) * 8.0 / (rec.width * rec.height),
        "format_version": rec.version,
        "backbone": {"fingerprint": rec.backbone_fp.hex(), "name": bb.name if bb else None},
        "entropy_model": entropy,
        "codec": {"fingerprint": rec.codec_fp.hex(), "name": _codec_name(rec.codec_fp.hex(), rec.backbone_fp.hex())},
        "t": rec.t,
        "gamma": [{"shift": float(s), "scale": float(c)} for s, c in rec.gamma.astype(float)],
        "width": rec.width, "height": rec.height,
        "gray": bool(rec.flags & bitstream.FLAG_GRAY), "alpha": bool(rec.flags & bitstream.FLAG_ALPHA),
        "latent": {"channels": rec.channels, "height": rec.latent_h, "width": rec.latent_w},
        "side_bytes": len(rec.side), "string_bytes": [len(s) for s in rec.strings],
        "symbol_hash": rec.symbol_hash.hex(), "crc_ok": crc_ok,
    }


def _codec_name(codec_fp: str, backbone_fp: str) -> str | None:
    if codec_fp == registry.STATIC_CODEC_FINGERPRINT:
        return "static (built in)"
    shipped = registry.codec_for_fingerprint(codec_fp, backbone_fp)
    return shipped.name if shipped else None


def inspect_dataset(root: str | Path) -> dict:
    """A bitstream dataset's summary from its manifest, commit markers and version column."""
    import pyarrow.parquet as pq

    if "://" in str(root):
        raise InspectError(f"inspect reads local datasets; for '{root}' run `fcodec verify {root}`")
    root = Path(root)
    man_path = root / "_manifest.json"
    if not man_path.is_file():
        raise InspectError(f"no _manifest.json in '{root}': not a bitstream dataset (made by `fcodec compress`)")
    try:
        man = json.loads(man_path.read_text())
        commits = [json.loads(p.read_text()) for p in sorted((root / "_commits").glob("*.json"))]
    except (OSError, ValueError) as e:
        raise InspectError(f"unreadable dataset metadata in '{root}': {e}") from None
    versions: set[str] = set()
    parts = sorted(root.glob("part-*.parquet"))
    for p in parts:
        try:
            col = pq.ParquetFile(p).read(columns=["codec_version"]).column(0)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise InspectError(f"unreadable part file '{p.name}': {e}") from None
        versions.update(v for v in col.to_pylist() if v)
    totals = man.get("totals", {})
    fp = man.get("codec_fingerprint") or ""
    bb = registry.backbone_for_fingerprint(fp[:16]) if len(fp) == 32 else None
    codec_cfg = man.get("config", {}).get("codec", {})
    committed = [c.get("committed_at") for c in commits if c.get("committed_at")]
    return {
        "kind": "dataset", "source": str(root), "format": man.get("format"), "complete": man.get("complete"),
        "codec": {k: codec_cfg.get(k) for k in ("backbone", "vae", "entropy", "codec_weights", "t", "target_bpp")},
        "codec_fingerprint": fp,
        "backbone": {"fingerprint": fp[:16], "name": bb.name if bb else None},
        "rows": totals.get("rows"), "ok": totals.get("ok"), "failed": totals.get("failed"),
        "rows_in_commits": sum(c.get("rows", 0) for c in commits),
        "shards_committed": len(commits), "shards_planned": man.get("shards_planned"), "part_files": len(parts),
        "mean_bpp": totals.get("mean_bpp"), "input_bytes": totals.get("input_bytes"),
        "output_bytes": totals.get("output_bytes"), "ratio": totals.get("ratio"),
        "created_at": min(committed) if committed else None, "updated_at": man.get("updated_at"),
        "software_versions": sorted(versions),
    }


def inspect_path(path: str | Path) -> dict:
    """A folder (or URL) is a dataset; a file is a record."""
    p = Path(path)
    if "://" in str(path) or p.is_dir():
        return inspect_dataset(path)
    if not p.is_file():
        raise InspectError(f"'{path}' is neither a .fdc record nor a dataset folder")
    return inspect_record(p.read_bytes(), str(path))


def format_report(info: dict) -> list[str]:
    """Human-readable lines for `inspect_record` / `inspect_dataset` output."""
    def name(d: dict) -> str:
        return f"{d['name'] or 'not a built-in'} ({d['fingerprint']})"

    if info["kind"] == "record":
        lat = info["latent"]
        gamma = ", ".join(f"{g['shift']:.4g}/{g['scale']:.4g}" for g in info["gamma"])
        src = "grayscale" if info["gray"] else "RGB"
        return [
            f"record:       {info['source'] or '-'} ({info['n_bytes']} bytes, {info['bpp']:.4f} bpp)",
            f"format:       version {info['format_version']}",
            f"backbone:     {name(info['backbone'])}",
            f"entropy:      {info['entropy_model']}",
            f"codec:        {info['codec']['name'] or 'not shipped'} ({info['codec']['fingerprint']})",
            f"t:            {info['t']}",
            f"gamma:        shift/scale per channel: {gamma}",
            f"image:        {info['width']}x{info['height']} {src}" + (", alpha dropped" if info["alpha"] else ""),
            f"latent:       {lat['channels']} x {lat['height']} x {lat['width']}",
            f"strings:      side {info['side_bytes']} B; strings {', '.join(f'{n} B' for n in info['string_bytes'])}",
            f"symbol hash:  {info['symbol_hash']} (checked when decoding)",
            f"CRC32:        {'OK' if info['crc_ok'] else 'MISMATCH (corrupt record)'}",
        ]
    c = info["codec"]
    opts = ", ".join(f"{k}={v}" for k, v in c.items() if v is not None)
    bpp = f"{info['mean_bpp']:.4f}" if info["mean_bpp"] is not None else "-"
    return [
        f"dataset:      {info['source']} (format {info['format']}, {'complete' if info['complete'] else 'incomplete'})",
        f"codec:        {opts}",
        f"backbone:     {name(info['backbone'])}",
        f"fingerprint:  {info['codec_fingerprint']}",
        f"images:       {info['rows']} rows: {info['ok']} ok, {info['failed']} failed",
        f"shards:       {info['shards_committed']} committed of {info['shards_planned']} planned, {info['part_files']} part files",
        f"mean bpp:     {bpp} (input {info['input_bytes']} B, output {info['output_bytes']} B)",
        f"created:      {info['created_at'] or '-'}",
        f"updated:      {info['updated_at'] or '-'}",
        f"written by:   {', '.join(f'foundation-codec {v}' for v in info['software_versions']) or '-'}",
    ]
