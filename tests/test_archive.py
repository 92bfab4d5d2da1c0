"""The archive survives change: stable shards under a changing source, crash-safe commits (SIGKILL
at each step of the commit protocol), one writer per dataset, a dataset that names its codec,
honest exit codes, a fast front door, and outside readers that see one row per key.

Real files, real Parquet, the tiny backbone on 16-32 px images, inline runs (the Ray paths are
in test_pipeline.py / test_pipeline_cluster.py)."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.samples import sample_image
from pipeline import storage as st
from pipeline.catalog import Books, read_dataset
from pipeline.lease import LeaseHeld, acquire
from pipeline.run import JobConfig, compress, decompress

REPO = Path(__file__).resolve().parents[1]
SPEC = {"backbone": "tiny", "steps": 0, "threads": 1, "t": 100}
quiet = {"use_ray": False, "progress": False, "echo": lambda s: None}


def png(seed: int, h: int = 16, w: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(sample_image(seed, h, w)).save(buf, format="PNG")
    return buf.getvalue()


def write(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        (folder / n).write_bytes(png(seed * 1000 + i))


def parts(dst: Path) -> list[Path]:
    return sorted(dst.glob("part-*.parquet"))


def keys_of(dst: Path) -> list[str]:
    return read_dataset(str(dst), columns=["key"]).column("key").to_pylist()


def check_whole(dst: Path, expected: set[str], shard_size: int, runs: int) -> None:
    """Every key once, no zero-row part, no more parts than ceil(keys/shard_size) + runs."""
    keys = keys_of(dst)
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    counts = [pq.ParquetFile(p).metadata.num_rows for p in parts(dst)]
    assert min(counts) > 0 and sum(counts) == len(expected)
    assert len(counts) <= math.ceil(len(expected) / shard_size) + runs


# ---------------------------------------------------------------- stable shards under change
def test_added_deleted_changed_sources_and_shard_size_change(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = [f"m{i:03d}.png" for i in range(12)]
    write(src, names)
    cfg = JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=4)
    r1 = compress(cfg, **quiet)
    assert r1["run"]["found"]["new"] == 12 and len(parts(dst)) == 3
    before = {p.name: p.read_bytes() for p in parts(dst)}

    # Names that sort first: existing shards keep their ids and bytes; one new part for 2 keys.
    write(src, ["a000.png", "a001.png"], seed=1)
    r2 = compress(cfg, **quiet)
    assert r2["run"]["found"] == {**r2["run"]["found"], "new": 2, "unchanged": 12, "changed": 0, "vanished": 0}
    assert r2["run"]["shards"] == 1 and len(parts(dst)) == 4
    assert all((dst / n).read_bytes() == b for n, b in before.items())
    check_whole(dst, set(names) | {"a000.png", "a001.png"}, 4, 2)

    # A --shard-size change renames nothing and writes nothing.
    r3 = compress(JobConfig(**{**cfg.public(), "shard_size": 2}), **quiet)
    assert r3["run"]["shards"] == 0 and len(parts(dst)) == 4

    # Delete 3 files: extend (the default) keeps their rows and says so; sync drops them.
    for n in names[:3]:
        (src / n).unlink()
    r4 = compress(cfg, **quiet)
    assert r4["run"]["found"]["vanished"] == 3 and r4["run"]["shards"] == 0 and len(keys_of(dst)) == 14
    r5 = compress(JobConfig(**{**cfg.public(), "mode": "sync"}), **quiet)
    assert r5["run"]["found"]["dropped"] == 3 and r5["run"]["found"]["vanished"] == 3
    live = set(names[3:]) | {"a000.png", "a001.png"}
    check_whole(dst, live, 4, 5)

    # Content changed under the same name: extend keeps the old row; sync recompresses it. A file
    # touched with the same bytes is confirmed unchanged by its hash and not recompressed.
    (src / names[5]).write_bytes(png(777))
    os.utime(src / names[6], (1, 1))
    r6 = compress(cfg, **quiet)
    assert r6["run"]["found"]["changed"] == 2 and r6["run"]["rows"] == 0
    old_sha = {r["key"]: r["source_sha256"] for r in read_dataset(str(dst)).to_pylist()}
    r7 = compress(JobConfig(**{**cfg.public(), "mode": "sync"}), **quiet)
    assert r7["run"]["found"]["changed"] == 1  # the touched one was confirmed identical
    rows = {r["key"]: r for r in read_dataset(str(dst)).to_pylist()}
    import hashlib

    assert rows[names[5]]["source_sha256"] == hashlib.sha256(png(777)).hexdigest() != old_sha[names[5]]
    assert rows[names[6]]["source_sha256"] == old_sha[names[6]]
    check_whole(dst, live, 4, 7)
    r8 = compress(JobConfig(**{**cfg.public(), "mode": "sync"}), **quiet)  # nothing left to notice
    assert r8["run"]["found"]["changed"] == 0 and r8["run"]["rows"] == 0


# ---------------------------------------------------------------- SIGKILL at each commit step
KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
import pipeline.storage as st
from pipeline import catalog, workers
from pipeline.run import JobConfig, compress
step, n = sys.argv[1], [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def kill_on(obj, name, after, when=lambda *a: True):
    orig = getattr(obj, name)
    def wrapped(*a, **kw):
        hit = when(*a) and n.__setitem__(0, n[0] + 1) is None and n[0] == 2
        if hit and not after:
            die()
        out = orig(*a, **kw)
        if hit and after:
            die()
        return out
    setattr(obj, name, wrapped)
if step == "before_part":  # the second shard encoded, its part not yet written
    kill_on(workers, "write_part", after=False)
elif step == "temp_written":  # the part's temp file complete, not yet renamed into place
    orig = st._replace_atomically
    def half(tmp, final, write):
        if "part-" in final:
            n[0] += 1
            if n[0] == 2:
                write(tmp)
                die()
        return orig(tmp, final, write)
    st._replace_atomically = half
elif step == "after_part":  # the part visible, its commit record not written
    kill_on(workers, "write_part", after=True)
elif step == "after_commit":  # the commit record written, the rest of the run not
    kill_on(catalog.Books, "commit", after=True)
elif step == "in_compaction":  # the catalog files rewritten, the folded commit records not yet removed
    kill_on(catalog.Books, "remove", after=False, when=lambda self, paths: any("/commits/" in p for p in paths))
    n[0] = 1
compress(JobConfig(src=sys.argv[2], dst=sys.argv[3], codec={spec!r}, shard_size=3), use_ray=False, progress=False)
"""


@pytest.mark.parametrize("step", ["before_part", "temp_written", "after_part", "after_commit", "in_compaction"])
def test_sigkill_at_each_commit_step_then_a_changed_listing(tmp_path, step):
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = [f"k{i:02d}.png" for i in range(9)]
    write(src, names)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), spec=SPEC))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(script), step, str(src), str(dst)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]  # really killed mid-protocol
    write(src, ["a0.png", "a1.png"], seed=3)  # and the listing changed before the rerun
    (src / names[0]).unlink()
    res = compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=3), **quiet)
    expected = set(names) | {"a0.png", "a1.png"}  # extend: the vanished key's row stays if it was committed
    got = set(keys_of(dst))
    assert got - {names[0]} == expected - {names[0]}
    check_whole(dst, got, 3, 2)
    assert not list((dst / "__fcodec__").rglob("*.part")) and not (dst / "__fcodec__" / "tmp").exists()
    assert not (dst / "__fcodec__" / "lease.json").exists()
    again = compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=3), **quiet)
    assert again["run"]["rows"] == 0
    from pipeline.verify import verify_dataset

    rep = verify_dataset(str(dst), hmac_key=None)
    assert rep["ok"], rep["problems"]  # whole: every key once, books and parts agree
    if step == "after_part":  # the orphan part was complete: adopted, not redone
        assert res["run"]["reconciled"]["adopted"] == 1


# ---------------------------------------------------------------- one writer per dataset
def test_one_writer_local_and_s3(tmp_path, s3_server, s3_bucket):
    src = tmp_path / "src"
    write(src, ["x.png", "y.png"])
    for dst, opts in ((str(tmp_path / "dst"), None), (f"{s3_bucket}/dst", s3_server["opts"])):
        fs, root = st.get_fs(dst, opts)
        with acquire(fs, root, ttl_s=60) as held:
            with pytest.raises(LeaseHeld, match="being written by another run .*" + held.owner.split(":")[0]):
                compress(JobConfig(src=str(src), dst=dst, codec=SPEC), opts, **quiet)
            # racing takers: exactly one wins each time
            wins = []

            def take():
                try:
                    acquire(fs, root, ttl_s=60).release()
                    wins.append(1)
                except LeaseHeld:
                    pass

            ts = [threading.Thread(target=take) for _ in range(4)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            assert wins == []  # the lease is held: nobody else gets it
        res = compress(JobConfig(src=str(src), dst=dst, codec=SPEC), opts, **quiet)  # released: the next run proceeds
        assert res["totals"]["ok"] == 2
        # a crashed holder's lease expires
        stale = acquire(fs, root, ttl_s=0.5, owner="elsewhere:1:dead")
        stale._stop.set()  # it stops renewing, as a killed run would
        import time

        time.sleep(0.7)
        acquire(fs, root, ttl_s=60).release()


def test_two_concurrent_cli_runs_exactly_one_proceeds(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src, [f"c{i}.png" for i in range(6)])
    cmd = [sys.executable, "-m", "jobs.cli", "compress", str(src), str(dst), "--backbone", "tiny", "--no-ray",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 2)
    assert "is being written by another run" in loser[1] and loser[1].count("\n") == 1
    assert sorted(keys_of(dst)) == [f"c{i}.png" for i in range(6)]


# ---------------------------------------------------------------- the dataset names its codec
def test_decompress_and_decode_with_no_codec_flags_saved_folder_backbone(tmp_path):
    from codec.backbone import Backbone

    folder = tmp_path / "my-backbone"
    Backbone.tiny(seed=1).save_pretrained(folder)  # weights of its own (not the built-in tiny's)
    src, dst, out = tmp_path / "src", tmp_path / "dst", tmp_path / "out"
    write(src, ["p.png", "q.png"])
    compress(JobConfig(src=str(src), dst=str(dst), codec={"backbone": str(folder), "t": 80, "threads": 1}), **quiet)
    m = Books(*st.get_fs(str(dst))).read_manifest()
    assert m.backbone["folder"] == "my-backbone" and m.codec["backbone"] == str(folder) and len(m.codec_fingerprint) == 32
    res = decompress(JobConfig(src=str(dst), dst=str(out), codec={"steps": 0}), **quiet)
    assert res["run"]["ok"] == 2 and sorted(p.name for p in out.glob("*.png")) == ["p.png", "q.png"]
    # the folder moved: the error names what the dataset was written with, before any row
    moved = tmp_path / "moved"
    folder.rename(moved)
    with pytest.raises(ValueError, match="my-backbone.*pass --backbone"):
        decompress(JobConfig(src=str(dst), dst=str(tmp_path / "out2")), **quiet)
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").glob("*.png"))
    res = decompress(JobConfig(src=str(dst), dst=str(tmp_path / "out3"), codec={"backbone": str(moved), "steps": 0}),
                     **quiet)
    assert res["run"]["ok"] == 2  # the same weights at a new path: accepted (the fingerprint is checked)
    with pytest.raises(ValueError, match="fingerprint"):  # other weights under the dataset's name: refused
        decompress(JobConfig(src=str(dst), dst=str(tmp_path / "out4"), codec={"backbone": "tiny"}), **quiet)


# ---------------------------------------------------------------- exit codes and the front door
def _cli(args: list[str], cwd: Path, check_modules: bool = False) -> subprocess.CompletedProcess:
    code = ("import sys; from jobs.cli import main; rc = main(sys.argv[1:]); "
            "print('MODULES', 'torch' in sys.modules, 'ray' in sys.modules); sys.exit(rc)") if check_modules else \
        "import sys; from jobs.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_exit_codes_all_ok_some_failed_all_failed_bad_src(tmp_path):
    ok, some, bad = tmp_path / "ok", tmp_path / "some", tmp_path / "bad"
    write(ok, ["a.png", "b.png"])
    write(some, ["a.png"])
    (some / "broken.png").write_bytes(b"no")
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    (bad / "y.jpg").write_bytes(b"not a jpeg")
    base = ["--backbone", "tiny", "--no-ray", "--no-progress", "--t", "100"]
    assert _cli(["compress", str(ok), str(tmp_path / "d1"), *base], tmp_path).returncode == 0
    assert _cli(["compress", str(some), str(tmp_path / "d2"), *base], tmp_path).returncode == 1
    assert _cli(["compress", str(bad), str(tmp_path / "d3"), *base], tmp_path).returncode == 2
    again = _cli(["compress", str(some), str(tmp_path / "d2"), *base], tmp_path, check_modules=True)
    assert again.returncode == 1 and "MODULES False False" in again.stdout  # nothing to do: no Ray, no torch
    missing = _cli(["compress", str(tmp_path / "nope"), str(tmp_path / "d4"), *base], tmp_path, check_modules=True)
    assert missing.returncode == 2 and "no input at" in missing.stderr and "MODULES False False" in missing.stdout


@pytest.mark.parametrize("job", ["compress", "decompress", "encode", "decode", "verify", "audit", "compare", "train",
                                 "train-backbone", "bench", "demo", "inspect"])
def test_help_imports_neither_torch_nor_ray(tmp_path, job):
    from jobs.cli import job_names

    if job.replace("-", "_") not in job_names():
        pytest.skip(f"no {job} job in this build")
    code = (f"import sys\nfrom jobs.cli import main\ntry:\n    main([{job!r}, '--help'])\n"
            f"except SystemExit:\n    pass\nprint('MODULES', 'torch' in sys.modules, 'ray' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert "MODULES False False" in p.stdout, p.stdout[-500:] + p.stderr[-1000:]
    assert "--config" in p.stdout


def test_paths_with_glob_characters_are_taken_literally(tmp_path):
    src = tmp_path / "odd [2024]"
    write(src, ["a.png", "b?.png"])
    res = compress(JobConfig(src=str(src), dst=str(tmp_path / "dst"), codec=SPEC), **quiet)
    assert res["totals"]["ok"] == 2 and sorted(keys_of(tmp_path / "dst")) == ["a.png", "b?.png"]


# ---------------------------------------------------------------- outside readers
def test_outside_readers_see_one_row_per_key_after_resumes_and_a_crash(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pds

    src, dst = tmp_path / "src", tmp_path / "dst"
    names = [f"r{i:02d}.png" for i in range(7)]
    write(src, names)
    cfg = JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=3, max_shards=1)
    compress(cfg, **quiet)  # a partial run
    books = Books(*st.get_fs(str(dst)))  # a crash: the second shard's part is written, its commit is not
    cat = books.read()
    write(src, ["a.png"], seed=5)  # the source grew meanwhile
    cfg.max_shards = None
    compress(cfg, **quiet)
    (dst / "__fcodec__" / "tmp").mkdir(exist_ok=True)
    (dst / "__fcodec__" / "tmp" / "junk.part").write_bytes(b"x")
    compress(cfg, **quiet)  # a resume that has nothing to do
    assert len(cat.shards) == 1
    expected = sorted(names + ["a.png"])
    assert sorted(pd.read_parquet(dst)["key"]) == expected
    assert sorted(pds.dataset(str(dst), format="parquet").to_table(columns=["key"]).column("key").to_pylist()) == expected
    assert sorted(k for (k,) in duckdb.sql(f"select key from read_parquet('{dst}/*.parquet')").fetchall()) == expected
    assert sorted(pl.scan_parquet(f"{dst}/*.parquet").select("key").collect()["key"].to_list()) == expected
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(dst), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["key"]) == expected and "bitstream" in ds.column_names


def test_codec_spec_round_trips_through_a_manifest(tmp_path):
    from codec.spec import CodecSpec

    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src, ["a.png"])
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC), **quiet)
    m = json.loads((dst / "__fcodec__" / "manifest.json").read_text())
    spec = CodecSpec.from_dict(m["codec"])
    assert spec == CodecSpec.from_dict(SPEC).pinned() and spec.to_dict() == m["codec"]  # stored resolved
    assert spec.entropy == "static" and spec.codec_weights is None  # `auto` with no weights for tiny
    assert spec.conflicts(CodecSpec(backbone="tiny", t=100)) == {}
    assert spec.conflicts(CodecSpec(backbone="tiny", t=50)) == {"t": (100, 50)}
    with pytest.raises(ValueError, match="unknown codec options"):
        CodecSpec.from_dict({"backbon": "tiny"})
    assert np.isclose(m["totals"]["mean_bpp"], read_dataset(str(dst)).column("bpp")[0].as_py())


def test_poisoned_rows_fail_alone_in_a_ray_decompress(tmp_path, ray_local):
    """Hostile records (the fuzz campaign's reproducers, CRC-valid) planted in a dataset with
    their sha256 fixed: decompress on Ray gives each a failed row, in bounded time, and
    decodes and commits everything else."""
    import hashlib

    src, dst, out = tmp_path / "src", tmp_path / "dst", tmp_path / "out"
    write(src, [f"h{i}.png" for i in range(6)])
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=3), **quiet)
    hostile = sorted((REPO / "tests" / "fixtures" / "hostile").glob("*.fdc"))[:4]
    planted = []
    for part, fix in zip(parts(dst), [hostile[:2], hostile[2:4]]):
        t = pq.read_table(part)
        rows = t.to_pylist()
        for r, f in zip(rows, fix):
            data = f.read_bytes()
            r.update(bitstream=data, bitstream_sha256=hashlib.sha256(data).hexdigest(), n_bytes=len(data))
            planted.append(r["key"])
        pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), part)
    res = decompress(JobConfig(src=str(dst), dst=str(out), codec={"steps": 0}, workers=1), use_ray=True,
                     progress=False, echo=lambda s: None)
    failed = {f["key"] for f in res["run"]["failures"]}
    assert failed == set(planted) and res["run"]["ok"] == 6 - len(planted), res["run"]["failures"]
    assert res["manifest"]["complete"] and len(list(out.glob("*.png"))) == 6 - len(planted)


def test_inspect_summarises_a_layout_2_dataset(tmp_path, capsys):
    from jobs.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src, ["a.png", "b.png"])
    (src / "c.png").write_bytes(b"no")
    compress(JobConfig(src=str(src), dst=str(dst), codec=SPEC, shard_size=2), **quiet)
    capsys.readouterr()
    assert main(["inspect", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layout"], info["rows"], info["ok"], info["failed"], info["shards_committed"]) == (2, 3, 2, 1, 2)
    assert info["codec"]["backbone"] == "tiny" and info["backbone"]["name"] == "tiny"
    assert info["errors"] == {"not a usable image": 1} and info["software_versions"] == ["0.1.0"]
