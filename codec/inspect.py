"""What a record says about itself: its header, checksums and the models it names.

No torch and no Ray: records are read with `codec.bitstream` (numpy). Models are named through
`codec.registry`, so a record of `nano-v1` says so. A dataset's summary is pipeline/summary.py.
"""
from __future__ import annotations

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


def inspect_file(path: str | Path) -> dict:
    """A .fdc file's header (datasets: pipeline/summary.py)."""
    p = Path(path)
    if not p.is_file():
        raise InspectError(f"'{path}' is neither a .fdc record nor a dataset folder")
    return inspect_record(p.read_bytes(), str(path))


def format_report(info: dict) -> list[str]:
    """Human-readable lines for `inspect_record` output."""
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
    raise ValueError(f"not a record report: {info.get('kind')}")
