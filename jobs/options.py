"""Every CLI option declared once, reused by the jobs that take it, and one `--config` mechanism.

Codec options come from `codec.spec.CodecSpec` (its help, choices and must-match rules); they
default to None on the command line, so a job can tell an option the user gave from one left
at its default, which is how `decompress`, `audit` and `verify` take the codec from the
dataset's manifest and refuse a flag that contradicts it.

Nothing here imports torch or Ray: `--help` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from codec.spec import CodecSpec, field_default, spec_fields


# ---------------------------------------------------------------- codec
def add_codec_options(p: argparse.ArgumentParser, encode: bool = True, decode: bool = True,
                      baseline: bool = False) -> None:
    """The codec options of a job that encodes and/or decodes (from `CodecSpec`)."""
    g = p.add_argument_group("codec (a dataset's own options are used unless given; given ones must agree)")
    rate = None
    for f in spec_fields():
        m = f.metadata
        if m["flag"] == "-" or (m["flag"] == "" and not baseline) or (not m["encode"] and not decode) or (not m["decode"] and not encode):
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = {"int": int, "float": float}.get(_base(f.type), str)
        default = field_default(f)
        help_ = m["help"] + (f" (default: {default})" if default is not None and "default" not in m["help"] else "")
        kw = {"default": None, "help": help_.replace("%", "%%"), "type": typ}
        if m["choices"]:
            kw["choices"] = list(m["choices"])
        if m["metavar"]:
            kw["metavar"] = m["metavar"]
        if f.name in ("t", "target_bpp"):  # one of the two
            rate = rate or g.add_mutually_exclusive_group()
            rate.add_argument(flag, **kw)
        else:
            g.add_argument(flag, **kw)


def _base(t) -> str:
    s = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return s.split("|")[0].strip()


def codec_given(args: argparse.Namespace) -> dict:
    """The codec options the user gave (command line or --config), as CodecSpec fields."""
    out = {}
    for f in spec_fields():
        v = getattr(args, f.name, None)
        if v is not None:
            out[f.name] = v
    return out


def codec_spec(args: argparse.Namespace) -> CodecSpec:
    """The options as a spec (defaults for what was not given)."""
    return CodecSpec.from_dict(codec_given(args))


# ---------------------------------------------------------------- cluster and storage
def add_ray_options(p: argparse.ArgumentParser, inline: bool = True) -> argparse._ArgumentGroup:
    """--ray-address (and --no-ray): one meaning in every job."""
    g = p.add_argument_group("cluster")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster ('auto' = the one this machine belongs to, or ray://host:port); "
                        "default: start a private local Ray (never joins one by accident)")
    if inline:
        g.add_argument("--no-ray", action="store_true", help="run inline in this process (debugging, tiny jobs)")
    return g


def add_pool_options(g: argparse._ArgumentGroup) -> None:
    """Actor pool options of the dataset jobs."""
    g.add_argument("--gpus", default="auto", metavar="auto|off|N",
                   help="auto: one GPU actor per GPU the cluster has now (else CPU actors); N: N GPU actors, requested "
                        "even before the GPU nodes exist (an autoscaler adds them); off: CPU actors (default: %(default)s)")
    g.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU; without GPUs half the CPUs)")
    g.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs reserved per actor, fractions allowed (default: %(default)s)")
    g.add_argument("--actor-start-timeout", type=int, default=900, metavar="S",
                   help="seconds for the pool's first actors to load the codec; fewer up by then is an error naming "
                        "the resources asked for (default: %(default)s)")
    g.add_argument("--io-threads", type=int, default=4,
                   help="threads per actor reading, decoding and writing images beside the model (default: %(default)s)")
    g.add_argument("--rows-per-batch", type=int, default=32, help="images read ahead per chunk (default: %(default)s)")


def add_storage_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("storage (credentials come from AWS_* environment variables, never from flags)")
    s.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3-compatible endpoint (MinIO, Ceph, R2); default $FCODEC_S3_ENDPOINT or $AWS_ENDPOINT_URL or AWS")
    s.add_argument("--s3-region", default=None)
    s.add_argument("--anon", action="store_true", help="anonymous access (public buckets)")


def storage_options(args: argparse.Namespace):
    from pipeline.storage import StorageOptions

    return StorageOptions.from_env(getattr(args, "s3_endpoint", None), getattr(args, "s3_region", None),
                                   bool(getattr(args, "anon", False)))


def ray_starter(args: argparse.Namespace):
    """A callable that starts Ray per the one policy (pipeline.raystart), for jobs to call only
    once they know there is work."""
    def start() -> None:
        from pipeline.raystart import init_ray

        init_ray(getattr(args, "ray_address", None))

    return start


# ---------------------------------------------------------------- positionals and --config
def job_parser(sub, name: str, help: str, description: str, positionals: list[tuple[str, str]] = (),
               epilog: str | None = None) -> argparse.ArgumentParser:
    """A job's subcommand with its positionals (each may also come from --config)."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    for pname, phelp in positionals:
        add_positional(p, pname, phelp)
    return p


def add_positional(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """A positional that may also come from --config (checked after the file is applied)."""
    p.add_argument(name, nargs="?", default=None, help=help + " (or in --config)")
    req = p.get_default("_required") or []
    p.set_defaults(_required=[*req, name])


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.set_defaults(_has_config=True)
    p.add_argument("--config", default=None, metavar="FILE_OR_URL",
                   help="YAML or TOML file (local, s3://, gs://) with any of this command's options, positionals "
                        "included (dashes or underscores; [sections] flattened); flags given on the command line win")


def load_config_file(path: str, opts=None) -> dict:
    """A TOML or YAML file (local path or URL) as a flat dict of option names."""
    if "://" in path:
        from pipeline.storage import get_fs, read_bytes

        fs, p = get_fs(path, opts)
        text = read_bytes(fs, p).decode()
    else:
        text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        import tomllib

        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options")
    flat: dict = {}
    for k, v in data.items():
        if isinstance(v, dict):  # allow [codec] / [cluster] sections
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            flat[k.replace("-", "_")] = v
    return flat


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Set every option still at its default from --config (flags win; unknown keys are an
    error, so a typo in a scheduled job's config never passes silently); then check that every
    positional is set. `parser`: the job's own (default: the one cli.py recorded in `args`)."""
    parser = parser or args._parser
    if getattr(args, "config", None):
        values = load_config_file(args.config, storage_options(args))
        known = {k for k in vars(parser.parse_args([])) if not k.startswith("_")} - {"config", "debug"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown options {unknown}")
        for k, v in values.items():
            if getattr(args, k, None) == parser.get_default(k):
                setattr(args, k, v)
    missing = [d.upper() for d in (getattr(args, "_required", None) or []) if getattr(args, d, None) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give it on the command line or in --config)")
    return args
