"""One Ray cluster and one tiny world per test session: both are expensive, every test shares them."""
import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_world():
    from trainer.bootstrap import ensure_tiny_world

    return ensure_tiny_world()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from trainer.ray_setup import init_ray

    resources = init_ray(num_cpus=8)  # logical CPUs: tiny actors share the 2 real cores
    yield resources
    ray.shutdown()
