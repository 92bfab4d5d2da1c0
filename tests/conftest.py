"""Shared fixtures: caches kept out of $HOME, the tiny codec, ../shared data (skipped if absent)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="fcodec-test-cache-"))
for var, sub in (("TORCH_HOME", "torch"), ("MPLCONFIGDIR", "mpl"), ("FCODEC_CACHE", "fcodec"),
                 ("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg")):
    os.environ.setdefault(var, str(_CACHE / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (real data and TAESD weights live there)")
    return SHARED


@pytest.fixture(scope="session")
def kodak(shared_dir) -> list[Path]:
    paths = sorted((shared_dir / "data" / "kodak").glob("*.png"))
    if not paths:
        pytest.skip("../shared/data/kodak is absent")
    return paths


@pytest.fixture(scope="session")
def taesd_dir(shared_dir) -> Path:
    d = shared_dir / "models" / "taesd"
    if not (d / "taesd_encoder.safetensors").is_file():
        pytest.skip("../shared/models/taesd is absent")
    return d


@pytest.fixture(scope="session")
def tiny_codec():
    from codec import load_codec

    return load_codec("tiny")


@pytest.fixture(scope="session")
def sample_images():
    from jobs.samples import sample_image

    return [sample_image(i, h, w) for i, (h, w) in enumerate([(64, 64), (96, 128), (128, 128), (33, 47)])]
