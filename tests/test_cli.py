"""`fcodec encode/decode`: one clear line and exit 2 on bad input, never a partial output."""
import io
import subprocess
import sys

import pytest
from PIL import Image

from jobs.samples import sample_image


def fcodec(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    buf = io.BytesIO()
    Image.fromarray(sample_image(3, 70, 90)).save(buf, format="PNG")
    png = buf.getvalue()
    (d / "img.png").write_bytes(png)
    (d / "trunc.png").write_bytes(png[: len(png) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_bytes(b"this is not an image at all\n" * 10)
    rc, out, err = fcodec("encode", str(d / "img.png"), str(d / "img.fdc"), "--t", "60")
    assert rc == 0, err
    good = (d / "img.fdc").read_bytes()
    (d / "trunc.fdc").write_bytes(good[:-7])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x04
    (d / "flip.fdc").write_bytes(bytes(flipped))
    import struct
    import zlib

    huge = bytearray(good[:-4])
    huge[24:32] = struct.pack("<II", 10**6, 10**6)
    (d / "huge.fdc").write_bytes(bytes(huge) + struct.pack("<I", zlib.crc32(bytes(huge))))
    # a learned model with no weights given and none shipped for the backbone: never a random initialisation
    rc, _, err = fcodec("encode", str(d / "img.png"), str(d / "hyper.fdc"), "--entropy", "hyperprior", "--backbone", "tiny")
    assert rc == 2 and "needs trained codec weights" in err
    import torch

    from codec import CodecConfig, DiffusionCodec, default_backbone, load_backbone

    torch.manual_seed(0)  # untrained hyperprior weights for the CLI's default backbone
    DiffusionCodec(load_backbone(default_backbone()), config=CodecConfig(entropy="hyperprior")).save_pretrained(d / "hp")
    rc, _, err = fcodec("encode", str(d / "img.png"), str(d / "hyper.fdc"), "--codec-weights", str(d / "hp"))
    assert rc == 0, err
    return d


def test_encode_decode_roundtrip(files):
    rc, out, err = fcodec("decode", str(files / "img.fdc"), str(files / "img_dec.png"), "--steps", "2")
    assert rc == 0, err
    assert Image.open(files / "img_dec.png").size == (90, 70)
    assert "bpp" in fcodec("encode", str(files / "img.png"), str(files / "again.fdc"), "--t", "60")[1]
    assert (files / "again.fdc").read_bytes() == (files / "img.fdc").read_bytes()


@pytest.mark.parametrize("cmd,src,msg", [
    ("encode", "text.png", "not a readable image"),
    ("encode", "empty.png", "0 bytes"),
    ("encode", "trunc.png", "not a readable image|truncated"),
    ("encode", "missing.png", "No such file"),
    ("decode", "trunc.fdc", "checksum|truncated"),
    ("decode", "flip.fdc", "checksum"),
    ("decode", "huge.fdc", "1000000x1000000"),
    ("decode", "hyper.fdc", "hyperprior"),
    ("decode", "img.png", "not a foundation-codec bitstream"),
])
def test_bad_input_one_line_no_traceback_no_output(files, cmd, src, msg):
    import re

    out = files / f"out_{cmd}_{src}.bin"
    rc, stdout, err = fcodec(cmd, str(files / src), str(out))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcodec: error:") and re.search(msg, lines[0]), err
    assert "Traceback" not in err
    assert not out.exists() and not list(files.glob(f".{out.name}*"))


def test_debug_shows_traceback(files):
    rc, _, err = fcodec("--debug", "decode", str(files / "flip.fdc"), str(files / "x.png"))
    assert rc == 2 and "Traceback" in err


def test_help_lists_options():
    rc, out, _ = fcodec("encode", "--help")
    assert rc == 0 and all(o in out for o in ("--backbone", "--vae", "--entropy", "--codec-weights", "--t", "--target-bpp"))
    rc, out, _ = fcodec("decode", "--help")
    assert rc == 0 and "--steps" in out


@pytest.mark.slow
def test_dataset_job_with_a_missing_model_says_how_to_point_at_a_snapshot(files, tmp_path):
    """The codec loads inside the Ray actors; its error reaches the user as itself, one line
    (it once read 'ActorDiedError: The actor died because of an error raised in its creation task')."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "img.png").write_bytes((files / "img.png").read_bytes())
    rc, _, err = fcodec("compress", str(src), str(tmp_path / "dst"), "--backbone", str(tmp_path / "no-snapshot"),
                        "--workers", "1", "--no-progress")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("fcodec: error: backbone folder"), err
    assert "--backbone DIR" in lines[0] and "huggingface-cli download" in lines[0] and "Actor" not in lines[0]
