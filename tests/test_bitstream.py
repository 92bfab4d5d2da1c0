"""The container: exact packing, strict parsing, clear errors on hostile records."""
import struct
import zlib

import numpy as np
import pytest

from codec import bitstream as bs


def _rec(**kw):
    base = dict(flags=0, entropy_id=0, backbone_fp=b"B" * 8, codec_fp=b"C" * 8, width=100, height=60, t=50,
                latent_h=8, latent_w=16, gamma=np.ones((4, 2), np.float16), side=b"\x01\x02\x03\x04",
                strings=[b"hello", b"world!"], symbol_hash=b"H" * 8)
    base.update(kw)
    return bs.Record(**base)


def test_pack_parse_roundtrip_and_size():
    data = bs.pack(_rec())
    # 40 fixed + 16 gamma + 2+4 side + 1 + 2*4 lengths + 11 strings + 8 hash + 4 crc
    assert len(data) == 40 + 16 + 6 + 1 + 8 + 11 + 8 + 4
    r = bs.parse(data)
    assert (r.width, r.height, r.t, r.strings, r.side) == (100, 60, 50, [b"hello", b"world!"], b"\x01\x02\x03\x04")


def _refix_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d[:-1], "checksum|truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:20] + bytes([d[20] ^ 0x10]) + d[21:], "checksum"),
    (lambda d: _refix_crc(d[:4] + b"\x09" + d[5:-4]), "version"),
    (lambda d: _refix_crc(d[:24] + struct.pack("<II", 10**6, 10**6) + d[32:-4]), "pixels"),
    (lambda d: _refix_crc(d[:-4] + b"extra"), "trailing|truncated"),
])
def test_hostile_records_are_clear_errors(mutate, msg):
    with pytest.raises(bs.BitstreamError, match=msg):
        bs.parse(mutate(bs.pack(_rec())))


def test_absurd_string_length_is_caught():
    data = bytearray(bs.pack(_rec())[:-4])
    off = 40 + 16 + 2 + 4 + 1
    data[off : off + 4] = struct.pack("<I", 2**31)
    with pytest.raises(bs.BitstreamError, match="truncated"):
        bs.parse(_refix_crc(bytes(data)))


def test_symbol_hash_is_order_sensitive():
    a = np.arange(12, dtype=np.int32).reshape(1, 3, 4)
    assert bs.symbol_hash(a) != bs.symbol_hash(a[:, ::-1].copy())
