"""`fcodec`: one console command, one subcommand per job (jobs/<name>.py)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Every module under jobs/ that defines add_parser(sub) and run(args) is a subcommand; these
# come first in --help, the rest alphabetically. Keep heavy imports inside run().
FIRST = ["demo", "encode", "decode", "inspect", "compress", "decompress", "verify", "audit", "compare", "train", "bench"]


def job_names() -> list[str]:
    import pkgutil
    from pathlib import Path

    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])]
    jobs = [n for n in names if hasattr(importlib.import_module(f"jobs.{n}"), "add_parser")]
    return sorted(jobs, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fcodec",
        description="foundation-codec: archive image datasets with a diffusion-based learned codec "
                    "(Relic et al., ECCV 2024). Run `fcodec <command> --help` for each command.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name in job_names():
        mod = importlib.import_module(f"jobs.{name}")
        sp = mod.add_parser(sub)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        sp.set_defaults(_run=mod.run)
        if not any("--config" in a.option_strings for a in sp._actions):
            _add_generic_config(sp)
    return p


def _add_generic_config(sp: argparse.ArgumentParser) -> None:
    """Give a job `--config PATH_OR_URL` (YAML/TOML, any option incl. positionals; flags win), so a
    scheduled run only changes a config file. Positionals become optional and are checked after."""
    sp.add_argument("--config", default=None, metavar="FILE_OR_URL",
                    help="YAML or TOML file (local, s3://, gs://) with any of this command's options; flags win")
    required = []
    for a in sp._actions:
        if not a.option_strings and a.nargs is None:
            a.nargs, a.required = "?", False
            required.append(a.dest)
    sp.set_defaults(_config_parser=sp, _config_required=required)


def apply_config(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options left at their defaults from --config; then every positional must be set."""
    sp = getattr(args, "_config_parser", None)
    if sp is None:
        return args
    if args.config:
        from pipeline.storage import StorageOptions

        from .compress import fill_from_config

        fill_from_config(args, sp, StorageOptions.from_env())
    missing = [d.upper() for d in args._config_required if getattr(args, d, None) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give it on the command line or in --config)")
    return args


def quiet_libraries() -> None:
    """Keep library chatter (dtype advice, hub retries) out of the CLI's one-line errors."""
    import logging

    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - diffusers missing is reported elsewhere
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_libraries()
    from .common import run_guarded

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    return run_guarded(lambda a: a._run(apply_config(a)), args)


if __name__ == "__main__":
    sys.exit(main())
