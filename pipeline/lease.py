"""One writer per dataset: a lease object `DST/__fcodec__/lease.json` with its owner and expiry.

Taken with a conditional create (local: a hard link, which fails if the name exists; S3 and
moto: `If-None-Match: *` through s3fs's exclusive "xb" mode), renewed by a heartbeat thread, and
removed when the run ends. A second run finds it held and stops at once naming the holder; a
crashed holder stops renewing, so its lease expires and the next run takes it over (at once
when the holder ran on the same host and its process is gone).

Takeover of an expired lease is delete-then-create, which two runs racing for the same dead
lease could interleave; the read-back after the create makes the loser notice and stop.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .layout import LEASE
from .storage import is_local, join, read_bytes

DEFAULT_TTL_S = 600.0


class LeaseHeld(RuntimeError):
    """Another run holds the dataset's lease."""


@dataclass
class Lease:
    """A held lease; `release()` (or leaving the `with` block) gives it back."""

    fs: object
    path: str
    owner: str
    ttl_s: float
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    def body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "renewed_at": now, "expires_at": now + self.ttl_s,
                           "ttl_s": self.ttl_s}).encode()

    def start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    _overwrite(self.fs, self.path, self.body())
                except Exception:  # noqa: BLE001 - a missed beat is retried; expiry is ttl away
                    pass

        self._thread = threading.Thread(target=beat, name="fcodec-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop:
            self._stop.set()
        try:
            cur = _read(self.fs, self.path)
            if cur and cur.get("owner") == self.owner:
                self.fs.rm(self.path)
        except Exception:  # noqa: BLE001 - an unreleased lease simply expires
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire(fs, root: str, ttl_s: float = DEFAULT_TTL_S, owner: str | None = None) -> Lease:
    """Take the lease on the dataset at `root`, or raise `LeaseHeld` naming the holder."""
    path = join(root, LEASE)
    lease = Lease(fs, path, owner or owner_id(), ttl_s)
    for _ in range(2):
        if _create(fs, path, lease.body()):
            got = _read(fs, path)
            if got and got.get("owner") == lease.owner:
                lease.start_heartbeat()
                return lease
        cur = _read(fs, path)
        if cur is None:
            continue  # vanished between create and read: try again
        if float(cur.get("expires_at", 0)) > time.time() and not _holder_is_dead(cur.get("owner", "")):
            left = float(cur["expires_at"]) - time.time()
            raise LeaseHeld(f"{root} is being written by another run ({cur.get('owner')}); its lease expires in "
                            f"{left:.0f} s unless renewed. Wait for it to finish, or if that run is gone, delete "
                            f"{path}")
        fs.rm(path)  # expired: the holder crashed
    raise LeaseHeld(f"could not take the lease {path}: another run is taking it at the same time")


def _holder_is_dead(owner: str) -> bool:
    """True when the holder ran on this host and its process is gone (a crashed run here need
    not wait for its lease to expire)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read(fs, path: str) -> dict | None:
    try:
        d = json.loads(read_bytes(fs, path))
        return d if isinstance(d, dict) else {}
    except FileNotFoundError:
        return None
    except ValueError:
        return {"owner": "unknown (unreadable lease)", "expires_at": 0}


def _create(fs, path: str, body: bytes) -> bool:
    """Create `path` only if it does not exist; False when it does."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        with fs.open(path, "xb") as f:
            f.write(body)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # s3fs reports a failed If-None-Match as an OSError (PreconditionFailed)
        if "Precondition" in str(e) or "412" in str(e):
            return False
        raise


def _overwrite(fs, path: str, body: bytes) -> None:
    if is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(body)
