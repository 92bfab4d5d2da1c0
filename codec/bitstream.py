"""The bitstream container: one self-describing, checksummed record per image.

Layout of format version 2 (little-endian; docs/bitstream.md is the full specification):

    0   4  magic  b"FDC\\x1a"
    4   1  format version (2; version 1 records, without the two tags, still decode)
    5   1  flags: bit0 source was grayscale, bit1 source had alpha (dropped); other bits 0
    6   1  entropy model id (0 static, 1 hyperprior, 2 checkerboard, 3 channel-checkerboard)
    7   1  latent channels C
    8   8  backbone fingerprint
    16  8  codec fingerprint (entropy model + estimator + CDF tables)
    24  4  width   (u32, original pixels)
    28  4  height  (u32)
    32  2  t       (u16, diffusion step the quantization noise matches)
    34  2  latent height h (u16)
    36  2  latent width  w (u16)
    38  2  reserved (0)
    40  8  key tag: `binding_tag(dataset key)`, zeros = unbound            (v2 only)
    48  8  source tag: `binding_tag(source bytes' sha256, hex)`, zeros = unbound (v2 only)
    56  4C γ: C × (shift f16, scale f16)                                    (v1: at 40)
    ..  2  side-info length S (u16), then S bytes (v2: zero padding may follow the model's side)
    ..  1  string count n (static 1, hyperprior 2, checkerboard 3, channel-checkerboard 5), then n × u32 lengths, then the strings
    ..  8  symbol hash: blake2b-64 of ŷ as int32 LE in C order
    ..  4  CRC32 of every byte before it

Parsing is defensive: hard limits on every length and count (`codec.limits`), exact length
accounting, reserved field and undefined flag bits 0, every range-coded string whole 32-bit
words, a plausible size per record byte, CRC checked before anything is decoded. Every failure
is a `BitstreamError` whose message says what is wrong.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import limits

MAGIC = b"FDC\x1a"
VERSION = 2  # written by default; every version in SUPPORTED_VERSIONS decodes
SUPPORTED_VERSIONS = (1, 2)
FLAG_GRAY, FLAG_ALPHA = 1, 2
DEFINED_FLAGS = FLAG_GRAY | FLAG_ALPHA
ENTROPY_STRINGS = {0: 1, 1: 2, 2: 3, 3: 5}  # entropy model id -> number of range-coded strings
MAX_CHANNELS = 16
MAX_STRINGS = 5
DEFAULT_MAX_PIXELS = limits.DECODE_MAX_PIXELS
MAX_RECORD_BYTES = limits.MAX_RECORD_BYTES
TAG_BYTES = 8
UNBOUND = bytes(TAG_BYTES)
_FIXED = struct.Struct("<4sBBBB8s8sIIHHHH")  # 40 bytes
_TAGS = struct.Struct("<8s8s")  # v2: 16 bytes after the fixed header
_MIN_TAIL = 2 + 1 + 8 + 4  # side length, string count, symbol hash, CRC


class BitstreamError(ValueError):
    """A record that cannot be decoded: truncated, corrupt, hostile or from another model."""


class BindingError(BitstreamError):
    """A valid record in the wrong place: its key or source tag differs from the expected one."""


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
    key_tag: bytes = UNBOUND  # binding_tag(key), v2; zeros: not bound to a key
    source_tag: bytes = UNBOUND  # binding_tag(source sha256 hex), v2; zeros: not bound

    @property
    def channels(self) -> int:
        return int(self.gamma.shape[0])


def symbol_hash(y_hat: np.ndarray) -> bytes:
    """blake2b-64 of the quantized symbols, so a decoder can prove it got ŷ back exactly."""
    return hashlib.blake2b(np.ascontiguousarray(y_hat, dtype="<i4").tobytes(), digest_size=8).digest()


def binding_tag(text: str) -> bytes:
    """The 8-byte tag a v2 record carries for a dataset key or a source sha256 (hex, compared in
    lower case): blake2b-64 of the UTF-8 text under a personalisation of its own. Never all
    zeros (that value means "unbound")."""
    if not isinstance(text, str):
        raise TypeError(f"binding_tag needs a str, got {type(text).__name__}")
    tag = hashlib.blake2b(text.encode("utf-8"), digest_size=TAG_BYTES, person=b"fdc-bind").digest()
    return tag if tag != UNBOUND else b"\x00" * 7 + b"\x01"


def check_binding(rec: Record, key: str | None = None, source_sha256: str | None = None) -> list[str]:
    """Check a parsed record against the place it is read from.

    Returns the names of the tags that were checked and matched (``[]`` for a v1 record or an
    unbound one: nothing to check); raises `BindingError` naming the tag that differs (a swapped
    or moved bitstream). A tag is checked only when the record carries it and the caller passes
    the value."""
    checked = []
    for name, value, tag in (("key", key, rec.key_tag), ("source_sha256", source_sha256, rec.source_tag)):
        if value is None or tag == UNBOUND:
            continue
        text = value.lower() if name == "source_sha256" else value
        if binding_tag(text) != tag:
            raise BindingError(f"record is bound to another {name} (its tag {tag.hex()} is not that of {value!r}): "
                               "a swapped or moved bitstream")
        checked.append(name)
    return checked


def symbol_count(rec: Record) -> int:
    """Symbols the record's header implies: C x h x w latent values."""
    return rec.channels * rec.latent_h * rec.latent_w


def pack(rec: Record) -> bytes:
    """Serialize a record in its `version`'s layout; the CRC32 of everything before it is appended."""
    c = rec.channels
    if rec.version not in SUPPORTED_VERSIONS:
        raise BitstreamError(f"cannot write format version {rec.version} (supported: {SUPPORTED_VERSIONS})")
    if not 1 <= c <= MAX_CHANNELS or len(rec.strings) > MAX_STRINGS or len(rec.side) > 0xFFFF:
        raise BitstreamError("record does not fit the format limits")
    if max(rec.latent_h, rec.latent_w) > limits.MAX_LATENT_SIDE or max(rec.width, rec.height) >= 1 << 32 or not 0 <= rec.t <= 0xFFFF:
        raise BitstreamError(f"record of {rec.width}x{rec.height} (latent {rec.latent_h}x{rec.latent_w}, t {rec.t}) "
                             "does not fit the format's fields")
    tags = b""
    if rec.version >= 2:
        tags = _TAGS.pack(rec.key_tag, rec.source_tag)
    elif rec.key_tag != UNBOUND or rec.source_tag != UNBOUND:
        raise BitstreamError("format version 1 has no binding tags")
    parts = [
        _FIXED.pack(MAGIC, rec.version, rec.flags, rec.entropy_id, c, rec.backbone_fp, rec.codec_fp,
                    rec.width, rec.height, rec.t, rec.latent_h, rec.latent_w, 0),
        tags,
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
    """Parse and verify one record (CRC, lengths, counts, limits). Raises `BitstreamError`.

    `max_pixels` may only lower `codec.limits.DECODE_MAX_PIXELS`, never raise it."""
    max_pixels = min(int(max_pixels), limits.DECODE_MAX_PIXELS)
    n_data = len(data)
    if n_data > MAX_RECORD_BYTES:
        raise BitstreamError(f"bitstream of {n_data} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    data = bytes(data)
    if n_data < _FIXED.size + _MIN_TAIL:
        raise BitstreamError(f"truncated bitstream: {n_data} bytes is shorter than any valid record")
    if data[:4] != MAGIC:
        raise BitstreamError("not a foundation-codec bitstream (bad magic bytes)")
    version = data[4]
    if version not in SUPPORTED_VERSIONS:
        raise BitstreamError(f"bitstream format version {version} is not supported (this decoder reads "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    if zlib.crc32(body) != crc:
        raise BitstreamError("bitstream checksum mismatch: the record is corrupt or truncated")
    (_, version, flags, entropy_id, c, bfp, cfp, width, height, t, lh, lw, reserved) = _FIXED.unpack_from(body, 0)
    if reserved:
        raise BitstreamError(f"bitstream has reserved field {reserved:#06x} (must be 0)")
    if flags & ~DEFINED_FLAGS:
        raise BitstreamError(f"bitstream has undefined flag bits set ({flags:#04x}; only bits 0-1 are defined)")
    if entropy_id not in ENTROPY_STRINGS:
        raise BitstreamError(f"bitstream names entropy model id {entropy_id} (defined: 0 static, 1 hyperprior, 2 checkerboard, 3 channel-checkerboard)")
    if not 1 <= c <= MAX_CHANNELS:
        raise BitstreamError(f"bitstream claims {c} latent channels (1..{MAX_CHANNELS} allowed)")
    if width < 1 or height < 1 or width * height > max_pixels:
        raise BitstreamError(f"bitstream claims a {width}x{height} image, outside the limit of {max_pixels} pixels")
    if width * height > n_data * limits.MAX_PIXELS_PER_BYTE:
        raise BitstreamError(f"bitstream of {n_data} bytes claims a {width}x{height} image: implausible (more than "
                             f"{limits.MAX_PIXELS_PER_BYTE} pixels per record byte)")
    # The latent covers the image plus padding to the backbone's multiple (at most 256 px).
    if not (height <= lh * latent_factor <= height + 256 and width <= lw * latent_factor <= width + 256):
        raise BitstreamError(f"latent size {lh}x{lw} does not fit an image of {width}x{height}")
    if t < 1:
        raise BitstreamError("bitstream has t = 0 (must be at least 1)")
    pos = _FIXED.size
    key_tag = source_tag = UNBOUND
    if version >= 2:
        key_tag, source_tag = _TAGS.unpack(_take(body, pos, _TAGS.size))
        pos += _TAGS.size
    gamma = np.frombuffer(_take(body, pos, 4 * c), dtype="<f2").reshape(c, 2).astype(np.float16)
    pos += 4 * c
    if not np.all(np.isfinite(gamma)) or np.any(gamma[:, 1] <= 0):
        raise BitstreamError("bitstream has non-finite or non-positive latent transform parameters")
    (n_side,) = struct.unpack("<H", _take(body, pos, 2))
    pos += 2
    side = _take(body, pos, n_side)
    pos += n_side
    model_side = c if entropy_id == 0 else 0
    if n_side < model_side or (version == 1 and n_side != model_side) or side[model_side:].strip(b"\0"):
        raise BitstreamError(f"bitstream has {n_side} bytes of side information; its entropy model writes "
                             f"{model_side}" + (" (then only zero padding)" if version >= 2 else ""))
    n = _take(body, pos, 1)[0]
    pos += 1
    if n != ENTROPY_STRINGS[entropy_id]:
        raise BitstreamError(f"bitstream has {n} range-coded strings; its entropy model writes {ENTROPY_STRINGS[entropy_id]}")
    lengths = struct.unpack(f"<{n}I", _take(body, pos, 4 * n))
    pos += 4 * n
    strings = []
    for ln in lengths:
        if ln < 8 or ln % 4:
            raise BitstreamError(f"bitstream has a range-coded string of {ln} bytes (a rANS stream is whole "
                                 "32-bit words, at least 2): truncated or hostile record")
        strings.append(_take(body, pos, ln))
        pos += ln
    sym = _take(body, pos, 8)
    pos += 8
    if pos != len(body):
        raise BitstreamError(f"bitstream has {len(body) - pos} unexpected trailing bytes")
    return Record(flags, entropy_id, bfp, cfp, width, height, t, lh, lw, gamma, side, strings, sym, version,
                  key_tag, source_tag)


def _take(body: bytes, pos: int, n: int) -> bytes:
    if pos + n > len(body):
        raise BitstreamError(f"truncated bitstream: field at byte {pos} needs {n} bytes, {len(body) - pos} left")
    return body[pos : pos + n]


@dataclass
class Encoded:
    """One encoded image: the record and facts worth a column in a dataset (what every codec's
    `encode` returns, ours and the stand-ins alike)."""

    data: bytes
    t: int
    width: int
    height: int

    @property
    def bpp(self) -> float:
        return len(self.data) * 8.0 / (self.width * self.height)
