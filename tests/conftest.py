"""One Ray cluster and one tiny world per test session: both are expensive, every test shares them.

The cluster is a real `ray start --head` on loopback (with the job server), so `ray job submit` is
tested against the same cluster the other tests use.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread avoids oversubscribing the shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_world():
    from trainer.tiny.bootstrap import ensure_tiny_world

    return ensure_tiny_world()


def cluster_env() -> dict:
    """Loopback only, no token auth for this throwaway cluster, and the venv's python for jobs."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """Start a head node; yields (gcs address, job server address)."""
    import ray

    from migration.collective import free_port
    from trainer.ray_setup import init_ray

    port, dash = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8", "--disable-usage-stats"],
        env=cluster_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    deadline = time.time() + 120
    while True:
        try:
            init_ray()
            break
        except Exception:  # noqa: BLE001 - the head is still starting
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError(f"ray head did not start; see {log.name}") from None
            time.sleep(1)
    yield address, f"http://127.0.0.1:{dash}"
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    import ray

    return ray.cluster_resources()
