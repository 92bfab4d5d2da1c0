"""Quality audit of a bitstream dataset against its originals, on Ray.

Driver: list the committed Parquet parts of the bitstream dataset (from its books) and hand one
part at a time to a pool of `AuditWorker` actors. Each actor streams its part in small batches
of the columns it needs, fetches every row's original by key (ORIGINALS/<key>, else the row's
`source_uri`) when it measures it, decodes the batch,
measures each image (`codec.metrics`) and folds HiFiC-patch features of originals and decodes
into two `FeatureStats`. The driver collects per-image metric rows (no pixels, no bitstreams),
asks every actor for its partial
statistics, merges them (sums and outer products; never all features in one place) and computes
FID/KID. Failed rows (compression failed, original missing or changed, undecodable) are rows
with status 'failed' and a one-line error; they never stop the audit.

`AuditWorker` is a plain class (tests use it without Ray); `Measurer.measure` is the per-image
step `fcodec compare` (pipeline/compare.py) shares with it.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .schema import STATUS_FAILED, STATUS_OK
from .storage import StorageOptions, get_fs, join, read_bytes, write_atomic, write_json_atomic

METRICS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("codec", pa.string()),        # codec label (e.g. 'tiny', 'jpeg')
    pa.field("setting", pa.string()),      # e.g. 't=100', 'q75'
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("n_bytes", pa.int64()),
    pa.field("bpp", pa.float64()),
    pa.field("t", pa.int32()),
    pa.field("psnr", pa.float64()),
    pa.field("ssim", pa.float64()),
    pa.field("ms_ssim", pa.float64()),     # null when a side is < 161 px (and for failed rows)
    pa.field("lpips", pa.float64()),       # null when LPIPS weights are absent
    pa.field("dists", pa.float64()),
    pa.field("colour_error", pa.float64()),  # mean |per-channel image mean difference|, 8-bit levels
    pa.field("n_patches", pa.int32()),     # HiFiC patches this image gave to FID/KID
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])


@dataclass
class AuditConfig:
    """What an audit measures (plain data: shipped to every actor, stored in summary.json)."""

    codec: dict = field(default_factory=dict)  # pipeline.actors codec spec, or {"baseline": "jpeg", "quality": 75}
    fid: str = "inception"  # feature extractor: inception | seeded[:DIM[:SEED]] | none
    patch: int = 256  # FID/KID patch side (HiFiC: 256)
    perceptual: tuple[str, ...] = ("lpips", "dists")
    weights: dict = field(default_factory=dict)  # {"lpips": DIR, "dists": DIR}; else env vars
    kid_cap: int = 2000
    threads: int = 1  # torch threads per actor
    label: str | None = None  # codec label in the report (default: the codec's name)
    setting: str = ""


def codec_from_spec(spec: dict):
    """Our codec from the pipeline's codec spec, or a baseline when spec has 'baseline'."""
    if spec.get("baseline"):
        from codec.baselines import make_baseline

        return make_baseline(spec["baseline"], int(spec.get("quality") or 75), weights_dir=spec.get("weights_dir"))
    from codec.spec import CodecSpec

    return CodecSpec.from_dict({k: v for k, v in spec.items() if k != "weights_dir"}).build()


class Measurer:
    """Per-image metrics and patch features, with the perceptual metrics and extractor loaded once."""

    def __init__(self, cfg: AuditConfig) -> None:
        from codec import metrics as M

        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"  # the networks follow the codec onto the GPU
        self.cfg, self.notes, self.perceptual = cfg, [], {}
        for name in cfg.perceptual:
            m, why = M.load_perceptual(name, cfg.weights.get(name))
            if m is None:
                self.notes.append(f"{name.upper()} {why}")
            else:
                self.perceptual[name] = m.to(dev)
        self.extractor, why = M.feature_extractor(cfg.fid)
        if self.extractor is None:
            self.notes.append(f"FID/KID {why}")
        else:
            self.extractor = self.extractor.to(dev)

    def new_stats(self):
        from codec.metrics import FeatureStats

        return FeatureStats(self.extractor.dim, cap=self.cfg.kid_cap) if self.extractor is not None else None

    def metrics(self, orig: np.ndarray, dec: np.ndarray) -> dict:
        from codec.metrics import image_metrics

        return image_metrics(orig, dec, self.perceptual)

    def add_features(self, stats, key: str, img: np.ndarray) -> int:
        """Fold the image's patch features into `stats`; returns the number of patches."""
        if stats is None:
            return 0
        from codec.metrics import patch_features

        f = patch_features(self.extractor, img, self.cfg.patch)
        if len(f):
            stats.add(f, key=key)
        return len(f)

    def measure(self, row: dict, orig: np.ndarray, dec, real=None, fake=None) -> None:
        """Fill `row` with one image's metrics and status, or its failure when `dec` is an exception
        (or measuring raises); fold the original's patch features into `real` and the decode's
        into `fake` (either may be None) and record the decode's patch count."""
        try:
            if isinstance(dec, BaseException):
                raise dec
            row.update(self.metrics(orig, dec), status=STATUS_OK, error=None)
            self.add_features(real, row["key"], orig)
            row["n_patches"] = self.add_features(fake, row["key"], dec[: orig.shape[0], : orig.shape[1]])
        except Exception as e:
            row.update(status=STATUS_FAILED, error=f"decoding failed: {one_line(e)}")


def one_line(e: BaseException) -> str:
    """An exception as one line: 'Type: first line of the message'."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


AUDIT_COLUMNS = ("key", "source_uri", "source_sha256", "width", "height", "bitstream", "bitstream_sha256", "n_bytes",
                 "bpp", "t", "status", "error", "ref_key")


class AuditWorker:
    """One actor: a codec, the metrics, and partial FID/KID statistics of what it measured."""

    def __init__(self, cfg: dict | AuditConfig, originals: str | dict[str, str], opts: StorageOptions | None = None) -> None:
        """`originals`: the ORIGINALS folder / prefix (an image's original is ORIGINALS/<key>,
        fetched when its row is measured: nothing is listed up front), or a key -> URL map."""
        import torch

        self.cfg = cfg if isinstance(cfg, AuditConfig) else AuditConfig(**cfg)
        torch.set_num_threads(max(1, int(self.cfg.threads)))
        self.codec = codec_from_spec(self.cfg.codec)
        self.label = self.cfg.label or getattr(self.codec, "name", None) or getattr(self.codec.backbone, "name", "codec")
        self.originals, self.opts = originals, opts
        self.m = Measurer(self.cfg)
        self.real, self.fake = self.m.new_stats(), self.m.new_stats()

    # -------------------------------------------------------------- inputs
    def read_part(self, url: str, batch_rows: int = 32, keys: set[str] | None = None) -> Iterator[list[dict]]:
        """One Parquet part of the bitstream dataset, `batch_rows` rows at a time, only the
        columns the audit needs (bounded memory whatever the part's size)."""
        import pyarrow.parquet as pq

        fs, path = get_fs(url, self.opts)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in AUDIT_COLUMNS if c in pf.schema_arrow.names]
            for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                rows = [r for r in rb.to_pylist() if keys is None or r["key"] in keys]
                if rows:
                    yield rows

    def _original_url(self, row: dict) -> str | None:
        if isinstance(self.originals, dict):
            return self.originals.get(row["key"]) or row.get("source_uri")
        from .storage import full_url

        fs, root = get_fs(self.originals, self.opts)
        path = join(root, row["key"])
        return full_url(fs, path) if row["key"] and fs.exists(path) else row.get("source_uri")

    def _original(self, row: dict) -> np.ndarray:
        """The row's original pixels: ORIGINALS/<key>, else its source_uri; checks sha256 and size."""
        from codec import load_image

        url = self._original_url(row)
        if not url:
            raise FileNotFoundError(f"original of '{row['key']}' not found under ORIGINALS and the row has no source_uri")
        try:
            if url.startswith("tar://"):
                import fsspec

                with fsspec.open(url, "rb") as f:
                    data = f.read()
            else:
                fs, path = get_fs(url, self.opts)
                data = read_bytes(fs, path)
        except Exception as e:
            raise FileNotFoundError(f"original of '{row['key']}' not readable at {url} ({one_line(e)})") from None
        if row.get("source_sha256") and hashlib.sha256(data).hexdigest() != row["source_sha256"]:
            raise ValueError(f"original at {url} differs from the one compressed (source_sha256 mismatch)")
        px = load_image(data).pixels
        if row.get("width") is not None and (px.shape[1], px.shape[0]) != (row["width"], row["height"]):
            raise ValueError(f"original is {px.shape[1]}x{px.shape[0]}, the row says {row['width']}x{row['height']}")
        return px

    # -------------------------------------------------------------- work
    def process_part(self, url: str) -> list[dict]:
        """Measure every row of one part; returns metrics rows (with `_part` for follow-ups)."""
        out = [r for rows in self.read_part(url) for r in self.process_rows(rows)]
        for r in out:
            r["_part"] = url
        return out

    def process_rows(self, rows: list[dict]) -> list[dict]:
        """Bitstream rows -> metrics rows (same order); one bad row fails alone."""
        out, todo = [], []
        for r in rows:
            base = {"key": r.get("key"), "source_uri": r.get("source_uri"), "codec": self.label,
                    "setting": self.cfg.setting, "width": r.get("width"), "height": r.get("height"),
                    "n_bytes": r.get("n_bytes"), "bpp": r.get("bpp"), "t": r.get("t")}
            out.append(base)
            if r.get("ref_key"):  # --dedupe: the same bytes as another key, measured there
                base.update(status=STATUS_FAILED, error=f"not measured: a duplicate of {r['ref_key']}")
                continue
            if r.get("status") != STATUS_OK or r.get("bitstream") is None:
                base.update(status=STATUS_FAILED, error=f"compression had failed: {r.get('error') or 'no bitstream'}")
                continue
            try:
                if r.get("bitstream_sha256") and hashlib.sha256(r["bitstream"]).hexdigest() != r["bitstream_sha256"]:
                    raise ValueError("bitstream_sha256 does not match the stored bitstream (corrupt dataset)")
                todo.append((base, self._original(r), r["bitstream"]))
            except Exception as e:
                base.update(status=STATUS_FAILED, error=one_line(e))
        decoded = self.codec.decode([b for _, _, b in todo], errors="return") if todo else []
        for (base, orig, _), dec in zip(todo, decoded):
            self.m.measure(base, orig, dec, self.real, self.fake)
        return out

    def pairs(self, url: str, keys: list[str]) -> list[dict]:
        """(original, decoded) pixels of a few keys of one part, for the report's thumbnails."""
        rows = [r for chunk in self.read_part(url, keys=set(keys)) for r in chunk]
        out = []
        for r in rows:
            try:
                orig = self._original(r)
                dec = self.codec.decode([r["bitstream"]])[0]
                out.append({"key": r["key"], "orig": orig, "dec": dec})
            except Exception:
                continue  # a thumbnail is optional
        return out

    def stats(self) -> tuple[Any, Any, list[str]]:
        """This actor's partial FID/KID statistics (originals, decodes) and its notes."""
        return self.real, self.fake, self.m.notes


# -------------------------------------------------------------- driver
def list_originals(originals: str, opts: StorageOptions | None = None) -> dict[str, str]:
    """key -> URL of every image file under ORIGINALS (tar/Parquet members pair by source_uri)."""
    from .sources import list_inputs

    inputs, _ = list_inputs(originals, opts)
    return {k: u for k, u, kind, _ in inputs if kind == "files"}


def dataset_parts(bitstreams: str, opts: StorageOptions | None = None) -> list[str]:
    """URLs of the committed Parquet parts of a bitstream dataset (all parts if none committed)."""
    from .catalog import Books
    from .storage import full_url

    fs, root = get_fs(bitstreams, opts)
    shards = Books(fs, root).read().shards
    if shards:
        return [full_url(fs, join(root, s.file)) for _, s in sorted(shards.items()) if s.file]
    files = sorted(p for p in fs.glob(join(root, "*.parquet")) if not os.path.basename(p).startswith(("_", ".")))
    if not files:
        raise FileNotFoundError(f"no bitstream dataset at '{bitstreams}' (expected part-*.parquet from `fcodec compress`)")
    return [full_url(fs, p) for p in files]


def merge_stats(parts: list[tuple[Any, Any, list[str]]]) -> tuple[Any, Any, list[str]]:
    """Merge the actors' partial statistics (None when FID/KID is off)."""
    real = fake = None
    notes: list[str] = []
    for r, f, n in parts:
        notes += [x for x in n if x not in notes]
        if r is not None:
            real = r if real is None else real.merge(r)
            fake = f if fake is None else fake.merge(f)
    return real, fake, notes


def dataset_scores(real, fake) -> dict:
    """FID and KID from merged statistics (NaN with too few patches)."""
    from codec.metrics import fid, kid

    if real is None or real.n < 2:
        return {"fid": float("nan"), "kid": float("nan"), "fid_patches": 0 if real is None else real.n}
    return {"fid": fid(real, fake), "kid": kid(real, fake), "fid_patches": int(real.n)}


def run_audit(originals: str, bitstreams: str, out: str, cfg: AuditConfig, opts: StorageOptions | None = None,
              workers: int = 2, n_worst: int = 6, cpus_per_worker: float = 0.5, ray_address: str | None = None,
              anchor: str | None = None, gpus_per_worker: float = 0) -> dict:
    """The audit job; returns the summary written to OUT/summary.json."""
    import pandas as pd
    import ray
    from ray.util import ActorPool

    from .report import summarize
    from .raystart import init_ray

    parts = dataset_parts(bitstreams, opts)
    init_ray(ray_address)  # local unless an address is given; an already connected Ray is kept
    Remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(AuditWorker)
    cfg_d = asdict(cfg)
    actors = [Remote.remote(cfg_d, originals, opts) for _ in range(max(1, min(workers, len(parts))))]
    pool = ActorPool(actors)
    rows = [r for part_rows in pool.map_unordered(lambda a, p: a.process_part.remote(p), parts) for r in part_rows]
    real, fake, notes = merge_stats(ray.get([a.stats.remote() for a in actors]))

    df = pd.DataFrame(rows).sort_values("key", kind="stable").reset_index(drop=True)
    for f in METRICS_SCHEMA:
        if f.name not in df:
            df[f.name] = None
    scores = dataset_scores(real, fake)
    label = df["codec"].iloc[0] if len(df) else (cfg.label or "codec")
    ok = df[df["status"] == STATUS_OK]
    worst = []
    if n_worst and len(ok):
        pick = ok.nsmallest(n_worst, "psnr")
        by_part: dict[str, list[str]] = {}
        for _, r in pick.iterrows():
            by_part.setdefault(r["_part"], []).append(r["key"])
        got = {p["key"]: p for lst in ray.get([actors[i % len(actors)].pairs.remote(u, ks) for i, (u, ks) in enumerate(by_part.items())])
               for p in lst}
        for _, r in pick.iterrows():
            if r["key"] in got:
                worst.append({**got[r["key"]], "codec": r["codec"], "setting": r["setting"], "bpp": r["bpp"], "psnr": r["psnr"]})
    for a in actors:
        ray.kill(a)

    failed = df[df["status"] != STATUS_OK]
    summary = {
        "originals": originals, "bitstreams": bitstreams, "n_rows": int(len(df)), "n_ok": int(len(ok)),
        "n_failed": int(len(failed)), "config": {k: v for k, v in cfg_d.items() if k != "weights"},
        "groups": summarize(df, {(label, cfg.setting): scores}), "notes": notes, **scores,
        "failed": [{"key": k, "error": e} for k, e in zip(failed["key"], failed["error"])][:1000],
    }
    write_outputs(out, df, summary, worst, opts, anchor=anchor)
    return summary


def write_outputs(out: str, df, summary: dict, worst: list[dict], opts: StorageOptions | None = None,
                  anchor: str | None = None) -> None:
    """OUT/metrics.parquet, OUT/summary.json and OUT/report.html (each written atomically)."""
    import pyarrow.parquet as pq

    from .report import render_html

    fs, root = get_fs(out, opts)
    fs.makedirs(root, exist_ok=True)
    cols = {}
    for f in METRICS_SCHEMA:  # pandas turned missing values into NaN: back to nulls
        vals = df[f.name].tolist() if f.name in df else [None] * len(df)
        vals = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in vals]
        cols[f.name] = [int(v) if v is not None and pa.types.is_integer(f.type) else v for v in vals]
    table = pa.Table.from_pydict(cols, schema=METRICS_SCHEMA)
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(fs, join(root, "metrics.parquet"), buf.getvalue())
    write_json_atomic(fs, join(root, "summary.json"), json_safe(summary))
    write_atomic(fs, join(root, "report.html"), render_html(df, summary, worst, anchor=anchor).encode())


def json_safe(o):
    """Plain JSON: numpy scalars to Python, NaN/inf to null (strict parsers reject NaN)."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
