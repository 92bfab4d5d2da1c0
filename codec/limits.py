"""The one cap policy: every limit that bounds the time and memory of one record, in one place.

The caps are constants of the software or of the job's own configuration (`CodecConfig`: the
operator's choice, clamped to the ceilings here), never values read from the record, the dataset
or its manifest: a hostile input cannot raise the limits applied to itself. docs/reliability.md
lists them with the reasons for their values.

Decode (checked on the header, before any allocation or any range decoding):

* `MAX_RECORD_BYTES`: a record larger than this is refused unread.
* `DECODE_MAX_PIXELS`: declared width x height.
* `MAX_PIXELS_PER_BYTE`: declared pixels per record byte. A legitimate record of P pixels at the
  lowest rate the codec writes costs more than P / 2^14 bytes (the encoder pads a record of a
  near-uniform image up to it), so a 100-byte record cannot claim an 8192x8192 image.
* `MAX_LATENT_TOKENS`: latent positions h x w. Self-attention runs over them at full latent
  resolution (SD's and the tiny backbone's first UNet level, the VAE decoder's mid block), and
  its cost is quadratic in them: an unbounded claim is an unbounded decode time. 2^16 is a
  2048 x 2048 image (about 50 s per UNet call for the tiny backbone on 2 CPU cores at 1024^2,
  x16 at 2048^2); jobs that decode larger images raise `CodecConfig.max_latent_tokens`.
* `MAX_HS_POSITIONS`: latent positions the hyperprior's h_s runs on (float64, 64 channels:
  ~0.5 KiB per position per activation).
* `DECODE_SECONDS`: wall-clock budget of one decode call, checked inside the range decoder
  and between UNet calls; past it the records of the batch fail with `DecodeBudgetError`.

Encode (checked on the image header, before the pixels are decoded):

* `ENCODE_MAX_PIXELS` / `DEFAULT_MAX_PIXELS`: *padded* pixels (both sides rounded up to the
  backbone's multiple), so a 1x100000 image counts as 64x100032. The VAE encoder needs ~400 B
  per padded pixel (tiny backbone, float32), so the default cap of 2^24 is ~7 GB at most.
* `MAX_LATENT_SIDE`: the format stores latent rows and columns as u16.
"""
from __future__ import annotations

MAX_RECORD_BYTES = 1 << 30
DECODE_MAX_PIXELS = 1 << 26  # ceiling of any decode pixel cap: 67 MP, e.g. 8192 x 8192
ENCODE_MAX_PIXELS = 1 << 26  # ceiling of any encode pixel cap (padded pixels)
DEFAULT_MAX_PIXELS = 1 << 24  # the jobs' default cap (CodecConfig.max_pixels): 16.7 MP, 4096 x 4096
MAX_PIXELS_PER_BYTE = 1 << 14  # a record must hold at least 1 byte per 16,384 declared pixels
MAX_LATENT_TOKENS = 1 << 16  # e.g. a 2048 x 2048 image (latent 256 x 256)
MAX_HS_POSITIONS = 1 << 18  # latent positions (h x w) for the hyperprior's h_s: ~0.5 GiB peak
DECODE_SECONDS = 900.0
MAX_LATENT_SIDE = 0xFFFF
MAX_BYPASS_NIBBLES = 8  # a 32-bit escape value needs at most 8 four-bit chunks
MAX_VERIFY_BITSTREAM_BYTES = 64 << 20  # verify: a bitstream above this is a failure row, not loaded


class DecodeBudgetError(ValueError):
    """A record (or its batch) would exceed, or did exceed, a decode budget of this module."""


def padded(n: int, multiple: int) -> int:
    """n rounded up to a multiple (the backbone pads images to it before the VAE)."""
    return -(-int(n) // multiple) * multiple


def check_encode_size(width: int, height: int, multiple: int, max_pixels: int = ENCODE_MAX_PIXELS,
                      latent_factor: int = 8) -> None:
    """Refuse an image the encoder must not start on: padded pixel count over the cap or a latent
    the format cannot store. Raises `DecodeBudgetError` (a `ValueError`) with the reason."""
    pw, ph = padded(width, multiple), padded(height, multiple)
    if width < 1 or height < 1:
        raise DecodeBudgetError(f"image of {width}x{height} pixels is empty")
    if pw * ph > max_pixels:
        raise DecodeBudgetError(f"image of {width}x{height} pixels exceeds the cap of {max_pixels} pixels once padded "
                                f"to {pw}x{ph} (multiples of {multiple})")
    if max(pw, ph) // latent_factor > MAX_LATENT_SIDE:
        raise DecodeBudgetError(f"image of {width}x{height} pixels: a latent side over {MAX_LATENT_SIDE} "
                                f"does not fit the format (at most {MAX_LATENT_SIDE * latent_factor} pixels a side)")


def min_record_bytes(pixels: int) -> int:
    """The smallest record the plausibility rule accepts for an image of `pixels` pixels."""
    return -(-int(pixels) // MAX_PIXELS_PER_BYTE)
