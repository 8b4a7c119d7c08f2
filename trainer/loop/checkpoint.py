"""Checkpoints every k iterations: DeepSpeed states (weights + optimizer) for policy and critic, the actor
in Hugging Face format, the draft trainer's weights and optimizer (online draft adaptation), and the driver's
own state (data cursor, RNG, reward statistics, W&B run id).

A checkpoint counts only once `latest` names it, so a crash mid-save never leaves a half checkpoint
to resume from.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import ray
import torch


class CheckpointManager:
    def __init__(self, root: str, every: int, policy, critic, draft=None):
        self.root, self.every = Path(root) / "checkpoints", every
        self.policy, self.critic, self.draft = policy, critic, draft

    def due(self, iteration: int) -> bool:
        return self.every > 0 and (iteration + 1) % self.every == 0

    def save(self, iteration: int, sampler, reward_moments, run_id: str | None) -> Path:
        path = self.root / f"iter_{iteration + 1:05d}"
        path.mkdir(parents=True, exist_ok=True)
        ray.get(self.trainer_calls("save_checkpoint", path)
                + [self.policy.actors[0].save_hf.remote(str(path / "actor_hf"))])
        state = {
            "completed_iterations": iteration + 1,
            "data": sampler.state(),
            "reward_moments": reward_moments.state_dict(),
            "wandb_run_id": run_id,
            "rng": {"python": list(random.getstate()[1]), "numpy": _numpy_state(),
                    "torch": torch.get_rng_state().tolist()},
        }
        (path / "driver.json").write_text(json.dumps(state))
        tmp = self.root / "latest.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, self.root / "latest")
        return path

    def trainer_calls(self, method: str, path: Path) -> list:
        """`method` (save_checkpoint or load_checkpoint) on every trainer, each in its own folder of `path`: Ray
        refs to wait on."""
        jobs = self.policy.call_all(method, str(path / "policy"))
        if self.critic:
            jobs += self.critic.call_all(method, str(path / "critic"))
        if self.draft is not None:
            jobs.append(getattr(self.draft, method).remote(str(path / "draft")))
        return jobs

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        return self.root / marker.read_text().strip() if marker.is_file() else None

    def restore(self, sampler, reward_moments) -> dict:
        """Load the newest checkpoint into the trainers and the driver; returns its driver state."""
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"trainer.resume=true but no checkpoint under {self.root}")
        state = json.loads((path / "driver.json").read_text())
        ray.get(self.trainer_calls("load_checkpoint", path))
        sampler.load_state(state["data"])
        reward_moments.load_state_dict(state["reward_moments"])
        rng = state["rng"]
        random.setstate((3, tuple(rng["python"]), None))
        keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        return state


def _numpy_state() -> list:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return [keys.tolist(), int(pos), int(has_gauss), float(gauss)]
