"""The code's shape, checked: no import cycle among codec/, pipeline/, jobs/ (imports inside
functions included), the layers' rules, no private names imported across modules, and every
job taking `--config`."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("codec", "pipeline", "jobs")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).glob("*.py")):
            out[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import in the file, at any depth."""
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:  # `from pkg import sub` imports the submodule
                sub = f"{base}.{a.name}"
                out.append((sub, []) if sub in known else (base, [a.name]))
    return [(m, n) for m, n in out if m in known]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports_of(name, p, known) if m != name} for name, p in known.items()}


def test_no_import_cycles_function_level_imports_included():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles
    assert len(g) > 40  # the walk saw the whole project


def test_layers_codec_knows_no_ray_or_storage_pipeline_no_diffusion_internals():
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        tops = {m.split(".")[0] for m in mods}
        if name.startswith("codec"):
            assert not tops & {"ray", "fsspec", "s3fs", "pipeline", "jobs"}, (name, tops)
        if name.startswith("pipeline"):
            assert not tops & {"diffusers", "compressai"}, (name, tops)


def test_no_private_names_imported_across_modules():
    known = modules()
    bad = []
    for name, path in known.items():
        for mod, names in imports_of(name, path, known):
            bad += [f"{name} imports {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_every_job_takes_config(tmp_path):
    from jobs.cli import build_parser, job_names
    from jobs.options import apply_config

    cfg = tmp_path / "job.toml"
    cfg.write_text('no_such_option = 1\n')
    parser = build_parser()
    names = job_names()
    assert {"compress", "decompress", "verify", "audit", "encode", "decode"} <= set(names)
    for job in names:
        args = parser.parse_args([job.replace("_", "-") if job == "train_backbone" else job, "--config", str(cfg)])
        with pytest.raises(ValueError, match=r"unknown options \['no_such_option'\]"):
            apply_config(args, args._parser)
