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
    from .common import EXIT_CODES_HELP
    from .options import add_config_option

    p = argparse.ArgumentParser(
        prog="fcodec",
        description="foundation-codec: archive image datasets with a diffusion-based learned codec "
                    "(Relic et al., ECCV 2024). Run `fcodec <command> --help` for each command.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name in job_names():
        mod = importlib.import_module(f"jobs.{name}")
        sp = mod.add_parser(sub)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        if not sp.get_default("_has_config"):  # every job takes --config FILE_OR_URL
            add_config_option(sp)
        sp.set_defaults(_run=mod.run, _parser=sp)
    return p


def quiet_libraries() -> None:
    """Keep library chatter (dtype advice, hub retries) out of the CLI's one-line errors, without
    importing the libraries (they read these variables when a job first imports them)."""
    import logging

    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(var, "error")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from .options import apply_config

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
    return run_guarded(lambda a: a._run(apply_config(a, a._parser)), args)


if __name__ == "__main__":
    sys.exit(main())
