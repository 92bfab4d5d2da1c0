"""Exact duplicates: one bitstream per distinct source sha256 within a dataset (`--dedupe`).

`Claims` is the one place that knows which key owns which content: a plain object inline, a
tiny Ray actor (num_cpus=0) shared by every worker of a run. A worker asks about each input's
sha256 before encoding it:

* a *confirmed* owner exists (its row is committed, or encoded ok in this run): the input is
  stored as a reference to that key (`ref_key`, no bitstream);
* another worker is encoding the same content right now (a tentative owner): encode it too (a
  duplicate stored twice, never a reference to a row that might yet fail);
* nobody: this input becomes the tentative owner, confirmed once it encoded ok.

Duplicates inside one chunk are grouped first (the first of a group encodes, the others refer
to it in the same shard). A shard whose rows refer to another shard's rows is committed only
once that shard is (`CommitRecord.depends_on`), so a reference never points at nothing.
Without `--dedupe` the same bookkeeping only counts the duplicates.
"""
from __future__ import annotations

SELF, ENCODE = "self", "encode"


class Claims:
    """sha256 -> (owner key, owner shard), confirmed or tentative."""

    def __init__(self, seed: dict[str, tuple[str, str]] | None = None) -> None:
        self.confirmed: dict[str, tuple[str, str]] = dict(seed or {})
        self.tentative: dict[str, tuple[str, str]] = {}

    def claim(self, pairs: list[tuple[str, str]], shard: str) -> list:
        """For each (sha256, key): [owner key, owner shard] to refer to, SELF (you own it:
        encode and confirm), or ENCODE (encode, someone else may own it)."""
        out = []
        for sha, key in pairs:
            if sha in self.confirmed:
                owner = self.confirmed[sha]
                out.append(SELF if owner == (key, shard) else list(owner))
            elif sha in self.tentative:
                out.append(SELF if self.tentative[sha] == (key, shard) else ENCODE)
            else:
                self.tentative[sha] = (key, shard)
                out.append(SELF)
        return out

    def confirm(self, results: list[tuple[str, str, str, bool]]) -> None:
        """(sha256, key, shard, encoded ok) of the inputs this worker owned."""
        for sha, key, shard, ok in results:
            if self.tentative.get(sha) == (key, shard):
                del self.tentative[sha]
                if ok:
                    self.confirmed[sha] = (key, shard)

    def size(self) -> int:
        return len(self.confirmed)

    def init_args(self) -> tuple:
        """Constructor arguments of an equal object (run.run_workers makes a Ray actor of it)."""
        return (self.confirmed,)


def call(claims, method: str, *args):
    """Call a Claims method on a plain object or a Ray actor handle."""
    fn = getattr(claims, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)
