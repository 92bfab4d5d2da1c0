"""One Ray start-up policy for every job (compress, decompress, audit, train, bench).

* No address: start a private local Ray (`address="local"`), never joining a running cluster by
  accident. It is quiet: token auth off (a local Ray on loopback needs none, and it would write
  ~/.ray/auth_token), usage stats off, Ray's own logging at WARNING, no dashboard.
* An address (`auto` = the cluster this machine belongs to, or `ray://…`, or host:port): join
  it, with whatever auth and logging that cluster is configured for.

Ray itself is imported only here, when a job actually has work to run.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator


def quiet_local_environment() -> None:
    """Environment for a private local Ray (set before `import ray`; the user's settings win)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


_STARTED = False  # a private local Ray started by init_ray (not a cluster joined)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join `address` or start a private local Ray; True when this call started it."""
    global _STARTED
    if not address:
        quiet_local_environment()
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    # A private local Ray keeps its processes' logs in its session folder (the workers' errors
    # reach us as exceptions); a cluster's are forwarded as that cluster is configured.
    kw = {"include_dashboard": False, "configure_logging": True, "logging_level": logging.WARNING,
          "log_to_driver": bool(address)}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kw)
    quiet_ray_data()
    _STARTED = True
    return True


def actor_pool_args() -> dict:
    """Remote args for actor pools under this policy. On a private local Ray an actor that dies
    is not restarted: there is no other node to move to, and a restart would only replay the
    input that killed it (Ray also logs an E-level line for every restartable pool). On a
    cluster, Ray's default fault tolerance stays: actors move off a lost node."""
    return {"max_restarts": 0} if _STARTED else {}


def quiet_ray_data() -> None:
    """Ray Data's own bars and start-up prints off (ours are per image)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # its "progress bars disabled" hint contradicts our own bar
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """`with ray_session(addr):` Ray is up inside; shut down after if this block started it."""
    started = init_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def shutdown_if_started() -> None:
    """Shut Ray down if `init_ray` started it in this process (jobs call this when they end)."""
    global _STARTED
    if _STARTED:
        import ray

        ray.shutdown()
        _STARTED = False  # a private local Ray started by init_ray (not a cluster joined)


def local_cluster(temp_dir: str, head_cpus: int = 1):
    """A multi-node Ray on this machine (`ray.cluster_utils.Cluster`) for simulations and fault
    tests: a head with `head_cpus` CPUs and no GPU, its session files under `temp_dir` (short:
    Ray's socket paths have a length limit). Add nodes with `.add_node(...)`.

    Cluster writes the head's address to `<system tmp>/ray/ray_current_cluster` whatever
    `temp_dir` says, and fails with FileNotFoundError where that folder does not exist yet (a
    fresh machine on which no Ray has run with its default temp dir), so it is made first."""
    quiet_local_environment()
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    return Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "num_gpus": 0,
                                                         "include_dashboard": False, "temp_dir": temp_dir})
