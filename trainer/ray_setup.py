"""The one Ray bootstrap: join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a
local one bound to loopback so nothing listens beyond this machine."""
from __future__ import annotations

import os

import ray

LOOPBACK = "127.0.0.1"


def init_ray(num_cpus: int | None = None, namespace: str = "rlhfspec") -> dict:
    """Connect (or reuse an existing connection); returns the cluster's resources."""
    if not ray.is_initialized():
        # Workers inherit these: wandb stays offline unless the config says otherwise, no telemetry.
        env = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        os.environ.update(env)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], namespace=namespace, log_to_driver=True)
        else:
            # Ray maps 127.0.0.1 to the host's interface address unless it believes it is a
            # single-machine install; make it so, and every Ray port stays on loopback.
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), namespace=namespace,
                     include_dashboard=False, _node_ip_address=LOOPBACK,
                     runtime_env={"env_vars": env})
    return ray.cluster_resources()
