"""Training the codec's learned parts on Ray Train (`TorchTrainer`, one process per worker).

What runs where:

* driver (`train()`): lists the data, starts `TorchTrainer` with `ScalingConfig(num_workers,
  use_gpu)` and `RunConfig(storage_path, name)`, then exports the final checkpoint with
  `DiffusionCodec.save_pretrained` (locally or to an fsspec URL);
* each worker (`train_loop`): loads the frozen backbone, its share of the data (every
  `world_size`-th input), and runs `codec.training.train_step` on random crops; DDP averages
  the gradients; rank 0 reports metrics every `log_every` steps and a checkpoint every
  `checkpoint_every` steps;
* hook: `train(job, on_step=fn)` calls fn(step, metrics) on every worker after each step;
  an exception it raises fails that worker like any other error (tests inject faults this way);
* resume: a run started again with the same `storage_path` and `name` restores the latest
  checkpoint (Ray Train v2 semantics) and continues from its step, optimizer and RNG state;
  worker failures are retried up to `max_failures` times from that checkpoint too;
* optional latent cache (`build_latent_cache`): a Ray Data job that runs the VAE encoder once
  over the dataset and writes Parquet rows (float16 latents), so epochs never re-run it.

The diffusion-specific parts (loss, quantization proxy, one-step x̂₀) live in `codec.training`.
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .raystart import init_ray
from .sources import list_inputs, plan_shards, read_shard
from .storage import StorageOptions, absolute_local, get_fs, is_local

CHECKPOINT_FILE = "train_state.pt"


@dataclass
class TrainJob:
    """A training run, as plain data (it is sent to every worker)."""

    data: str  # images (folder, glob, tar shards, Parquet) — or None-equivalent "" with latent_cache
    out: str  # export folder or URL for save_pretrained
    backbone: str = "tiny"
    vae: str | None = None
    latent_cache: str | None = None  # Parquet written by build_latent_cache; used instead of data
    num_workers: int = 1
    use_gpu: bool = False
    storage_path: str | None = None  # Ray Train checkpoints (local or s3://); default OUT/checkpoints
    name: str = "fcodec-train"
    train_steps: int = 1000  # optimizer steps per worker (`fcodec train --train-steps`)
    batch_size: int = 8
    crop: int = 256  # pixels (a multiple of 8); latent crops are crop/8
    checkpoint_every: int = 100
    log_every: int = 1
    max_failures: int = 0
    seed: int = 0
    threads_per_worker: int = 1
    max_side: int | None = None  # downscale images to this longer side before encoding (None: as they are)
    default_t: int | None = None  # the exported weights' t when none is given (None: the codec's DEFAULT_T)
    train: dict = field(default_factory=dict)  # codec.training.CodecTrainConfig fields

    def resolved_storage(self) -> str:
        if self.storage_path:
            return self.storage_path
        return self.out.rstrip("/") + "/checkpoints"

    def with_absolute_paths(self) -> "TrainJob":
        """The same job with its local paths absolute, as the workers need them (they do not run
        in the driver's folder). URLs and the names of shipped weights stay as they are."""
        def folder(p: str | None) -> str | None:  # a folder here, not a shipped name or hub id
            return absolute_local(p) if p and os.path.isdir(p) else p

        train = {**self.train, "init_weights": folder(self.train.get("init_weights"))} if self.train else {}
        return replace(self, data=absolute_local(self.data), out=absolute_local(self.out), vae=folder(self.vae),
                       latent_cache=self.latent_cache and absolute_local(self.latent_cache),
                       storage_path=self.storage_path and absolute_local(self.storage_path), train=train)


# ---------------------------------------------------------------- data
def _worker_images(data: str, rank: int, world: int, opts: StorageOptions | None = None) -> list[bytes]:
    """This worker's share of the source image bytes: every world-th input in sorted order.

    The (compressed) bytes stay in memory for the run; for datasets larger than the workers'
    memory, train from a latent cache (`build_latent_cache`, ~1/24 of the raw pixels).
    """
    inputs, _ = list_inputs(data, opts)
    out: list[bytes] = []
    files = [x for x in inputs if x[2] == "files"][rank::world]
    containers = [x for x in inputs if x[2] != "files"]
    shards = plan_shards(files, shard_size=256)
    index = 0
    for shard in shards:
        for rows in read_shard(shard, opts):
            out.extend(r["data"] for r in rows if r["data"])
    for shard in plan_shards(containers):
        for rows in read_shard(shard, opts):
            for r in rows:  # containers: members are dealt round-robin across workers
                if r["data"] and index % world == rank:
                    out.append(r["data"])
                index += 1
    if not out:
        raise ValueError(f"no readable images for worker {rank}/{world} in '{data}' (fewer inputs than workers?)")
    return out


def _worker_latents(cache: str, rank: int, world: int, opts: StorageOptions | None = None) -> tuple[list, str]:
    """This worker's share of a latent cache as float32 tensors (C, h, w), and the encoder fingerprint."""
    import pyarrow.parquet as pq
    import torch

    fs, root = get_fs(cache, opts)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet")
                   and not any(s.startswith(("_", ".")) for s in posixpath.relpath(p, root).split("/")))
    if not files:
        raise FileNotFoundError(f"no latent cache at '{cache}': build it with `fcodec train --build-cache`")
    rows = []
    for p in files:
        with fs.open(p, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    rows.sort(key=lambda r: r["key"])
    mine = rows[rank::world]
    if not mine:
        raise ValueError(f"latent cache '{cache}' has {len(rows)} rows, fewer than {world} workers")
    return [torch.from_numpy(np.frombuffer(r["latent"], dtype="<f2").reshape(r["channels"], r["height"], r["width"])
                             .astype(np.float32)) for r in mine], rows[0]["encoder_fingerprint"]


class _Batches:
    """Random crops, batch after batch: latents from the cache, or images VAE-encoded on the fly."""

    def __init__(self, backbone, job: TrainJob, rank: int, world: int, generator,
                 opts: StorageOptions | None = None) -> None:
        self.backbone, self.job, self.g = backbone, job, generator
        if job.crop % 8:
            raise ValueError(f"--crop must be a multiple of 8 pixels, got {job.crop}")
        if job.latent_cache:
            self.latents, fp = _worker_latents(job.latent_cache, rank, world, opts)
            if fp != backbone.encoder_fingerprint().hex():  # latents depend on the VAE only, not the UNet
                raise ValueError(f"latent cache '{job.latent_cache}' was made with the VAE {fp}, not "
                                 f"{backbone.encoder_fingerprint().hex()}: rebuild it with the same --backbone/--vae")
            self.images = None
        else:
            self.images, self.latents = _worker_images(job.data, rank, world, opts), None
            # With --max-side, decode and downscale once (a wallpaper-sized JPEG per crop would
            # dominate a step); else keep the compressed bytes and decode per crop (less memory).
            self.decoded = bool(job.max_side)
            if self.decoded:
                self.images = [training_pixels(b, job.max_side) for b in self.images]

    def __len__(self) -> int:
        return len(self.latents if self.latents is not None else self.images)

    def next(self):
        """(z (B,C,c,c), images (B,3,8c,8c) in [-1,1] or None)."""
        import torch

        from codec.pixels import random_crop, to_unit
        from codec.training import encode_latents

        n = len(self)
        idx = torch.randint(0, n, (self.job.batch_size,), generator=self.g).tolist()
        if self.latents is not None:
            z = torch.stack([random_crop(self.latents[i], self.job.crop // 8, self.g) for i in idx])
            return z, None
        px = [self.images[i] if self.decoded else training_pixels(self.images[i], None) for i in idx]
        x = torch.stack([random_crop(to_unit(p), self.job.crop, self.g) for p in px])
        return encode_latents(self.backbone, x), x


# ---------------------------------------------------------------- worker
def train_loop(config: dict) -> None:
    """The per-worker training function (Ray Train calls it on every worker).

    `config` is {"job": TrainJob fields, "on_step": None or fn(step, metrics)} (see `train`).
    """
    import ray.train
    import torch
    import ray.train.torch as rt

    from codec import load_backbone
    from codec.training import CodecTrainConfig, RateDistortion, make_optimizer, train_step

    job, on_step = TrainJob(**config["job"]), config.get("on_step")
    torch.set_num_threads(max(1, job.threads_per_worker))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = rt.get_device()
    backbone = load_backbone(job.backbone, job.vae)
    backbone.to(device)
    model = RateDistortion(backbone, CodecTrainConfig.from_dict(job.train))
    opt = make_optimizer(model, model.config)
    g = torch.Generator().manual_seed(job.seed * 1000 + rank)
    step, history, resumes = 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        if state["backbone_fingerprint"] != backbone.fingerprint().hex():
            raise ValueError("the checkpoint in the run folder was trained with another backbone; "
                             "use another --name or --storage-path for a new run")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, history, resumes = int(state["step"]), list(state["history"]), list(state["resumes"]) + [int(state["step"])]
        g.manual_seed(job.seed * 1000 + rank + 7919 * step)  # a fresh but reproducible stream after resume
        if rank == 0:
            print(f"[fcodec train] resumed from step {step}", flush=True)
    model = rt.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 else model.to(device)
    core = model.module if hasattr(model, "module") else model
    data = _Batches(backbone, job, rank, world, g, StorageOptions.from_env())
    t0 = time.time()
    while step < job.train_steps:
        z, x = data.next()
        m = train_step(model, opt, z.to(device), images=None if x is None else x.to(device), generator=g, step=step)
        step += 1
        m["step"] = step
        history.append(m)
        if on_step is not None:
            on_step(step, m)
        last = step == job.train_steps
        if step % job.log_every and step % job.checkpoint_every and not last:
            continue
        if rank == 0:
            print(f"[fcodec train] step {step}/{job.train_steps} rate+λD {m['rd']:.4f} bpp {m['bpp']:.4f} "
                  f"D {m['distortion']:.5f} t {m['t']:.1f} λ {m['lam']:.3g} ({time.time() - t0:.1f}s)", flush=True)
        if rank == 0 and (step % job.checkpoint_every == 0 or last):
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": core.state_dict(), "optim": opt.state_dict(), "step": step, "history": history,
                            "resumes": resumes, "train_config": core.config.to_dict(), "backbone_fingerprint": backbone.fingerprint().hex()},
                           Path(d) / CHECKPOINT_FILE)
                ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(m)


# ---------------------------------------------------------------- driver
@dataclass
class TrainResult:
    """What a finished run leaves: per-step metrics (rank 0), the checkpoint, the exported codec."""

    history: list[dict]
    checkpoint_path: str
    codec: object  # codec.DiffusionCodec, ready to encode (the exported weights)


def _storage_kwargs(storage: str, opts: StorageOptions | None) -> dict:
    """RunConfig storage arguments: remote URLs go through our fsspec options (custom endpoints)."""
    fs, path = get_fs(storage, opts)
    if is_local(fs):
        return {"storage_path": str(Path(path).resolve())}
    from .storage import arrow_fs

    return {"storage_path": path, "storage_filesystem": arrow_fs(fs)}


def train(job: TrainJob, opts: StorageOptions | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) training and export the result to `job.out`.

    Runs on the Ray cluster this process is connected to, else on a new local one (never one
    found by accident). `on_step(step, metrics)`, if given, runs on every worker after each
    optimizer step (it travels to the workers by cloudpickle).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not job.data and not job.latent_cache:
        raise ValueError("give training images (DATA) or a --latent-cache")
    opts = opts or StorageOptions.from_env()
    job = job.with_absolute_paths()
    init_ray()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": asdict(job), "on_step": on_step},
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu),
        run_config=RunConfig(
            name=job.name, **_storage_kwargs(job.resolved_storage(), opts),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint ({result.error})")
    state = load_checkpoint_state(result.checkpoint)
    codec = export(job, state, opts)
    return TrainResult(state["history"], result.checkpoint.path, codec)


def load_checkpoint_state(checkpoint) -> dict:
    """The training state dict stored in a Ray Train checkpoint."""
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def export(job: TrainJob, state: dict, opts: StorageOptions | None = None):
    """Build the codec from a checkpoint state and `save_pretrained` it to `job.out` (local or URL)."""
    opts = opts or StorageOptions.from_env()
    from codec import load_backbone
    from codec.training import CodecTrainConfig, RateDistortion, export_codec

    backbone = load_backbone(job.backbone, job.vae)
    model = RateDistortion(backbone, CodecTrainConfig.from_dict(state["train_config"]))
    model.load_state_dict(state["model"])
    codec = export_codec(backbone, model, default_t=job.default_t)
    fs, path = get_fs(job.out, opts)
    if is_local(fs):
        codec.save_pretrained(path)
    else:
        with tempfile.TemporaryDirectory() as d:
            codec.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                fs.put_file(os.path.join(d, name), posixpath.join(path, name))
    return codec


# ---------------------------------------------------------------- latent cache
def training_pixels(data: bytes, max_side: int | None) -> np.ndarray:
    """A training image's RGB pixels, downscaled to `max_side` (training folders are the user's own
    photos, so the cap on pixels is the training one, not the compress job's)."""
    from codec import load_image
    from codec.pixels import TRAINING_MAX_PIXELS, cap_long_side

    return cap_long_side([load_image(bytes(data), max_pixels=TRAINING_MAX_PIXELS).pixels], max_side)[0]


class LatentEncoder:
    """Ray Data actor: image bytes -> float16 latents (the VAE loaded once per actor)."""

    def __init__(self, backbone: str, vae: str | None, use_gpu: bool = False, max_side: int | None = None) -> None:
        import torch

        from codec import load_backbone

        torch.set_num_threads(1)
        self.backbone = load_backbone(backbone, vae, "cuda" if use_gpu else None)
        self.fp = self.backbone.encoder_fingerprint().hex()
        self.max_side = max_side

    def __call__(self, batch: dict) -> dict:
        from codec.pixels import to_unit
        from codec.training import encode_latents

        out = {k: [] for k in ("key", "source_uri", "latent", "channels", "height", "width", "encoder_fingerprint")}
        for key, uri, data in zip(batch["key"], batch["source_uri"], batch["data"]):
            if data is None:
                continue
            try:
                px = training_pixels(data, self.max_side)
            except ValueError:
                continue  # not an image: training skips it, as the compress job would report it
            z = encode_latents(self.backbone, to_unit(px)[None])[0].cpu().numpy().astype("<f2")
            out["key"].append(key)
            out["source_uri"].append(uri)
            out["latent"].append(z.tobytes())
            out["channels"].append(z.shape[0])
            out["height"].append(z.shape[1])
            out["width"].append(z.shape[2])
            out["encoder_fingerprint"].append(self.fp)
        return {k: np.array(v, dtype=object if k in ("key", "source_uri", "latent", "encoder_fingerprint") else np.int32)
                for k, v in out.items()}


def build_latent_cache(data: str, out: str, backbone: str = "tiny", vae: str | None = None, num_actors: int = 1,
                       use_gpu: bool = False, opts: StorageOptions | None = None, max_side: int | None = None) -> int:
    """Encode every image under `data` once with the VAE; write Parquet latents to `out`. Returns rows.

    Runs on the Ray cluster this process is connected to, else on a new local one."""
    import ray

    from .storage import arrow_fs

    init_ray()
    opts = opts or StorageOptions.from_env()
    inputs, _ = list_inputs(data, opts)
    shards = plan_shards(inputs, shard_size=16)
    if not shards:
        raise ValueError(f"no images under '{data}'")
    blobs = [json.dumps(asdict(s)) for s in shards]

    def read(row: dict) -> list[dict]:
        from .sources import Shard

        d = json.loads(row["shard"])
        shard = Shard(d["id"], d["kind"], tuple(d["uris"]), tuple(d["keys"]), d["size"])
        return [{"key": r["key"], "source_uri": r["source_uri"], "data": r["data"]}
                for rows in read_shard(shard, opts) for r in rows]

    ds = ray.data.from_items([{"shard": b} for b in blobs]).flat_map(read)
    ds = ds.map_batches(
        LatentEncoder, fn_constructor_kwargs={"backbone": backbone, "vae": vae, "use_gpu": use_gpu, "max_side": max_side},
        compute=ray.data.ActorPoolStrategy(size=max(1, num_actors)), batch_size=8,
        num_gpus=1 if use_gpu else 0, num_cpus=0.5, batch_format="numpy",
    )
    fs, path = get_fs(out, opts)
    if is_local(fs):
        ds.write_parquet(str(Path(path).resolve()))
    else:
        ds.write_parquet(path, filesystem=arrow_fs(fs))
    n = sum(1 for _ in _iter_cache_keys(out, opts))
    return n


def _iter_cache_keys(cache: str, opts: StorageOptions | None):
    import pyarrow.parquet as pq

    fs, root = get_fs(cache, opts)
    for p in sorted(fs.find(root)):
        if p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                yield from pq.read_table(f, columns=["key"]).column("key").to_pylist()


__all__ = ["TrainJob", "TrainResult", "build_latent_cache", "export", "load_checkpoint_state", "train", "train_loop"]
