"""`fcodec`: one console command, one subcommand per job (jobs/<name>.py)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Every module under jobs/ that defines add_parser(sub) and run(args) is a subcommand; these
# come first in --help, the rest alphabetically. Keep heavy imports inside run().
FIRST = ["demo", "encode", "decode", "compress", "decompress", "verify", "audit", "compare", "train", "bench"]


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
