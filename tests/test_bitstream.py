"""The container: exact packing (v2 and v1), strict parsing, binding tags, clear errors on hostile records."""
import struct
import zlib

import numpy as np
import pytest

from codec import bitstream as bs
from codec import limits


def _rec(**kw):
    base = dict(flags=0, entropy_id=0, backbone_fp=b"B" * 8, codec_fp=b"C" * 8, width=100, height=60, t=50,
                latent_h=8, latent_w=16, gamma=np.ones((4, 2), np.float16), side=b"\x01\x02\x03\x04",
                strings=[b"hello..." * 2], symbol_hash=b"H" * 8)
    base.update(kw)
    return bs.Record(**base)


def _refix_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _edit(data: bytes, off: int, new: bytes) -> bytes:
    """Overwrite header bytes and recompute the CRC, as a forger would."""
    body = bytearray(data[:-4])
    body[off : off + len(new)] = new
    return _refix_crc(bytes(body))


def test_v2_pack_parse_roundtrip_and_size():
    rec = _rec(key_tag=bs.binding_tag("a/x.png"), source_tag=bs.binding_tag("ab" * 32))
    data = bs.pack(rec)
    # 40 fixed + 16 tags + 16 gamma + 2+4 side + 1 + 4 length + 16 string + 8 hash + 4 crc
    assert len(data) == 40 + 16 + 16 + 6 + 1 + 4 + 16 + 8 + 4 and data[4] == 2
    r = bs.parse(data)
    assert (r.version, r.width, r.height, r.t, r.strings, r.side) == (2, 100, 60, 50, [b"hello..." * 2], b"\x01\x02\x03\x04")
    assert (r.key_tag, r.source_tag) == (rec.key_tag, rec.source_tag)


def test_v1_layout_still_parses():
    data = bs.pack(_rec(version=1))
    assert len(data) == 40 + 16 + 6 + 1 + 4 + 16 + 8 + 4 and data[4] == 1
    r = bs.parse(data)
    assert r.version == 1 and r.key_tag == r.source_tag == bs.UNBOUND
    assert bs.check_binding(r, "any/key", "00" * 32) == []  # v1: nothing to check
    with pytest.raises(bs.BitstreamError, match="no binding tags"):
        bs.pack(_rec(version=1, key_tag=bs.binding_tag("k")))


def test_binding_tags_catch_a_swap():
    sha = "AB" * 32
    r = bs.parse(bs.pack(_rec(key_tag=bs.binding_tag("a.png"), source_tag=bs.binding_tag(sha.lower()))))
    assert bs.check_binding(r, "a.png", sha) == ["key", "source_sha256"]  # hex compared in lower case
    assert bs.check_binding(r) == []
    with pytest.raises(bs.BindingError, match="another key"):
        bs.check_binding(r, "b.png", sha)
    with pytest.raises(bs.BindingError, match="another source_sha256"):
        bs.check_binding(r, "a.png", "cd" * 32)
    assert len(bs.binding_tag("x")) == 8 and bs.binding_tag("x") != bs.binding_tag("y") != bs.UNBOUND


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d[:-1], "checksum|truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:20] + bytes([d[20] ^ 0x10]) + d[21:], "checksum"),
    (lambda d: _edit(d, 4, b"\x09"), "version"),
    (lambda d: _edit(d, 24, struct.pack("<II", 10**6, 10**6)), "pixels"),
    (lambda d: _refix_crc(d[:-4] + b"extra"), "trailing|truncated"),
    (lambda d: _edit(d, 38, b"\x01\x00"), "reserved"),
    (lambda d: _edit(d, 5, b"\x04"), "undefined flag"),
    (lambda d: _edit(d, 6, b"\x07"), "entropy model id"),
    (lambda d: _edit(d, 6, b"\x01"), "side information|strings"),  # static layout, hyperprior id
    (lambda d: _edit(d, 24, struct.pack("<II", 4000, 4000)), "implausible|latent"),
])
def test_hostile_records_are_clear_errors(mutate, msg):
    with pytest.raises(bs.BitstreamError, match=msg):
        bs.parse(mutate(bs.pack(_rec())))


def test_absurd_string_length_is_caught():
    data = bytearray(bs.pack(_rec())[:-4])
    off = 40 + 16 + 16 + 2 + 4 + 1
    data[off : off + 4] = struct.pack("<I", 2**31)
    with pytest.raises(bs.BitstreamError, match="truncated"):
        bs.parse(_refix_crc(bytes(data)))


@pytest.mark.parametrize("strings", [[b""], [b"abcd"], [b"abcdefghi"]])
def test_strings_that_are_not_whole_rans_streams_are_refused(strings):
    with pytest.raises(bs.BitstreamError, match="range-coded string of"):
        bs.parse(bs.pack(_rec(strings=strings)))


def test_plausibility_floor_pixels_per_byte():
    # 2048 x 2048 in a ~110-byte record: refused on the header; the encoder pads such records
    rec = _rec(width=2048, height=2048, latent_h=256, latent_w=256)
    data = bs.pack(rec)
    assert 2048 * 2048 > len(data) * limits.MAX_PIXELS_PER_BYTE
    with pytest.raises(bs.BitstreamError, match="implausible"):
        bs.parse(data)
    rec.side = rec.side + bytes(limits.min_record_bytes(2048 * 2048) - len(data))  # v2 zero padding
    assert bs.parse(bs.pack(rec)).side[:4] == b"\x01\x02\x03\x04"
    rec.side = rec.side[:-1] + b"\x01"  # padding must be zeros
    with pytest.raises(bs.BitstreamError, match="side information"):
        bs.parse(bs.pack(rec))


def test_pixel_cap_cannot_be_raised_by_the_caller():
    rec = _rec(width=9000, height=8000, latent_h=1000, latent_w=1125, side=b"\x01\x02\x03\x04" + bytes(5000))
    with pytest.raises(bs.BitstreamError, match=str(limits.DECODE_MAX_PIXELS)):
        bs.parse(bs.pack(rec), max_pixels=1 << 40)


def test_symbol_hash_is_order_sensitive():
    a = np.arange(12, dtype=np.int32).reshape(1, 3, 4)
    assert bs.symbol_hash(a) != bs.symbol_hash(a[:, ::-1].copy())
