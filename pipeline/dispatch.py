"""Shard dispatch: one call per work item on a pool of Ray actors, the driver asleep in `ray.wait`.

Why not Ray Data's `map_batches` over an actor pool, which ran the shards before: its streaming
executor runs a whole scheduling step (resources, backpressure, stats) ten times a second however
few shards finish, plus prefetch threads for the outputs. On a 2-core driver that was 12% of a
core for a 16-GPU job, i.e. ~170 ms of driver CPU per 1000 images (docs/performance.md). A shard
job needs none of it: the items are a few hundred small dicts and each result is one commit
record. Here the driver wakes when a shard finishes, and otherwise only to refresh a visible
progress bar.

* The pool: `max_size` actors are requested at once (capped at the number of items), so an
  autoscaler sees the whole demand and adds nodes; work starts once `min_size` of them have built
  their worker (codec loaded), within `start_timeout_s`, else a clear error naming what was asked
  for. Actors that come up later join as they do.
* Each ready actor has at most `depth` calls (one running, one waiting, so no actor idles while
  the driver commits and hands out the next); a new item goes to the least busy actor. Near the
  end (fewer items left than actors) only idle actors get one, so the tail is not stuck behind a
  busy actor while another waits.
* Failures follow Ray Data's pool defaults: on a cluster an actor restarts (`max_restarts=-1`)
  and Ray re-runs the calls it lost (`max_task_retries=-1`), e.g. when its node is preempted; with
  `max_restarts=0` (a private local Ray, raystart.actor_pool_args) a dead actor's error ends the
  job. An error raised by the worker itself ends the job too; what was committed stays committed.
* Actors are killed when the job ends, so the GPUs are free for the next job in this session.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

ACTOR_PROCESS = "ray::ShardWorker"  # how the pool's processes are named (ps, psutil): Ray titles them by class


class ShardWorker:
    """The actor: builds one `worker_cls(**kwargs)` (the codec is loaded once) and runs items.
    `named` maps more keyword arguments to the names of live actors, looked up here: a handle
    passed as a constructor argument would make Ray warn that a restart may fail (ray#53727)."""

    def __init__(self, worker_cls: type, kwargs: dict, named: dict[str, str] | None = None) -> None:
        import ray

        # A constructor that raises reaches the driver as an ActorDiedError whose message is Ray's
        # traceback text (the original exception is not kept), so a missing model would read as
        # "the actor died". The error is kept and raised by ready(), whose task error carries it.
        self.worker, self.start_error = None, None
        try:
            self.worker = worker_cls(**kwargs, **{k: ray.get_actor(v) for k, v in (named or {}).items()})
        except Exception as e:  # noqa: BLE001 - re-raised, unchanged, by ready()
            self.start_error = e

    def ready(self) -> bool:
        """Returns once the constructor has finished (calls run after it, in order); raises the
        constructor's error if it failed."""
        if self.start_error is not None:
            raise self.start_error
        return True

    def run(self, item: dict) -> Any:
        return self.worker.run(item)


def run_pool(items: list[dict], worker_cls: type, kwargs: dict, *, min_size: int, max_size: int,
             remote_args: dict, start_timeout_s: float, on_result: Callable[[Any], None],
             poll: Callable[[], None] | None = None, poll_s: float | None = None,
             depth: int = 2, named: dict[str, str] | None = None) -> dict:
    """Run `worker_cls(**kwargs).run(item)` for every item on up to `max_size` Ray actors created
    with `remote_args`; hand each result to `on_result` as it arrives (any order). `poll` is
    called every `poll_s` seconds (progress; never when `poll_s` is None). `named`: keyword
    arguments that are named actors, {argument: actor name} (see ShardWorker). Returns
    {"actors": started, "ready": n}."""
    import ray

    n = max(1, min(max_size, len(items)))
    need = max(1, min(min_size, n))
    opts = {"scheduling_strategy": "SPREAD", **remote_args}
    if opts.get("max_restarts", -1) != 0:
        opts.setdefault("max_restarts", -1)
        opts.setdefault("max_task_retries", -1)
    actor_cls = ray.remote(ShardWorker).options(**opts)
    actors = [actor_cls.remote(worker_cls, kwargs, named) for _ in range(n)]
    pings = {a.ready.remote(): i for i, a in enumerate(actors)}
    ready: list[int] = []
    load = [0] * n
    queue = deque(items)
    inflight: dict[Any, int] = {}  # call -> actor
    started = time.monotonic()
    next_poll = started + (poll_s or 0.0)
    try:
        while queue or inflight:
            while queue and len(ready) >= need:  # hand out work, least busy first
                i = min(ready, key=load.__getitem__)
                # queue behind a running item only while there is work for every actor: at the
                # end, an item queued behind a busy actor would leave an idle one waiting
                if load[i] >= (depth if len(queue) > len(ready) else 1):
                    break
                inflight[actors[i].run.remote(queue.popleft())] = i
                load[i] += 1
            now = time.monotonic()
            if len(ready) < need and now - started > start_timeout_s:
                raise TimeoutError(
                    f"only {len(ready)} of {need} shard workers started within {start_timeout_s:g} s "
                    f"(each asks for {_asked(opts)}): the cluster has too few free resources for the pool. "
                    "Add nodes or lower --gpus/--workers/--actor-cpus, or wait longer with "
                    "--actor-start-timeout.")
            waits = [*inflight, *pings]
            timeout = None
            if poll_s is not None:
                timeout = max(0.0, next_poll - now)
            if len(ready) < need:
                left = start_timeout_s - (now - started)
                timeout = max(0.0, left if timeout is None else min(timeout, left))
            done, _ = ray.wait(waits, num_returns=1, timeout=timeout) if waits else ([], [])
            for ref in done:
                if ref in pings:
                    i = pings.pop(ref)
                    _get(ref)  # a worker that cannot start (its codec fails to load) raises here
                    ready.append(i)
                else:
                    load[inflight.pop(ref)] -= 1
                    on_result(_get(ref))
            if poll is not None and poll_s is not None and time.monotonic() >= next_poll:
                poll()
                next_poll = time.monotonic() + poll_s
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
    return {"actors": n, "ready": len(ready)}


def _get(ref: Any) -> Any:
    """`ray.get` of a worker's call; an error it raised comes back as itself (a BackboneError
    that says how to point at a local snapshot, an OSError naming the object it could not
    write), not as Ray's wrapper whose first line is `ray::ShardWorker.run() (pid=...)`. The
    wrapper, with the worker's traceback, stays as its cause for --debug."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
            raise cause from e
        raise


def _asked(opts: dict) -> str:
    parts = [f"{opts.get('num_cpus', 1):g} CPU"]
    if opts.get("num_gpus"):
        parts.append(f"{opts['num_gpus']:g} GPU")
    return " + ".join(parts)
