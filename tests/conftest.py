"""One Ray cluster and one tiny world per test session: both are expensive, every test shares them.

The cluster is a real `ray start --head` on loopback (with the job server and Ray's token authentication), so
`ray job submit` is tested against the same cluster the other tests use.
"""
import atexit
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# The Triton kernel's tests run it in Triton's CPU interpreter, which is chosen when triton is first imported (and
# torch.compile imports it): set before anything can.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Ray's token authentication, on as on users' clusters, with this session's secret (not ~/.ray/auth_token), for
# the head, `ray job submit` and this process. Set before any test imports ray: Ray reads the mode on import.
_AUTH_DIR = tempfile.mkdtemp(prefix="rlhfspec-ray-auth-")
atexit.register(shutil.rmtree, _AUTH_DIR, True)
(Path(_AUTH_DIR) / "auth_token").write_text(secrets.token_hex(32))
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(_AUTH_DIR) / "auth_token")})


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread avoids oversubscribing the shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quick_calibration(target, draft):
    """A rough profile of a tiny model pair for the `adaptive` strategy (one thread, as the engine tests run).
    Decisions change speed only, so exactness tests need no accurate one."""
    import torch

    from drafting import SpeculativeEngine
    from drafting.calibrate.profile import profile_engine

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng = SpeculativeEngine(target, draft, strategy="none", max_slots=4, max_len=48)
        return profile_engine(eng, quick=True, repeats=1, live_grid=[1, 2, 4], ctx_grid=[10, 24], verbose=False)
    finally:
        torch.set_num_threads(before)


def drafting_friendly_calibration(target, draft):
    """A calibration under which drafting pays at any batch size, keyed for this pair on one thread (the engine
    tests run on one), so `adaptive` drafts and its accept and reject paths both get exercised."""
    from drafting import SpeculativeEngine
    from drafting.policy.calibration import drafting_friendly

    return drafting_friendly({**SpeculativeEngine(target, draft, strategy="none", max_slots=1, max_len=8)
                              .calibration_key(), "threads": 1})


@pytest.fixture(scope="session")
def calibrate():
    """quick_calibration(target, draft) for tests that build an `adaptive` engine (.friendly: one under which
    drafting always pays)."""
    quick_calibration.friendly = drafting_friendly_calibration
    return quick_calibration


@pytest.fixture(scope="session")
def tiny_world():
    from trainer.tiny.bootstrap import ensure_tiny_world

    return ensure_tiny_world()


def cluster_env() -> dict:
    """Loopback only, the venv's python for jobs; token auth comes with os.environ (set above)."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """Start a head node; yields (gcs address, job server address)."""
    import ray

    from migration.collective import free_port
    from trainer.loop.ray_setup import init_ray

    port, dash, agent = free_port(), free_port(), free_port()  # no default port: another head may hold it
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    # Its own temp dir: a job's driver finds its cluster through <temp dir>/ray_current_cluster, which in the
    # shared /tmp/ray names whichever cluster on this machine started last (short path: socket names)
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--temp-dir={temp_dir}", "--num-cpus=8", "--disable-usage-stats"],
        env=cluster_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    os.environ.update({"RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    deadline = time.time() + 120
    while True:
        try:
            init_ray()
            break
        except Exception:  # noqa: BLE001 - the head is still starting
            if time.time() > deadline or head.poll() is not None:
                head.terminate()
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
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    import ray

    return ray.cluster_resources()
