"""The simulated-cluster benchmark (`fcodec bench --sim-cluster K`): the real compress job on a
`ray.cluster_utils.Cluster` of K fake-GPU nodes (one GPU, one CPU each), with the stand-in codec
(codec/standin.py: sleeps a set latency per batch, returns ~5 KB bitstreams), over many tiny PNGs.

What it measures, per run (each run in a fresh subprocess, so peak RSS is that run's own):
* sustained images/s against the ideal K x per-actor rate (per-actor rate = batch / latency);
  sustained = the images committed between the 10% and 90% marks of the run over that time, read
  from the commit records' worker-side timestamps (start-up and the last shards' tail excluded;
  both are reported apart);
* driver CPU seconds per 1000 images (`time.process_time()` of the driver around `compress`,
  all its threads: listing, planning, the shard dispatcher, commits, compaction);
* driver peak RSS during `compress` (Linux VmHWM, reset after the cluster's start-up), compared
  at 1x and 10x the inputs;
* CPU of the whole simulated cluster per image (every process the driver started: GCS, raylets,
  workers) and how busy this machine's CPUs were, which locate the knee: the K x rate at which
  the CPUs, not the fake GPUs, bound the job.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SIDE = 8  # pixels per side of the generated inputs


def make_inputs(folder: str | Path, n: int, per_dir: int = 1000) -> Path:
    """`n` distinct SIDE x SIDE PNGs under `folder` (1000 per subfolder); reused when present."""
    import io

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    stamp = folder / f".made-{n}"
    if stamp.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    for i in range(n):
        d = folder / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        px = base.copy()
        px[0, :3, :] = np.frombuffer(i.to_bytes(9, "little"), np.uint8).reshape(3, 3)  # distinct content
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        (d / f"img{i:08d}.png").write_bytes(buf.getvalue())
    stamp.write_text("ok\n")
    return folder


def _tree_cpu(root_pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every live descendant of `root_pid`, per pid."""
    out: dict[int, float] = {}
    try:
        for c in psutil.Process(root_pid).children(recursive=True):
            try:
                t = c.cpu_times()
                out[c.pid] = t.user + t.system
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return out


class TreeCpu:
    """CPU seconds used by `root_pid`'s descendants while the block runs, processes that exit
    before its end included (the job kills its actors when it ends): each pid's last sample,
    taken every `every` seconds, less what it had used before. `own`: the sampler thread's CPU
    (in the driver's process; the driver's figure leaves it out)."""

    def __init__(self, root_pid: int, every: float = 1.0) -> None:
        self.root, self.every, self.own = root_pid, every, 0.0
        self.before: dict[int, float] = {}  # each pid's CPU when the block started
        self.seen: dict[int, float] = {}  # each pid's last sample
        self.used = 0.0  # set when the block ends
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="sim-tree-cpu", daemon=True)

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.every):
            self.seen.update(_tree_cpu(self.root))
        self.own = time.thread_time() - t0  # the sampling's own CPU, not the driver's work

    def __enter__(self) -> "TreeCpu":
        self.before = _tree_cpu(self.root)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.seen.update(_tree_cpu(self.root))
        self.used = sum(v - self.before.get(pid, 0.0) for pid, v in self.seen.items())


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux VmHWM) and return the RSS now in KB (0: cannot)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return 0


def _machine_busy() -> tuple[float, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return sum(t) - idle, sum(t)


def sustained_rate(records: list[tuple[str, int]], lo: float = 0.1, hi: float = 0.9) -> dict:
    """Images/s between the `lo` and `hi` fractions of the committed images, from (committed_at
    ISO time, rows) pairs; also the span of the commits."""
    from datetime import datetime

    pts = sorted((datetime.fromisoformat(t).timestamp(), n) for t, n in records if t and n)
    if len(pts) < 3:
        return {"sustained_images_per_s": None}
    total = sum(n for _, n in pts)
    cum, ta, ca, tb, cb = 0, None, 0, None, 0
    for t, n in pts:
        cum += n
        if ta is None and cum >= lo * total:
            ta, ca = t, cum
        if cum >= hi * total:
            tb, cb = t, cum
            break
    rate = (cb - ca) / (tb - ta) if tb is not None and tb > ta else None
    return {"sustained_images_per_s": rate, "commit_span_s": pts[-1][0] - pts[0][0]}


def run_once(k: int, n_inputs: int, latency_ms: float, batch: int, workdir: str | Path, nbytes: int = 5000,
             shard_size: int = 256, node_cpus: float = 1.0, io_threads: int = 2) -> dict:
    """One compress run on a fresh K-node simulated cluster, in this process (see module doc)."""
    import ray

    from .catalog import Books
    from .raystart import local_cluster, quiet_local_environment, quiet_ray_data
    from .run import JobConfig, compress
    from .storage import get_fs

    quiet_local_environment()
    workdir = Path(workdir)
    src = make_inputs(workdir / f"inputs-{n_inputs}", n_inputs)
    dst = workdir / f"out-k{k}-{os.getpid()}"
    shutil.rmtree(dst, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="rsim-", dir="/tmp"))
    cluster = local_cluster(str(tmp))
    try:
        for _ in range(k):
            cluster.add_node(num_cpus=node_cpus, num_gpus=1)
        ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False,
                 logging_level="WARNING", configure_logging=True)
        quiet_ray_data()
        cluster.wait_for_nodes()
        cfg = JobConfig(src=str(src), dst=str(dst), shard_size=shard_size, gpus=str(k), actor_cpus=node_cpus,
                        io_threads=io_threads, codec={"baseline": f"standin:{latency_ms:g}:{nbytes}", "batch_size": batch})
        rss0 = _reset_peak_rss()  # the cluster's start-up in this process is not the job's
        busy0, all0 = _machine_busy()
        cpu0, t0 = time.process_time(), time.perf_counter()
        with TreeCpu(os.getpid()) as tree_cpu:
            res = compress(cfg, progress=False, echo=lambda s: None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0 - tree_cpu.own
        tree = tree_cpu.used
        busy1, all1 = _machine_busy()
        peak = _status_kb("VmHWM") if rss0 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fs, root = get_fs(str(dst))
        recs = [(r.committed_at, r.rows) for r in Books(fs, root).read().shards.values()]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    run = res["run"]
    n = run["rows"]
    ideal = k * batch / (latency_ms / 1000.0)
    out = {"k": k, "inputs": n_inputs, "rows": n, "ok": run["ok"], "latency_ms": latency_ms, "batch": batch,
           "per_actor_rate": batch / (latency_ms / 1000.0), "ideal_images_per_s": ideal, "shard_size": shard_size,
           "bitstream_bytes": nbytes, "wall_s": wall, "end_to_end_images_per_s": n / wall if wall else None,
           "first_output_s": run.get("first_output_s"), "pool": run.get("pool"), "actors": len(run.get("workers") or {}),
           "driver_cpu_s": cpu, "driver_cpu_ms_per_1000": 1e6 * cpu / n if n else None,
           "cluster_cpu_ms_per_image": 1e3 * (tree + cpu) / n if n else None,
           "machine_busy_fraction": (busy1 - busy0) / (all1 - all0) if all1 > all0 else None,
           "driver_peak_rss_mb": peak / 1024, "driver_rss_before_mb": rss0 / 1024,
           **sustained_rate(recs)}
    out["of_ideal"] = out["sustained_images_per_s"] / ideal if out["sustained_images_per_s"] else None
    return out


def run_isolated(k: int, n_inputs: int, latency_ms: float, batch: int, workdir: str | Path, timeout_s: float = 1800,
                 **kw) -> dict:
    """`run_once` in a fresh Python process (its own Ray and its own peak RSS)."""
    args = {"k": k, "n_inputs": n_inputs, "latency_ms": latency_ms, "batch": batch, "workdir": str(workdir), **kw}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.run([sys.executable, "-m", "pipeline.simcluster", json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout_s, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"simulated-cluster run failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def bench_section(k: int = 16, n_inputs: int = 20000, latency_ms: float = 100.0, batch: int = 8,
                  workdir: str | Path | None = None, sweep: tuple[int, ...] = (), memory_10x: bool = True,
                  shard_size: int = 256, echo=print) -> dict:
    """The `sim_cluster` section of `fcodec bench`: K nodes at 1x the inputs (and 10x for the
    driver's memory), plus a sweep of smaller K at the same per-actor rate (the knee)."""
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fcodec-sim-"))
    try:
        runs = {}
        for kk in sorted(set(sweep) | {k}):
            r = run_isolated(kk, n_inputs, latency_ms, batch, workdir, shard_size=shard_size)
            runs[kk] = r
            echo(f"simulated cluster: {kk} GPUs at {r['of_ideal'] or 0:.2f}× of ideal "
                 f"({r['sustained_images_per_s'] or 0:.0f} of {r['ideal_images_per_s']:.0f} images/s); "
                 f"driver CPU: {r['driver_cpu_ms_per_1000']:.1f} ms per 1000 images; "
                 f"CPUs {100 * (r['machine_busy_fraction'] or 0):.0f}% busy")
        out = {"k": k, "inputs": n_inputs, "latency_ms": latency_ms, "batch": batch, "shard_size": shard_size,
               "runs": runs}
        if memory_10x:
            big = run_isolated(k, 10 * n_inputs, latency_ms, batch, workdir, shard_size=shard_size)
            a, b = runs[k]["driver_peak_rss_mb"], big["driver_peak_rss_mb"]
            out.update(run_10x=big, driver_rss_growth=b / a - 1)
            echo(f"driver peak RSS: {a:.0f} MB at {n_inputs} inputs, {b:.0f} MB at {10 * n_inputs} ({100 * (b / a - 1):+.1f}%)")
        return out
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":  # python -m pipeline.simcluster '{"k": 2, ...}' (what run_isolated starts)
    print(json.dumps(run_once(**json.loads(sys.argv[1]))))
