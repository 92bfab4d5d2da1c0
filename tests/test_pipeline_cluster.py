"""Acceptance runs of compress/decompress (slow): >= 200 images + Kodak through a moto-served
bucket on local Ray, a job killed with SIGKILL and rerun, and a two-node Ray cluster whose
nodes each advertise one GPU."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline import storage as st
from pipeline.catalog import Books, part_record, read_dataset
from pipeline.raystart import local_cluster
from pipeline.rows import output_key
from pipeline.run import JobConfig, compress, decompress
from pipeline.schema import BITSTREAM_SCHEMA
from test_pipeline import SPEC, make_corrupt, make_images

REPO = Path(__file__).resolve().parents[1]
quiet = {"progress": False, "echo": lambda s: None}


@pytest.mark.slow
def test_acceptance_200_images_and_kodak_via_s3(tmp_path, s3_server, s3_bucket, ray_local, request):
    import pandas as pd
    import s3fs

    local = tmp_path / "src"
    expected = make_images(local, 200, seed=3)
    bad = make_corrupt(local)
    try:  # a few real photos at full size when ../shared is present (768x512 costs ~5 s each on CPU)
        kodak = request.getfixturevalue("kodak")[:4]
    except pytest.skip.Exception:
        kodak = []
    for p in kodak:
        (local / "kodak").mkdir(exist_ok=True)
        (local / "kodak" / p.name).write_bytes(p.read_bytes())
        w, h = Image.open(p).size
        expected[f"kodak/{p.name}"] = (h, w)
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(local) + "/", f"{s3_bucket[5:]}/photos/", recursive=True)
    opts = s3_server["opts"]
    src, dst, out = f"{s3_bucket}/photos", f"{s3_bucket}/archive", f"{s3_bucket}/restored"

    res = compress(JobConfig(src=src, dst=dst, codec=SPEC, shard_size=32, rows_per_batch=16), opts, **quiet)
    assert res["totals"]["rows"] == len(expected) + len(bad)  # one row per input
    assert res["totals"]["ok"] == len(expected) and res["totals"]["failed"] == len(bad)
    assert sum(w["rows"] for w in res["run"]["workers"].values()) == res["totals"]["rows"]

    df = pd.read_parquet(dst, storage_options=s3_server["storage_options"])
    assert list(df.columns) == [*BITSTREAM_SCHEMA.names, "sidecars", "ref_key"]
    assert len(df) == len(expected) + len(bad) and df["key"].is_unique
    failed = df[df.status == "failed"].set_index("key")["error"].to_dict()
    assert set(failed) == set(bad) and all(frag in failed[k] for k, frag in bad.items())
    ok = df[df.status == "ok"]
    assert (ok["n_bytes"] == ok["bitstream"].map(len)).all() and ok["bpp"].between(0.001, 20).all()
    assert {tuple(x) for x in ok[["key", "height", "width"]].values} == {(k, h, w) for k, (h, w) in expected.items()}

    dres = decompress(JobConfig(src=dst, dst=out, rows_per_batch=8), opts, **quiet)
    assert dres["run"]["ok"] == len(expected) and dres["run"]["failed"] == 0
    for key, (h, w) in expected.items():  # every image back at its original size
        assert Image.open(io.BytesIO(fs.cat(f"{out[5:]}/{output_key(key)}"))).size == (w, h)


def _markers(dst: Path) -> list[Path]:
    """The running job's commit log (before its end-of-run compaction)."""
    d = dst / "__fcodec__" / "commits"
    return sorted(d.glob("*.json")) if d.is_dir() else []


@pytest.mark.slow
def test_killed_job_then_rerun_has_each_key_once(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    expected = make_images(src, 120, seed=5)
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "jobs.cli", "compress", str(src), str(dst), "--backbone", "tiny", "--ray-address", address,
           "--shard-size", "4", "--rows-per-batch", "4", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(_markers(dst)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        at_kill = len(_markers(dst))
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-job, as on a preempted machine
    finally:
        proc.wait(timeout=30)
    assert at_kill >= 2
    assert at_kill < 30, "the job finished before it could be killed; the test proves nothing"
    # Whatever is visible is whole: committed shards read back; no manifest claims completeness.
    assert len(read_dataset(str(dst))) == 4 * len(_markers(dst))
    manifest = Books(*st.get_fs(str(dst))).read_manifest()
    assert manifest is None or not manifest.complete

    res = compress(JobConfig(src=str(src), dst=str(dst), codec={"backbone": "tiny", "threads": 1}, shard_size=4,
                             rows_per_batch=4), **quiet)
    assert res["run"]["found"]["unchanged"] >= 4 * at_kill  # committed shards are not redone
    keys = read_dataset(str(dst), columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == 120
    assert res["manifest"]["complete"] and res["totals"]["ok"] == 120


@pytest.mark.slow
def test_two_nodes_one_actor_per_gpu_model_loaded_once(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared local Ray restarts for later tests
    src, dst = tmp_path / "src", tmp_path / "dst"
    expected = make_images(src, 48, seed=7)
    cluster = local_cluster(str(Path("/tmp") / f"rayc-{os.getpid()}"))
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for dev in ("0", "1"):  # two machines, each exposing one (different) GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = dev
            cluster.add_node(num_cpus=2, num_gpus=1)
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
        ray.init(address=cluster.address, log_to_driver=False)
        res = compress(JobConfig(src=str(src), dst=str(dst), codec={"backbone": "tiny", "threads": 1}, shard_size=8,
                                 rows_per_batch=4, io_threads=2), **quiet)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    pool, workers = res["run"]["pool"], res["run"]["workers"]
    assert pool["max_size"] == 2 and pool["num_gpus"] == 1 and pool["device"] == "gpu"
    assert len(workers) == 2, workers
    ids = [w.split(":") for w in workers]  # host:node:pid:CUDA_VISIBLE_DEVICES
    assert len({i[1] for i in ids}) == 2  # two nodes
    assert sorted(i[3] for i in ids) == ["0", "1"]  # each actor sees exactly one, distinct GPU
    rows = [w["rows"] for w in workers.values()]
    assert sum(rows) == 48 and min(rows) > 0 and max(w["shards"] for w in workers.values()) > 1  # one load, many shards
    assert res["totals"]["ok"] == len(expected) and json.loads((dst / "__fcodec__" / "manifest.json").read_text())["complete"]
    # The parts were written where the rows were: by the two actors on the worker nodes, never the driver.
    fs, root = st.get_fs(str(dst))
    writers = {part_record(fs, str(p)).writer for p in dst.glob("part-*.parquet")}
    assert writers == set(workers) and all(int(w.split(":")[2]) != os.getpid() for w in writers)
    assert len({w.split(":")[1] for w in writers}) == 2


@pytest.mark.slow
def test_local_cluster_starts_where_no_ray_ran_before(tmp_path, monkeypatch):
    """A fresh machine has no `<tmp>/ray`: ray.cluster_utils.Cluster alone then fails writing its
    address file there (FileNotFoundError, seen on CI). local_cluster makes the folder first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared local Ray restarts for later tests
    fresh = tmp_path / "never-used"
    monkeypatch.setenv("RAY_TMPDIR", str(fresh))  # where Ray looks for <tmp>/ray
    cluster = local_cluster(str(Path("/tmp") / f"rayn-{os.getpid()}"))
    try:
        cluster.add_node(num_cpus=1, num_gpus=0)
        ray.init(address=cluster.address, log_to_driver=False)
        assert sum(1 for n in ray.nodes() if n["Alive"]) == 2
        assert (fresh / "ray" / "ray_current_cluster").read_text() == cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
