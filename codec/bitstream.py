"""The bitstream container: one self-describing, checksummed record per image.

Layout (little-endian; docs/bitstream.md is the full specification):

    0   4  magic  b"FDC\\x1a"
    4   1  format version (1)
    5   1  flags: bit0 source was grayscale, bit1 source had alpha (dropped)
    6   1  entropy model id (0 static, 1 hyperprior)
    7   1  latent channels C
    8   8  backbone fingerprint
    16  8  codec fingerprint (entropy model + estimator + CDF tables)
    24  4  width   (u32, original pixels)
    28  4  height  (u32)
    32  2  t       (u16, diffusion step the quantization noise matches)
    34  2  latent height h (u16)
    36  2  latent width  w (u16)
    38  2  reserved (0)
    40  4C γ: C × (shift f16, scale f16)
    ..  2  side-info length S (u16), then S bytes
    ..  1  string count n (≤ 4), then n × u32 lengths, then the strings
    ..  8  symbol hash: blake2b-64 of ŷ as int32 LE in C order
    ..  4  CRC32 of every byte before it

Parsing is defensive: hard limits on every length and on the pixel count, exact length
accounting, CRC checked before anything is decoded. Every failure is a `BitstreamError`
whose message says what is wrong.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"FDC\x1a"
VERSION = 1
FLAG_GRAY, FLAG_ALPHA = 1, 2
MAX_CHANNELS = 16
MAX_STRINGS = 4
DEFAULT_MAX_PIXELS = 1 << 28  # 268 MP; jobs may lower it
MAX_RECORD_BYTES = 1 << 30
_FIXED = struct.Struct("<4sBBBB8s8sIIHHHH")  # 40 bytes


class BitstreamError(ValueError):
    """A record that cannot be decoded: truncated, corrupt, hostile or from another model."""


@dataclass
class Record:
    """The parsed content of one bitstream record."""

    flags: int
    entropy_id: int
    backbone_fp: bytes
    codec_fp: bytes
    width: int
    height: int
    t: int
    latent_h: int
    latent_w: int
    gamma: np.ndarray  # (C, 2) float16: shift, scale
    side: bytes
    strings: list[bytes]
    symbol_hash: bytes
    version: int = VERSION

    @property
    def channels(self) -> int:
        return int(self.gamma.shape[0])


def symbol_hash(y_hat: np.ndarray) -> bytes:
    """blake2b-64 of the quantized symbols, so a decoder can prove it got ŷ back exactly."""
    return hashlib.blake2b(np.ascontiguousarray(y_hat, dtype="<i4").tobytes(), digest_size=8).digest()


def pack(rec: Record) -> bytes:
    """Serialize a record; the CRC32 of everything before it is appended."""
    c = rec.channels
    if not 1 <= c <= MAX_CHANNELS or len(rec.strings) > MAX_STRINGS or len(rec.side) > 0xFFFF:
        raise BitstreamError("record does not fit the format limits")
    parts = [
        _FIXED.pack(MAGIC, VERSION, rec.flags, rec.entropy_id, c, rec.backbone_fp, rec.codec_fp,
                    rec.width, rec.height, rec.t, rec.latent_h, rec.latent_w, 0),
        np.ascontiguousarray(rec.gamma, dtype="<f2").tobytes(),
        struct.pack("<H", len(rec.side)), rec.side,
        struct.pack("<B", len(rec.strings)),
        b"".join(struct.pack("<I", len(s)) for s in rec.strings),
        *rec.strings,
        rec.symbol_hash,
    ]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def parse(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, latent_factor: int = 8) -> Record:
    """Parse and verify one record (CRC, lengths, limits). Raises `BitstreamError`."""
    data = bytes(data)
    if len(data) < _FIXED.size + 4 + 2 + 1 + 8:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than any valid record")
    if len(data) > MAX_RECORD_BYTES:
        raise BitstreamError(f"bitstream of {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    if data[:4] != MAGIC:
        raise BitstreamError("not a foundation-codec bitstream (bad magic bytes)")
    if data[4] != VERSION:
        raise BitstreamError(f"bitstream format version {data[4]} is not supported (this decoder reads {VERSION})")
    body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream checksum mismatch: the record is corrupt or truncated")
    (_, version, flags, entropy_id, c, bfp, cfp, width, height, t, lh, lw, _r) = _FIXED.unpack_from(body, 0)
    if not 1 <= c <= MAX_CHANNELS:
        raise BitstreamError(f"bitstream claims {c} latent channels (1..{MAX_CHANNELS} allowed)")
    if width < 1 or height < 1 or width * height > max_pixels:
        raise BitstreamError(f"bitstream claims a {width}x{height} image, outside the limit of {max_pixels} pixels")
    # The latent covers the image plus padding to the backbone's multiple (at most 256 px).
    if not (height <= lh * latent_factor <= height + 256 and width <= lw * latent_factor <= width + 256):
        raise BitstreamError(f"latent size {lh}x{lw} does not fit an image of {width}x{height}")
    if t < 1:
        raise BitstreamError("bitstream has t = 0 (must be at least 1)")
    pos = _FIXED.size
    gamma = np.frombuffer(_take(body, pos, 4 * c), dtype="<f2").reshape(c, 2).astype(np.float16)
    pos += 4 * c
    if not np.all(np.isfinite(gamma)) or np.any(gamma[:, 1] <= 0):
        raise BitstreamError("bitstream has non-finite or non-positive latent transform parameters")
    (n_side,) = struct.unpack("<H", _take(body, pos, 2))
    pos += 2
    side = _take(body, pos, n_side)
    pos += n_side
    n = _take(body, pos, 1)[0]
    pos += 1
    if n > MAX_STRINGS:
        raise BitstreamError(f"bitstream claims {n} strings (at most {MAX_STRINGS})")
    lengths = struct.unpack(f"<{n}I", _take(body, pos, 4 * n))
    pos += 4 * n
    strings = []
    for ln in lengths:
        strings.append(_take(body, pos, ln))
        pos += ln
    sym = _take(body, pos, 8)
    pos += 8
    if pos != len(body):
        raise BitstreamError(f"bitstream has {len(body) - pos} unexpected trailing bytes")
    return Record(flags, entropy_id, bfp, cfp, width, height, t, lh, lw, gamma, side, strings, sym, version)


def _take(body: bytes, pos: int, n: int) -> bytes:
    if pos + n > len(body):
        raise BitstreamError(f"truncated bitstream: field at byte {pos} needs {n} bytes, {len(body) - pos} left")
    return body[pos : pos + n]
