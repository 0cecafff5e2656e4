"""Starting or joining Ray: the same code runs embedded on a laptop and under `ray job submit`."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets), else start one.

    Idempotent: a driver that already called `ray.init` keeps its connection.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": always a fresh embedded Ray, never a cluster that happens to run here
        # (pass --address auto to join one started with `ray start`)
        log.info("starting an embedded Ray (num_cpus=%s)", num_cpus)
        # Ray runs its workers at nice 15, and the vLLM engine processes an actor spawns inherit
        # it: beside any other process on a laptop they starve (the demo's caption stage took
        # 79 s at nice 15, 67 s at nice 0, under load). An embedded Ray is the user's own job.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    from pipeline.backend import quiet_ray_data

    quiet_ray_data()  # one progress display per stage (pipeline.backend), not Ray Data's per operator


def add_ray_args(parser) -> None:
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start an embedded Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded Ray (default: all)")
