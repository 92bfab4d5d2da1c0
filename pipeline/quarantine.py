"""A poisoned row fails alone: bounded decode attempts per row across crashes of the decoding process.

Ray restarts a crashed actor and re-delivers its batch (`max_restarts=-1`, `max_task_retries=-1`),
so one row that kills the process (a native crash, the OOM killer) used to come back forever and
take its batch with it. `guarded_decode` records, durably and *before* decoding, which rows are
being attempted (`AttemptLedger`: one small fsynced file per row under a directory that outlives
the process, e.g. node-local `/tmp/fcodec-ledger/<job>`):

1. rows never attempted are decoded together, as before, each marked "attempt 1" first;
2. rows already attempted (their batch died) are suspects: each is decoded alone, its attempt
   count raised and synced just before, so a second crash points at exactly one row;
3. a row whose count reached `max_attempts` without ever finishing is not decoded again: it
   yields `QuarantinedError` (a failure row), and the rest of its batch commits.

Finished rows (decoded, or failed cleanly) are removed from the ledger. With the default
`max_attempts=2` a poisoned row costs at most two crashes of its worker. The ledger is per node;
a batch re-delivered to another node starts its counts again there (still bounded: attempts per
node). This module knows nothing of the codec: `decode_fn(items) -> results` is the caller's.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

ENV_DIR = "FCODEC_LEDGER_DIR"
DEFAULT_MAX_ATTEMPTS = 2


class QuarantinedError(RuntimeError):
    """The row crashed its decoding process `max_attempts` times; it is failed without decoding."""


class AttemptLedger:
    """Decode attempts per key, on disk, surviving the death of the process that writes them."""

    def __init__(self, root: str | os.PathLike, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_attempts = int(max_attempts)

    @classmethod
    def from_env(cls, job: str = "default", max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> "AttemptLedger | None":
        """A ledger under `$FCODEC_LEDGER_DIR/<job>`, or None when the variable is unset."""
        d = os.environ.get(ENV_DIR)
        return cls(Path(d) / _safe(job), max_attempts) if d else None

    def attempts(self, key: str) -> int:
        """Attempts recorded for `key` that never finished (0 when none)."""
        try:
            return int(self._path(key).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def begin(self, key: str) -> int:
        """Record one more attempt at `key`, durably (write + fsync + rename); returns the count."""
        n = self.attempts(key) + 1
        p = self._path(key)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(str(n))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return n

    def finish(self, key: str) -> None:
        """The attempt at `key` ended (either way) without a crash: forget it."""
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def _path(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".n")


def guarded_decode(ledger: AttemptLedger | None, keys: Sequence[str], items: Sequence,
                   decode_fn: Callable[[list], list]) -> list:
    """`decode_fn(items)` with bounded attempts per row across crashes (see the module docstring).

    Returns one result per item, in order: `decode_fn`'s result, or a `QuarantinedError` for a row
    that crashed its process `ledger.max_attempts` times. Without a ledger: `decode_fn(items)`."""
    if ledger is None:
        return list(decode_fn(list(items)))
    out: list = [None] * len(items)
    fresh, suspects = [], []
    for i, k in enumerate(keys):
        n = ledger.attempts(k)
        if n >= ledger.max_attempts:
            out[i] = QuarantinedError(f"decoding this row crashed its worker {n} times; quarantined, not decoded again")
            ledger.finish(k)  # its failure row is the outcome; a later --retry-failed may try again
        elif n:
            suspects.append(i)
        else:
            fresh.append(i)
    if fresh:
        for i in fresh:
            ledger.begin(keys[i])
        for i, r in zip(fresh, decode_fn([items[i] for i in fresh])):
            out[i] = r
        for i in fresh:
            ledger.finish(keys[i])
    for i in suspects:  # one at a time: a crash now names its row
        ledger.begin(keys[i])
        out[i] = decode_fn([items[i]])[0]
        ledger.finish(keys[i])
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100].lstrip(".") or "default"


__all__ = ["AttemptLedger", "DEFAULT_MAX_ATTEMPTS", "ENV_DIR", "QuarantinedError", "guarded_decode"]
