"""The shard dispatcher (pipeline/dispatch.py) on a real local Ray: every item once, the pool's
bounds (min to start, max asked for), a clear error when too few actors can start, worker errors
surfaced, and actors gone (their resources free) when the pool ends."""
from __future__ import annotations

import os
import sys
import time

import pytest
import ray.cloudpickle

from pipeline.dispatch import run_pool

# Actors cannot import a test module by name: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowEcho:
    """A stand-in shard worker: each item takes `delay_s`; returns (item, this actor's pid)."""

    def __init__(self, delay_s: float = 0.05, fail_on: int | None = None, boom: bool = False) -> None:
        if boom:
            raise RuntimeError("the codec could not be loaded (test)")
        self.delay_s, self.fail_on = delay_s, fail_on

    def run(self, item: dict) -> tuple[int, int]:
        if item["i"] == self.fail_on:
            raise ValueError(f"shard {item['i']} is broken (test)")
        time.sleep(self.delay_s)
        return item["i"], os.getpid()


def _free_cpus(ray, want: float, timeout: float = 20.0) -> float:
    end = time.time() + timeout
    while time.time() < end and ray.available_resources().get("CPU", 0) < want:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


def test_every_item_once_across_the_pool_then_actors_released(ray_local):
    ray = ray_local
    got, polls = [], []
    out = run_pool([{"i": i} for i in range(40)], SlowEcho, {"delay_s": 0.05}, min_size=3, max_size=3,
                   remote_args={"num_cpus": 1, "max_restarts": 0}, start_timeout_s=120, on_result=got.append,
                   poll=lambda: polls.append(1), poll_s=0.05)
    assert out == {"actors": 3, "ready": 3}
    assert sorted(i for i, _ in got) == list(range(40))  # each item once
    pids = {p for _, p in got}
    assert len(pids) == 3 and os.getpid() not in pids  # shared by all three actors, none the driver
    assert min(sum(1 for _, p in got if p == q) for q in pids) >= 5  # none starved
    assert len(polls) >= 2  # 40 x 0.05 s over 3 actors: ~0.7 s of polling at 0.05 s
    assert _free_cpus(ray, 4) == 4  # the actors were killed: their CPUs are free again


def test_pool_runs_on_the_actors_that_fit_and_asks_for_the_rest(ray_local):
    """min 1, max 3 at 1.5 CPU each on 4 CPUs: two actors fit and do all the work; the third
    stays asked for (what an autoscaler would add a node for) and is released at the end."""
    ray = ray_local
    got = []
    # 0.4 s an item (4.8 s on one actor): the first actor must not finish all 12 before the second
    # has started (at 0.05 s it did once, on a loaded CI machine: ready 1)
    out = run_pool([{"i": i} for i in range(12)], SlowEcho, {"delay_s": 0.4}, min_size=1, max_size=3,
                   remote_args={"num_cpus": 1.5, "max_restarts": 0}, start_timeout_s=120, on_result=got.append)
    assert out == {"actors": 3, "ready": 2}
    assert sorted(i for i, _ in got) == list(range(12)) and len({p for _, p in got}) == 2
    assert _free_cpus(ray, 4) == 4


def test_pool_that_cannot_start_is_a_clear_timeout(ray_local):
    t0 = time.time()
    with pytest.raises(TimeoutError, match=r"only 0 of 1 shard workers started within 1 s \(each asks for "
                                           r"1 CPU \+ 1 GPU\).*--actor-start-timeout"):
        run_pool([{"i": 0}], SlowEcho, {}, min_size=1, max_size=1,
                 remote_args={"num_cpus": 1, "num_gpus": 1, "max_restarts": 0}, start_timeout_s=1,
                 on_result=lambda r: None)
    assert time.time() - t0 < 30
    assert _free_cpus(ray_local, 4) == 4


def test_worker_errors_end_the_pool_with_their_message(ray_local):
    # A constructor's error comes back as itself, its message the CLI's one line (not Ray's
    # "ActorDiedError: The actor died because of an error raised in its creation task, ..."),
    # under the local policy and the cluster's (restartable actors).
    for restarts in (0, -1):
        with pytest.raises(RuntimeError) as err:
            run_pool([{"i": 0}], SlowEcho, {"boom": True}, min_size=1, max_size=1,
                     remote_args={"num_cpus": 1, "max_restarts": restarts}, start_timeout_s=60,
                     on_result=lambda r: None)
        assert type(err.value) is RuntimeError and str(err.value) == "the codec could not be loaded (test)"
    got = []
    with pytest.raises(ValueError, match="shard 5 is broken") as err:
        run_pool([{"i": i} for i in range(10)], SlowEcho, {"fail_on": 5}, min_size=2, max_size=2,
                 remote_args={"num_cpus": 1, "max_restarts": 0}, start_timeout_s=60, on_result=got.append)
    assert type(err.value) is ValueError and str(err.value) == "shard 5 is broken (test)"  # as the worker raised it
    worker_tb = str(err.value.__cause__)  # Ray's wrapper, with the worker's traceback, kept for --debug
    assert "ShardWorker.run()" in worker_tb and 'test_dispatch.py", line' in worker_tb
    assert 5 not in {i for i, _ in got}
    assert _free_cpus(ray_local, 4) == 4
