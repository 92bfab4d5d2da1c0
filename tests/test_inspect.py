"""`fcodec inspect`: a record's header and a dataset's summary (human and --json); a truncated or
corrupt record is a clear error with a non-zero exit; datasets are read without torch or Ray."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jobs.cli import main

V1 = Path(__file__).parent / "golden" / "v1"
GOLDEN = {r["name"]: r for r in json.loads((V1 / "index.json").read_text())["records"]}


def inspect(capsys, *args) -> tuple[int, str, str]:
    rc = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_record_json_has_the_header(capsys):
    e = GOLDEN["nano_t200_gray"]
    rc, out, _ = inspect(capsys, V1 / e["file"], "--json")
    info = json.loads(out)
    assert rc == 0 and info["kind"] == "record" and info["crc_ok"] is True
    assert info["format_version"] == 1 and info["n_bytes"] == e["n_bytes"] == 91
    assert info["backbone"] == {"fingerprint": e["backbone_fingerprint"], "name": "nano-v1"}
    assert info["codec"] == {"fingerprint": e["codec_fingerprint"], "name": "static (built in)"}
    assert (info["entropy_model"], info["t"], info["width"], info["height"], info["gray"]) == ("static", 200, 56, 40, True)
    assert info["latent"] == {"channels": 4, "height": 8, "width": 8}
    assert len(info["gamma"]) == 4 and all(g["scale"] == 1.0 for g in info["gamma"])
    assert info["side_bytes"] == 4 and len(info["string_bytes"]) == 1
    # every byte accounted for: 40 fixed + 4C γ + 2 + S + 1 + 4n + strings + 8 + 4
    assert 40 + 16 + 2 + 4 + 1 + 4 + sum(info["string_bytes"]) + 12 == info["n_bytes"]


def test_record_human_output(capsys):
    rc, out, _ = inspect(capsys, V1 / GOLDEN["nano_hyperprior_t80"]["file"])
    assert rc == 0
    for line in ("format:       version 1", "backbone:     nano-v1 (ca97b6bc3bbdbb97)", "entropy:      hyperprior",
                 "codec:        not shipped (ca046d2677024be3)", "t:            80", "image:        40x64 RGB",
                 "latent:       4 x 8 x 8", "CRC32:        OK"):
        assert line in out.splitlines()
    rc, out, _ = inspect(capsys, V1 / GOLDEN["tiny_t100"]["file"])
    assert "backbone:     tiny (8e0ab3e836b8832c)" in out


def test_truncated_record_is_one_line_error(capsys, tmp_path):
    data = (V1 / GOLDEN["nano_t50"]["file"]).read_bytes()
    for n in (len(data) - 7, 60, 10):
        (tmp_path / "t.fdc").write_bytes(data[:n])
        rc, out, err = inspect(capsys, tmp_path / "t.fdc")
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "truncated" in err and "Traceback" not in err


def test_corrupt_record_shows_header_and_fails(capsys, tmp_path):
    data = bytearray((V1 / GOLDEN["nano_t50"]["file"]).read_bytes())
    data[-20] ^= 0x10  # inside a string: layout intact, checksum wrong
    (tmp_path / "c.fdc").write_bytes(bytes(data))
    rc, out, _ = inspect(capsys, tmp_path / "c.fdc")
    assert rc == 1 and "CRC32:        MISMATCH (corrupt record)" in out and "t:            50" in out
    rc, out, _ = inspect(capsys, tmp_path / "c.fdc", "--json")
    assert rc == 1 and json.loads(out)["crc_ok"] is False


def test_not_a_record_or_dataset(capsys, tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG" + b"\0" * 100)
    rc, _, err = inspect(capsys, tmp_path / "x.png")
    assert rc == 2 and "bad magic" in err
    rc, _, err = inspect(capsys, tmp_path)
    assert rc == 2 and "no manifest" in err
    rc, _, err = inspect(capsys, tmp_path / "missing.fdc")
    assert rc == 2 and "neither" in err


def test_dataset_summary_json_and_human(capsys):
    man = json.loads((V1 / "dataset" / "_manifest.json").read_text())
    rc, out, _ = inspect(capsys, V1 / "dataset", "--json")
    info = json.loads(out)
    assert rc == 0 and info["kind"] == "dataset" and info["complete"] is True
    assert (info["rows"], info["ok"], info["failed"], info["rows_in_commits"]) == (3, 3, 0, 3)
    assert (info["shards_committed"], info["shards_planned"], info["part_files"]) == (2, 2, 2)
    assert info["mean_bpp"] == man["totals"]["mean_bpp"] and info["updated_at"] == man["updated_at"]
    assert info["codec"]["backbone"] == "nano" and info["backbone"]["name"] == "nano-v1"
    assert info["software_versions"] == ["0.1.0"] and info["created_at"] <= info["updated_at"]
    rc, out, _ = inspect(capsys, V1 / "dataset")
    assert rc == 0
    for line in ("images:       3 rows: 3 ok, 0 failed", "shards:       2 committed of 2 planned, 2 part files",
                 f"mean bpp:     {man['totals']['mean_bpp']:.4f} (input 10773 B, output 377 B)",
                 "backbone:     nano-v1 (ca97b6bc3bbdbb97)", "written by:   foundation-codec 0.1.0"):
        assert line in out.splitlines()


def test_inspect_loads_no_torch_and_no_ray():
    # the library call; the CLI's parser currently imports torch through `train-backbone`'s defaults
    code = ("import sys; from codec.inspect import format_report, inspect_file; "
            "from pipeline.summary import format_dataset, inspect_dataset; "
            f"infos = [inspect_dataset({str(V1 / 'dataset')!r}), inspect_file({str(V1 / GOLDEN['nano_t50']['file'])!r})]; "
            "format_dataset(infos[0]); format_report(infos[1]); "
            "print([i['kind'] for i in infos], 'torch' in sys.modules, 'ray' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # Under load, pyarrow's Parquet threads can still be alive at interpreter teardown and abort
    # the process after all work is done (SIGABRT, "terminate called without an active
    # exception": apache/arrow#34314, seen once here in a full run). That exit race is upstream's
    # and is not what this test is about; any other failure is.
    race = p.returncode == -6 and "terminate called without an active exception" in p.stderr
    assert p.returncode == 0 or race, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "['dataset', 'record'] False False"
