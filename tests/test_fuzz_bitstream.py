"""Hostile bitstreams: random bytes, truncations, bit flips (with and without a re-fixed CRC),
absurd header fields. Every input ends as a clear `ValueError` subclass or a correctly sized
image — never another exception, a crash or a hang."""
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import BitstreamError, CodecError
from codec import bitstream as bs

SETTINGS = dict(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid(tiny_codec):
    from jobs.samples import sample_image

    return tiny_codec.encode([sample_image(5, 48, 40)], t=40)[0].data


def _fix_crc(body: bytes) -> bytes:
    return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))


def _check(codec, data: bytes) -> None:
    try:
        out = codec.decode([data], steps=1)[0]
    except (BitstreamError, CodecError) as e:
        assert str(e)  # a message that says what is wrong
        return
    rec = bs.parse(data)
    assert out.shape == (rec.height, rec.width, 3)


@settings(**SETTINGS)
@given(st.binary(max_size=400))
def test_random_bytes(tiny_codec, data):
    _check(tiny_codec, data)


@settings(**SETTINGS)
@given(st.data())
def test_truncations_and_flips(tiny_codec, valid, data):
    cut = data.draw(st.integers(0, len(valid)))
    _check(tiny_codec, valid[:cut])
    pos = data.draw(st.integers(0, len(valid) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(valid)
    flipped[pos] ^= 1 << bit
    with pytest.raises((BitstreamError, CodecError)):
        tiny_codec.decode([bytes(flipped)])  # the CRC catches every single-bit flip
    _check(tiny_codec, _fix_crc(bytes(flipped)))  # a forger who re-computes the CRC


@settings(**SETTINGS)
@given(st.data())
def test_forged_payload_bytes(tiny_codec, valid, data):
    """Garbage inside the range-coded strings, CRC made valid: the symbol hash or the coder says no."""
    body = bytearray(valid)
    start = 40 + 16 + 2 + 4 + 1 + 4  # after the static model's header, side info and one length
    for _ in range(data.draw(st.integers(1, 8))):
        body[data.draw(st.integers(start, len(body) - 13))] = data.draw(st.integers(0, 255))
    _check(tiny_codec, _fix_crc(bytes(body)))


@settings(**SETTINGS)
@given(w=st.integers(0, 2**32 - 1), h=st.integers(0, 2**32 - 1), lh=st.integers(0, 2**16 - 1),
       lw=st.integers(0, 2**16 - 1), t=st.integers(0, 2**16 - 1), c=st.integers(0, 255))
def test_absurd_header_fields(tiny_codec, valid, w, h, lh, lw, t, c):
    body = bytearray(valid)
    body[7] = c
    body[24:32] = struct.pack("<II", w, h)
    body[32:38] = struct.pack("<HHH", t, lh, lw)
    _check(tiny_codec, _fix_crc(bytes(body)))


def test_claimed_huge_image_is_refused_before_any_allocation(tiny_codec, valid):
    body = bytearray(valid)
    body[24:32] = struct.pack("<II", 10**6, 10**6)
    with pytest.raises(BitstreamError, match="1000000x1000000"):
        tiny_codec.decode([_fix_crc(bytes(body))])
