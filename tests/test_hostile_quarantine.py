"""A poisoned row fails alone: `pipeline.quarantine.guarded_decode` bounds the attempts per row
across real crashes (SIGSEGV) of the decoding process, re-delivered as Ray re-delivers them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.quarantine import AttemptLedger, guarded_decode

ROOT = Path(__file__).resolve().parents[1]
BATCH = ["a", "b", "poison", "c", "d"]

CHILD = r"""
import json, os, signal, sys
from pipeline.quarantine import AttemptLedger, guarded_decode
ledger = AttemptLedger(sys.argv[1], max_attempts=2)
def decode(items):  # "poison" kills the process as a native crash would
    if "poison" in items:
        os.kill(os.getpid(), signal.SIGSEGV)
    return [x.upper() for x in items]
batch = json.loads(sys.argv[2])
print(json.dumps([r if isinstance(r, str) else f"{type(r).__name__}: {r}" for r in guarded_decode(ledger, batch, batch, decode)]))
"""


def test_poisoned_row_fails_alone_after_two_crashes(tmp_path):
    runs, rcs = 0, []
    while True:  # what Ray does with a crashed actor's task: restart the process, deliver the batch again
        runs += 1
        p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ledger"), json.dumps(BATCH)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rcs.append(p.returncode)
        if p.returncode == 0 or runs == 6:
            break
    assert rcs == [-11, -11, 0]  # the batch attempt, the poisoned row's solo attempt, then it is quarantined
    out = json.loads(p.stdout)
    assert out[:2] == ["A", "B"] and out[3:] == ["C", "D"]
    assert out[2].startswith("QuarantinedError: decoding this row crashed its worker 2 times")
    assert not list((tmp_path / "ledger").glob("*.n"))  # every row finished: nothing left behind


def test_ledger_without_crashes_is_transparent(tmp_path):
    ledger = AttemptLedger(tmp_path, max_attempts=2)
    calls = []

    def decode(items):
        calls.append(list(items))
        return [x * 2 for x in items]

    assert guarded_decode(ledger, ["k1", "k2"], [1, 2], decode) == [2, 4]
    assert calls == [[1, 2]]  # one batch call, as without a ledger
    assert guarded_decode(None, ["k1"], [3], decode) == [6]
    assert ledger.attempts("k1") == 0


def test_suspects_are_decoded_one_at_a_time(tmp_path):
    ledger = AttemptLedger(tmp_path, max_attempts=3)
    ledger.begin("x")  # x's batch died once
    calls = []

    def decode(items):
        calls.append(list(items))
        return list(items)

    assert guarded_decode(ledger, ["w", "x", "y"], ["W", "X", "Y"], decode) == ["W", "X", "Y"]
    assert calls == [["W", "Y"], ["X"]]


def test_env_configures_the_ledger(tmp_path, monkeypatch):
    monkeypatch.delenv("FCODEC_LEDGER_DIR", raising=False)
    assert AttemptLedger.from_env("job") is None
    monkeypatch.setenv("FCODEC_LEDGER_DIR", str(tmp_path))
    led = AttemptLedger.from_env("../job one")
    assert led is not None and led.root == tmp_path / "_job_one"  # a job name cannot leave the ledger folder
    assert AttemptLedger.from_env("..").root == tmp_path / "default"


@pytest.mark.slow
def test_ray_actor_restarts_then_the_batch_commits_without_the_poisoned_row(tmp_path):
    """Real Ray: an actor with Ray Data's pool defaults (max_restarts=-1, max_task_retries=-1)
    whose decode crashes the worker process on one row; one call returns the whole batch."""
    import ray

    # local: a multi-node test on another xdist worker leaves <tmp>/ray/ray_current_cluster naming
    # its live cluster, which a bare ray.init() would try to join
    ray.init(address="local", num_cpus=1, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        @ray.remote(max_restarts=-1, max_task_retries=-1)
        class Decoder:
            def __init__(self, d):
                self.ledger = AttemptLedger(d, max_attempts=2)

            def decode(self, batch):
                import signal

                def fn(items):
                    if "poison" in items:
                        os.kill(os.getpid(), signal.SIGSEGV)
                    return [x.upper() for x in items]

                return [r if isinstance(r, str) else "quarantined" for r in guarded_decode(self.ledger, batch, batch, fn)]

        a = Decoder.remote(str(tmp_path / "ledger"))
        assert ray.get(a.decode.remote(BATCH), timeout=120) == ["A", "B", "quarantined", "C", "D"]
    finally:
        ray.shutdown()
