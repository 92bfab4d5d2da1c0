"""Entropy models over the quantized latent ŷ, on CompressAI (real rANS range coding to bytes).

Two models share one small interface (CompressAI style: `update()` before coding):

* `StaticEntropyModel` (training-free, beyond the paper): each channel is a zero-mean discretized
  Gaussian whose scale travels as one byte of side information (an index into the scale table).
  Works with any backbone before any training.
* `HyperpriorEntropyModel` (the paper's learned model): a mean-scale hyperprior (Minnen et al.
  2018): h_a(ŷ) → z, z coded with a factorized `EntropyBottleneck`, h_s(ẑ) → (μ, σ) for ŷ.

Determinism (bitstreams are forever): everything that the decoder must reproduce — h_s, the
mean rounding, the scale → table-index map, the CDF tables — runs on the CPU in float64 and ends
in integers, so no float detail of a machine, thread count or batch composition reaches the
range coder. The integer CDF tables are hashed into the codec fingerprint; a decoder whose
tables differ refuses the bitstream instead of decoding garbage.
"""
from __future__ import annotations

import functools
import hashlib
import math
import struct
import time
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .limits import MAX_BYPASS_NIBBLES, DecodeBudgetError

SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64
LIKELIHOOD_BOUND = 1e-9


def scale_table() -> list[float]:
    """CompressAI's log-spaced table of Gaussian scales (computed in float64)."""
    return [float(v) for v in np.exp(np.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))]


def scale_to_index(scales: np.ndarray) -> np.ndarray:
    """Nearest table entry in the log domain, float64; the only float→int step on the decoder."""
    table = np.log(np.asarray(scale_table(), dtype=np.float64))
    s = np.log(np.clip(np.asarray(scales, dtype=np.float64), SCALE_MIN, SCALE_MAX))
    step = (table[-1] - table[0]) / (SCALE_LEVELS - 1)
    return np.clip(np.floor((s - table[0]) / step + 0.5), 0, SCALE_LEVELS - 1).astype(np.int32)


RANS64_L = 1 << 31
_OVERRUN = "range-coded string ends before the symbols the header declares (truncated or hostile record)"


def rans_decode(string: bytes, indexes: list[int], cdfs: list[list[int]], lengths: list[int],
                offsets: list[int], deadline: float | None = None) -> list[int]:
    """CompressAI's rANS `decode_with_indexes`, bit for bit, but bounds-checked (pure Python).

    CompressAI's C++ decoder trusts its input: a record that claims more symbols than its string
    holds makes it read past the end of the buffer (a crash), and a forged escape count makes it
    loop up to 2^31 times. This decoder mirrors its arithmetic and refuses instead: the string is
    whole 32-bit words, no read passes its end, an escape has at most `MAX_BYPASS_NIBBLES`
    chunks, and the stream must end exactly where the encoder began (every word consumed, the
    state back at RANS64_L). Any violation is a `ValueError`; past `deadline` (time.monotonic)
    a `DecodeBudgetError`.
    """
    n_bytes = len(string)
    if n_bytes < 8 or n_bytes % 4:
        raise ValueError(f"range-coded string of {n_bytes} bytes is not a rANS stream (whole 32-bit words, at least 2)")
    words = struct.unpack(f"<{n_bytes // 4}I", string)
    n_words, low = len(words), RANS64_L
    x, p = words[0] | (words[1] << 32), 2
    out = [0] * len(indexes)
    for i, ci in enumerate(indexes):
        if not i & 0xFFFF and deadline is not None and time.monotonic() > deadline:
            raise DecodeBudgetError("range decoding ran past the decode time budget")
        cdf = cdfs[ci]
        cum = x & 0xFFFF
        s = bisect_right(cdf, cum) - 1
        start = cdf[s]
        x = (cdf[s + 1] - start) * (x >> 16) + cum - start
        if x < low:
            if p == n_words:
                raise ValueError(_OVERRUN)
            x = (x << 32) | words[p]
            p += 1
        max_value = lengths[ci] - 2
        if s != max_value:
            out[i] = s + offsets[ci]
            continue
        # Escape: a chunk count in 4-bit digits (15 = "and more"), then the chunks, low first.
        n_bypass, raw, j, counting = 0, 0, 0, True
        while True:
            val = x & 15
            x >>= 4
            if x < low:
                if p == n_words:
                    raise ValueError(_OVERRUN)
                x = (x << 32) | words[p]
                p += 1
            if counting:
                n_bypass += val
                if n_bypass > MAX_BYPASS_NIBBLES:
                    raise ValueError(f"escape of {n_bypass}+ chunks (a 32-bit value has at most {MAX_BYPASS_NIBBLES})")
                counting = val == 15
                if counting or n_bypass:
                    continue
                break
            raw |= val << (4 * j)
            j += 1
            if j == n_bypass:
                break
        if raw >= 1 << 31:
            raise ValueError("escape value outside int32 (no encoder writes it)")
        value = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + max_value
        out[i] = value + offsets[ci]
    if p != n_words or x != low:
        raise ValueError(f"range-coded string does not end with its symbols ({n_words - p} words left over)")
    return out


@dataclass
class Payload:
    """What an entropy model writes for one image: range-coded strings plus side bytes."""

    strings: list[bytes]
    side: bytes = b""


class _GaussianCoder(nn.Module):
    """A `GaussianConditional` with its CDF tables built once, in float64, as Python lists."""

    def __init__(self) -> None:
        super().__init__()
        from compressai.entropy_models import GaussianConditional

        self.gc = GaussianConditional(scale_table())
        self._lists: tuple | None = None

    def update(self) -> None:
        self.gc.double()
        self.gc.update_scale_table(scale_table(), force=True)
        self.gc.float()
        self._lists = _table_lists(self.gc.quantized_cdf, self.gc.cdf_length, self.gc.offset)

    def tables_digest(self) -> bytes:
        return _digest_ints(self.gc.quantized_cdf, self.gc.cdf_length, self.gc.offset)

    def _subset(self, indexes: np.ndarray) -> tuple[list[int], list, list[int], list[int]]:
        cdf, lengths, offsets = self._require()
        used, local = np.unique(indexes, return_inverse=True)
        if used.size and (used[0] < 0 or used[-1] >= len(cdf)):
            raise ValueError(f"scale index outside the table of {len(cdf)}")
        u = used.tolist()
        return local.reshape(-1).tolist(), [cdf[i] for i in u], [lengths[i] for i in u], [offsets[i] for i in u]

    def encode(self, symbols: np.ndarray, indexes: np.ndarray) -> bytes:
        from compressai.ans import RansEncoder

        _check_encoder_room(symbols, indexes, *self._require())
        idx, cdf, lengths, offsets = self._subset(indexes)
        return RansEncoder().encode_with_indexes(symbols.reshape(-1).tolist(), idx, cdf, lengths, offsets)

    def decode(self, string: bytes, indexes: np.ndarray, deadline: float | None = None) -> np.ndarray:
        idx, cdf, lengths, offsets = self._subset(indexes)
        values = rans_decode(string, idx, cdf, lengths, offsets, deadline)
        return np.asarray(values, dtype=np.int32).reshape(indexes.shape)

    def bits(self, symbols: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """−log2 P of integer (or noisy) symbols under N(0, σ) discretized to unit bins."""
        lik = self.gc._likelihood(symbols, scales).clamp_min(LIKELIHOOD_BOUND)
        return -torch.log2(lik)

    def _require(self) -> tuple:
        if self._lists is None:
            raise RuntimeError("entropy model not ready: call update() before compress/decompress")
        return self._lists


MEAN_LEVELS = 5  # fractional parts of μ the hyperprior's tables resolve: −0.4, −0.2, 0, 0.2, 0.4
TAIL_MULTIPLIER = 6.11  # ±6.11σ hold all but ~1e-9 of a Gaussian (CompressAI's tail_mass); the rest escapes


def split_means(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """μ (float64) -> (integer part m = ⌊μ + ½⌋, index k of the nearest tabled fraction)."""
    mu = np.asarray(means, dtype=np.float64)
    m = np.floor(mu + 0.5)
    k = np.clip(np.floor((mu - m + 0.5) * MEAN_LEVELS), 0, MEAN_LEVELS - 1)
    return m.astype(np.int32), k.astype(np.int32)


def mean_offsets() -> torch.Tensor:
    """The tabled fractions of μ, float64."""
    return -0.5 + (torch.arange(MEAN_LEVELS, dtype=torch.float64) + 0.5) / MEAN_LEVELS


class _MeanScaleCoder(_GaussianCoder):
    """Range coding of ŷ − m under N(o_k, σ_j) discretized to unit bins: one CDF table per
    (scale level j, mean fraction k), table index j·MEAN_LEVELS + k. Keeping the fraction of
    the predicted mean (not only its rounding) is worth ~7% of the rate at the codec's low
    rates, where |ŷ| is mostly ≤ 2. Tables are computed in float64 and end as integers."""

    def update(self) -> None:
        self._lists = _mean_scale_tables()

    def tables_digest(self) -> bytes:
        cdfs, lengths, offsets = self._require()
        flat = torch.tensor([v for c in cdfs for v in c] + lengths + offsets, dtype=torch.int64)
        return _digest_ints(flat)

    def bits(self, symbols: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("use the Gaussian likelihood with the quantized mean (HyperpriorEntropyModel)")


class StaticEntropyModel(nn.Module):
    """Per-channel zero-mean Gaussian; the C scale indexes are the side information."""

    model_id = 0
    name = "static"

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.coder = _GaussianCoder()

    def update(self) -> None:
        self.coder.update()

    def tables_digest(self) -> bytes:
        return self.coder.tables_digest()

    def _indexes(self, y_hat: np.ndarray) -> np.ndarray:
        # The rms (not std) of each channel: the coding mean is 0, so the rms fits the symbols.
        rms = np.sqrt(np.mean(np.square(y_hat.astype(np.float64)), axis=(1, 2)))
        return scale_to_index(rms)

    def compress(self, y_hat: np.ndarray) -> Payload:
        """Integer symbols (C, h, w) -> Payload(strings=[one string], side=C index bytes)."""
        idx = self._indexes(y_hat)
        full = np.broadcast_to(idx[:, None, None], y_hat.shape)
        return Payload([self.coder.encode(y_hat.astype(np.int32), full)], bytes(idx.astype(np.uint8).tolist()))

    def decompress(self, payload: Payload, shape: tuple[int, int, int], deadline: float | None = None) -> np.ndarray:
        c = shape[0]
        # v2 records may pad the side information with zeros (see codec/bitstream.py)
        if len(payload.strings) != 1 or len(payload.side) < c or payload.side[c:].strip(b"\0"):
            raise ValueError("static entropy payload needs 1 string and one side byte per channel")
        idx = np.frombuffer(payload.side[:c], dtype=np.uint8).astype(np.int32)
        if idx.max(initial=0) >= SCALE_LEVELS:
            raise ValueError(f"scale index {int(idx.max())} outside the table of {SCALE_LEVELS}")
        return self.coder.decode(payload.strings[0], np.broadcast_to(idx[:, None, None], shape).copy(), deadline)

    def estimate_bits(self, y_hat: np.ndarray) -> float:
        """The model's own estimate of the payload size in bits (excluding side bytes)."""
        idx = self._indexes(y_hat)
        scales = torch.tensor(scale_table(), dtype=torch.float64)[torch.from_numpy(idx).long()]
        return float(self.coder.bits(torch.from_numpy(y_hat).double(), scales[:, None, None]).sum())

    def likelihood_bits(self, y: torch.Tensor) -> torch.Tensor:
        """Differentiable bits of a (B,C,h,w) batch, per image (rms scale per channel)."""
        scales = y.detach().pow(2).mean(dim=(2, 3), keepdim=True).sqrt().clamp_min(SCALE_MIN)
        return self.coder.bits(y, scales).sum(dim=(1, 2, 3))


class HyperpriorEntropyModel(nn.Module):
    """Mean-scale hyperprior over the C-channel latent (Minnen et al. 2018, no context model).

    The transforms are shaped for SD's 4-channel latent at the codec's low rates (|ŷ| mostly
    ≤ 2): h_a sees [ŷ, |ŷ|] in 4×4 patches, so z describes each patch's mean and energy, and
    h_s maps z back to per-symbol (μ, σ). Deeper Minnen-style strided stacks did not learn
    to use z within a short training run (the side latent collapsed); this one does.
    """

    model_id = 1
    name = "hyperprior"

    def __init__(self, channels: int = 4, hidden: int = 64, z_channels: int = 8) -> None:
        super().__init__()
        from compressai.entropy_models import EntropyBottleneck

        self.channels, self.hidden, self.z_channels = channels, hidden, z_channels
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.h_a = nn.Sequential(
            _PatchFeatures(), nn.Conv2d(2 * channels, hidden, 4, stride=4), act(), nn.Conv2d(hidden, z_channels, 1),
        )
        self.h_s = nn.Sequential(
            nn.ConvTranspose2d(z_channels, hidden, 4, stride=4), act(),
            nn.Conv2d(hidden, hidden, 3, padding=1), act(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )
        self.entropy_bottleneck = EntropyBottleneck(z_channels)
        with torch.no_grad():  # z starts at std ~1, not ~0.2: the bottleneck's U(-½, ½) training
            self.h_a[-1].weight.mul_(5.0)  # noise would otherwise drown it and h_s learn to ignore z
        self.coder = _MeanScaleCoder()
        self._h_s64: nn.Module | None = None
        self._z_lists: tuple | None = None

    def update(self) -> None:
        self.coder.update()
        eb = self.entropy_bottleneck
        eb.double()
        eb.update(force=True)
        eb.float()
        import copy

        self._h_s64 = copy.deepcopy(self.h_s).cpu().double().eval()
        self._z_lists = _table_lists(eb.quantized_cdf, eb.cdf_length, eb.offset)

    def tables_digest(self) -> bytes:
        eb = self.entropy_bottleneck
        return self.coder.tables_digest() + _digest_ints(eb.quantized_cdf, eb.cdf_length, eb.offset)

    def _params(self, z_hat: torch.Tensor, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Integer means m and table indexes (scale level, mean fraction) for ŷ from ẑ: float64
        CPU, single deterministic path."""
        return _tables(self._side64(z_hat, shape), shape[0])

    def _side64(self, z_hat: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """h_s(ẑ) in float64 on the CPU, cropped to ŷ's size: (1, 2C, h, w) = (μ, log σ)."""
        if self._h_s64 is None:
            raise RuntimeError("entropy model not ready: call update() before compress/decompress")
        with torch.inference_mode():
            return self._h_s64(z_hat.double().cpu())[..., : shape[1], : shape[2]]

    def compress(self, y_hat: np.ndarray) -> Payload:
        """Integer ŷ (C,h,w), h and w multiples of 4 -> Payload([y string, z string])."""
        z_string, z_hat = self._code_z(y_hat)
        means, idx = self._params(z_hat, y_hat.shape)
        y_string = self.coder.encode(y_hat.astype(np.int32) - means, idx)
        return Payload([y_string, z_string])

    def _code_z(self, y_hat: np.ndarray) -> tuple[bytes, torch.Tensor]:
        """The side latent of ŷ: its range-coded string and ẑ exactly as the decoder will see it."""
        with torch.inference_mode():
            z = self.h_a(torch.from_numpy(y_hat).float()[None].to(self._device())).cpu()
            eb = self.entropy_bottleneck
            z_sym = torch.round(z - eb.quantiles[:, :, 1:2].detach().reshape(1, -1, 1, 1)).int().numpy()
            _check_encoder_room(z_sym, np.broadcast_to(np.arange(z.shape[1])[None, :, None, None], z_sym.shape),
                                *self._z_lists)
            z_string = eb.compress(z)[0]
            return z_string, self._decode_z(z_string, tuple(z.shape[-2:]), None)

    def decompress(self, payload: Payload, shape: tuple[int, int, int], deadline: float | None = None) -> np.ndarray:
        if len(payload.strings) != 2 or payload.side.strip(b"\0"):
            raise ValueError("hyperprior payload needs 2 strings and no side information")
        c, h, w = shape
        z_hat = self._decode_z(payload.strings[1], ((h + 3) // 4, (w + 3) // 4), deadline)
        means, idx = self._params(z_hat, shape)
        return self.coder.decode(payload.strings[0], idx, deadline) + means

    def _decode_z(self, string: bytes, size: tuple[int, int], deadline: float | None) -> torch.Tensor:
        """`EntropyBottleneck.decompress` (same tables, same float32 result) on the bounds-checked
        decoder: ẑ = symbols + channel medians, shape (1, z_channels, *size)."""
        if self._z_lists is None:
            raise RuntimeError("entropy model not ready: call update() before compress/decompress")
        cdfs, lengths, offsets = self._z_lists
        zc = len(cdfs)
        idx = np.broadcast_to(np.arange(zc, dtype=np.int64)[:, None, None], (zc, *size)).reshape(-1).tolist()
        values = rans_decode(string, idx, cdfs, lengths, offsets, deadline)
        symbols = torch.tensor(values, dtype=torch.int32).reshape(1, zc, *size)
        medians = self.entropy_bottleneck.quantiles[:, :, 1:2].detach().reshape(1, zc, 1, 1)
        return symbols.type_as(medians) + medians

    def estimate_bits(self, y_hat: np.ndarray) -> float:
        with torch.inference_mode():
            z = self.h_a(torch.from_numpy(y_hat).float()[None].to(self._device())).cpu()
            _, z_lik = self.entropy_bottleneck(z, training=False)
            z_hat = self.entropy_bottleneck.decompress(self.entropy_bottleneck.compress(z), z.shape[-2:])
        means, idx = self._params(z_hat, y_hat.shape)
        table = torch.tensor(scale_table(), dtype=torch.float64)
        scales = table[torch.from_numpy(idx // MEAN_LEVELS).long()]
        mu = torch.from_numpy(means).double() + mean_offsets()[torch.from_numpy(idx % MEAN_LEVELS).long()]
        lik = self.coder.gc._likelihood(torch.from_numpy(y_hat).double() - mu, scales).clamp_min(LIKELIHOOD_BOUND)
        return float(-torch.log2(lik).sum() - torch.log2(z_lik.double()).sum())

    def likelihood_bits(self, y: torch.Tensor, z_weight: float = 1.0) -> torch.Tensor:
        """Differentiable bits per image of a noisy (training) or rounded (eval) batch.

        `z_weight` < 1 discounts the side information's bits (a training warm-up: a side latent
        that costs full price from step 0 is switched off before h_s learns to use it).
        """
        params, z_bits = self._side(y)
        return self._bits(y, params) + z_weight * z_bits

    def _side(self, y: torch.Tensor, training: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training twin of the side path: h_s's (μ, log σ) for y, and the side latent's bits per
        image (z noised in train mode, rounded in eval mode or with training=False)."""
        z_tilde, z_lik = self.entropy_bottleneck(self.h_a(y), training=training)
        z_bits = -torch.log2(z_lik.clamp_min(LIKELIHOOD_BOUND))
        return self.h_s(z_tilde)[..., : y.shape[-2], : y.shape[-1]], z_bits.sum(dim=(1, 2, 3))

    def _bits(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Bits per image of y under (μ, log σ) = params, μ quantized as the coder uses it."""
        means, log_scales = params.chunk(2, dim=1)
        # The coder sees μ as m + one of MEAN_LEVELS fractions (`split_means`), so training does
        # too, with a straight-through gradient: the rate trained is the rate coded.
        means = means + (_quantize_means(means) - means).detach()
        lik = self.coder.gc._likelihood(y - means, log_scales.exp()).clamp_min(LIKELIHOOD_BOUND)
        return -torch.log2(lik).sum(dim=(1, 2, 3))

    def _device(self) -> torch.device:
        return next(self.h_a.parameters()).device


def anchor_mask(h: int, w: int) -> np.ndarray:
    """The checkerboard's anchors: positions with (i + j) even, coded first (bool (h, w))."""
    i, j = np.indices((h, w))
    return (i + j) % 2 == 0


class CheckerboardEntropyModel(HyperpriorEntropyModel):
    """The hyperprior plus a checkerboard spatial context (He et al. 2021), decoded in two passes.

    Anchors ((i + j) even) are coded with the hyperprior's (μ, σ) alone. The other half is coded
    with (μ, σ) refined from the decoded anchors around it: a 5×5 conv over the anchors (the
    non-anchors zeroed) and a 1×1 network add a correction to the hyperprior's parameters. At the
    codec's rates the latent is smooth next to its neighbours, which a 4×4-patch side latent
    cannot say. Both passes are parallel (no per-symbol loop); the context network runs in
    float64 on the CPU like h_s, so encoder and decoder derive the same integers. The correction
    starts at zero: training warm-starts from a trained hyperprior (`codec.training.initial_entropy`).
    """

    model_id = 2
    name = "checkerboard"

    def __init__(self, channels: int = 4, hidden: int = 64, z_channels: int = 8) -> None:
        super().__init__(channels, hidden, z_channels)
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.context = nn.Conv2d(channels, hidden, 5, padding=2)
        self.refine = nn.Sequential(nn.Conv2d(2 * channels + hidden, hidden, 1), act(), nn.Conv2d(hidden, 2 * channels, 1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self._ctx64: tuple[nn.Module, nn.Module] | None = None

    def update(self) -> None:
        import copy

        super().update()
        self._ctx64 = (copy.deepcopy(self.context).cpu().double().eval(), copy.deepcopy(self.refine).cpu().double().eval())

    def _refined(self, params: torch.Tensor, anchors: torch.Tensor, context: nn.Module, refine: nn.Module) -> torch.Tensor:
        """(μ, log σ) of the non-anchors: hyperprior params + correction from the anchors."""
        return params + refine(torch.cat([params, context(anchors)], dim=1))

    def _context64(self, params: torch.Tensor, y_anchors: np.ndarray) -> torch.Tensor:
        """The non-anchors' (μ, log σ) from h_s's float64 output and ŷ with the non-anchors zeroed."""
        if self._ctx64 is None:
            raise RuntimeError("entropy model not ready: call update() before compress/decompress")
        with torch.inference_mode():
            return self._refined(params, torch.from_numpy(y_anchors).double()[None], *self._ctx64)

    def compress(self, y_hat: np.ndarray) -> Payload:
        """Integer ŷ (C,h,w) -> Payload([anchor string, non-anchor string, z string])."""
        c, h, w = y_hat.shape
        z_string, z_hat = self._code_z(y_hat)
        a = np.broadcast_to(anchor_mask(h, w), y_hat.shape)
        y = y_hat.astype(np.int32)
        params = self._side64(z_hat, y_hat.shape)
        m, idx = _tables(params, c)
        first = self.coder.encode(y[a] - m[a], idx[a])
        m, idx = _tables(self._context64(params, np.where(a, y, 0)), c)
        second = self.coder.encode(y[~a] - m[~a], idx[~a])
        return Payload([first, second, z_string])

    def decompress(self, payload: Payload, shape: tuple[int, int, int], deadline: float | None = None) -> np.ndarray:
        if len(payload.strings) != 3 or payload.side.strip(b"\0"):
            raise ValueError("checkerboard payload needs 3 strings and no side information")
        c, h, w = shape
        z_hat = self._decode_z(payload.strings[2], ((h + 3) // 4, (w + 3) // 4), deadline)
        a = np.broadcast_to(anchor_mask(h, w), shape)
        y = np.zeros(shape, dtype=np.int32)
        params = self._side64(z_hat, shape)
        m, idx = _tables(params, c)
        y[a] = self.coder.decode(payload.strings[0], idx[a], deadline) + m[a]
        m, idx = _tables(self._context64(params, y), c)  # y holds the anchors only, as the encoder's
        y[~a] = self.coder.decode(payload.strings[1], idx[~a], deadline) + m[~a]
        return y

    def estimate_bits(self, y_hat: np.ndarray) -> float:
        y = torch.from_numpy(y_hat).float()[None].to(self._device())
        with torch.inference_mode():
            params, z_bits = self._side(y, training=False)  # the side latent rounded, as coded
            return float((self._checkerboard_bits(y, params) + z_bits)[0])

    def likelihood_bits(self, y: torch.Tensor, z_weight: float = 1.0) -> torch.Tensor:
        """Differentiable bits per image of a rounded batch: both passes in one (He et al.'s
        training), anchors under the hyperprior's parameters, the rest under the refined ones."""
        params, z_bits = self._side(y)
        return self._checkerboard_bits(y, params) + z_weight * z_bits

    def _checkerboard_bits(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Bits of ŷ: anchors under h_s's parameters, the rest under the context-refined ones."""
        a = torch.from_numpy(anchor_mask(*y.shape[-2:])).to(y.device, y.dtype)
        refined = self._refined(params, y * a, self.context, self.refine)
        return self._bits(y, a * params + (1 - a) * refined)


def pass_masks(c: int, h: int, w: int, groups: int) -> list[np.ndarray]:
    """The coding passes of `ChannelCheckerboardEntropyModel`: for each channel group in turn,
    its anchors, then its other half. Bool (C, h, w) each; disjoint; together the whole latent."""
    a = anchor_mask(h, w)[None]
    bounds = np.linspace(0, c, groups + 1).round().astype(int)
    masks = []
    for g in range(groups):
        ch = np.zeros((c, 1, 1), dtype=bool)
        ch[bounds[g]:bounds[g + 1]] = True
        masks += [ch & a, ch & ~a]
    return masks


class ChannelCheckerboardEntropyModel(HyperpriorEntropyModel):
    """The checkerboard context over channel groups as well (He et al. 2022's ELIC order).

    The latent's channels are coded in GROUPS groups, each as a checkerboard (anchors, then the
    rest); every pass after the first refines h_s's (μ, σ) from all symbols decoded before it
    (earlier groups whole, and the group's own anchors), each pass with its own 5×5 context conv
    and 1×1 network. SD latents' channels are correlated where the picture has structure, which
    neither the side latent nor a same-channel spatial context can say. Passes are parallel
    within themselves; the context networks run in float64 on the CPU, like h_s.
    """

    model_id = 3
    name = "channel-checkerboard"
    GROUPS = 2  # fixed for this model id: the record's string count (2 * GROUPS + 1) depends on it

    def __init__(self, channels: int = 4, hidden: int = 64, z_channels: int = 8) -> None:
        super().__init__(channels, hidden, z_channels)
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        n = 2 * self.GROUPS - 1
        self.contexts = nn.ModuleList(nn.Conv2d(channels, hidden, 5, padding=2) for _ in range(n))
        self.refines = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * channels + hidden, hidden, 1), act(), nn.Conv2d(hidden, 2 * channels, 1))
            for _ in range(n))
        for r in self.refines:  # every correction starts at zero: step 0 codes as the hyperprior
            nn.init.zeros_(r[-1].weight)
            nn.init.zeros_(r[-1].bias)
        self._ctx64: list[tuple[nn.Module, nn.Module]] | None = None

    def update(self) -> None:
        import copy

        super().update()
        self._ctx64 = [(copy.deepcopy(c).cpu().double().eval(), copy.deepcopy(r).cpu().double().eval())
                       for c, r in zip(self.contexts, self.refines)]

    def _pass_params64(self, k: int, params: torch.Tensor, y_done: np.ndarray) -> torch.Tensor:
        """(μ, log σ) for pass k from h_s's float64 output and ŷ with the undecoded symbols zeroed."""
        if k == 0:
            return params
        if self._ctx64 is None:
            raise RuntimeError("entropy model not ready: call update() before compress/decompress")
        context, refine = self._ctx64[k - 1]
        with torch.inference_mode():
            done = torch.from_numpy(y_done).double()[None]
            return params + refine(torch.cat([params, context(done)], dim=1))

    def compress(self, y_hat: np.ndarray) -> Payload:
        """Integer ŷ (C,h,w) -> Payload([one string per pass, z string])."""
        z_string, z_hat = self._code_z(y_hat)
        y = y_hat.astype(np.int32)
        params = self._side64(z_hat, y_hat.shape)
        done = np.zeros(y.shape, dtype=bool)
        strings = []
        for k, mask in enumerate(pass_masks(*y.shape, self.GROUPS)):
            m, idx = _tables(self._pass_params64(k, params, np.where(done, y, 0)), y.shape[0])
            strings.append(self.coder.encode(y[mask] - m[mask], idx[mask]))
            done |= mask
        return Payload(strings + [z_string])

    def decompress(self, payload: Payload, shape: tuple[int, int, int], deadline: float | None = None) -> np.ndarray:
        n = 2 * self.GROUPS + 1
        if len(payload.strings) != n or payload.side.strip(b"\0"):
            raise ValueError(f"{self.name} payload needs {n} strings and no side information")
        c, h, w = shape
        z_hat = self._decode_z(payload.strings[-1], ((h + 3) // 4, (w + 3) // 4), deadline)
        params = self._side64(z_hat, shape)
        y = np.zeros(shape, dtype=np.int32)  # holds exactly the symbols decoded so far, as the encoder's view
        for k, mask in enumerate(pass_masks(c, h, w, self.GROUPS)):
            m, idx = _tables(self._pass_params64(k, params, y), c)
            y[mask] = self.coder.decode(payload.strings[k], idx[mask], deadline) + m[mask]
        return y

    def estimate_bits(self, y_hat: np.ndarray) -> float:
        y = torch.from_numpy(y_hat).float()[None].to(self._device())
        with torch.inference_mode():
            params, z_bits = self._side(y, training=False)
            return float((self._pass_bits(y, params) + z_bits)[0])

    def likelihood_bits(self, y: torch.Tensor, z_weight: float = 1.0) -> torch.Tensor:
        """Differentiable bits per image of a rounded batch, every pass in one forward."""
        params, z_bits = self._side(y)
        return self._pass_bits(y, params) + z_weight * z_bits

    def _pass_bits(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Bits of ŷ, each pass's symbols under the parameters refined from the passes before it."""
        masks = [torch.from_numpy(m).to(y.device, y.dtype) for m in pass_masks(*y.shape[1:], self.GROUPS)]
        done = torch.zeros_like(masks[0])
        final = torch.zeros_like(params)
        for k, mask in enumerate(masks):
            p = params if k == 0 else params + self.refines[k - 1](torch.cat([params, self.contexts[k - 1](y * done)], dim=1))
            final = final + torch.cat([mask, mask])[None] * p
            done = done + mask
        return self._bits(y, final)


class _PatchFeatures(nn.Module):
    """ŷ -> [ŷ, |ŷ|], zero-padded to a multiple of 4 (z is ⌈h/4⌉ × ⌈w/4⌉, as `decompress` expects).

    With |ŷ| the local energy that sets σ is one linear map away. h_a runs only in the encoder;
    the decoder needs ẑ alone.
    """

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h, w = y.shape[-2:]
        y = nn.functional.pad(y, (0, -w % 4, 0, -h % 4))
        return torch.cat([y, y.abs()], dim=1)


ENTROPY_MODELS = {"static": StaticEntropyModel, "hyperprior": HyperpriorEntropyModel,
                  "checkerboard": CheckerboardEntropyModel, "channel-checkerboard": ChannelCheckerboardEntropyModel}
ENTROPY_IDS = {cls.model_id: name for name, cls in ENTROPY_MODELS.items()}
# The learned models (a side latent, h_s in float64): they need trained weights to code anything.
LEARNED_ENTROPY = tuple(name for name, cls in ENTROPY_MODELS.items() if issubclass(cls, HyperpriorEntropyModel))


@functools.lru_cache(maxsize=1)
def _mean_scale_tables() -> tuple[list, list, list]:
    """The (scale, mean fraction) CDF tables: constants, built once per process (~1 s)."""
    from compressai._CXX import pmf_to_quantized_cdf

    cdfs, lengths, offsets = [], [], []
    for scale in scale_table():
        n = int(math.ceil(scale * TAIL_MULTIPLIER)) + 1
        x = torch.arange(-n, n + 1, dtype=torch.float64)
        for o in mean_offsets().tolist():
            upper = torch.special.ndtr((x + 0.5 - o) / scale)
            lower = torch.special.ndtr((x - 0.5 - o) / scale)
            pmf = (upper - lower).clamp_min(0)
            tail = max(0.0, 1.0 - float(pmf.sum()))
            cdfs.append(list(pmf_to_quantized_cdf(pmf.tolist() + [tail], 16)))
            lengths.append(len(pmf) + 2)
            offsets.append(-n)
    return cdfs, lengths, offsets


def _tables(params: torch.Tensor, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, 2C, h, w) float64 (μ, log σ) -> integer means m and table indexes (scale level ·
    MEAN_LEVELS + mean fraction): the float→int step the encoder and decoder share."""
    out = params[0].numpy()
    m, k = split_means(out[:c])
    return m, scale_to_index(np.exp(out[c:])) * MEAN_LEVELS + k


def _quantize_means(means: torch.Tensor) -> torch.Tensor:
    """μ as the coder uses it: integer part plus the nearest tabled fraction (torch twin of
    `split_means`, for training)."""
    m = torch.floor(means + 0.5)
    k = torch.clamp(torch.floor((means - m + 0.5) * MEAN_LEVELS), 0, MEAN_LEVELS - 1)
    return m - 0.5 + (k + 0.5) / MEAN_LEVELS


def _table_lists(cdf: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor) -> tuple[list, list, list]:
    """CompressAI's CDF tables as Python lists, rows trimmed to their real length (the coder reads
    only cdf_length entries, and short rows keep the per-call list conversion small)."""
    n = lengths.reshape(-1).int().tolist()
    return [row[:k] for row, k in zip(cdf.tolist(), n)], n, offsets.reshape(-1).int().tolist()


def _check_encoder_room(symbols: np.ndarray, indexes: np.ndarray, cdfs: list, lengths: list, offsets: list) -> None:
    """CompressAI's encoder writes into a buffer of one 32-bit word per symbol, unchecked; a latent
    whose escapes need more (values far outside the tables, e.g. from a broken estimator) would
    overrun it. Bound the words it can emit (<= 17 bits per symbol + 5 per escape chunk, + flush)
    and refuse such a latent with a clear error instead."""
    idx = np.asarray(indexes).reshape(-1)
    v = np.asarray(symbols, dtype=np.int64).reshape(-1) - np.asarray(offsets, dtype=np.int64)[idx]
    max_value = np.asarray(lengths, dtype=np.int64)[idx] - 2
    esc = (v < 0) | (v >= max_value)
    if not esc.any():
        return
    raw = np.where(v[esc] < 0, -2 * v[esc] - 1, 2 * (v[esc] - max_value[esc]))
    chunks = np.zeros_like(raw)
    r = raw.copy()
    while (r > 0).any():
        chunks += r > 0
        r >>= 4
    b = int((chunks + chunks // 15 + 1).sum())
    if 17 * v.size + 5 * b + 64 > 32 * v.size:
        raise ValueError(f"latent too far outside the entropy model's range ({int(esc.sum())} of {v.size} symbols escape); "
                         "the range coder's buffer would overflow (check the codec weights / estimator)")


def _digest_ints(*tensors: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes())
    return h.digest()
