"""Shared CLI plumbing: exit codes, one-line errors, atomic writes, the codec from the options."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .options import add_codec_options, codec_spec

# Exit codes of every job (documented in `fcodec --help` and the README):
EXIT_OK = 0  # every row (image) succeeded
EXIT_SOME_FAILED = 1  # the job finished, some rows failed (status = 'failed' rows; --retry-failed)
EXIT_ERROR = 2  # the job could not run, or nothing succeeded
EXIT_CODES_HELP = ("exit codes: 0 = all images ok; 1 = finished, some images failed (recorded as failed rows); "
                   "2 = could not run (bad arguments, missing SRC, another run holds DST, codec mismatch) or nothing "
                   "succeeded")

# Known, user-facing failures: printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError)


def exit_code(run: dict, totals: dict) -> int:
    """The exit code of a dataset job from this run's counts (or the dataset's, when this run had
    nothing to do)."""
    c = run if run.get("rows") else totals
    if not c.get("rows"):
        return EXIT_OK
    if c.get("ok", 0) == 0:
        return EXIT_ERROR
    return EXIT_SOME_FAILED if c.get("failed", 0) else EXIT_OK


def add_codec_args(p: argparse.ArgumentParser, encode: bool = True, decode: bool = True) -> None:
    """The codec options every job shares (`fcodec encode`, `compress`, `audit`, ...)."""
    add_codec_options(p, encode=encode, decode=decode)


def codec_from_args(args: argparse.Namespace):
    """Build the codec the options describe."""
    return codec_spec(args).build()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file so readers never see half of it (pipeline.storage.write_atomic)."""
    from pipeline.storage import get_fs, write_atomic

    fs, p = get_fs(str(Path(path).resolve()))
    write_atomic(fs, p, data)


def run_guarded(fn, args: argparse.Namespace) -> int:
    """Run a job; known failures become one line on stderr (traceback only with --debug)."""
    try:
        rc = fn(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("fcodec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's single place that turns errors into messages
        if getattr(args, "debug", False):
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, USER_ERRORS):
            msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
        print(f"fcodec: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
