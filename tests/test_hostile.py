"""Regression fixtures of every hostile-input defect class (tests/fixtures/hostile/, README.md there):
each now ends as a clear error in bounded time and memory, checked in a child process so that a
crash of native code would show as the child's death instead of taking pytest down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "hostile"
RSS_BOUND_MB = 1024  # peak RSS over the loaded codec for all cases together (docs/reliability.md)

# fixture -> (config overrides, regex the error must match). max_pixels at the ceiling so the
# deeper caps are exercised, not only the jobs' default pixel cap.
RECORDS = {
    "overrun_511x512.fdc": ({}, "ends before the symbols"),
    "empty_string_512.fdc": ({}, "range-coded string of 0 bytes"),
    "escape_flood_64.fdc": ({}, "escape of"),
    "claims_8192_empty.fdc": ({"max_pixels": 1 << 26}, "implausible"),
    "claims_16384_empty.fdc": ({"max_pixels": 1 << 26}, "outside the limit"),
    "hyperprior_8192.fdc": ({"max_pixels": 1 << 26}, "implausible"),
    "flat_1024.fdc": ({"decode_seconds": 0.0}, "time budget"),  # a budget already spent: fails before any work
    "reserved_set.fdc": ({}, "reserved field"),
    "undefined_flag.fdc": ({}, "undefined flag bits"),
    # three inputs that killed main's decoder by SIGSEGV (heap-state dependent: after other decodes)
    "segv_main_1.fdc": ({}, "range-coded string of"),
    "segv_main_2.fdc": ({}, "range-coded string of"),
    "segv_main_3.fdc": ({}, "range-coded string of"),
}
IMAGES = {
    "onebit_8192.png": "exceeds the cap",
    "deflate_8192.tif": "exceeds the cap",
    "eps_named.png": "not a readable image of an allowed format",
    "lab.tif": "mode LAB",
}

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from codec import CodecConfig, DiffusionCodec, ImageError, load_backbone, load_image
from codec.limits import DecodeBudgetError
from codec.model import CodecError
from codec.bitstream import BitstreamError
torch.set_num_threads(1)
fix, records, images = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
bb = load_backbone("tiny")
def codec(entropy, **kw):
    torch.manual_seed(0)
    return DiffusionCodec(bb, config=CodecConfig(entropy=entropy, overlap_entropy=False, steps=8, **kw))
codec("static"); codec("hyperprior")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def run(name, fn):
    t0 = time.monotonic()
    try:
        out = fn(); res = {"ok": True, "out": str(out)}
    except (BitstreamError, CodecError, DecodeBudgetError, ImageError) as e:
        res = {"ok": False, "type": type(e).__name__, "msg": str(e)}
    res.update(name=name, s=round(time.monotonic() - t0, 2),
               rss_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    print(json.dumps(res), flush=True)
for name, kw in records.items():
    c = codec("hyperprior" if "hyperprior" in name else "static", **kw)
    data = open(f"{fix}/{name}", "rb").read()
    run(name, lambda: c.decode([data])[0].shape)
for name in images:
    data = open(f"{fix}/{name}", "rb").read()
    run(name, lambda: load_image(data).pixels.shape)
tall = load_image(open(f"{fix}/tall_1x100000.png", "rb").read())
run("tall_1x100000.png", lambda: codec("static").encode([tall])[0].bpp)
run("rows_600000", lambda: codec("static", max_pixels=1 << 26).encode([np.zeros((600000, 1, 3), np.uint8)])[0].bpp)
"""


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(FIX), json.dumps({k: v[0] for k, v in RECORDS.items()}),
                        json.dumps(list(IMAGES))], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert p.returncode == 0, f"child died (rc {p.returncode}) after {[x['name'] for x in lines]}: {p.stderr[-1500:]}"
    for x in lines:
        print(x)
    return {x["name"]: x for x in lines}


@pytest.mark.parametrize("name", list(RECORDS))
def test_hostile_record_is_a_clear_error(results, name):
    r = results[name]
    assert not r["ok"], r
    assert r["type"] in ("BitstreamError", "CodecError", "DecodeBudgetError"), r
    import re

    assert re.search(RECORDS[name][1], r["msg"]), r
    assert "0x7f" not in r["msg"] and "object at" not in r["msg"]


@pytest.mark.parametrize("name", list(IMAGES))
def test_hostile_image_is_refused(results, name):
    import re

    r = results[name]
    assert not r["ok"] and r["type"] == "ImageError" and re.search(IMAGES[name], r["msg"]), r
    assert "BytesIO" not in r["msg"]


def test_encoder_bombs_refused_before_the_vae(results):
    tall, rows = results["tall_1x100000.png"], results["rows_600000"]
    assert not tall["ok"] and "latent positions" in tall["msg"], tall  # 1x100000 is 64x100032 padded
    assert not rows["ok"] and "does not fit the format" in rows["msg"], rows  # u16 latent rows, before the VAE


def test_memory_bounded(results):
    peak = max(r["rss_mb"] for r in results.values())
    print(f"peak RSS over the loaded codecs: {peak} MB")
    assert peak < RSS_BOUND_MB


def test_time_budget_is_checked_before_every_unet_call_and_the_vae(tiny_codec):
    """The deadline wrapper `denoise` sees: a spent budget stops the next UNet call (deterministic:
    no timing is measured, the deadline is in the past)."""
    import time

    import torch

    from codec import limits
    from codec.model import DeadlineBackbone

    timed = DeadlineBackbone(tiny_codec.backbone, time.monotonic() + 3600)
    x = torch.zeros(1, 4, 8, 8)
    assert timed.predict(x, torch.tensor([10])).shape == x.shape
    spent = DeadlineBackbone(tiny_codec.backbone, time.monotonic() - 1)
    with pytest.raises(limits.DecodeBudgetError, match="time budget"):
        spent.predict(x, torch.tensor([10]))
    with pytest.raises(limits.DecodeBudgetError):
        spent.check()


def test_dark_16bit_pgm_is_not_brightened():
    from codec import load_image

    li = load_image((FIX / "dark16.pgm").read_bytes())
    assert li.gray and li.pixels.shape == (48, 64, 3)
    assert int(li.pixels.max()) == 1  # 255/65535*255 rounds to 1; main's content guess made it 255


def test_hyperprior_hs_cap_before_any_allocation(tmp_path):
    """A hyperprior 8192^2 claim padded to the plausibility floor: refused on the header by the
    token cap, and with the token cap raised by the h_s cap (never by the data)."""
    import torch

    from codec import CodecConfig, DiffusionCodec, load_backbone
    from codec import bitstream as bs
    from codec import limits

    from jobs.samples import sample_image

    torch.manual_seed(0)
    bb = load_backbone("tiny")
    hp = DiffusionCodec(bb, config=CodecConfig(entropy="hyperprior", max_pixels=1 << 26))
    rec = bs.parse(hp.encode([sample_image(3, 64, 64)], t=50)[0].data)
    rec.width = rec.height = 8192
    rec.latent_h = rec.latent_w = 1024
    rec.side = bytes(limits.min_record_bytes(8192 * 8192))
    data = bs.pack(rec)
    with pytest.raises(limits.DecodeBudgetError, match="max_latent_tokens"):
        hp.parse(data)
    torch.manual_seed(0)
    hp2 = DiffusionCodec(bb, config=CodecConfig(entropy="hyperprior", max_pixels=1 << 26, max_latent_tokens=1 << 21))
    with pytest.raises(limits.DecodeBudgetError, match="h_s cap"):
        hp2.parse(data)


def test_v2_binding_is_checked_on_decode(tiny_codec):
    from codec import bitstream as bs
    from jobs.samples import sample_image

    img = sample_image(4, 40, 48)
    data = tiny_codec.encode([img], t=60, keys=["a/x.png"], source_sha256=["AB" * 32])[0].data
    assert tiny_codec.decode([data], steps=1, keys=["a/x.png"], source_sha256=["ab" * 32])[0].shape == (40, 48, 3)
    with pytest.raises(bs.BindingError, match="another key"):
        tiny_codec.decode([data], steps=1, keys=["b/y.png"])
    unbound = tiny_codec.encode([img], t=60)[0].data
    assert bs.parse(unbound).key_tag == bs.UNBOUND
    assert np.array_equal(tiny_codec.decode([unbound], steps=1, keys=["any"])[0],
                          tiny_codec.decode([data], steps=1)[0])  # tags do not change the pixels


def test_near_uniform_image_is_padded_to_the_plausibility_floor(tiny_codec):
    from codec import bitstream as bs
    from codec import limits

    img = np.full((1024, 1024, 3), 128, np.uint8)
    enc = tiny_codec.encode([img], t=999)[0]
    assert len(enc.data) >= limits.min_record_bytes(1024 * 1024)
    rec = bs.parse(enc.data)
    assert rec.side[:4] != b"" and len(rec.side) >= 4


def test_encoder_room_check_refuses_a_latent_the_cpp_encoder_would_overflow():
    """CompressAI's encoder writes into one unchecked 32-bit word per symbol; a latent of escapes
    only (~44 bits each) would overrun it. Refused with a clear error; a normal latent is not."""
    from codec.entropy import StaticEntropyModel

    m = StaticEntropyModel(4)
    m.update()
    with pytest.raises(ValueError, match="buffer would overflow"):
        m.compress(np.full((4, 8, 8), 1 << 20, np.int32))
    y = np.zeros((4, 8, 8), np.int32)
    y[0, 0, 0] = 1 << 20  # one escape among 256 symbols fits
    assert np.array_equal(m.decompress(m.compress(y), y.shape), y)
