"""Golden archives: records and a dataset made by release 0.1.0 (tests/golden/v1) still decode,
with today's code, to the same pixels: identical in exact mode, within one level on at most 0.1%
of pixels in float32; `fcodec verify` and `fcodec decompress` read the dataset with no codec flags.

These fixtures are never regenerated to make a test pass (see tests/golden/make_v1.py): a failure
here means today's code no longer reads last release's archives.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codec import CodecConfig, bitstream, load_codec, registry, resolve
from jobs.cli import main

V1 = Path(__file__).parent / "golden" / "v1"
INDEX = json.loads((V1 / "index.json").read_text())
RECORDS = {r["name"]: r for r in INDEX["records"]}
_CODECS: dict = {}


def _tree_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(V1.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(V1)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def fixtures_stay_untouched():
    """No test (nor the code under test) may write into the golden folder."""
    before = _tree_digest()
    yield
    assert _tree_digest() == before, "tests/golden/v1 was modified: golden fixtures are read-only"


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(Path(path).read_bytes())).convert("RGB"))


def assert_within_one_level(got: np.ndarray, want: np.ndarray) -> None:
    """The float32 promise: at most one level off, on at most 0.1% of the values."""
    assert got.shape == want.shape
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert d.max() <= 1, f"max difference {d.max()} levels"
    assert (d > 0).mean() <= 0.001, f"{(d > 0).mean():.4%} of values differ"


def golden(name: str, request) -> tuple[bytes, dict]:
    """A golden record and the codec options today's code picks for it (from its fingerprints)."""
    entry = RECORDS[name]
    data = (V1 / entry["file"]).read_bytes()
    vae = str(request.getfixturevalue("taesd_dir")) if entry["vae"] else None  # skips without ../shared
    weights = str(V1 / entry["codec_weights"]) if entry["codec_weights"] else None
    return data, resolve.options_for_record(data, vae=vae, codec_weights=weights)


def decoder(opts: dict, precision: str):
    key = (tuple(sorted(opts.items())), precision)
    if key not in _CODECS:
        _CODECS[key] = load_codec(**opts, config=CodecConfig(precision=precision))
    return _CODECS[key]


def test_index_describes_the_records():
    assert INDEX["format_version"] == 1 and INDEX["made_by"] == "foundation-codec 0.1.0"
    assert {r["backbone"] for r in RECORDS.values()} == {"nano", "tiny"}
    assert {r["entropy"] for r in RECORDS.values()} == {"static", "hyperprior"}
    for e in RECORDS.values():
        rec = bitstream.parse((V1 / e["file"]).read_bytes())
        assert (rec.version, rec.width, rec.height, rec.t) == (1, e["width"], e["height"], e["t"])
        assert (rec.backbone_fp.hex(), rec.codec_fp.hex()) == (e["backbone_fingerprint"], e["codec_fingerprint"])
        assert bool(rec.flags & bitstream.FLAG_GRAY) == e["gray"]


def test_records_name_the_versioned_builtin_backbones():
    names = {e["name"]: registry.backbone_for_fingerprint(e["backbone_fingerprint"]) for e in RECORDS.values()}
    assert names["nano_t50"].name == names["nano_t200_gray"].name == names["nano_hyperprior_t80"].name == "nano-v1"
    assert names["tiny_t100"].name == "tiny"
    assert names["nano_taesd_t100"] is None  # nano with another VAE: not a built-in on its own


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_exact_mode_pixels_identical(name, request):
    data, opts = golden(name, request)
    got = decoder(opts, "exact").decode([data], steps=INDEX["steps"])[0]
    assert np.array_equal(got, read_png(V1 / RECORDS[name]["exact"]))


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_float32_pixels_within_one_level(name, request):
    data, opts = golden(name, request)
    got = decoder(opts, "float32").decode([data], steps=INDEX["steps"])[0]
    assert_within_one_level(got, read_png(V1 / RECORDS[name]["default"]))


@pytest.mark.parametrize("name", ["nano_t50", "tiny_t100"])
def test_fcodec_decode_without_codec_flags(name, tmp_path):
    out = tmp_path / "out.png"
    assert main(["decode", str(V1 / RECORDS[name]["file"]), str(out)]) == 0
    assert_within_one_level(read_png(out), read_png(V1 / RECORDS[name]["default"]))


@pytest.fixture
def dataset_copy(tmp_path) -> Path:
    """The golden dataset, copied: the fixture folder itself is never written."""
    dst = tmp_path / "dataset"
    shutil.copytree(V1 / INDEX["dataset"]["path"], dst)
    return dst


def test_golden_dataset_verifies(dataset_copy, capsys):
    assert main(["verify", str(dataset_copy), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is True


@pytest.mark.parametrize("precision,want", [("auto", "decoded"), ("exact", "decoded_exact")])
def test_golden_dataset_decompresses_without_codec_flags(dataset_copy, tmp_path, precision, want):
    out = tmp_path / "restored"
    args = ["decompress", str(dataset_copy), str(out), "--no-ray", "--no-progress", "--precision", precision]
    assert main(args) == 0
    expected = sorted((V1 / INDEX["dataset"][want]).glob("*.png"))
    assert len(expected) == INDEX["dataset"]["images"]
    for p in expected:
        got, ref = read_png(out / p.name), read_png(p)
        if precision == "exact":
            assert np.array_equal(got, ref), p.name
        else:
            assert_within_one_level(got, ref)


DETERMINISM = r"""
import hashlib, json, sys
import torch
from codec import CodecConfig, load_codec
specs, out = json.loads(sys.argv[1]), {}
codecs = [(spec, load_codec(**spec["opts"], config=CodecConfig(precision="exact"))) for spec in specs]
for threads in (1, 2, 4):
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for spec, codec in codecs:
        datas = [open(f, "rb").read() for f in spec["files"]]
        n = len(datas)
        # each alone in a batch of one, then all in one batch, reversed, with a repeat
        for order, bsz in [([i], 1) for i in range(n)] + [(list(range(n))[::-1] + [n - 1], 8)]:
            codec.config.batch_size = bsz
            for i, px in zip(order, codec.decode([datas[i] for i in order])):
                out.setdefault(spec["files"][i], set()).add(hashlib.sha256(px.tobytes()).hexdigest())
print(json.dumps({k: sorted(v) for k, v in out.items()}))
"""


@pytest.mark.slow  # ~55 s on 2 shared cores: float64 networks at 4 threads, every record 3 times
def test_exact_mode_is_deterministic_across_threads_and_batches(request):
    """Every golden record, decoded in exact mode in a fresh process at 1, 2 and 4 threads and in
    several batch compositions, gives exactly the golden pixels."""
    groups: dict = {}
    for name in sorted(RECORDS):
        try:
            _, opts = golden(name, request)
        except pytest.skip.Exception:
            continue  # the TAESD record without ../shared
        groups.setdefault(json.dumps(opts, sort_keys=True), []).append(str(V1 / RECORDS[name]["file"]))
    specs = [{"opts": json.loads(k), "files": v} for k, v in groups.items()]
    want = {str(V1 / e["file"]): hashlib.sha256(read_png(V1 / e["exact"]).tobytes()).hexdigest()
            for e in RECORDS.values()}
    p = subprocess.run([sys.executable, "-c", DETERMINISM, json.dumps(specs)],
                       capture_output=True, text=True, timeout=600, env=_env(4))
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(got) == {f for s in specs for f in s["files"]}
    for f, hashes in got.items():
        assert hashes == [want[f]], f"{Path(f).name}: {len(hashes)} distinct decodes across threads and batches"


def _env(threads: int) -> dict:
    import os

    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}


ENTROPY_GOLDEN = [Path(__file__).parent / "golden" / d for d in ("entropy_v1", "entropy_v2")]


def _entropy_records() -> list[dict]:
    # entropy_v1: taesd-v1 with its three entropy models; entropy_v2: taesd-v2 (make_entropy_v2.py)
    return [dict(e, folder=str(d), backbone=e.get("backbone", "taesd-v1"))
            for d in ENTROPY_GOLDEN for e in json.loads((d / "index.json").read_text())["records"]]


@pytest.mark.parametrize("entry", _entropy_records(), ids=lambda e: f"{e['backbone']}:{e['name']}")
def test_shipped_entropy_weights_decode_their_golden_records(entry):
    """Records written with each shipped entropy model of taesd-v1 and taesd-v2
    (tests/golden/make_entropy_v*.py, never regenerated) entropy-decode today to exactly the
    symbols their hash names, and the backbone and weights found for the record are the ones it
    was written with (by fingerprint)."""
    if not (registry.WEIGHTS_DIR / entry["backbone"] / registry.SUMS_FILE).is_file():
        pytest.skip(f"{entry['backbone']} is not installed")
    data = (Path(entry["folder"]) / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]  # the fixture itself is untouched
    rec = bitstream.parse(data)
    assert (bitstream.ENTROPY_STRINGS[rec.entropy_id], len(rec.strings)) == (entry["strings"], entry["strings"])
    # What the record names picks its models, whatever the default backbone is now (taesd-v2)
    from codec.resolve import options_for_record

    opts = options_for_record(data)
    assert opts["backbone"] == entry["backbone"] and Path(opts["codec_weights"]).name == entry["weights"]
    codec = load_codec(**opts)
    assert codec.entropy.name == entry["entropy"] and rec.codec_fp == codec.fingerprint()[:8]
    z = codec.decode_latent(rec)  # raises unless the decoded symbols match the record's hash
    assert tuple(z.shape) == (4, rec.latent_h, rec.latent_w)
    assert codec.decode([data], steps=0)[0].shape == (rec.height, rec.width, 3)
