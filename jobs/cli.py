"""`fcodec`: one console command, one subcommand per job (jobs/<name>.py)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module under jobs/; each has add_parser(sub) and run(args).
JOBS = ["encode", "decode", "demo"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fcodec",
        description="foundation-codec: archive image datasets with a diffusion-based learned codec "
                    "(Relic et al., ECCV 2024). Run `fcodec <command> --help` for each command.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name in JOBS:
        mod = importlib.import_module(f"jobs.{name}")
        sp = mod.add_parser(sub)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        sp.set_defaults(_run=mod.run)
    return p


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
    return run_guarded(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
