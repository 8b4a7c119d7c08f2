"""Checkpoints every k iterations: DeepSpeed states (weights + optimizer) for policy and critic, the actor
in Hugging Face format, the draft trainer's weights and optimizer (online draft adaptation), and the driver's
own state (data cursor, RNG, reward statistics, W&B run id, and with rollout drafts the history of earlier
epochs' responses per prompt, in history.json beside driver.json).

A checkpoint cannot lie: it is written aside (`.iter_NNNNN.partial`), its manifest of file sizes last, and only
then renamed into place; resume takes the newest checkpoint whose files match its manifest and names any it
skipped. `latest` still names the newest one written, for people and scripts.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trainer.loop.deadline import wait

MANIFEST = "manifest.json"
HISTORY = "history.json"  # the driver's HistoryStore (rollout drafts), apart from driver.json: it may run to MBs
NAME = re.compile(r"^iter_(\d{5,})$")


def write_manifest(path: Path) -> None:
    """Every file's size, written last. Sizes, not hashes: a crash leaves missing or short files, which sizes
    catch, and hashing an 8B model's optimizer states would add minutes to every save."""
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    os.replace(tmp, path / MANIFEST)


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` (None: complete)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (its save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {size}"
    return None


class CheckpointManager:
    def __init__(self, root: str, every: int, policy, critic, draft=None, keep: int = 0,
                 timeout_s: float | None = None, log=print, history=None):
        """keep: the newest `keep` checkpoints stay on disk (0: all); timeout_s: the deadline of a save or load;
        history: the driver's HistoryStore (rollout drafts on), saved with each checkpoint and restored from it."""
        self.root, self.every, self.keep, self.timeout_s, self.log = Path(root) / "checkpoints", every, keep, timeout_s, log
        self.history = history
        self.attach(policy, critic, draft)

    def attach(self, policy, critic, draft=None) -> None:
        """The trainers to save and load (new ones after a restart)."""
        self.policy, self.critic, self.draft = policy, critic, draft

    def due(self, iteration: int) -> bool:
        return self.every > 0 and (iteration + 1) % self.every == 0

    def save(self, iteration: int, sampler, reward_moments, run_id: str | None) -> Path:
        final = self.root / f"iter_{iteration + 1:05d}"
        path = self.root / f".{final.name}.partial"
        shutil.rmtree(path, ignore_errors=True)  # a save that died half way
        path.mkdir(parents=True)
        wait(self.trainer_calls("save_checkpoint", path) + [self.policy.actors[0].save_hf.remote(str(path / "actor_hf"))],
             self.timeout_s, f"checkpoint save of {final.name}")
        write_driver_state(path, driver_state(iteration + 1, sampler, reward_moments, run_id, self.history))
        write_manifest(path)
        if final.exists():  # the same iteration saved before a rewind: the redone one is the same state
            shutil.rmtree(final)
        os.replace(path, final)
        tmp = self.root / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, self.root / "latest")
        self.prune()
        return final

    def trainer_calls(self, method: str, path: Path) -> list:
        """`method` (save_checkpoint or load_checkpoint) on every trainer, each in its own folder of `path`: Ray
        refs to wait on."""
        jobs = self.policy.call_all(method, str(path / "policy"))
        if self.critic:
            jobs += self.critic.call_all(method, str(path / "critic"))
        if self.draft is not None:
            jobs.append(getattr(self.draft, method).remote(str(path / "draft")))
        return jobs

    def saved(self) -> list[Path]:
        """Every checkpoint folder renamed into place, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def latest(self, report: bool = False) -> Path | None:
        """The newest complete checkpoint; with `report`, one line for each damaged one skipped on the way."""
        for path in self.saved():
            problem = damage(path)
            if problem is None:
                return path
            if report:
                self.log(f"checkpoint {path} skipped: damaged, {problem}", flush=True)
        return None

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; older folders go, complete or not."""
        if self.keep <= 0:
            return
        complete = [p for p in self.saved() if damage(p) is None]
        if len(complete) <= self.keep:
            return
        oldest_kept = int(NAME.match(complete[self.keep - 1].name).group(1))
        for path in self.saved():
            if int(NAME.match(path.name).group(1)) < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)

    def restore(self, sampler, reward_moments, path: Path | None = None) -> dict:
        """Load a checkpoint (the newest complete one by default) into the trainers and the driver; returns its
        driver state."""
        path = path or self.latest(report=True)
        if path is None:
            raise FileNotFoundError(f"trainer.resume=true but no complete checkpoint under {self.root}")
        state = read_driver_state(path)
        wait(self.trainer_calls("load_checkpoint", path), self.timeout_s, f"checkpoint load of {path.name}")
        load_driver_state(state, sampler, reward_moments, self.history)
        state.pop("history", None)
        return {**state, "path": str(path)}


def driver_state(completed: int, sampler, reward_moments, run_id: str | None, history=None) -> dict:
    """What the driver itself needs to go on from here: the data cursor, reward statistics, RNGs, and the
    rollout drafts' history (a HistoryStore's state, when given): a rewind to this state redoes the iterations
    after it with the same drafts, so exactly (the tokens never depend on drafts; the steps and times do)."""
    state = {
        "completed_iterations": completed,
        "data": sampler.state(),
        "reward_moments": reward_moments.state_dict(),
        "wandb_run_id": run_id,
        "rng": {"python": list(random.getstate()[1]), "numpy": _numpy_state(),
                "torch": torch.get_rng_state().tolist()},
    }
    if history is not None:
        state["history"] = history.state_dict()
    return state


def write_driver_state(path: Path, state: dict) -> None:
    """driver.json, and the history (if the state holds one) in history.json beside it."""
    state = dict(state)
    history = state.pop("history", None)
    if history is not None:
        (path / HISTORY).write_text(json.dumps(history, separators=(",", ":")))
    (path / "driver.json").write_text(json.dumps(state))


def read_driver_state(path: Path) -> dict:
    """A checkpoint's driver state as `write_driver_state` wrote it (with "history" when it saved one)."""
    state = json.loads((path / "driver.json").read_text())
    if (path / HISTORY).is_file():
        state["history"] = json.loads((path / HISTORY).read_text())
    return state


def load_driver_state(state: dict, sampler, reward_moments, history=None) -> None:
    """The driver's state back in place; `history` (the run's HistoryStore, rollout drafts on) becomes the state's,
    or empty when the state has none (saved with rollout drafts off)."""
    sampler.load_state(state["data"])
    reward_moments.load_state_dict(state["reward_moments"])
    if history is not None:
        history.load_state_dict(state.get("history") or type(history)(history.cfg).state_dict())
    rng = state["rng"]
    random.setstate((3, tuple(rng["python"]), None))
    keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


def _numpy_state() -> list:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return [keys.tolist(), int(pos), int(has_gauss), float(gauss)]
