"""Generator of the v1 golden fixtures (tests/golden/v1/), run ONCE with release 0.1.0.

###############################################################################################
#  NEVER RE-RUN THIS SCRIPT TO MAKE A FAILING TEST PASS.                                      #
#                                                                                             #
#  These files are archives made by foundation-codec 0.1.0. The tests in tests/test_golden.py #
#  check that today's code still reads them and decodes them to the same pixels. If a change  #
#  breaks them, the change broke every user's archive: fix the change, not the fixtures.      #
#  A new bitstream format (or a new built-in backbone) adds a NEW folder beside v1 (v2/ with  #
#  its own make_v2.py); v1 stays, byte for byte, and keeps passing forever.                   #
###############################################################################################

What it wrote (see v1/index.json, which the tests read):
* records/*.fdc: nano static at t=50 and t=200 (the second from a grayscale source), tiny static,
  nano + TAESD VAE (needs ../shared/models/taesd), nano + hyperprior with saved codec weights
  (codec_weights/hyperprior/, seeded random init: the point is the format, not the rate);
* decoded/<name>.exact.png (float64 networks) and decoded/<name>.default.png (float32 on the CPU),
  both at the default DDIM budget, as RGB;
* dataset/: `fcodec compress dataset_src dataset --shard-size 2` (default nano backbone), with
  its _manifest.json and _commits/; dataset_decoded/ and dataset_decoded_exact/: `fcodec
  decompress` of it (default and --precision exact).
Images are synthetic (jobs/samples.py), tiny, so the fixtures stay small and the tests fast.

Run from the repository root at the release commit:  python tests/golden/make_v1.py
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "v1"
TAESD = REPO.parent / "shared" / "models" / "taesd"
sys.path.insert(0, str(REPO))


def png(px: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    import torch

    from codec import CODEC_VERSION, CodecConfig, DiffusionCodec, LoadedImage, load_backbone, load_codec
    from codec.entropy import HyperpriorEntropyModel
    from codec.estimator import ParameterEstimator
    from jobs.samples import sample_image, write_samples

    if OUT.exists():
        sys.exit(f"{OUT} exists: golden fixtures are never regenerated (add a new version folder instead)")
    torch.set_num_threads(1)
    (OUT / "records").mkdir(parents=True)
    (OUT / "decoded").mkdir()

    # codec weights: a seeded random hyperprior (+ estimator) for nano, saved as `fcodec train` would
    torch.manual_seed(16)
    hp = DiffusionCodec(load_backbone("nano"), HyperpriorEntropyModel(4, hidden=16, z_channels=4),
                        ParameterEstimator(4, hidden=8))
    hp.save_pretrained(OUT / "codec_weights" / "hyperprior")

    gray = sample_image(3, 40, 56).mean(axis=2, keepdims=True).round().astype(np.uint8).repeat(3, axis=2)
    specs = [  # name, backbone, vae, codec weights, t, image
        ("nano_t50", "nano", None, None, 50, LoadedImage(sample_image(1, 64, 64))),
        ("nano_t200_gray", "nano", None, None, 200, LoadedImage(gray, gray=True)),
        ("tiny_t100", "tiny", None, None, 100, LoadedImage(sample_image(2, 33, 47))),
        ("nano_taesd_t100", "nano", "taesd", None, 100, LoadedImage(sample_image(4, 48, 64))),
        ("nano_hyperprior_t80", "nano", None, "codec_weights/hyperprior", 80, LoadedImage(sample_image(5, 64, 40))),
    ]
    index = {"made_by": f"foundation-codec {CODEC_VERSION}", "format_version": 1,
             "steps": CodecConfig().steps, "records": []}
    for name, backbone, vae, weights, t, img in specs:
        if vae and not TAESD.is_dir():
            sys.exit(f"{TAESD} is absent: the TAESD record needs it")
        kw = dict(backbone=backbone, vae=str(TAESD) if vae else None,
                  codec_weights=str(OUT / weights) if weights else None)
        enc_codec = load_codec(**kw)
        data = enc_codec.encode([img], t=t)[0].data
        (OUT / "records" / f"{name}.fdc").write_bytes(data)
        for mode, prec in (("exact", "exact"), ("default", "auto")):
            dec = load_codec(**kw, config=CodecConfig(precision=prec)).decode([data])[0]
            (OUT / "decoded" / f"{name}.{mode}.png").write_bytes(png(dec))
        index["records"].append({
            "name": name, "file": f"records/{name}.fdc", "backbone": backbone, "vae": vae, "codec_weights": weights,
            "entropy": enc_codec.entropy.name, "t": t, "width": img.pixels.shape[1], "height": img.pixels.shape[0],
            "gray": img.gray, "n_bytes": len(data),
            "backbone_fingerprint": enc_codec.backbone.fingerprint().hex(),
            "codec_fingerprint": enc_codec.fingerprint().hex(),
            "exact": f"decoded/{name}.exact.png", "default": f"decoded/{name}.default.png",
        })
        print(name, len(data), "bytes")

    # one small dataset, made and decoded by the CLI exactly as a user would (default nano backbone)
    write_samples(OUT / "dataset_src", n=3, seed=16, sizes=((32, 32), (48, 64), (64, 40)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "jobs.cli"]
    for cmd in (["compress", "dataset_src", "dataset", "--shard-size", "2", "--workers", "1", "--no-progress"],
                ["decompress", "dataset", "dataset_decoded", "--workers", "1", "--no-progress"],
                ["decompress", "dataset", "dataset_decoded_exact", "--precision", "exact", "--workers", "1", "--no-progress"]):
        subprocess.run(cli + cmd, cwd=OUT, env=env, check=True)
    index["dataset"] = {"path": "dataset", "src": "dataset_src", "decoded": "dataset_decoded",
                        "decoded_exact": "dataset_decoded_exact", "images": 3, "shards": 2}
    (OUT / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    for junk in OUT.rglob("__pycache__"):
        shutil.rmtree(junk)


if __name__ == "__main__":
    main()
