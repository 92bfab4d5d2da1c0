"""Faults injected into real jobs: a Ray worker node removed mid-job (ray.cluster_utils.Cluster),
the object store unreachable for a while (a pausable TCP proxy in front of a moto server), and
credentials that must never reach logs or output files. Each run ends with `verify_dataset`:
the archive is whole and every input appears exactly once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline import storage as st
from pipeline.catalog import read_dataset
from pipeline.raystart import local_cluster
from pipeline.run import JobConfig, compress
from pipeline.verify import verify_dataset
from test_pipeline import make_corrupt, make_images

REPO = Path(__file__).resolve().parents[1]
SPEC = {"backbone": "tiny", "steps": 1, "threads": 1}
quiet = {"progress": False, "echo": lambda s: None}


def _markers(root: Path) -> int:
    """Shards committed so far in the running job (its commit log, before the end-of-run compaction)."""
    d = root / "__fcodec__" / "commits"
    return len(list(d.glob("*.json"))) if d.is_dir() else 0


def _wait(cond, timeout: float, every: float = 0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(every)
    return False


# ---------------------------------------------------------------- a worker node dies mid-job
@pytest.mark.slow
def test_worker_node_removed_mid_job_every_input_once(tmp_path):
    """Head (1 CPU) + two worker nodes (2 CPUs each); once the first shard commits, the worker
    node hosting the most actors is removed. Ray Data restarts the actor elsewhere and retries
    the lost tasks; the dataset is whole and holds each key exactly once."""
    import ray
    import ray._private.state as ray_state

    if ray.is_initialized():
        ray.shutdown()  # the shared local Ray restarts for later tests
    src, dst = tmp_path / "src", tmp_path / "dst"
    expected = make_images(src, 64, seed=11)
    cluster = local_cluster(f"/tmp/rayf-{os.getpid()}")
    nodes = [cluster.add_node(num_cpus=2, num_gpus=0) for _ in range(2)]
    removed: dict = {}

    def kill_a_node() -> None:
        if not _wait(lambda: _markers(dst) >= 1, 300):
            return
        alive = [a for a in ray_state.actors().values() if a.get("State") == "ALIVE"]
        per_node = {n.node_id: sum(1 for a in alive if a.get("Address", {}).get("NodeID") == n.node_id) for n in nodes}
        victim = max(nodes, key=lambda n: per_node[n.node_id])
        removed.update(node=victim.node_id, actors=per_node[victim.node_id], markers=_markers(dst))
        cluster.remove_node(victim, allow_graceful=False)  # as a preempted VM: no goodbye

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        killer = threading.Thread(target=kill_a_node, daemon=True)
        killer.start()
        res = compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=4, rows_per_batch=4, workers=2,
                                 actor_cpus=0.5), **quiet)
        killer.join(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "no shard committed: the fault was never injected"
    assert removed["actors"] >= 1, "the removed node hosted no actor; the test proves nothing"
    assert removed["markers"] < 16, "the job finished before the node died; the test proves nothing"
    keys = read_dataset(str(dst), columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == 64
    assert res["totals"]["ok"] == 64 and res["manifest"]["complete"]
    rep = verify_dataset(str(dst))
    assert rep["ok"], rep["problems"]
    assert rep["rows"] == 64 and rep["bitstreams_checked"] == 64
    print(f"node removed after {removed['markers']} of 16 shards committed, hosting {removed['actors']} actor(s); "
          f"64 of 64 inputs ok, each once")


# ---------------------------------------------------------------- the object store goes away
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PausableProxy:
    """A TCP proxy on loopback in front of an S3 endpoint. `down()` closes the listening socket
    and every open connection (clients get 'connection refused', as when the store is
    unreachable); `up()` listens again on the same port. The server behind keeps its state."""

    def __init__(self, target_port: int) -> None:
        self.target, self.port = target_port, _free_port()
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.cut_after: float | None = None  # armed by cut_next_body
        self.victims: set[socket.socket] = set()
        self.cuts = 0
        self.up()

    def cut_next_body(self, down_for: float) -> None:
        """The next ranged GET's response is cut after its headers and 100 bytes of body (the
        client has its response and fails reading the body), then the endpoint is down for
        `down_for` seconds: the store going away mid-transfer."""
        self.cut_after = down_for

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", self.port))
        self.srv.listen(64)
        threading.Thread(target=self._accept, args=(self.srv,), daemon=True).start()

    def down(self) -> None:
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        except OSError:
            pass
        self.srv.close()
        with self.lock:
            for s in self.conns:
                self._close(s)
            self.conns.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns |= {c, u}
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b, a is u), daemon=True).start()

    @staticmethod
    def _close(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def _pump(self, a: socket.socket, b: socket.socket, upstream: bool) -> None:
        head = b""  # a victim response so far
        try:
            while data := a.recv(65536):
                if not upstream and self.cut_after is not None and data.startswith(b"GET ") and b"\nrange: " in data.lower():
                    self.victims.add(b)  # its answer comes back from b
                if upstream and a in self.victims:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0 or len(head) < end + 4 + 100:
                        continue
                    b.sendall(head[: end + 4 + 100])
                    down_for, self.cut_after = self.cut_after, None
                    self.victims.clear()
                    self.cuts += 1
                    self.down()
                    threading.Timer(down_for, self.up).start()
                    return
                b.sendall(data)
        except OSError:
            pass
        finally:
            self._close(a)
            self._close(b)
            with self.lock:
                self.conns -= {a, b}


@pytest.fixture
def flaky_s3(tmp_path):
    """Our own moto server (not the session one) behind a PausableProxy. Yields a dict with
    `proxy`, `opts` (through the proxy: what the job uses) and `direct` (an s3fs client that
    bypasses the proxy: what the test uses to watch and check)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = PausableProxy(port)
    direct = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", key="testing", secret="testing")
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"  # moto's state is per process: every server sees every bucket
    direct.mkdir(bucket)
    try:
        yield {"proxy": proxy, "direct": direct, "bucket": bucket,
               "opts": st.StorageOptions(endpoint_url=proxy.url, key="testing", secret="testing"),
               "direct_opts": st.StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", key="testing", secret="testing")}
    finally:
        proxy.down()
        server.stop()


@pytest.mark.slow
def test_response_cut_mid_body_is_read_again_after_the_outage(flaky_s3):
    """botocore retries a request until its response's headers arrive; a connection cut while the
    body streams reaches the caller as aiohttp's ClientPayloadError. clear_errors sends such a
    read once more, and that request waits the outage out under botocore's policy."""
    fs_direct, proxy, b = flaky_s3["direct"], flaky_s3["proxy"], flaky_s3["bucket"]
    data = os.urandom(200_000)
    fs_direct.pipe(f"{b}/obj.bin", data)
    fs, path = st.get_fs(f"s3://{b}/obj.bin", flaky_s3["opts"])

    proxy.cut_next_body(down_for=0.5)  # as each job's read was before: one try, the cut is the error
    with pytest.raises(Exception) as err:
        st.read_bytes(fs, path)
    assert proxy.cuts == 1 and st.is_body_cut(err.value), repr(err.value)
    assert st.read_bytes(fs, path) == data  # a new request: botocore waits the outage out

    proxy.cut_next_body(down_for=3.0)
    t0 = time.time()
    assert st.clear_errors(lambda: st.read_bytes(fs, path), f"read s3://{b}/obj.bin") == data
    assert proxy.cuts == 2 and time.time() - t0 >= 3.0  # the second try met the outage and waited it out
    # anything else is not tried again: one call, its error as it is
    calls = []
    with pytest.raises(FileNotFoundError):
        st.clear_errors(lambda: calls.append(1) or st.read_bytes(fs, f"{b}/missing.bin"), "read missing")
    assert calls == [1]


def _upload(local: Path, fs, prefix: str) -> None:
    fs.put(str(local) + "/", prefix + "/", recursive=True)
    fs.invalidate_cache()


def _s3_markers(fs, prefix: str) -> int:
    fs.invalidate_cache()
    try:
        return len(fs.glob(f"{prefix}/__fcodec__/commits/*.json"))
    except OSError:
        return 0


def _check_whole(url: str, opts, expected: dict) -> dict:
    rep = verify_dataset(url, opts)
    assert rep["ok"], rep["problems"]
    keys = read_dataset(url, opts, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    return rep


@pytest.mark.slow
def test_object_store_outage_mid_job_retried_then_whole(tmp_path, flaky_s3, ray_local, caplog):
    """The endpoint is refused for 15 s (longer than botocore's own retries) once the first shard
    is committed. Reads that fall in the outage become 'could not read source' rows, writes wait
    it out (botocore's adaptive retries, storage.S3_MAX_ATTEMPTS), nothing partial is visible;
    `--retry-failed` then completes the archive."""
    fs, proxy, b = flaky_s3["direct"], flaky_s3["proxy"], flaky_s3["bucket"]
    expected = make_images(tmp_path / "src", 32, seed=12)
    _upload(tmp_path / "src", fs, f"{b}/src")
    src, dst = f"s3://{b}/src", f"s3://{b}/dst"
    outage: dict = {}

    def cut() -> None:
        if _wait(lambda: _s3_markers(fs, f"{b}/dst") >= 1, 240, every=0.2):
            outage["markers"] = _s3_markers(fs, f"{b}/dst")
            proxy.down()
            time.sleep(1)  # a PUT moto already received when the link was cut may still land
            settled = _s3_markers(fs, f"{b}/dst")
            time.sleep(14)
            outage["commits_during"] = _s3_markers(fs, f"{b}/dst") - settled
            proxy.up()

    t = threading.Thread(target=cut, daemon=True)
    t.start()
    cfg = JobConfig(src=src, dst=dst, codec=SPEC, shard_size=4, rows_per_batch=4, workers=1)
    res = compress(cfg, flaky_s3["opts"], **quiet)
    t.join(timeout=60)
    # Whether a commit write falls inside the outage depends on how long the reads hang in
    # botocore first; when one does, it waits (test_commit_write_waits_out_an_outage pins that).
    assert outage.get("markers", 99) < 8, "the job finished before the outage; the test proves nothing"
    assert outage["commits_during"] == 0  # nothing could be committed while the store was away
    tot = res["totals"]
    assert tot["rows"] == 32 and tot["ok"] + tot["failed"] == 32  # every input exactly once, ok or failed
    for f in res["run"]["failures"]:
        assert "could not read source" in f["error"], f
    _check_whole(dst, flaky_s3["direct_opts"], expected)  # whole as committed, failed rows included

    res2 = compress(JobConfig(**{**cfg.public(), "retry_failed": True}), flaky_s3["opts"], **quiet)
    assert res2["totals"]["ok"] == 32 and res2["totals"]["failed"] == 0
    assert res2["run"]["rows"] == tot["failed"]
    rep = _check_whole(dst, flaky_s3["direct_opts"], expected)
    assert rep["ok_rows"] == 32
    print(f"outage: first commit at {outage['markers']} shards, {tot['failed']} rows "
          f"failed in the outage, all 32 ok after --retry-failed")


@pytest.mark.slow
def test_commit_write_waits_out_an_outage(flaky_s3):
    """A write that starts while the endpoint is refused for 15 s is retried by botocore's
    adaptive mode (storage.S3_MAX_ATTEMPTS, backoff up to 20 s a try) and lands once the endpoint
    is back, complete."""
    fs, proxy, b = flaky_s3["direct"], flaky_s3["proxy"], flaky_s3["bucket"]
    wfs, root = st.get_fs(f"s3://{b}/dst", flaky_s3["opts"])
    proxy.down()
    threading.Timer(15.0, proxy.up).start()
    t0 = time.time()
    st.write_json_atomic(wfs, st.join(root, "__fcodec__/commits/x.json"), {"rows": 3})
    assert time.time() - t0 >= 14  # it waited the outage out
    fs.invalidate_cache()
    assert json.loads(fs.cat(f"{b}/dst/__fcodec__/commits/x.json")) == {"rows": 3}


@pytest.mark.slow
def test_object_store_gone_for_good_is_a_clear_error_and_nothing_partial(tmp_path, flaky_s3, monkeypatch):
    """The endpoint never comes back: the job stops with one clear error after bounded retries;
    what is visible is only committed shards (verify: no orphans, only 'no manifest'); a rerun
    once the store is back finishes the archive with each key once."""
    monkeypatch.setattr(st, "S3_MAX_ATTEMPTS", 2)  # bounded either way; 2 keeps the test short
    fs, proxy, b = flaky_s3["direct"], flaky_s3["proxy"], flaky_s3["bucket"]
    expected = make_images(tmp_path / "src", 16, seed=13)
    _upload(tmp_path / "src", fs, f"{b}/src")
    src, dst = f"s3://{b}/src", f"s3://{b}/dst"
    cfg = JobConfig(src=src, dst=dst, codec=SPEC, shard_size=4, rows_per_batch=4, lease_ttl_s=3)
    cut = threading.Thread(target=lambda: _wait(lambda: _s3_markers(fs, f"{b}/dst") >= 1, 240, every=0.02) and proxy.down(),
                           daemon=True)
    cut.start()
    t0 = time.time()
    # the next shard's first touch of the store (reading its row group of new files, or writing
    # its part) is the one that meets the outage
    with pytest.raises(OSError, match=rf"could not (read|write) s3://{b}/dst/.* after 2 attempts .*Rerun the job to resume"):
        compress(cfg, flaky_s3["opts"], use_ray=False, **quiet)  # inline: the driver itself meets the outage
    took = time.time() - t0
    cut.join(timeout=10)
    proxy.up()
    rep = verify_dataset(dst, flaky_s3["direct_opts"])
    n = rep["shards"]
    assert 1 <= n < 4
    assert rep["problems"] == ["no manifest: the compress job never finished (rerun it to resume)"]
    assert rep["rows"] == 4 * n  # the committed shards are whole; nothing else is visible
    time.sleep(3.5)  # the dead run's lease (3 s here) could not be removed while the store was away: it expires
    res = compress(cfg, flaky_s3["opts"], use_ray=False, **quiet)
    assert res["run"]["shards"] == 4 - n and res["totals"]["ok"] == 16
    _check_whole(dst, flaky_s3["direct_opts"], expected)
    print(f"store gone: clear error after {took:.0f} s with {n} of 4 shards committed; rerun completed")


# ---------------------------------------------------------------- credentials stay secret
@pytest.mark.slow
def test_credentials_never_in_logs_or_outputs(tmp_path, s3_server, s3_bucket):
    """A real `fcodec compress` subprocess on its own local Ray against moto, with a distinctive
    secret and access key id: neither appears in stdout/stderr, in any output object, nor in any
    file Ray wrote (worker logs, session files) -- the storage options travel to the read tasks
    pickled, and their repr hides the secrets."""
    import shutil
    import tempfile

    import s3fs

    secret, key_id = "SeCrEt-Do-Not-Print-7f3a9c", "AKIDDISTINCTIVE42"
    make_images(tmp_path / "src", 6, seed=14)
    make_corrupt(tmp_path / "src")  # failure rows carry error text: it must not leak either
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(tmp_path / "src") + "/", f"{s3_bucket[5:]}/src/", recursive=True)
    ray_tmp = tempfile.mkdtemp(prefix="rcred-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **s3_server["env"], "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id,
           "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "jobs.cli", "compress", f"{s3_bucket}/src", f"{s3_bucket}/dst", "--backbone", "tiny",
           "--workers", "1", "--shard-size", "4", "--no-progress", "--debug"]
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 1, out.stderr[-2000:]  # finished; the corrupt inputs are failed rows
        vout = subprocess.run([sys.executable, "-m", "jobs.cli", "verify", f"{s3_bucket}/dst", "--json"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)
        assert vout.returncode == 1, vout.stdout[-2000:] + vout.stderr[-2000:]  # whole, with failed rows
        ray_files = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
        ray_bytes = b"".join(p.read_bytes() for p in ray_files if p.stat().st_size < 50 << 20)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    logs = out.stdout + out.stderr + vout.stdout + vout.stderr
    assert "config: " in out.stdout and '"credentials": "from environment"' in out.stdout  # the config IS printed ...
    objects = fs.find(f"{s3_bucket[5:]}/dst")
    assert any(o.endswith("__fcodec__/manifest.json") for o in objects) and len(objects) >= 5
    assert len(ray_files) > 10  # Ray did write its logs there
    blobs = b"".join(fs.cat(o) for o in objects)
    for s in (secret, key_id):  # ... without the secrets, and no output object or Ray log holds them
        assert s not in logs and s.encode() not in blobs and s.encode() not in ray_bytes


# ---------------------------------------------------------------- hostile records: caps and a longer fuzz
def test_decoder_pixel_cap_refuses_before_entropy_decoding(tiny_codec):
    """A decoder whose job lowers `max_pixels` refuses bigger records at parse time (CodecConfig ->
    bitstream.parse), before any entropy decoding or tensor allocation; the latent size is
    bound to the claimed image size there too."""
    from codec import BitstreamError, CodecConfig, load_codec
    from jobs.samples import sample_image

    data = tiny_codec.encode([sample_image(3, 40, 48)], t=40)[0].data
    small = load_codec("tiny", config=CodecConfig(max_pixels=40 * 48 - 1, steps=1))
    with pytest.raises(BitstreamError, match="48x40 image, outside the limit of 1919 pixels"):
        small.decode([data])
    assert tiny_codec.config.max_pixels >= 40 * 48 and tiny_codec.decode([data], steps=1)[0].shape == (40, 48, 3)


LONG_FUZZ = 2000  # examples per test below (docs/reliability.md reports the figure)


@pytest.mark.slow
def test_long_fuzz_forged_records_through_the_decoder(tiny_codec):
    """Bit flips and byte overwrites anywhere in a valid record, CRC re-fixed so they reach the
    header checks, the entropy decoder and the model: a clear error or a correctly sized image."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hst

    from jobs.samples import sample_image
    from test_fuzz_bitstream import _check, _fix_crc

    valid = tiny_codec.encode([sample_image(8, 40, 32)], t=30)[0].data
    seen = {"n": 0}

    @settings(max_examples=LONG_FUZZ, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(hst.lists(hst.tuples(hst.integers(0, len(valid) - 5), hst.integers(0, 255)), min_size=1, max_size=6))
    def run(edits):
        b = bytearray(valid)
        for pos, val in edits:
            b[pos] = val
        seen["n"] += 1
        _check(tiny_codec, _fix_crc(bytes(b)))

    run()
    assert seen["n"] >= LONG_FUZZ // 2  # hypothesis may stop early only on an exhausted space
    print(f"long fuzz: {seen['n']} forged records through the decoder")


@pytest.mark.slow
def test_long_fuzz_random_and_truncated_bytes_parse(tiny_codec):
    """Random bytes, and valid records cut anywhere, through `bitstream.parse`: BitstreamError each."""
    from hypothesis import given, settings
    from hypothesis import strategies as hst

    from codec import bitstream as bs
    from jobs.samples import sample_image

    valid = tiny_codec.encode([sample_image(9, 32, 32)], t=30)[0].data
    seen = {"n": 0}

    @settings(max_examples=LONG_FUZZ * 2, deadline=None, database=None)
    @given(hst.binary(max_size=2048), hst.integers(0, len(valid) - 1))
    def run(data, cut):
        seen["n"] += 1
        for x in (data, b"FDC\x1a\x01" + data, valid[:cut]):
            with pytest.raises(bs.BitstreamError):
                bs.parse(x)

    run()
    assert seen["n"] >= LONG_FUZZ
    print(f"long fuzz: {seen['n']} x 3 inputs through bitstream.parse")
