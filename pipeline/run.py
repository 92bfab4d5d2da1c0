"""The compress and decompress jobs: plan shards, run read -> actor pool -> commit, resume, stats.

Graph (Ray Data, streaming):

    from_items(one row per pending shard)
      -> map_batches(read_*, tasks, fractional CPU)      source bytes in chunks + a sentinel per shard
      -> map_batches(decode_sources, tasks)               compress, GPU actors: image bytes -> pixels (transform.py)
      -> map_batches(EncodeActor | DecodeActor, ActorPoolStrategy: one actor per GPU, else CPU actors)
      -> map_batches(encode_outputs, tasks)               decompress, GPU actors: pixels -> PNG, written
      -> driver: collect rows per shard; when a shard's sentinel and all its rows are in:
         write part-<shard>.parquet (temp + rename), then _commits/<shard>.json (the commit)

Every stage is a plain callable, and `use_ray=False` runs the same stages inline in this
process (tests, debugging, tiny jobs). A killed job leaves complete files or none; a rerun
skips committed shards and rewrites the rest under the same names, so no key appears twice.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage as st
from .actors import DecodeActor, EncodeActor, normalize_codec
from .schema import (BITSTREAM_SCHEMA, DECODED_SCHEMA, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED,
                     parquet_write_kwargs)
from .sources import Shard, list_inputs, plan_shards, read_shard
from .transform import decode_sources, encode_outputs

READ_SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("data", pa.large_binary()),
                         ("read_error", pa.string()), ("_shard", pa.string()), ("_sentinel", pa.bool_()),
                         ("_shard_n", pa.int64())])
BITSTREAM_READ_COLUMNS = ["key", "bitstream", "bitstream_sha256", "width", "height", "status", "error"]
# Codec options that must match between the runs writing one dataset (else rows would mix codecs).
COMPAT_KEYS = ("backbone", "vae", "entropy", "codec_weights", "t", "target_bpp")
log = logging.getLogger("fcodec")


@dataclass
class JobConfig:
    """Everything a compress/decompress run needs besides credentials (stored in the manifest)."""

    src: str
    dst: str
    codec: dict = field(default_factory=dict)  # see actors.load_codec_from_spec
    shard_size: int = 256  # image files per shard (tar and Parquet inputs: one shard per file)
    rows_per_batch: int = 32  # rows per actor call; Ray costs ~0.3 s per call on 2 CPUs (docs/performance.md)
    workers: int | None = None  # actors; default one per GPU, else half the CPUs
    actor_cpus: float = 1.0  # CPUs reserved per actor (fractional is fine)
    read_cpus: float = 0.5  # CPUs per read task
    gpus: str = "auto"  # auto: one actor per GPU when the cluster has GPUs; off: CPU actors
    retry_failed: bool = False
    max_shards: int | None = None  # stop after this many shards (incremental runs)
    image_column: str | None = None  # Parquet inputs: the image-bytes column
    format: str = "png"  # decompress: png files under DST, or parquet of PNG bytes
    actor_start_timeout_s: int = 900  # all actors must have loaded the codec by then (else: too few resources)
    storage: dict = field(default_factory=dict)  # StorageOptions.public() (no secrets)
    # Image work in Ray tasks beside the actors, overlapping the model (True), or inside the
    # actors (False): compress decodes source images in the read tasks; decompress PNG-encodes
    # and writes in tasks after the actors. None: tasks when the actors have GPUs (the GPU is the
    # bottleneck, CPUs are spare); inside CPU actors (the CPUs are the bottleneck either way, and
    # the extra hop of raw pixels measured no faster: docs/performance.md).
    image_stage: bool | None = None

    def public(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- Ray plumbing
def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join `address` ('auto' = the running cluster) or start a local Ray; True if we started it."""
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline by default; users may opt in
    import ray

    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kw)  # never join a cluster by accident
    return True


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (tqdm, per image) replace Ray's per-operator bars
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def pool_plan(cfg: JobConfig, est_batches: int) -> dict:
    """Actor pool size and per-actor resources for the cluster Ray is connected to."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus >= 1 and cfg.gpus != "off":
        n = cfg.workers or gpus
        return {"size": max(1, min(n, gpus)), "num_gpus": 1, "num_cpus": cfg.actor_cpus, "device": "gpu"}
    n = cfg.workers or max(1, int(cpus // 2))
    n = max(1, min(n, est_batches, int(max(1.0, cpus - cfg.read_cpus) // cfg.actor_cpus) or 1))
    return {"size": n, "num_gpus": None, "num_cpus": cfg.actor_cpus, "device": "cpu"}


@dataclass
class ImageStage:
    """Image work that can run in Ray tasks beside the actors instead of inside them: `pre`
    runs on the read tasks' output (compress: decode images), `post` on the actors' output
    (decompress: PNG-encode and write); `actor_kwargs` tell the actor its share is moved out."""

    pre: Callable | None = None
    post: Callable | None = None
    actor_kwargs: dict = field(default_factory=dict)


def _image_stage_on(cfg: JobConfig, device: str) -> bool:
    """Whether image work runs in tasks beside actors on `device`: as configured, or by default
    only beside GPU actors (JobConfig.image_stage)."""
    return cfg.image_stage if cfg.image_stage is not None else device == "gpu"


def _execute(items: list[dict], read_fn: Callable, actor_cls: type, actor_kwargs: dict, cfg: JobConfig,
             use_ray: bool, est_rows: int, info: dict, stage: ImageStage | None = None) -> Iterator[pa.Table]:
    """Run read [-> pre] -> actor [-> post] over `items` (one per shard); yields the output tables."""
    if not use_ray:
        stage = stage if stage and _image_stage_on(cfg, "inline") else None
        actor = actor_cls(**actor_kwargs, **(stage.actor_kwargs if stage else {}))
        info["pool"] = {"size": 1, "device": "inline", "image_stage": stage is not None}
        pre = stage.pre if stage and stage.pre else (lambda t: t)
        post = stage.post if stage and stage.post else (lambda t: t)
        for item in items:
            for t in read_fn({"work": [item["work"]]}):
                yield post(actor(pre(t)))
        return
    _quiet_ray_data()
    from ray.data import DataContext

    # Start work only once every actor has loaded its codec: the pool shares the work from the
    # first batch on, and a cluster too small for the pool fails with a clear timeout, not a hang.
    DataContext.get_current().wait_for_min_actors_s = cfg.actor_start_timeout_s
    plan = pool_plan(cfg, max(1, -(-est_rows // max(1, cfg.rows_per_batch))) if est_rows else 1 << 30)
    stage = stage if stage and _image_stage_on(cfg, plan["device"]) else None
    plan["image_stage"] = stage is not None
    info["pool"] = plan
    ds = build_dataset(items, read_fn, actor_cls, actor_kwargs, cfg, plan, stage)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def build_dataset(items: list[dict], read_fn: Callable, actor_cls: type, actor_kwargs: dict, cfg: JobConfig,
                  plan: dict, stage: ImageStage | None = None):
    """The Ray Data graph: read [-> pre] tasks -> actor pool [-> post tasks] (lazy; nothing runs yet)."""
    import ray

    spec = dict(actor_kwargs["spec"])
    spec.setdefault("threads", max(1, int(round(plan["num_cpus"]))))
    actor_kwargs = {**actor_kwargs, **(stage.actor_kwargs if stage else {}), "spec": spec}
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Ray fuses map stages whose remote args are equal, a task stage into an actor stage too: equal
    # CPUs would pull the reads into the actors (serial with the model), so keep them apart.
    read_cpus = cfg.read_cpus if plan["num_gpus"] or cfg.read_cpus != plan["num_cpus"] else cfg.read_cpus * 0.99
    ds = ds.map_batches(read_fn, batch_size=1, num_cpus=read_cpus, batch_format="pyarrow")
    if stage and stage.pre:  # image decoding, fused into the read tasks (same remote args)
        ds = ds.map_batches(stage.pre, batch_size=None, num_cpus=read_cpus, batch_format="pyarrow")
    kw = {"num_gpus": plan["num_gpus"]} if plan["num_gpus"] else {}
    ds = ds.map_batches(actor_cls, fn_constructor_kwargs=actor_kwargs, batch_size=cfg.rows_per_batch,
                        compute=ray.data.ActorPoolStrategy(size=plan["size"]), num_cpus=plan["num_cpus"],
                        batch_format="pyarrow", **kw)
    if stage and stage.post:  # tasks never fuse into an upstream actor pool
        ds = ds.map_batches(stage.post, batch_size=None, num_cpus=read_cpus, batch_format="pyarrow")
    return ds


class ShardCollector:
    """Gathers streamed rows per shard; a shard is complete once its sentinel (carrying the row
    count) and that many rows have arrived, in any order."""

    def __init__(self) -> None:
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.count: Counter = Counter()
        self.expected: dict[str, int] = {}
        self.workers: dict[str, dict] = {}

    def add(self, table: pa.Table) -> tuple[list[tuple[str, pa.Table]], int]:
        """Add a batch; returns (completed (shard, rows) pairs, number of real rows added)."""
        sentinel = table.column("_sentinel").fill_null(False).to_pylist()
        for w, loads, is_s in zip(table.column("_worker").to_pylist(), table.column("_loads").to_pylist(), sentinel):
            if w is not None and not is_s:
                d = self.workers.setdefault(w, {"rows": 0, "codec_loads": 0})
                d["rows"] += 1
                d["codec_loads"] = max(d["codec_loads"], loads or 0)
        sent = table.column("_sentinel").fill_null(False)
        for s, n in zip(table.filter(sent).column("_shard").to_pylist(), table.filter(sent).column("_shard_n").to_pylist()):
            self.expected[s] = int(n)
        rows = table.filter(pc.invert(sent))
        touched = set(self.expected) & set(table.column("_shard").to_pylist())
        for s in set(rows.column("_shard").to_pylist()):
            part = rows.filter(pc.equal(rows.column("_shard"), s))
            self.parts[s].append(part)
            self.count[s] += part.num_rows
            touched.add(s)
        done = []
        for s in sorted(touched):
            if s in self.expected and self.count[s] >= self.expected[s]:
                parts = self.parts.pop(s, [])
                done.append((s, pa.concat_tables(parts) if parts else None))
                del self.expected[s]
        return done, rows.num_rows


def steady_rate(arrivals: list[tuple[float, int]], min_arrivals: int = 4) -> float | None:
    """Rows per second after start-up: the rows after the first arrival over the time from it to
    the last (arrivals are (time, rows) pairs). Conservative: the transient right after the first
    output (read tasks' processes starting) stays in. None with too few arrivals to mean anything."""
    if len(arrivals) < min_arrivals:
        return None
    rows = sum(n for _, n in arrivals[1:])
    dt = arrivals[-1][0] - arrivals[0][0]
    return rows / dt if rows and dt > 0 else None


class Throughput:
    """Arrival times of output rows at the driver: start-up latency and steady-state rate.

    Outputs reach the driver a shard at a time (Ray buffers a task's output into blocks), so
    the steady rate (`steady_rate`) needs a few shards to mean anything.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []

    def add(self, n: int) -> None:
        if n:
            self.arrivals.append((time.perf_counter(), n))

    def stats(self) -> dict:
        first = round(self.arrivals[0][0] - self.t0, 3) if self.arrivals else None
        return {"first_output_s": first, "steady_images_per_s": steady_rate(self.arrivals)}


def _commit_stream(tables: Iterator[pa.Table], col: ShardCollector, rate: Throughput, bar, run: dict,
                   failures: list, commit: Callable[[str, pa.Table | None], dict]) -> None:
    """Feed output tables to the collector and `commit` each completed shard, adding the
    commit's per-run counts (its "_run") to `run` and its failures to `failures`."""
    try:
        for table in tables:
            done, n = col.add(table)
            rate.add(n)
            bar.update(n)
            for sid, rows in done:
                got = commit(sid, rows)["_run"]
                for k in run:
                    run[k] += got.get(k, 0) if k != "shards" else 1
                failures.extend(got["failures"])
                bar.set_postfix(ok=run["ok"], failed=run["failed"], shards=run["shards"])
    finally:
        bar.close()


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: a bar on terminals, nothing in logs and pipes
    return tqdm(total=total, desc=desc, unit="img", disable=None if enabled else True, dynamic_ncols=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- compress
def read_sources(batch, opts: st.StorageOptions | None = None, image_column: str | None = None) -> Iterator[pa.Table]:
    """Read stage: for each work item (a JSON shard descriptor) yield its source rows in chunks,
    then one sentinel row carrying the shard's row count."""
    for w in (batch["work"].to_pylist() if isinstance(batch, pa.Table) else list(batch["work"])):
        item = json.loads(w)
        shard = Shard(item["id"], item["kind"], tuple(item["uris"]), tuple(item["keys"]), item.get("size", 0))
        only = set(item["only_keys"]) if item.get("only_keys") is not None else None
        n = 0
        for rows in read_shard(shard, opts, only_keys=only, image_column=image_column):
            n += len(rows)
            yield pa.Table.from_pylist([{**r, "_shard": shard.id, "_sentinel": False} for r in rows], schema=READ_SCHEMA)
        yield pa.Table.from_pylist([{"key": "", "source_uri": "", "_shard": shard.id, "_sentinel": True, "_shard_n": n}],
                                   schema=READ_SCHEMA)


def _shard_stats(shard_id: str, table: pa.Table, extra: dict) -> dict:
    ok = pc.equal(table.column("status"), STATUS_OK)
    okt = table.filter(ok)
    src_bytes = table.column("_source_bytes").fill_null(0) if "_source_bytes" in table.column_names else None
    return {
        "shard": shard_id, "file": st.part_name(shard_id), "rows": table.num_rows, "ok": okt.num_rows,
        "failed": table.num_rows - okt.num_rows,
        "input_bytes": int(pc.sum(src_bytes.filter(ok)).as_py() or 0) if src_bytes is not None else 0,
        "output_bytes": int(pc.sum(okt.column("n_bytes")).as_py() or 0),
        "bpp_sum": float(pc.sum(okt.column("bpp")).as_py() or 0.0),
        "pixels": int(pc.sum(pc.multiply(okt.column("width").cast(pa.int64()), okt.column("height").cast(pa.int64()))).as_py() or 0),
        "codec_fingerprint": okt.column("codec_fingerprint")[0].as_py() if okt.num_rows else None,
        "committed_at": _now(), **extra,
    }


def _totals(shards: dict[str, dict]) -> dict:
    tot = {k: sum(s.get(k, 0) for s in shards.values()) for k in ("rows", "ok", "failed", "skipped", "input_bytes", "output_bytes", "pixels")}
    tot["shards"] = len(shards)
    tot["mean_bpp"] = (sum(s.get("bpp_sum", 0.0) for s in shards.values()) / tot["ok"]) if tot["ok"] else None
    tot["ratio"] = (tot["input_bytes"] / tot["output_bytes"]) if tot["output_bytes"] else None
    return tot


def _check_compatible(committed: dict[str, dict], manifest: dict | None, codec: dict, dst: str) -> None:
    prev = None
    if manifest:
        prev = manifest.get("config", {}).get("codec")
    if prev is None and committed:
        prev = next(iter(committed.values())).get("codec")
    if not prev:
        return
    prev, codec = normalize_codec(prev), normalize_codec(codec)
    diff = {k: (prev.get(k), codec.get(k)) for k in COMPAT_KEYS if prev.get(k) != codec.get(k)}
    if diff:
        desc = ", ".join(f"{k}: dataset {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{dst} already holds shards made with other codec options ({desc}): "
                         f"rerun with the dataset's options or write to a new DST")


def compress(cfg: JobConfig, opts: st.StorageOptions | None = None, use_ray: bool = True,
             progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Compress every input under cfg.src into a bitstream dataset at cfg.dst; returns stats."""
    t0 = time.perf_counter()
    fs, root = st.get_fs(cfg.dst, opts)
    inputs, ignored = list_inputs(cfg.src, opts)
    inside = st.full_url(fs, root).rstrip("/") + "/"
    inputs = [x for x in inputs if not x[1].startswith(inside)]  # DST inside SRC: never read our own output
    if not inputs:
        raise ValueError(f"no images, tar shards or Parquet files under {cfg.src} ({ignored} other files ignored)")
    shards = plan_shards(inputs, cfg.shard_size)
    st.clean_tmp(fs, root)  # leftovers of a killed run are never part of the dataset
    committed = st.committed_shards(fs, root)
    manifest = st.read_manifest(fs, root)
    _check_compatible(committed, manifest, cfg.codec, cfg.dst)

    # Keys committed by shards this plan no longer has (the listing changed): never write them twice.
    planned = {s.id for s in shards}
    stale = [s for sid, s in committed.items() if sid not in planned]
    done_keys: set[str] = set()
    for s in stale:
        with fs.open(st.join(root, s["file"]), "rb") as f:
            done_keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())

    work: list[dict] = []
    for s in shards:
        item = {"id": s.id, "kind": s.kind, "uris": list(s.uris), "keys": list(s.keys), "size": s.size}
        if s.id in committed:
            if not (cfg.retry_failed and committed[s.id].get("failed", 0)):
                continue
            with fs.open(st.join(root, committed[s.id]["file"]), "rb") as f:
                t = pq.read_table(f, columns=["key", "status"])
            item["only_keys"] = t.filter(pc.equal(t.column("status"), STATUS_FAILED)).column("key").to_pylist()
            item["retry"] = True
        elif done_keys and s.kind == "files":
            item["only_keys"] = [k for k in s.keys if k not in done_keys]
        work.append(item)
    if cfg.max_shards is not None:
        work = work[: cfg.max_shards]
    n_skip = len(shards) - len([w for w in work if not w.get("retry")])
    echo(f"{len(inputs)} inputs in {len(shards)} shards ({ignored} other files ignored); "
         f"{len(committed)} shards already committed, {len(work)} to do")

    known = all(w["kind"] == "files" or w.get("only_keys") is not None for w in work)
    est = sum(len(w["only_keys"]) if w.get("only_keys") is not None else len(w["keys"]) for w in work) if known else 0
    info: dict = {}
    run = {"rows": 0, "ok": 0, "failed": 0, "input_bytes": 0, "output_bytes": 0, "bpp_sum": 0.0, "shards": 0}
    failures: list[tuple[str, str]] = []
    col = ShardCollector()
    by_id = {w["id"]: w for w in work}
    items = [{"work": json.dumps(w)} for w in work]
    read_fn = _partial(read_sources, opts=opts, image_column=cfg.image_column)
    stage = ImageStage(pre=_partial(decode_sources, max_pixels=normalize_codec(cfg.codec).get("max_pixels")))
    rate = Throughput()
    tables = _execute(items, read_fn, EncodeActor, {"spec": cfg.codec}, cfg, use_ray, est, info, stage) if work else []
    _commit_stream(tables, col, rate, _progress(est or None, "compress", progress), run, failures,
                   lambda sid, rows: _commit_compressed(fs, root, sid, rows, by_id[sid], committed.get(sid), cfg))
    wall = time.perf_counter() - rate.t0

    committed = st.committed_shards(fs, root)
    tot = _totals(committed)
    run_stats = {"shards": run["shards"], "rows": run["rows"], "ok": run["ok"], "failed": run["failed"],
                 "input_bytes": run["input_bytes"], "output_bytes": run["output_bytes"],
                 "ratio": run["input_bytes"] / run["output_bytes"] if run["output_bytes"] else None,
                 "mean_bpp": run["bpp_sum"] / run["ok"] if run["ok"] else None, "seconds": round(wall, 3),
                 "images_per_s": run["rows"] / wall if wall > 0 and run["rows"] else None, **rate.stats(),
                 "skipped_committed_shards": n_skip, "workers": col.workers, "pool": info.get("pool"),
                 "failures": [{"key": k, "error": e} for k, e in failures[:100]]}
    manifest = {"kind": "foundation-codec bitstream dataset", "format": 1, "columns": BITSTREAM_SCHEMA.names,
                "complete": len(committed) >= len(shards) and all(s.id in committed for s in shards),
                "shards_planned": len(shards), "totals": tot, "config": cfg.public(),
                "codec_fingerprint": next((s.get("codec_fingerprint") for s in committed.values() if s.get("codec_fingerprint")), None),
                "last_run": run_stats, "updated_at": _now()}
    st.write_json_atomic(fs, st.join(root, st.MANIFEST), manifest)
    st.clean_tmp(fs, root)
    _print_summary("compressed", run_stats, tot, failures, cfg.dst, echo)
    run_stats["total_seconds"] = time.perf_counter() - t0
    return {"run": run_stats, "totals": tot, "manifest": manifest}


def _partial(fn, **kw):
    import functools

    return functools.partial(fn, **kw)


def _commit_compressed(fs, root: str, sid: str, rows: pa.Table | None, item: dict, prev: dict | None,
                       cfg: JobConfig) -> dict:
    """Write one shard's Parquet (atomically), then its stats marker: the commit."""
    rows = rows if rows is not None else BITSTREAM_SCHEMA.empty_table()
    new = rows
    if item.get("retry") and prev:
        with fs.open(st.join(root, prev["file"]), "rb") as f:
            old = pq.read_table(f)
        keep = old.filter(pc.invert(pc.is_in(old.column("key"), value_set=pa.array(rows.column("key").to_pylist(), pa.string()))))
        data = pa.concat_tables([keep, rows.select(BITSTREAM_SCHEMA.names).cast(BITSTREAM_SCHEMA)])
    else:
        data = rows.select(BITSTREAM_SCHEMA.names).cast(BITSTREAM_SCHEMA)
    data = data.sort_by("key")
    st.write_parquet_atomic(fs, root, st.part_name(sid), data, **parquet_write_kwargs(data))
    run = _shard_stats(sid, new, {}) if new.num_rows else _shard_stats(sid, BITSTREAM_SCHEMA.empty_table(), {})
    stats = _shard_stats(sid, data, {"kind": item["kind"], "sources": item["keys"] if item["kind"] != "files" else None,
                                      "codec": cfg.codec})
    # Source bytes are not a dataset column: carry the total over from the previous commit on retries.
    stats["input_bytes"] = run["input_bytes"] + ((prev or {}).get("input_bytes", 0) if item.get("retry") else 0)
    st.write_json_atomic(fs, st.marker_path(root, sid), stats)
    fails = new.filter(pc.equal(new.column("status"), STATUS_FAILED)) if new.num_rows else new
    run["failures"] = list(zip(fails.column("key").to_pylist(), fails.column("error").to_pylist())) if new.num_rows else []
    stats["_run"] = run
    return stats


def _print_summary(verb: str, run: dict, tot: dict, failures: list, dst: str, echo) -> None:
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    ratio = f", ratio {run['ratio']:.1f}:1" if run.get("ratio") else ""
    bpp = f", mean bpp {run['mean_bpp']:.4f}" if run.get("mean_bpp") is not None else ""
    ips = f"{run['images_per_s']:.1f}" if run.get("images_per_s") else "-"
    steady = (f"; start-up {run['first_output_s']:.1f} s, then {run['steady_images_per_s']:.1f} images/s"
              if run.get("steady_images_per_s") else "")
    echo(f"{verb} {run['rows']} images: {run['ok']} ok, {run['failed']} failed"
         + (f", {run['skipped']} skipped" if run.get("skipped") else "")
         + f"; input {mb(run['input_bytes'])}, output {mb(run['output_bytes'])}{ratio}{bpp}, "
         f"{ips} images/s ({run['seconds']:.1f} s{steady}) -> {dst}")
    echo(f"dataset: {tot['shards']} shards, {tot['rows']} rows ({tot['ok']} ok, {tot['failed']} failed"
         + (f", {tot['skipped']} skipped)" if tot.get("skipped") else ")"))
    for k, e in failures[:5]:
        echo(f"  failed: {k}: {e}")
    if len(failures) > 5:
        echo(f"  ... {len(failures) - 5} more failures (status = 'failed' rows; --retry-failed redoes them)")


# ---------------------------------------------------------------- decompress
def read_bitstreams(batch, opts: st.StorageOptions | None = None, chunk_rows: int = 64) -> Iterator[pa.Table]:
    """Read stage of decompress: a committed shard's rows (+ one sentinel), in chunks."""
    from .actors import INTERNAL

    schema = pa.schema([BITSTREAM_SCHEMA.field(c) for c in BITSTREAM_READ_COLUMNS] +
                       [pa.field(n, t) for n, t in INTERNAL if n in ("_shard", "_sentinel", "_shard_n")])
    for w in (batch["work"].to_pylist() if isinstance(batch, pa.Table) else list(batch["work"])):
        item = json.loads(w)
        only = set(item["only_keys"]) if item.get("only_keys") is not None else None
        fs, path = st.get_fs(item["url"], opts)
        n = 0
        with fs.open(path, "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows, columns=BITSTREAM_READ_COLUMNS):
                t = pa.Table.from_batches([rb])
                if only is not None:
                    t = t.filter(pc.is_in(t.column("key"), value_set=pa.array(sorted(only), pa.string())))
                if t.num_rows == 0:
                    continue
                n += t.num_rows
                t = t.append_column("_shard", pa.array([item["id"]] * t.num_rows, pa.string()))
                t = t.append_column("_sentinel", pa.array([False] * t.num_rows))
                t = t.append_column("_shard_n", pa.array([None] * t.num_rows, pa.int64()))
                yield t.cast(schema)
        yield pa.Table.from_pylist([{"key": "", "status": "", "_shard": item["id"], "_sentinel": True, "_shard_n": n}],
                                   schema=schema)


def decompress(cfg: JobConfig, opts: st.StorageOptions | None = None, use_ray: bool = True,
               progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Decode a bitstream dataset at cfg.src to PNGs under cfg.dst (or Parquet with cfg.format)."""
    if cfg.format not in ("png", "parquet"):
        raise ValueError(f"unknown output format {cfg.format!r} (png or parquet)")
    sfs, sroot = st.get_fs(cfg.src, opts)
    dfs, droot = st.get_fs(cfg.dst, opts)
    src_shards = st.committed_shards(sfs, sroot)
    if not src_shards:
        raise ValueError(f"{cfg.src} has no committed shards (_commits/*.json): is it a `fcodec compress` output?")
    src_manifest = st.read_manifest(sfs, sroot)
    if src_manifest:
        prev = src_manifest.get("config", {}).get("codec", {})
        prev, now = normalize_codec(prev), normalize_codec(cfg.codec)
        diff = [k for k in ("backbone", "vae", "entropy", "codec_weights") if prev.get(k) != now.get(k)]
        if diff:
            echo("warning: the dataset was compressed with " + ", ".join(f"--{k.replace('_', '-')} {prev.get(k)}" for k in diff)
                 + "; decoding needs the same options")
    done = st.committed_shards(dfs, droot)
    work = []
    for sid, s in sorted(src_shards.items()):
        item = {"id": sid, "url": st.full_url(sfs, st.join(sroot, s["file"]))}
        if sid in done:
            if not (cfg.retry_failed and done[sid].get("failed", 0)):
                continue
            item["only_keys"] = [f["key"] for f in done[sid].get("failures", [])]
            item["retry"] = True
        work.append(item)
    if cfg.max_shards is not None:
        work = work[: cfg.max_shards]
    est = sum(src_shards[w["id"]].get("rows", 0) if not w.get("retry") else len(w["only_keys"]) for w in work)
    echo(f"{len(src_shards)} shards in {cfg.src}; {len(done)} already decoded, {len(work)} to do")

    info: dict = {}
    out_url = cfg.dst if cfg.format == "png" else None
    kwargs = {"spec": cfg.codec, "out_url": out_url, "opts": opts}
    stage = ImageStage(post=_partial(encode_outputs, out_url=out_url, opts=opts), actor_kwargs={"emit_pixels": True})
    run = {"rows": 0, "ok": 0, "failed": 0, "skipped": 0, "input_bytes": 0, "output_bytes": 0, "shards": 0}
    failures: list[tuple[str, str]] = []
    col = ShardCollector()
    by_id = {w["id"]: w for w in work}
    items = [{"work": json.dumps(w)} for w in work]
    rate = Throughput()
    tables = _execute(items, _partial(read_bitstreams, opts=opts), DecodeActor, kwargs, cfg, use_ray, est, info, stage) if work else []
    _commit_stream(tables, col, rate, _progress(est or None, "decompress", progress), run, failures,
                   lambda sid, rows: _commit_decoded(dfs, droot, sid, rows, by_id[sid], done.get(sid), src_shards[sid], cfg))
    wall = time.perf_counter() - rate.t0
    done = st.committed_shards(dfs, droot)
    tot = _totals(done)
    run_stats = {**run, "seconds": round(wall, 3), "images_per_s": run["rows"] / wall if wall > 0 and run["rows"] else None,
                 **rate.stats(), "ratio": None, "mean_bpp": None, "workers": col.workers, "pool": info.get("pool"),
                 "failures": [{"key": k, "error": e} for k, e in failures[:100]]}
    manifest = {"kind": "foundation-codec decoded dataset", "format": cfg.format, "source": cfg.src,
                "complete": all(sid in done for sid in src_shards), "totals": tot, "config": cfg.public(),
                "last_run": run_stats, "updated_at": _now()}
    st.write_json_atomic(dfs, st.join(droot, st.MANIFEST), manifest)
    st.clean_tmp(dfs, droot)
    _print_summary("decompressed", run_stats, tot, failures, cfg.dst, echo)
    return {"run": run_stats, "totals": tot, "manifest": manifest}


def _commit_decoded(fs, root: str, sid: str, rows: pa.Table | None, item: dict, prev: dict | None,
                    src_stats: dict, cfg: JobConfig) -> dict:
    rows = rows if rows is not None else DECODED_SCHEMA.empty_table()
    status = rows.column("status").to_pylist()
    keys, errors = rows.column("key").to_pylist(), rows.column("error").to_pylist()
    fails = [(k, e) for k, s, e in zip(keys, status, errors) if s == STATUS_FAILED]
    out_bytes = int(pc.sum(rows.column("_out_bytes").fill_null(0)).as_py() or 0) if rows.num_rows else 0
    in_bytes = int(pc.sum(rows.column("_source_bytes").fill_null(0)).as_py() or 0) if rows.num_rows else 0
    run = {"rows": len(status), "ok": status.count(STATUS_OK), "failed": len(fails), "skipped": status.count(STATUS_SKIPPED),
           "output_bytes": out_bytes, "input_bytes": in_bytes, "failures": fails}
    if item.get("retry") and prev:
        retried = set(keys)
        old_fail = [f for f in prev.get("failures", []) if f["key"] not in retried]
        stats = {**prev, "ok": prev["ok"] + run["ok"], "failed": len(old_fail) + len(fails),
                 "output_bytes": prev.get("output_bytes", 0) + out_bytes,
                 "failures": old_fail + [{"key": k, "error": e} for k, e in fails], "committed_at": _now()}
    else:
        stats = {"shard": sid, "source_file": src_stats.get("file"), "rows": run["rows"], "ok": run["ok"],
                 "failed": run["failed"], "skipped": run["skipped"], "output_bytes": out_bytes,
                 "failures": [{"key": k, "error": e} for k, e in fails], "committed_at": _now()}
    if cfg.format == "parquet":
        data = rows.select(DECODED_SCHEMA.names).cast(DECODED_SCHEMA)
        if item.get("retry") and prev:
            with fs.open(st.join(root, st.part_name(sid)), "rb") as f:
                old = pq.read_table(f)
            keep = old.filter(pc.invert(pc.is_in(old.column("key"), value_set=pa.array(data.column("key").to_pylist(), pa.string()))))
            data = pa.concat_tables([keep, data])
        data = data.sort_by("key")
        st.write_parquet_atomic(fs, root, st.part_name(sid), data, **parquet_write_kwargs(data))
        stats["file"] = st.part_name(sid)
    st.write_json_atomic(fs, st.marker_path(root, sid), stats)
    stats["_run"] = run
    return stats
