"""Structure-aware fuzzing of the record parser and decoder, each input in a child process.

Mutants of valid records (tiny backbone; static and hyperprior; formats v2 and v1; several sizes
and t): bit flips, byte edits, truncations, extensions (each with and without the CRC
recomputed), header fields set to boundary or consistent-but-forged values with the CRC
recomputed (as an attacker would), range-coded strings replaced (cut, emptied, 0xFF-filled,
random) with lengths and CRC fixed, and version bytes swapped. Every input must end as a clear
`ValueError` subclass (BitstreamError, CodecError, DecodeBudgetError) or as an image of the
declared size whose record differs from the original only in fields the CRC alone cannot
protect (`FORGEABLE`, caught by the archive HMAC of `pipeline/integrity.py`), never as another
exception, a crashed child (signal) or a hang.

Workers are child processes (`python tests/test_fuzz_bitstream.py --worker ...`), so a crash in
native code (CompressAI's C++ range coder, torch) is seen as the child's death by a signal; the
failing index range is then bisected to the input, which is reported. Run the campaign by hand:

    PYTHONPATH=. python tests/test_fuzz_bitstream.py --campaign 100000 --workers 2
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_DECODE_PIXELS = 128 * 128  # mutants claiming more are parsed and entropy-decoded, not run through the UNet
ENTROPY_DECODE_SYMBOLS = 4 * 64 * 64
UNET_EVERY_SLOW = 4  # the 10^5 campaign runs every 4th small parsed mutant through the UNet and VAE (time)
HANG_S = 5.0  # an input taking longer than this is a hang
# Record fields a forger who recomputes the CRC can change and still have a valid record: the
# format cannot tell such an edit from the original (only an HMAC can, pipeline/integrity.py).
# latent_h/latent_w: a transposed latent of the same symbol count keeps the symbol hash (it covers
# the symbols, not the shape), so a forged geometry with the same count is a valid record too.
FORGEABLE = {"t", "gamma", "flags", "width", "height", "latent_h", "latent_w", "key_tag", "source_tag"}
FIELDS = ("flags", "entropy_id", "backbone_fp", "codec_fp", "width", "height", "t", "latent_h", "latent_w",
          "gamma", "side", "strings", "symbol_hash", "version", "key_tag", "source_tag")


# ------------------------------------------------------------------ the worker (child process)
def _bases():
    """Valid records and the codecs that read them (deterministic: every worker builds the same)."""
    import numpy as np
    import torch

    from codec import CodecConfig, DiffusionCodec, load_backbone
    from codec import bitstream as bs
    from jobs.samples import sample_image

    torch.set_num_threads(1)
    bb = load_backbone("tiny")
    static = DiffusionCodec(bb, config=CodecConfig(entropy="static", overlap_entropy=False, batch_size=1))
    torch.manual_seed(0)
    hyper = DiffusionCodec(bb, config=CodecConfig(entropy="hyperprior", overlap_entropy=False, batch_size=1))
    out = []
    for codec, sizes in ((static, [(32, 32), (48, 40), (64, 64), (17, 90)]), (hyper, [(32, 32), (64, 48)])):
        for i, (h, w) in enumerate(sizes):
            for t in (20, 150):
                img = sample_image(10 + i, h, w) if i != 3 else np.full((h, w, 3), 7, np.uint8)
                data = codec.encode([img], t=t, keys=[f"k/{i}.png"], source_sha256=["ab" * 32])[0].data
                out.append((codec, data))
                rec = bs.parse(data)
                rec.version, rec.key_tag, rec.source_tag = 1, bs.UNBOUND, bs.UNBOUND
                rec.side = rec.side[: rec.channels] if rec.entropy_id == 0 else b""
                out.append((codec, bs.pack(rec)))
    return out


def _fix(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _layout(data: bytes) -> dict[str, tuple[int, int]]:
    """Offsets and sizes of a valid record's fields (name -> (offset, size))."""
    v2 = data[4] >= 2
    c = data[7]
    f = {"version": (4, 1), "flags": (5, 1), "entropy_id": (6, 1), "channels": (7, 1), "backbone_fp": (8, 8),
         "codec_fp": (16, 8), "width": (24, 4), "height": (28, 4), "t": (32, 2), "latent_h": (34, 2),
         "latent_w": (36, 2), "reserved": (38, 2)}
    pos = 40
    if v2:
        f["key_tag"], f["source_tag"] = (40, 8), (48, 8)
        pos = 56
    f["gamma"] = (pos, 4 * c)
    pos += 4 * c
    (n_side,) = struct.unpack_from("<H", data, pos)
    f["side_len"], f["side"] = (pos, 2), (pos + 2, n_side)
    pos += 2 + n_side
    n = data[pos]
    f["n_strings"], f["lengths"] = (pos, 1), (pos + 1, 4 * n)
    lengths = struct.unpack_from(f"<{n}I", data, pos + 1)
    pos += 1 + 4 * n
    for i, ln in enumerate(lengths):
        f[f"string{i}"] = (pos, ln)
        pos += ln
    f["symbol_hash"] = (pos, 8)
    return f


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One structure-aware mutant of a valid record: (operator name, bytes)."""
    op = rng.choices(["flip", "bytes", "truncate", "extend", "flip+crc", "bytes+crc", "extend+crc", "field",
                      "field", "field", "geometry", "string", "version"],
                     weights=[10, 10, 8, 6, 4, 6, 3, 10, 10, 10, 6, 8, 2])[0]
    b = bytearray(data)
    body = bytearray(data[:-4])
    if op in ("flip", "flip+crc"):
        tgt = b if op == "flip" else body
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(tgt))
            tgt[i] ^= 1 << rng.randrange(8)
        return op, bytes(b) if op == "flip" else _fix(bytes(body))
    if op in ("bytes", "bytes+crc"):
        tgt = b if op == "bytes" else body
        for _ in range(rng.randint(1, 8)):
            tgt[rng.randrange(len(tgt))] = rng.randrange(256)
        return op, bytes(b) if op == "bytes" else _fix(bytes(body))
    if op == "truncate":
        return op, bytes(b[: rng.randrange(len(b))])
    if op in ("extend", "extend+crc"):
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return op, bytes(b) + extra if op == "extend" else _fix(bytes(body) + extra)
    lay = _layout(data)
    if op == "version":
        body[4] = rng.choice([0, 1, 2, 3, 255])
        return op, _fix(bytes(body))
    if op == "field":
        name = rng.choice([k for k, (_, n) in lay.items() if 0 < n <= 8 and k != "version"] + ["gamma", "side"])
        off, n = lay[name]
        if n == 0:
            return op, data
        if name in ("gamma", "side") and n > 8:
            off, n = off + rng.randrange(0, n - 1), 2
        bits = 8 * n
        old = int.from_bytes(body[off : off + n], "little")
        val = rng.choice([0, 1, 2, (1 << bits) - 1, 1 << (bits - 1), old + 1, old - 1, old * 2, old ^ (1 << rng.randrange(bits)),
                          rng.randrange(1 << bits)]) % (1 << bits)
        body[off : off + n] = val.to_bytes(n, "little")
        return f"field:{name}", _fix(bytes(body))
    if op == "geometry":  # a consistent forged size: width/height and the latent that fits them
        w = rng.choice([1, 33, 64, 100, 511, 512, 1024, 2048, 4096, 8192, 16384, 65535 * 8, rng.randrange(1, 5000)])
        h = rng.choice([1, 33, 64, 100, 512, 1024, 2048, 8192, 16384, rng.randrange(1, 5000)])
        lw, lh = min(0xFFFF, -(-w // 64) * 8), min(0xFFFF, -(-h // 64) * 8)
        body[24:32] = struct.pack("<II", w, h)
        body[34:38] = struct.pack("<HH", lh, lw)
        return op, _fix(bytes(body))
    # "string": replace one range-coded string, lengths and CRC fixed
    names = [k for k in lay if k.startswith("string")]
    name = rng.choice(names)
    off, n = lay[name]
    old = bytes(body[off : off + n])
    new = rng.choice([b"", old[:8], old[: rng.randrange(n + 1)], old + bytes(rng.randrange(16)), b"\xff" * rng.choice([8, 64, 256]),
                      bytes(rng.choice([8, 64])), bytes(rng.randrange(256) for _ in range(rng.choice([8, 12, 40]))),
                      old[:4] + b"\xff" * (n - 4)])
    loff, _ = lay["lengths"]
    idx = int(name[len("string"):])
    body[loff + 4 * idx : loff + 4 * idx + 4] = struct.pack("<I", len(new))
    return op + ":" + name, _fix(bytes(body[:off]) + new + bytes(body[off + n :]))


def _fix_crc(data: bytes) -> bytes:
    """A record with its last 4 bytes replaced by the CRC of the rest (tests/test_faults.py uses it)."""
    return _fix(data[:-4])


def _check(codec, data: bytes) -> None:
    """One input in this process: a clear error with a message, or an image of the declared size."""
    from codec import bitstream as bs
    from codec import limits
    from codec.model import CodecError

    try:
        out = codec.decode([data], steps=1)[0]
    except (bs.BitstreamError, CodecError, limits.DecodeBudgetError) as e:
        assert str(e)
        return
    rec = bs.parse(data)
    assert out.shape == (rec.height, rec.width, 3)


def _changed(a, b) -> set[str]:
    import numpy as np

    out = set()
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        same = np.array_equal(x, y) if f == "gamma" else x == y
        if not same:
            out.add(f)
    return out


def run_worker(seed: int, start: int, stop: int, unet_every: int = 1) -> dict:
    """Feed mutants [start, stop) to the decoder in this process; returns counts and findings.

    Mutants that pass the parser are entropy-decoded (symbol hash included); small ones (and, with
    unet_every > 1, every unet_every-th) go on through the UNet and VAE to pixels."""
    import resource
    import signal

    from codec import bitstream as bs
    from codec import limits
    from codec.model import CodecError

    bases = _bases()
    parsed = [bs.parse(d) for _, d in bases]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clean = (bs.BitstreamError, CodecError, limits.DecodeBudgetError)
    counts: dict[str, int] = {}
    accepted_ops: dict[str, int] = {}
    findings: list[dict] = []

    def alarm(*_):
        raise TimeoutError("hang")

    signal.signal(signal.SIGALRM, alarm)
    crash_at = int(os.environ.get("FUZZ_SELFTEST_CRASH_AT", "-1"))  # the harness's own test: die like a segfault
    for i in range(start, stop):
        if i == crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        rng = random.Random(seed * 1_000_003 + i)
        k = rng.randrange(len(bases))
        codec, base = bases[k]
        op, data = mutate(base, rng)
        if data == base:
            counts["identical"] = counts.get("identical", 0) + 1
            continue
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
        t0 = time.monotonic()
        try:
            try:
                rec = codec.parse(data)
            except clean:
                counts["rejected_parse"] = counts.get("rejected_parse", 0) + 1
                continue
            changed = _changed(rec, parsed[k])
            if rec.width * rec.height <= SMALL_DECODE_PIXELS and i % unet_every == 0:
                out = codec.decode([data], steps=1, errors="return")[0]
                if isinstance(out, clean):
                    counts["rejected_decode"] = counts.get("rejected_decode", 0) + 1
                    continue
                if isinstance(out, BaseException):
                    raise out
                if out.shape != (rec.height, rec.width, 3):
                    findings.append({"i": i, "kind": "wrong_size", "op": op, "msg": f"{out.shape} vs {rec.width}x{rec.height}"})
                    continue
            elif bs.symbol_count(rec) <= ENTROPY_DECODE_SYMBOLS * 64:
                try:
                    codec.decode_latent(rec)
                except clean:
                    counts["rejected_decode"] = counts.get("rejected_decode", 0) + 1
                    continue
            else:
                counts["parsed_only"] = counts.get("parsed_only", 0) + 1
                continue
            counts["accepted"] = counts.get("accepted", 0) + 1
            key = op.split(":")[0] + ":" + ",".join(sorted(changed))
            accepted_ops[key] = accepted_ops.get(key, 0) + 1
            if not changed <= FORGEABLE:
                findings.append({"i": i, "kind": "unexplained_acceptance", "op": op, "msg": sorted(changed)})
        except TimeoutError:
            findings.append({"i": i, "kind": "hang", "op": op, "msg": f"> {HANG_S} s"})
        except Exception as e:  # any other exception type is a bug
            findings.append({"i": i, "kind": "unexpected", "op": op, "msg": f"{type(e).__name__}: {e}"[:300]})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            dt = time.monotonic() - t0
            if dt > counts.get("max_input_ms", 0) / 1000:
                counts["max_input_ms"] = int(dt * 1000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"counts": counts, "accepted_ops": accepted_ops, "findings": findings, "rss_setup_mb": rss0 // 1024,
            "rss_peak_mb": rss // 1024, "n": stop - start}


# ------------------------------------------------------------------ the parent
def _spawn(seed: int, start: int, stop: int, unet_every: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, __file__, "--worker", str(seed), str(start), str(stop), str(unet_every)],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float) -> tuple[int | None, dict | None, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return None, None, "timeout"
    if p.returncode != 0:
        return p.returncode, None, err[-2000:]
    return 0, json.loads(out.strip().splitlines()[-1]), err


def campaign(n: int, workers: int = 2, seed: int = 0, chunk_timeout: float | None = None, unet_every: int = 1) -> dict:
    """Run n mutants in `workers` child processes; a chunk whose child dies is bisected to the input."""
    per = -(-n // workers)
    ranges = [(s, min(n, s + per)) for s in range(0, n, per)]
    chunk_timeout = chunk_timeout or 120 + per * 0.05
    total: dict = {"counts": {}, "accepted_ops": {}, "findings": [], "rss_peak_mb": 0, "rss_setup_mb": 0, "n": 0,
                   "crashes": [], "hangs_killed": []}
    pending = [(r, _spawn(seed, *r, unet_every)) for r in ranges]
    for (s, e), p in pending:
        rc, res, err = _finish(p, chunk_timeout)
        if rc == 0:
            _merge(total, res)
        else:
            total["crashes" if rc is not None else "hangs_killed"] += _bisect(seed, s, e, chunk_timeout, unet_every)
    return total


def _bisect(seed: int, s: int, e: int, timeout: float, unet_every: int) -> list[dict]:
    """Narrow a dead chunk to the inputs that kill a child (signal) or stall it."""
    if e - s == 1:
        rc, _, err = _finish(_spawn(seed, s, e, unet_every), timeout)
        return [] if rc == 0 else [{"i": s, "rc": rc, "stderr": err[-500:]}]
    m = (s + e) // 2
    out = []
    for a, b in ((s, m), (m, e)):
        rc, _, _ = _finish(_spawn(seed, a, b, unet_every), timeout)
        if rc != 0:
            out += _bisect(seed, a, b, timeout, unet_every)
    return out


def _merge(total: dict, res: dict) -> None:
    for key in ("counts", "accepted_ops"):
        for k, v in res[key].items():
            if k == "max_input_ms":
                total[key][k] = max(total[key].get(k, 0), v)
            else:
                total[key][k] = total[key].get(k, 0) + v
    total["findings"] += res["findings"]
    total["rss_peak_mb"] = max(total["rss_peak_mb"], res["rss_peak_mb"])
    total["rss_setup_mb"] = max(total["rss_setup_mb"], res["rss_setup_mb"])
    total["n"] += res["n"]


def _assert_clean(res: dict, n: int) -> None:
    print(json.dumps({k: v for k, v in res.items() if k != "findings"}, indent=1, sort_keys=True))
    assert res["crashes"] == [] and res["hangs_killed"] == [], (res["crashes"], res["hangs_killed"])
    assert res["findings"] == [], res["findings"][:10]
    assert res["n"] == n
    c = res["counts"]
    assert c.get("rejected_parse", 0) + c.get("rejected_decode", 0) + c.get("accepted", 0) + c.get("parsed_only", 0) \
        + c.get("identical", 0) == n


def test_fuzz_small_campaign_in_a_child_process():
    """Default suite: 600 mutants in one child (a crash would be its death by a signal)."""
    res = campaign(600, workers=1, seed=1)
    _assert_clean(res, 600)
    assert res["counts"].get("rejected_parse", 0) > 300 and res["counts"].get("rejected_decode", 0) > 0


@pytest.mark.slow
def test_fuzz_campaign_100k_inputs():
    """>= 10^5 mutants over 2 child processes: 0 crashes, 0 hangs, acceptances only of forgeable fields."""
    n = 100_000
    res = campaign(n, workers=2, seed=2, unet_every=UNET_EVERY_SLOW)
    _assert_clean(res, n)


@pytest.mark.slow
def test_harness_catches_and_bisects_a_crash(monkeypatch):
    """A worker killed by SIGSEGV at input 2 of 4: the campaign reports exactly that input."""
    monkeypatch.setenv("FUZZ_SELFTEST_CRASH_AT", "2")
    res = campaign(4, workers=1, seed=3)
    assert [c["i"] for c in res["crashes"]] == [2] and res["crashes"][0]["rc"] == -11


def test_mutator_reaches_every_operator():
    import numpy as np

    from codec import bitstream as bs

    rec = bs.Record(flags=0, entropy_id=0, backbone_fp=b"B" * 8, codec_fp=b"C" * 8, width=64, height=64, t=50,
                    latent_h=8, latent_w=8, gamma=np.ones((4, 2), np.float16), side=b"\x01\x02\x03\x04",
                    strings=[b"12345678"], symbol_hash=b"H" * 8)
    data = bs.pack(rec)
    ops = {mutate(data, random.Random(i))[0].split(":")[0] for i in range(400)}
    assert ops == {"flip", "bytes", "truncate", "extend", "flip+crc", "bytes+crc", "extend+crc", "field", "geometry",
                   "string", "version"}


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        print(json.dumps(run_worker(*map(int, sys.argv[2:6]))))
    elif sys.argv[1] == "--campaign":
        n = int(sys.argv[2])
        w = int(sys.argv[sys.argv.index("--workers") + 1]) if "--workers" in sys.argv else 2
        t0 = time.time()
        r = campaign(n, workers=w, seed=int(os.environ.get("FUZZ_SEED", "2")), unet_every=UNET_EVERY_SLOW)
        r["wall_s"] = round(time.time() - t0, 1)
        r["findings"] = r["findings"][:50]
        print(json.dumps(r, indent=1, sort_keys=True))
