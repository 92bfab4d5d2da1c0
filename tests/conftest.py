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
# Ray 2.60 turns token auth on for local clusters and writes ~/.ray/auth_token; tests keep out of $HOME.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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


# ---------------------------------------------------------------- pipeline fixtures (real S3, real Ray)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback: moto's ThreadedMotoServer on a free port, for the session.

    Yields a dict: `endpoint_url`, `opts` (a `pipeline.storage.StorageOptions` with the endpoint
    and moto's dummy credentials, to pass to pipeline functions), `storage_options` (the same
    for pandas/s3fs: `pd.read_parquet(url, storage_options=...)`) and `env` (variables that make
    a `fcodec` subprocess reach it: FCODEC_S3_ENDPOINT + AWS_* credentials). Use `s3_bucket`
    for a fresh bucket per test.
    """
    from moto.server import ThreadedMotoServer

    from pipeline.storage import StorageOptions

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing")
    env = {"FCODEC_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    yield {"endpoint_url": endpoint, "opts": opts, "env": env,
           "storage_options": {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; returns 's3://<name>'. (Created without a
    region: moto + s3fs reject LocationConstraint us-east-1.)"""
    import re
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


_RAY_TMP = None


def start_local_ray(num_cpus: int = 4):
    """Start (or reuse) the tests' local Ray: `num_cpus` logical CPUs, temp dir under /tmp
    (short: Ray's socket paths have a length limit), no dashboard. Returns the ray module."""
    global _RAY_TMP
    import ray

    if not ray.is_initialized():
        if _RAY_TMP is None:
            _RAY_TMP = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        ray.init(address="local", num_cpus=num_cpus, num_gpus=0, _temp_dir=_RAY_TMP, include_dashboard=False,
                 object_store_memory=256 << 20, log_to_driver=False, configure_logging=False)
    return ray


@pytest.fixture(scope="module")
def _ray_for_module():
    ray = start_local_ray()
    yield ray
    ray.shutdown()  # modules that call ray.init themselves (test_train) find no Ray running


@pytest.fixture
def ray_local(_ray_for_module):
    """A local Ray runtime shared by a module's tests (started once per module and shut down
    after it; restarted if a test shut it down, e.g. the multi-node test). Yields the ray module;
    `ray.get_runtime_context().gcs_address` is the address a subprocess joins with `--ray-address`."""
    yield start_local_ray()
