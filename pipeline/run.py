"""The compress and decompress jobs: lease -> reconcile -> plan -> shard workers -> commit.

    DST lease (one writer)            lease.py
    reconcile leftovers of a kill     here: orphan parts adopted if valid, else removed; temps removed
    plan from the key index           plan.py: new keys -> new shards; changed/vanished per --mode
    one call per shard on a pool of shard-worker actors (dispatch.py, workers.py), which
        read, encode and write `part-<shard>.parquet` themselves and return the commit record
    driver: append each record to the commit log, drop superseded parts; compact; manifest last

The driver never holds bitstream bytes: only one small record per shard passes through it.
`use_ray=False` runs the same workers inline in this process (tests, debugging, tiny jobs).
Ray is started (through `start_ray`) only when there is work to do.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

from codec.spec import CodecSpec, backbone_origin

from . import layout as L
from .catalog import Books, Catalog, dataset_codec, fold, part_record
from .dedupe import Claims
from .dispatch import run_pool
from .lease import acquire
from .plan import file_sha256, plan_compress, plan_decompress
from .raystart import actor_pool_args
from .schema import BITSTREAM_SCHEMA
from .sources import list_entries_sorted
from .storage import StorageOptions, clear_errors, full_url, get_fs, is_local, join
from .workers import Progress, ShardDecoder, ShardEncoder

log = logging.getLogger("fcodec")


@dataclass
class JobConfig:
    """Everything a compress/decompress run needs besides credentials (stored in the manifest)."""

    src: str
    dst: str
    codec: dict = field(default_factory=dict)  # CodecSpec fields given for this run (None = the dataset's / default)
    shard_size: int = 256  # image files per new shard (tar and Parquet inputs: one shard per file)
    mode: str = "extend"  # what to do about changed / vanished sources (plan.py)
    rows_per_batch: int = 32  # images a worker reads and decodes ahead per chunk
    workers: int | None = None  # actors; default one per GPU, else half the CPUs
    actor_cpus: float = 1.0  # CPUs reserved per actor (its I/O threads included)
    io_threads: int = 4  # threads per actor reading, decoding and writing images
    gpus: str = "auto"  # auto: one actor per GPU the cluster has now; N: N GPU actors (an autoscaler adds nodes); off
    retry_failed: bool = False
    max_shards: int | None = None  # stop after this many shards (incremental runs)
    image_column: str | None = None  # Parquet inputs: the image-bytes column
    format: str = "files"  # decompress: image files under DST | webdataset tar shards | parquet (png = files)
    image_format: str = "png"  # decompress: png | webp | jpg
    keep_columns: list[str] | None = None  # compress, Parquet inputs: the columns carried over (None: all)
    dedupe: bool = False  # compress: one bitstream per distinct source sha256 (later rows refer to the first)
    actor_start_timeout_s: int = 900  # the pool's minimum must have loaded the codec by then (else: too few resources)
    lease_ttl_s: float = 600.0
    storage: dict = field(default_factory=dict)  # StorageOptions.public() (no secrets)

    def public(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sortable and unique: UTC time + 4 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:4]


# ---------------------------------------------------------------- progress
def steady_rate(arrivals: list[tuple[float, int]], min_arrivals: int = 4) -> float | None:
    """Rows per second after start-up: the rows after the first arrival over the time from it to
    the last (arrivals are (time, rows) pairs). None with too few arrivals to mean anything."""
    if len(arrivals) < min_arrivals:
        return None
    rows = sum(n for _, n in arrivals[1:])
    dt = arrivals[-1][0] - arrivals[0][0]
    return rows / dt if rows and dt > 0 else None


class Throughput:
    """Arrival times of finished shards at the driver: start-up latency and steady-state rate."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []

    def add(self, n: int) -> None:
        if n:
            self.arrivals.append((time.perf_counter(), n))

    def stats(self) -> dict:
        first = round(self.arrivals[0][0] - self.t0, 3) if self.arrivals else None
        return {"first_output_s": first, "steady_images_per_s": steady_rate(self.arrivals)}


class ProgressBar:
    """A per-image bar on terminals; a progress line every `every_s` seconds in logs."""

    def __init__(self, total: int | None, desc: str, enabled: bool, echo: Callable[[str], None],
                 every_s: float = 10.0) -> None:
        self.total, self.desc, self.echo, self.every_s = total, desc, echo, every_s
        self.n, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        self.lock = threading.Lock()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
        self.enabled = enabled

    def set(self, n: int) -> None:
        with self.lock:
            if n <= self.n:
                return
            if self.bar is not None:
                self.bar.update(n - self.n)
            self.n = n
            t = time.perf_counter()
            if self.enabled and self.bar is None and t - self.last >= self.every_s:
                self.last = t
                of = f"/{self.total}" if self.total else ""
                self.echo(f"{self.desc}: {self.n}{of} images, {self.n / (t - self.t0):.1f} images/s")

    @property
    def refresh_s(self) -> float | None:
        """How often the count is worth fetching: None when nothing is shown."""
        if not self.enabled:
            return None
        return 0.5 if self.bar is not None else self.every_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- running the workers
def pool_plan(cfg: JobConfig, n_items: int) -> dict:
    """Actor pool bounds and per-actor resources for the cluster Ray is connected to."""
    import ray

    res = ray.cluster_resources()
    gpus_now, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if cfg.gpus not in ("auto", "off"):
        n = int(cfg.gpus)  # asked for: request them even if the nodes are still to come (autoscaler)
        return {"min_size": 1, "max_size": max(1, n), "num_gpus": 1, "num_cpus": cfg.actor_cpus, "device": "gpu"}
    if gpus_now >= 1 and cfg.gpus == "auto":
        n = min(cfg.workers or gpus_now, gpus_now)
        return {"min_size": n, "max_size": n, "num_gpus": 1, "num_cpus": cfg.actor_cpus, "device": "gpu"}
    n = cfg.workers or max(1, int(cpus // 2))
    n = max(1, min(n, n_items, int(max(1.0, cpus) // cfg.actor_cpus) or 1))
    return {"min_size": n, "max_size": n, "num_gpus": None, "num_cpus": cfg.actor_cpus, "device": "cpu"}


def run_workers(items: list[dict], worker_cls: type, kwargs: dict, cfg: JobConfig, use_ray: bool,
                start_ray: Callable[[], None] | None, on_record: Callable[[L.CommitRecord], None],
                bar: ProgressBar, info: dict, shared: dict | None = None) -> None:
    """Run one worker call per item (inline or on a Ray actor pool); hand each record to on_record.
    `shared` objects (e.g. dedupe.Claims) are passed to every worker: as they are inline, as one
    tiny Ray actor each on Ray."""
    if not use_ray:
        kwargs = {**kwargs, **(shared or {})}
        done = [0]

        def count(n: int) -> None:
            done[0] += n
            bar.set(done[0])

        w = worker_cls(**kwargs, progress=count)
        info["pool"] = {"size": 1, "device": "inline"}
        for item in items:
            on_record(w.run(item))
        return
    if start_ray:
        start_ray()
    import ray

    plan = pool_plan(cfg, len(items))
    info["pool"] = plan
    # Bookkeeping actors live on the driver's node: if it goes, the job goes anyway, and a lost
    # worker node never takes them along.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    small = ray.remote(num_cpus=0, scheduling_strategy=here)
    # each shared object becomes one named actor, built from the same constructor arguments;
    # the workers look them up by name (dispatch.ShardWorker)
    prefix = f"fcodec-{uuid.uuid4().hex[:12]}-"
    objs = {"progress": Progress(), **(shared or {})}
    handles = {k: small(type(v)).options(name=prefix + k).remote(*v.init_args()) for k, v in objs.items()}
    counter = handles["progress"]

    def poll() -> None:
        try:
            bar.set(ray.get(counter.total.remote(), timeout=5))
        except Exception:  # noqa: BLE001 - the bar is best effort
            pass

    remote_args = {"num_cpus": plan["num_cpus"], **({"num_gpus": plan["num_gpus"]} if plan["num_gpus"] else {}),
                   **actor_pool_args()}
    try:
        run_pool(items, worker_cls, kwargs, min_size=plan["min_size"], max_size=plan["max_size"],
                 remote_args=remote_args, start_timeout_s=cfg.actor_start_timeout_s, on_result=on_record,
                 poll=poll, poll_s=bar.refresh_s, named={k: prefix + k for k in handles})
    finally:
        poll()
        for h in handles.values():
            ray.kill(h, no_restart=True)


# ---------------------------------------------------------------- books
@contextlib.contextmanager
def writing(fs, root: str, ttl_s: float) -> Iterator[tuple[Books, Catalog, str]]:
    """Hold the dataset's lease; yields its books, their state (layout-1 books moved to layout
    2 first) and a new run id."""
    with acquire(fs, root, ttl_s):
        books = Books(fs, root)
        cat = books.read()
        if cat.layout == 1:
            books.migrate_v1(cat)
        yield books, cat, new_run_id()


def reconcile(books: Books, cat: Catalog, echo: Callable[[str], None]) -> dict:
    """Settle what a killed run left: temp files removed; a part without a commit record is
    adopted when its embedded record is valid and none of its keys live in another shard, else
    removed; parts of superseded shards removed. Returns counts."""
    out = {"temp_files": books.clean_tmp(), "adopted": 0, "removed": 0}
    live_entries = None  # entry -> shard, built only when a part without a record is found
    for name in books.part_files():
        sid = L.shard_of_part(name)
        if sid in cat.shards:
            continue
        path = books.path(name)
        rec = part_record(books.fs, path)
        if live_entries is None and rec is not None:
            live_entries = cat.entry_shards()
        ok = (rec is not None and rec.shard == sid and rec.file == name and
              all(s in cat.shards for s in rec.supersedes) and all(d in cat.shards for d in rec.depends_on) and
              all(live_entries.get(e.entry) in (None, *rec.supersedes) for e in rec.entries))
        if ok:
            books.commit(rec)
            fold(cat, [rec])
            live_entries = cat.entry_shards()
            out["adopted"] += 1
        else:
            books.remove([path])
            out["removed"] += 1
    if out["adopted"] or out["removed"]:
        echo(f"reconciled {books.root}: {out['adopted']} uncommitted part(s) adopted, {out['removed']} removed")
    return out


def _check_backbone_reachable(spec: CodecSpec, m: L.Manifest | None) -> None:
    """A dataset written with a local backbone folder that is not there now: say what it was,
    before any row is attempted."""
    import os

    if m is None or spec.baseline or not m.backbone.get("folder"):
        return
    from codec.registry import lookup

    name = spec.resolved_backbone()
    if not os.path.isdir(name) and lookup(name) is None:
        fp = (m.codec_fingerprint or "")[:16]
        raise ValueError(f"the dataset was written with the backbone folder '{m.backbone['folder']}' "
                         f"({m.backbone.get('name')}, fingerprint {fp}), which is not there now: pass --backbone DIR "
                         f"with that folder")


def _manifest(kind: str, cat: Catalog, spec: CodecSpec, cfg: JobConfig, run: dict, fingerprint: str | None,
              **extra) -> L.Manifest:
    from codec.version import CODEC_VERSION

    prev = cat.manifest
    return L.Manifest(kind=kind, codec=spec.to_dict(), backbone=backbone_origin(spec) if not spec.baseline else {},
                      codec_fingerprint=fingerprint or (prev.codec_fingerprint if prev else None),
                      software_version=CODEC_VERSION, created_at=(prev.created_at if prev and prev.created_at else _now()),
                      updated_at=_now(), totals=cat.totals(), config=cfg.public(), last_run=run,
                      columns=BITSTREAM_SCHEMA.names if kind == L.BITSTREAM_KIND else [], **extra)


def driver_memory_pool() -> None:
    """The driver's Arrow buffers come from the system allocator. Its bookkeeping allocates and
    frees many short-lived batches (listing runs, index merges, compaction); Arrow's default
    pool (mimalloc) kept the freed pages: a 200k-key compaction grew RSS by ~44 MB against ~18 MB
    with the system pool, and a 16-GPU simulated run's peak at 10x the inputs grew +30% against
    +18% (docs/performance.md). Allocation speed does not matter on the driver."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


# ---------------------------------------------------------------- compress
def compress(cfg: JobConfig, opts: StorageOptions | None = None, use_ray: bool = True, progress: bool = True,
             echo: Callable[[str], None] = print, start_ray: Callable[[], None] | None = None) -> dict:
    """Compress every input under cfg.src into the bitstream dataset at cfg.dst; returns stats."""
    t0 = time.perf_counter()
    driver_memory_pool()
    fs, root = get_fs(cfg.dst, opts)
    # sorted runs on local disk, streamed into the plan; DST inside SRC: never read our own output
    listing, ignored = list_entries_sorted(cfg.src, opts, exclude_prefix=full_url(fs, root).rstrip("/") + "/")
    if not listing.num_rows:
        listing.close()
        raise ValueError(f"no images, tar shards or Parquet files under {cfg.src} ({ignored} other files ignored)")
    with listing, writing(fs, root, cfg.lease_ttl_s) as (books, cat, run_id):
        recon = reconcile(books, cat, echo)
        spec = dataset_codec(cat.manifest, CodecSpec.from_dict(cfg.codec), cfg.dst)
        if cat.manifest and cat.manifest.kind != L.BITSTREAM_KIND:
            raise ValueError(f"{cfg.dst} holds a {cat.manifest.kind}, not a bitstream dataset")
        plan = plan_compress(listing.sorted(), cat, cfg.shard_size, run_id, cfg.mode, cfg.retry_failed,
                             cfg.max_shards, hasher=lambda url: file_sha256(url, opts))
        listing.close()  # the plan holds what the run needs
        f = plan.found
        echo(f"{f['listed']} inputs ({ignored} other files ignored): {f['new']} new, {f['changed']} changed, "
             f"{f['vanished']} vanished, {f['unchanged']} unchanged (mode {cfg.mode}); "
             f"{len(cat.shards)} shards committed, {len(plan.work)} to do")
        stats = _Run()
        for rec in plan.records:  # settled without a worker (rows dropped, new change tokens)
            _commit(books, cat, rec, stats)
        for w in plan.work:  # a rewritten shard keeps the references of the rows it carries
            if w.get("supersedes"):
                w["carry_depends_on"] = sorted({d for s in w["supersedes"] if s in cat.shards
                                                for d in cat.shards[s].depends_on})
        _write_new_files(books, plan, run_id)
        bar = ProgressBar(plan.n_images, "compress", progress, echo)
        kwargs = {"spec": spec.to_dict(), "dst": cfg.dst, "opts": opts, "image_column": cfg.image_column,
                  "run_id": run_id, "io_threads": cfg.io_threads, "keep_columns": cfg.keep_columns,
                  "dedupe": cfg.dedupe}
        info: dict = {}
        rate = Throughput()
        gate = _Gate(lambda rec: (_commit(books, cat, rec, stats), rate.add(rec.rows)), cat)
        shared = {"claims": Claims(_owners(books, cat) if cfg.dedupe else None)}
        try:
            if plan.work:
                run_workers(plan.work, ShardEncoder, kwargs, cfg, use_ray, start_ray, gate.add, bar, info, shared)
                gate.finish()
        finally:
            bar.close()
        wall = time.perf_counter() - rate.t0
        books.compact(cat)
        run = stats.summary(wall, rate, info, plan.found, recon)
        fp = stats.fingerprint or (cat.manifest.codec_fingerprint if cat.manifest else None)
        manifest = _manifest(L.BITSTREAM_KIND, cat, spec, cfg, run, fp,
                             complete=plan.found["planned_shards"] == len(plan.work) == run["shards"] - len(plan.records),
                             integrity=_sign_books(books, cat))
        books.write_manifest(manifest)
        books.clean_tmp()
    tot = cat.totals()
    print_summary("compressed", run, tot, stats.failures, cfg.dst, echo)
    run["total_seconds"] = time.perf_counter() - t0
    return {"run": run, "totals": tot, "manifest": manifest.to_dict()}


def _write_new_files(books: Books, plan, run_id: str) -> None:
    """Write the plan's new files beside the books (one row group per shard; the temp folder,
    removed at the end of the run and by the next run) and name the file in the items that read
    it, so work items stay a few hundred bytes however many keys a shard has."""
    try:
        if not any(w.get("new_rows") for w in plan.work):
            return
        rel = f"{L.TMP}/new-files-{run_id}.parquet"
        if is_local(books.fs):
            books.fs.makedirs(books.path(L.TMP), exist_ok=True)
        clear_errors(lambda: books.fs.put_file(plan.new_files, books.path(rel)),
                     f"write {full_url(books.fs, books.path(rel))}")
        for w in plan.work:
            if w.get("new_rows"):
                w["listing"] = rel
    finally:
        plan.close()  # the workers read it from the books' temp folder; the driver keeps only the counts


class _Gate:
    """Commits records as they arrive, except one whose references point into shards not yet
    committed (--dedupe): it waits for them. At the end of a run every waiting record whose
    shards all arrived is committed (references may go both ways between shards of one run)."""

    def __init__(self, commit: Callable[[L.CommitRecord], None], cat: Catalog) -> None:
        self.commit, self.cat, self.waiting = commit, cat, []

    def add(self, rec: L.CommitRecord) -> None:
        if all(d in self.cat.shards for d in rec.depends_on):
            self.commit(rec)
            self._flush(set())
        else:
            self.waiting.append(rec)

    def _flush(self, also: set[str]) -> None:
        progress = True
        while progress and self.waiting:
            progress = False
            for rec in list(self.waiting):
                if all(d in self.cat.shards or d in also for d in rec.depends_on):
                    self.waiting.remove(rec)
                    self.commit(rec)
                    progress = True

    def finish(self) -> None:
        arrived = {r.shard for r in self.waiting}
        while True:  # drop records that wait on a shard that never arrived, then commit the rest
            bad = [r for r in self.waiting if not all(d in self.cat.shards or d in arrived for d in r.depends_on)]
            if not bad:
                break
            for r in bad:
                self.waiting.remove(r)
                arrived.discard(r.shard)
        self._flush(arrived)


def _owners(books: Books, cat: Catalog) -> dict[str, tuple[str, str]]:
    """sha256 -> (key, shard) of every stored bitstream in the dataset (what --dedupe refers to)."""
    out: dict[str, tuple[str, str]] = {}
    for sid, rec in sorted(cat.shards.items()):
        if not rec.file:
            continue
        t = books.read_columns(books.path(rec.file))
        refs = t.column("ref_key").to_pylist() if "ref_key" in t.column_names else [None] * t.num_rows
        for key, sha, st, ref, bs in zip(t.column("key").to_pylist(), t.column("source_sha256").to_pylist(),
                                          t.column("status").to_pylist(), refs, t.column("n_bytes").to_pylist()):
            if sha and st == "ok" and ref is None and bs:
                out.setdefault(sha, (key, sid))
    return out


def _sign_books(books: Books, cat: Catalog) -> dict:
    """With an HMAC key in the environment: the books signature over every live part (file, rows,
    sha256 of its bytes), so rows or shards deleted with the books fixed are caught by verify."""
    from .integrity import ALGORITHM, file_sha256, load_key, sign_books

    key = load_key()
    if key is None:
        return {}
    parts = []
    for rec in sorted(cat.shards.values(), key=lambda r: r.shard):
        if not rec.file:
            continue
        if not rec.part_sha256:  # a part written before (or adopted): hash it now
            with books.fs.open(books.path(rec.file), "rb") as f:
                rec.part_sha256 = file_sha256(f)
        parts.append({"file": rec.file, "rows": rec.rows, "checksum": rec.part_sha256})
    return {"algorithm": ALGORITHM, "books_hmac": sign_books(key, parts)}


class _Run:
    """This run's counts, accumulated from the commit records as they arrive."""

    def __init__(self) -> None:
        self.c = {"shards": 0, "rows": 0, "ok": 0, "failed": 0, "skipped": 0, "input_bytes": 0, "output_bytes": 0}
        self.bpp_sum = 0.0
        self.failures: list[tuple[str, str]] = []
        self.errors: dict[str, int] = {}
        self.workers: dict[str, dict] = {}
        self.fingerprint: str | None = None
        self.duplicates = self.refs = 0

    def add(self, rec: L.CommitRecord, new_rows: int | None = None) -> None:
        self.c["shards"] += 1
        for k in ("rows", "ok", "failed", "skipped", "input_bytes", "output_bytes"):
            self.c[k] += getattr(rec, k)
        self.bpp_sum += rec.bpp_sum
        self.duplicates += rec.duplicates
        self.refs += rec.refs
        # a sample for the summary, not every failed key: a run where millions fail stays small
        self.failures.extend((f["key"], f.get("error")) for f in rec.failures[:max(0, 100 - len(self.failures))])
        for k, v in rec.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        if rec.writer:
            w = self.workers.setdefault(rec.writer, {"shards": 0, "rows": 0})
            w["shards"] += 1
            w["rows"] += rec.rows
        self.fingerprint = self.fingerprint or rec.codec_fingerprint

    def summary(self, wall: float, rate: Throughput, info: dict, found: dict, recon: dict) -> dict:
        c = self.c
        return {**c, "ratio": c["input_bytes"] / c["output_bytes"] if c["output_bytes"] else None,
                "mean_bpp": self.bpp_sum / c["ok"] if c["ok"] else None, "seconds": round(wall, 3),
                "images_per_s": c["rows"] / wall if wall > 0 and c["rows"] else None, **rate.stats(),
                "found": found, "reconciled": recon, "errors": dict(sorted(self.errors.items())),
                "duplicates": self.duplicates, "references": self.refs,
                "bytes_saved": round(self.refs * c["output_bytes"] / max(1, c["ok"] - self.refs)) if self.refs else 0,
                "workers": self.workers, "pool": info.get("pool"),
                "failures": [{"key": k, "error": e} for k, e in self.failures[:100]]}


def _commit(books: Books, cat: Catalog, rec: L.CommitRecord, stats: _Run) -> None:
    """Append a record to the commit log, fold it, then remove the parts it superseded. Shards
    whose references pointed into a superseded shard now point to its successor."""
    books.commit(rec)
    gone = [cat.shards[s].file for s in rec.supersedes if s in cat.shards and cat.shards[s].file]
    fold(cat, [rec])
    cat.loose.append(books.path(f"{L.COMMITS}/{rec.shard}.json"))
    if rec.supersedes:
        old = set(rec.supersedes)
        for t in [t for t in cat.shards.values() if t.shard != rec.shard and old & set(t.depends_on)]:
            ents = cat.rows_of_shards([t.shard]).drop_columns(["shard"])
            moved = L.CommitRecord.from_dict({**t.to_dict(), "committed_at": _now_us(), "entries": ents.to_pylist(),
                                              "depends_on": sorted((set(t.depends_on) - old) | {rec.shard})})
            books.commit(moved)
            fold(cat, [moved])
    books.remove([books.path(f) for f in gone if f != rec.file])
    stats.add(rec)


def _now_us() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def print_summary(verb: str, run: dict, tot: dict, failures: list, dst: str, echo) -> None:
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
    if run.get("errors"):
        echo("errors: " + ", ".join(f"{k}: {v}" for k, v in run["errors"].items()))
    if run.get("references"):
        echo(f"duplicates: {run['duplicates']} exact duplicates, {run['references']} stored as references "
             f"(about {mb(run['bytes_saved'])} of bitstreams not stored)")
    elif run.get("duplicates"):
        echo(f"duplicates: {run['duplicates']} exact duplicates found, stored as they are (--dedupe stores each once)")
    for k, e in failures[:5]:
        echo(f"  failed: {k}: {e}")
    more = max(len(failures), run.get("failed") or 0) - min(5, len(failures))
    if more > 0:
        echo(f"  ... {more} more failures (status = 'failed' rows; --retry-failed redoes them)")


# ---------------------------------------------------------------- decompress
def decompress(cfg: JobConfig, opts: StorageOptions | None = None, use_ray: bool = True, progress: bool = True,
               echo: Callable[[str], None] = print, start_ray: Callable[[], None] | None = None) -> dict:
    """Decode the bitstream dataset at cfg.src to PNGs under cfg.dst (or Parquet with cfg.format),
    with the codec the dataset names (options given in cfg.codec must agree with it)."""
    driver_memory_pool()
    from .rows import IMAGE_FORMATS
    from .workers import OUTPUT_FORMATS

    if cfg.format not in (*OUTPUT_FORMATS, "png"):
        raise ValueError(f"unknown output format {cfg.format!r} (choose {', '.join(OUTPUT_FORMATS)})")
    if cfg.image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {cfg.image_format!r} (choose {', '.join(IMAGE_FORMATS)})")
    sfs, sroot = get_fs(cfg.src, opts)
    dfs, droot = get_fs(cfg.dst, opts)
    source = Books(sfs, sroot).read()
    if not source.shards:
        raise ValueError(f"{cfg.src} has no committed shards: is it a `fcodec compress` output?")
    spec = dataset_codec(source.manifest, CodecSpec.from_dict(cfg.codec), cfg.src)
    _check_backbone_reachable(spec, source.manifest)
    expect = source.manifest.codec_fingerprint if source.manifest else None
    with writing(dfs, droot, cfg.lease_ttl_s) as (books, cat, run_id):
        recon = {"temp_files": books.clean_tmp()}
        plan = plan_decompress(source, cat, lambda f: full_url(sfs, join(sroot, f)), cfg.retry_failed, cfg.max_shards)
        for w in plan.work:  # --dedupe references: the parts holding the bitstreams they refer to
            w["deps"] = [full_url(sfs, join(sroot, source.shards[d].file)) for d in source.shards[w["shard"]].depends_on
                         if d in source.shards and source.shards[d].file]
        echo(f"{len(source.shards)} shards in {cfg.src}; {plan.found['decoded']} already decoded, "
             f"{len(plan.work)} to do")
        stats = _Run()
        n_rows = sum(source.shards[w["shard"]].rows if not w.get("only_keys") else len(w["only_keys"]) for w in plan.work)
        bar = ProgressBar(n_rows, "decompress", progress, echo)
        kwargs = {"spec": spec.to_dict(), "dst": cfg.dst, "fmt": cfg.format, "opts": opts, "run_id": run_id,
                  "expect_fingerprint": expect, "io_threads": cfg.io_threads, "chunk_rows": cfg.rows_per_batch,
                  "image_format": cfg.image_format}
        info: dict = {}
        rate = Throughput()

        def on_record(rec: L.CommitRecord) -> None:
            prev = cat.shards.get(rec.shard)
            if prev is not None and rec.rows < prev.rows:  # a retry of failed rows: merge with the earlier commit
                rec = _merge_retry(prev, rec)
            _commit(books, cat, rec, stats)
            rate.add(rec.rows)

        try:
            if plan.work:
                run_workers(plan.work, ShardDecoder, kwargs, cfg, use_ray, start_ray, on_record, bar, info)
        finally:
            bar.close()
        wall = time.perf_counter() - rate.t0
        books.compact(cat)
        run = stats.summary(wall, rate, info, plan.found, recon)
        run["ratio"] = run["mean_bpp"] = None
        manifest = _manifest(L.DECODED_KIND, cat, spec, cfg, run, expect, source=cfg.src, format=cfg.format,
                             complete=all(s in cat.shards for s in source.shards))
        books.write_manifest(manifest)
        books.clean_tmp()
    tot = cat.totals()
    print_summary("decompressed", run, tot, stats.failures, cfg.dst, echo)
    return {"run": run, "totals": tot, "manifest": manifest.to_dict()}


def _merge_retry(prev: L.CommitRecord, new: L.CommitRecord) -> L.CommitRecord:
    retried = {f["key"] for f in prev.failures}
    kept = [f for f in prev.failures if f["key"] not in retried]
    merged = L.CommitRecord.from_dict(new.to_dict())
    merged.rows = prev.rows
    merged.ok = prev.ok + new.ok
    merged.failed = len(kept) + new.failed
    merged.skipped = prev.skipped
    merged.failures = kept + new.failures
    merged.output_bytes = prev.output_bytes + new.output_bytes
    merged.input_bytes = prev.input_bytes
    return merged
