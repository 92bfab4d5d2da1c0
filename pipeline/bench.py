"""Pipeline benchmarks: the Ray compress job against a bare in-process loop over the same codec
and images, 1 vs 2 actors, and peak RSS per actor as the dataset grows 10×. Everything is
measured side by side in one run; the ratios are the figures (absolute speeds depend on the box).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from .actors import load_codec_from_spec
from .run import JobConfig, compress, steady_rate


def processes(pattern: str) -> list[dict]:
    """`psutil` info (pid, cmdline, memory_info) of this machine's processes whose command line
    contains `pattern` (Ray names actor processes after their class)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        try:
            if pattern in " ".join(p.info["cmdline"] or []):
                found.append(p.info)
        except psutil.Error:
            continue
    return found


class RssSampler:
    """Samples the RSS of this machine's Ray actor processes running `pattern` (peak per pid)."""

    def __init__(self, pattern: str = "EncodeActor", every: float = 0.2) -> None:
        self.pattern, self.every, self.peak = pattern, every, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for info in processes(self.pattern):
                if info["memory_info"] is not None:
                    self.peak[info["pid"]] = max(self.peak.get(info["pid"], 0), info["memory_info"].rss)
            self._stop.wait(self.every)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def quiesce(pattern: str = "MapWorker", timeout_s: float = 20.0) -> None:
    """Wait until the previous job's actor processes (Ray Data's actor pools run in `MapWorker`
    processes) have exited: Ray kills them asynchronously, and a measurement must not share the
    CPUs with their shutdown."""
    deadline = time.monotonic() + timeout_s
    while processes(pattern) and time.monotonic() < deadline:
        time.sleep(0.2)


def bare_loop(src_files: list[Path], spec: dict, batch: int) -> dict:
    """Read, decode and encode the files in this process, in batches like the actors: the baseline.

    The codec loads before the clock starts (the Ray job's start-up is reported separately);
    `steady_images_per_s` is `run.steady_rate` over the batches' end times, as the job's figure
    is over its outputs.
    """
    from codec import load_image

    quiesce()
    codec = load_codec_from_spec(spec)
    n_bytes, ends = 0, []
    t0 = time.perf_counter()
    for i in range(0, len(src_files), batch):
        imgs = [load_image(p.read_bytes()) for p in src_files[i : i + batch]]
        n_bytes += sum(len(e.data) for e in codec.encode(imgs))
        ends.append((time.perf_counter(), len(imgs)))
    dt = time.perf_counter() - t0
    return {"images": len(src_files), "seconds": dt, "images_per_s": len(src_files) / dt, "bytes": n_bytes,
            "steady_images_per_s": steady_rate(ends)}


def ray_job(src: str, spec: dict, workers: int, batch: int, shard_size: int, sample_rss: bool = False,
            image_stage: bool | None = None) -> dict:
    """The real compress job (local Ray already initialised) into a temporary destination.

    `steady_images_per_s` and `first_output_s` are the job's own figures (run.Throughput):
    outputs reach the driver a shard at a time, so shard_size = batch gives the finest clock.
    """
    dst = tempfile.mkdtemp(prefix="fcodec-bench-")
    try:
        cfg = JobConfig(src=src, dst=dst, codec=dict(spec), shard_size=shard_size, rows_per_batch=batch,
                        workers=workers, actor_cpus=max(0.5, 1.0 / workers), image_stage=image_stage)
        sampler = RssSampler() if sample_rss else None
        quiesce()
        t0 = time.perf_counter()
        if sampler:
            with sampler:
                stats = compress(cfg, progress=False, echo=lambda *_: None)
        else:
            stats = compress(cfg, progress=False, echo=lambda *_: None)
        dt = time.perf_counter() - t0
        n = int(stats["totals"]["ok"])
        out = {"images": n, "failed": int(stats["totals"]["failed"]), "seconds": dt, "workers": workers,
               "images_per_s": n / dt if dt else 0.0, "image_stage": (stats["run"].get("pool") or {}).get("image_stage"),
               "first_output_s": stats["run"]["first_output_s"], "steady_images_per_s": stats["run"]["steady_images_per_s"]}
        if sampler:
            out["peak_rss_mb_per_actor"] = sorted(v / 2**20 for v in sampler.peak.values())
        return out
    finally:
        shutil.rmtree(dst, ignore_errors=True)
