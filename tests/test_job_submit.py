"""`ray job submit` of the tiny job to a running head (the session's `ray start --head`, token authentication on)
succeeds with the client in token mode, and a client without it is turned away."""
import subprocess

from conftest import BIN, ROOT, cluster_env


def test_ray_job_submit_runs_the_tiny_job(ray_head, tiny_world, tmp_path):
    _, job_server = ray_head
    env = cluster_env()
    assert env["RAY_AUTH_MODE"] == "token"
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", job_server], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

    cmd = [str(BIN / "ray"), "job", "submit", "--address", job_server, "--working-dir", str(ROOT), "--",
           "python", "launch.py", "trainer.iterations=1", "trainer.prompts_per_iteration=4",
           "trainer.samples_per_prompt=2", "trainer.micro_batch_size=8", "generation.num_instances=1",
           "tracking.progress=false", f"trainer.output_dir={tmp_path}", "trainer.save_every=1",
           "data.eval.size=16"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "training batches, first vs last 1 iteration(s): score/mean" in log  # launch.py's own closing line, from the job
    assert (tmp_path / "checkpoints" / "iter_00001" / "actor_hf" / "config.json").is_file()
