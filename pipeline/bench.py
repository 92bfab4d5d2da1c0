"""`fcodec bench`'s measurements.

Pipeline sections: the Ray compress job against a bare in-process loop over the same codec and
images (marginal rates, so fixed costs cancel), 1 vs 2 actors, and peak RSS per actor as the
dataset grows 10×. The codec-level sections (stage breakdown, speed options, fp32 vs bf16) are
`codec.profiling`'s; `run_bench` runs the chosen sections in one process and returns one
dict (`pipeline.bench_report` writes it as JSON and as docs/performance.md's Markdown).
Everything is measured side by side in one run: the ratios are the figures (absolute speeds
depend on the box).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Callable

import psutil

from .actors import as_spec
from .dispatch import ACTOR_PROCESS
from .raystart import init_ray
from .run import JobConfig, compress, steady_rate

SECTIONS = ("stages", "fastpath", "pipeline", "scaling", "memory", "gpu")


def parse_sections(text: str) -> tuple[str, ...]:
    """`--sections`: a comma list of SECTIONS, or `none` (e.g. only the simulated cluster)."""
    return checked_sections(text.split(","))


def checked_sections(names) -> tuple[str, ...]:
    """Section names with blanks and `none` left out; an unknown name is an error."""
    names = tuple(s.strip() for s in names if s.strip() and s.strip() != "none")
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench sections {unknown} (choose from {', '.join(SECTIONS)}, or none)")
    return names


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

    def __init__(self, pattern: str = ACTOR_PROCESS, every: float = 0.2) -> None:
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


def quiesce(pattern: str = ACTOR_PROCESS, timeout_s: float = 20.0) -> None:
    """Wait until the previous job's shard-worker processes have exited: Ray kills them
    asynchronously, and a measurement must not share the CPUs with their shutdown."""
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
    codec = as_spec(spec).build()
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
            io_threads: int = 4) -> dict:
    """The real compress job (local Ray already initialised) into a temporary destination.

    `steady_images_per_s` and `first_output_s` are the job's own figures (run.Throughput):
    outputs reach the driver a shard at a time, so shard_size = batch gives the finest clock.
    """
    dst = tempfile.mkdtemp(prefix="fcodec-bench-")
    try:
        cfg = JobConfig(src=src, dst=dst, codec=dict(spec), shard_size=shard_size, rows_per_batch=batch,
                        workers=workers, actor_cpus=max(0.5, 1.0 / workers), io_threads=io_threads)
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
               "images_per_s": n / dt if dt else 0.0, "io_threads": io_threads,
               "first_output_s": stats["run"]["first_output_s"], "steady_images_per_s": stats["run"]["steady_images_per_s"]}
        if sampler:
            out["peak_rss_mb_per_actor"] = sorted(v / 2**20 for v in sampler.peak.values())
        return out
    finally:
        shutil.rmtree(dst, ignore_errors=True)


# ---------------------------------------------------------------- sections
def pipeline_efficiency(small: list[Path], big: list[Path], spec: dict, batch: int, repeats: int) -> dict:
    """Bare loop vs the Ray job (as configured by default, and with one I/O thread per actor
    instead of the default four: reads and image decoding less overlapped with the model) on N
    and 4N images, `repeats` times in turn. Each rate is
    marginal: (4N - N) images over the difference of the two runs' wall times, which cancels
    every fixed cost (the job's start-up: Ray, the actor process, the codec load) and leaves the
    per-image rate a long archive job runs at. The figures are medians over the repeats."""
    def marginal(a: dict, b: dict) -> float:
        return (b["images"] - a["images"]) / max(1e-9, b["seconds"] - a["seconds"])

    src_n, src_4n = str(small[0].parent), str(big[0].parent)
    reps = []
    for _ in range(max(1, repeats)):
        runs = {"bare_loop": bare_loop(small, spec, batch), "bare_loop_4x": bare_loop(big, spec, batch)}
        for name in ("ray_job", "ray_job_other"):
            threads = 4 if name == "ray_job" else 1  # the default I/O threads, then a single one
            runs[name] = ray_job(src_n, spec, 1, batch, batch, io_threads=threads)
            runs[name + "_4x"] = ray_job(src_4n, spec, 1, batch, batch, io_threads=threads)
        bare = marginal(runs["bare_loop"], runs["bare_loop_4x"])
        job, other = marginal(runs["ray_job"], runs["ray_job_4x"]), marginal(runs["ray_job_other"], runs["ray_job_other_4x"])
        reps.append({**runs, "bare_marginal_images_per_s": bare, "ray_marginal_images_per_s": job,
                     "ray_other_marginal_images_per_s": other, "efficiency": job / bare, "efficiency_other": other / bare,
                     "end_to_end_efficiency": runs["ray_job_4x"]["images_per_s"] / runs["bare_loop_4x"]["images_per_s"],
                     "fixed_startup_s": runs["ray_job"]["seconds"] - runs["ray_job"]["images"] / job})
    med = lambda k: median(r[k] for r in reps)  # noqa: E731
    return {"images": [len(small), len(big)], "repeats": reps, "efficiency": med("efficiency"),
            "io_threads": reps[0]["ray_job"]["io_threads"], "efficiency_other": med("efficiency_other"),
            "end_to_end_efficiency": med("end_to_end_efficiency"), "startup_s": med("fixed_startup_s"),
            "first_output_s": median(r["ray_job_4x"]["first_output_s"] or 0 for r in reps),
            "bare_marginal_images_per_s": med("bare_marginal_images_per_s"),
            "ray_marginal_images_per_s": med("ray_marginal_images_per_s")}


def actor_scaling(src: str, spec: dict, batch: int, base_rate: float | None, cpus: int) -> dict:
    """1 vs 2 actors on the same data, and the model of N GPUs (N x one actor's steady rate,
    `base_rate` when the pipeline section measured it)."""
    one = ray_job(src, spec, 1, batch, batch)
    two = ray_job(src, spec, 2, batch, batch)
    rate = lambda r: r["steady_images_per_s"] or r["images_per_s"]  # noqa: E731
    base = base_rate or rate(one)
    return {"1_actor": one, "2_actors": two, "speedup": rate(two) / rate(one),
            "per_actor_efficiency": rate(two) / (2 * rate(one)),
            "model_n_gpus": {n: base * n for n in (1, 2, 4, 8, 16)},
            "note": f"This machine has {cpus} CPUs shared by reading, actors and the driver, "
                    "so two actors compete for them; on GPUs each actor owns its device, so the model is "
                    "N x one actor's steady-state rate (an upper bound: shared reads and the driver's commits are not modelled)"}


def memory_growth(src: str, src_10x: str, spec: dict, batch: int, shard_size: int) -> dict:
    """Peak RSS per actor for a dataset and one 10x larger (streaming: it should not grow)."""
    a = ray_job(src, spec, 1, batch, shard_size, sample_rss=True)
    b = ray_job(src_10x, spec, 1, batch, shard_size, sample_rss=True)
    pa, pb = max(a["peak_rss_mb_per_actor"] or [0]), max(b["peak_rss_mb_per_actor"] or [0])
    return {"dataset": a, "dataset_10x": b, "peak_rss_mb": [pa, pb], "growth": (pb / pa - 1) if pa else None}


# ---------------------------------------------------------------- the whole bench
@dataclass
class BenchConfig:
    """What `fcodec bench` measures (stored in bench.json as `params`)."""

    backbone: str = "tiny"  # pipeline sections
    images: int = 48  # dataset size N of the pipeline sections
    size: int = 128  # image side in pixels
    t: int = 100
    steps: int = 4  # DDIM steps in the decode stages
    batch: int = 32  # images per actor call / loop batch
    repeats: int = 3
    sections: tuple[str, ...] = SECTIONS
    shared: str | None = None  # folder with models/taesd (the stages section adds TAESD when present)


def run_bench(cfg: BenchConfig, make_image: Callable[[int, int, int], object],
              write_images: Callable[[Path, int, int], list[Path]], data_dir: Path,
              echo: Callable[[str], None] = print) -> dict:
    """Run the chosen sections; returns the bench.json dict.

    `make_image(seed, h, w)` gives one uint8 image and `write_images(folder, n, size)` a folder of
    n square images (the job passes its synthetic samples); datasets are written under `data_dir`.
    """
    import torch

    from codec import load_codec
    from codec.profiling import precision_speed, speed_options, stage_breakdown

    sections = set(checked_sections(cfg.sections))
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                 "params": asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    imgs = [make_image(i, cfg.size, cfg.size) for i in range(4)]

    if "stages" in sections:
        res["stages"] = {"tiny": stage_breakdown(load_codec("tiny"), imgs, t=cfg.t, steps=cfg.steps)}
        taesd = Path(cfg.shared) / "models" / "taesd" if cfg.shared else None
        if taesd is not None and taesd.is_dir():
            res["stages"]["tiny+taesd"] = stage_breakdown(load_codec("tiny", vae=str(taesd)), imgs, t=cfg.t, steps=cfg.steps)
        echo(json.dumps({k: round(v["total_s_per_mp"], 3) for k, v in res["stages"].items()}) + " s/MP")

    if sections & {"pipeline", "scaling", "memory"}:
        res.update(_ray_sections(cfg, sections, write_images, data_dir, res["machine"]["cpus"], echo))

    if "fastpath" in sections:
        fp_imgs = [make_image(i, cfg.size, cfg.size) for i in range(2 * cfg.batch)]
        res["fastpath"] = speed_options(fp_imgs, cfg.t, cfg.steps, cfg.repeats)
        echo("fastpath: " + ", ".join(f"cl={r['channels_last']} overlap={r['overlap_entropy']}: "
                                      f"{r['encode_img_s']:.1f}/{r['decode_img_s']:.1f} img/s" for r in res["fastpath"]["rows"]))

    if "gpu" in sections:
        res["gpu"] = precision_speed(make_image, cfg.steps) if torch.cuda.is_available() else {
            "skipped": "no CUDA device on this machine"}
    return res


def _ray_sections(cfg: BenchConfig, sections: set[str], write_images, data_dir: Path, cpus: int, echo) -> dict:
    """The sections that run the Ray job, on one local Ray started (and stopped) here."""
    import ray

    spec = {"backbone": cfg.backbone, "t": cfg.t, "batch_size": cfg.batch, "threads": 1}
    out: dict = {}
    small = write_images(data_dir / "small", cfg.images, cfg.size)
    started = init_ray(None, num_cpus=cpus)
    try:
        # warm-up: imports, codec construction and Ray worker start-up are not what we compare
        ray_job(str(data_dir / "small"), spec, 1, cfg.batch, cfg.images)
        bare_loop(small[: cfg.batch], spec, cfg.batch)
        if sections & {"pipeline", "scaling"}:  # N = 4x --images and 4N, a shard per batch
            mid = write_images(data_dir / "pipeline", 4 * cfg.images, cfg.size)
            big = write_images(data_dir / "pipeline_4x", 16 * cfg.images, cfg.size)
        if "pipeline" in sections:
            pl = out["pipeline"] = pipeline_efficiency(mid, big, spec, cfg.batch, cfg.repeats)
            echo(f"pipeline efficiency: {pl['efficiency']:.2f}x the bare loop (steady state, median of "
                 f"{len(pl['repeats'])}); with 1 I/O thread per actor instead of {pl['io_threads']}: "
                 f"{pl['efficiency_other']:.2f}x; end to end {pl['end_to_end_efficiency']:.2f}x (start-up {pl['startup_s']:.1f} s)")
        if "scaling" in sections:
            base = out.get("pipeline", {}).get("ray_marginal_images_per_s")
            out["scaling"] = actor_scaling(str(data_dir / "pipeline_4x"), spec, cfg.batch, base, cpus)
            echo(f"scaling: 2 actors = {out['scaling']['speedup']:.2f}x one")
        if "memory" in sections:
            write_images(data_dir / "large", cfg.images * 10, cfg.size)
            m = out["memory"] = memory_growth(str(data_dir / "small"), str(data_dir / "large"), spec, cfg.batch, cfg.images)
            echo(f"memory: peak RSS per actor {m['peak_rss_mb'][0]:.0f} MB -> {m['peak_rss_mb'][1]:.0f} MB with 10x the data")
    finally:
        if started:
            ray.shutdown()
    return out
