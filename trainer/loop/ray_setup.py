"""The one Ray bootstrap: join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a
local one bound to loopback so nothing listens beyond this machine."""
from __future__ import annotations

import logging
import os

import ray

LOOPBACK = "127.0.0.1"


def _stay_on_loopback() -> None:
    # Ray maps 127.0.0.1 to the host's interface address unless it believes it is a single-machine
    # install; make it believe so, and every Ray port stays on loopback.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


# Workers have no terminal: Hugging Face's per-actor bars ("Loading weights", "Writing model shards") are noise.
WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _quiet_worker_death_notices() -> None:
    """Ray pushes every worker death to the driver as a dozen-line `(raylet) A worker died or was killed while
    executing a task ...` notice; the run's restart line (or its last line) already names the actor and Ray's
    reason. Ray has no setting for these notices, so the driver's printer of pushed errors drops them, and only
    them (a private function: if it moves, the notices print again, nothing else changes)."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "quiet_deaths", False):
        return

    def printer(data, ignore_prefix):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and all(str(line).startswith("A worker died or was killed")
                                                          for line in lines):
            return None
        return original(data, ignore_prefix)

    printer.quiet_deaths = True
    ray_worker.print_to_stdstream = printer


def init_ray(num_cpus: int | None = None, namespace: str = "rlhfspec") -> dict:
    """Connect (or reuse an existing connection); returns the cluster's resources."""
    if not ray.is_initialized():
        # after a death the driver leaves the dead actor's peers' failed calls unread on purpose (recovery
        # handles the death once): Ray's "Unhandled error" dump of each is a duplicate of the restart line
        env = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_IGNORE_UNHANDLED_ERRORS": "1"}
        os.environ.update(env)
        address = os.environ.get("RAY_ADDRESS")
        if address:
            if address.split("://")[-1].startswith((LOOPBACK, "localhost")):
                _stay_on_loopback()
            # merged with a submitted job's runtime env (its working_dir stays)
            ray.init(address=address, namespace=namespace, log_to_driver=True, logging_level=logging.WARNING,
                     runtime_env={"env_vars": WORKER_ENV})
        else:
            _stay_on_loopback()
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the same for worker processes
            # Ray turns token authentication on for a local cluster and warns that it did: wanted, not news
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), namespace=namespace,
                     include_dashboard=False, _node_ip_address=LOOPBACK, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {**env, **WORKER_ENV}})
        _quiet_worker_death_notices()
    return ray.cluster_resources()
