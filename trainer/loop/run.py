"""Wiring for one run: checks first, then actors, then the driver loop. `launch.py` calls `run(cfg)`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from configs.schema import Config, adapts_draft, critic_init
from trainer.loop.preflight import (RunPaths, check_memory, check_models, check_resources, instance_memory,
                                    memory_needs_ray, preflight)


@dataclass
class RLActors:
    fleet: object  # RolloutFleet
    policy: object  # TrainerGroup of PolicyTrainer ranks
    critic: object | None  # TrainerGroup of Critic ranks (PPO only)
    reference: object  # Restartable ReferenceActor (trainer/loop/recovery.py)
    reward: object  # Restartable RewardActor
    draft: object | None = None  # DraftTrainer handle when the draft adapts online (draft.online)
    restarts: object | None = None  # the run's Restarts (trainer.max_restarts)

    def trainers(self) -> dict:
        """The actors with training state, by the names restart lines give them."""
        named = {f"policy rank {i}": a for i, a in enumerate(self.policy.actors)}
        if self.critic is not None:
            named.update({f"critic rank {i}": a for i, a in enumerate(self.critic.actors)})
        if self.draft is not None:
            named["draft trainer"] = self.draft
        return named

    def shutdown_trainers(self) -> None:
        import ray

        for group in (self.policy, self.critic):
            if group is not None:
                group.shutdown()
        if self.draft is not None:
            ray.kill(self.draft)

    def shutdown(self) -> None:
        self.shutdown_trainers()
        self.reference.kill()
        self.reward.kill()
        self.fleet.shutdown()


def build_trainers(cfg: Config, paths: RunPaths) -> tuple:
    """The roles with training state, from the initial weights: policy ranks, critic ranks (PPO), draft trainer."""
    import ray

    from actors.critic import Critic
    from actors.draft_trainer import DraftTrainer
    from actors.policy_trainer import PolicyTrainer
    from actors.trainer_group import create_trainer_group
    from trainer.loop.deadline import wait

    t, m = cfg.trainer, cfg.model
    device = "cuda" if t.gpus_per_actor > 0 else "cpu"
    per_rank = {"num_cpus": t.cpus_per_actor, "num_gpus": t.gpus_per_actor}
    common = {"temperature": max(cfg.generation.temperature, 1e-6), "seed": cfg.seed, "zero_stage": t.zero_stage,
              "micro_batch_size": t.micro_batch_size, "ppo_epochs": t.ppo_epochs, "max_norm": t.max_norm,
              "weight_decay": t.weight_decay, "dtype": m.dtype, "device": device, "threads": t.threads_per_actor}
    policy_cfg = {**common, "lr": t.actor_lr, "tokenizer_path": paths.actor, "clip_eps": t.clip_eps,
                  "kl_coef": t.kl_coef, "kl_estimator": t.kl_estimator, "use_kl_loss": t.use_kl_loss, "entropy_coef": t.entropy_coef}
    critic_cfg = {**common, "lr": t.critic_lr, "value_clip": t.value_clip}

    policy = create_trainer_group(PolicyTrainer, t.world_size, per_rank, paths.actor, policy_cfg)
    critic = None
    if t.algorithm == "ppo":
        init_from = critic_init(cfg)
        critic_path = paths.reward if init_from == "reward" else paths.actor
        critic = create_trainer_group(Critic, t.world_size, per_rank, critic_path, critic_cfg, init_from=init_from)
    draft = None
    if adapts_draft(cfg):
        draft = ray.remote(DraftTrainer).options(**per_rank).remote(
            paths.draft, cfg.draft, cfg.generation.temperature, seed=cfg.seed, device=device,
            threads=t.threads_per_actor, actor_path=paths.actor)
        wait(draft.ready.remote(), t.call_timeout_s, "draft trainer start-up")
    return policy, critic, draft


def build_actors(cfg: Config, paths: RunPaths, restarts=None) -> RLActors:
    import ray

    from actors.reference import ReferenceActor
    from actors.reward import RewardActor
    from trainer.loop.deadline import wait
    from trainer.loop.recovery import Restartable
    from trainer.loop.rollout import RolloutFleet

    t, m = cfg.trainer, cfg.model
    device = "cuda" if t.gpus_per_actor > 0 else "cpu"
    remote = lambda cls: ray.remote(cls).options(num_cpus=t.cpus_per_actor, num_gpus=t.gpus_per_actor)  # noqa: E731
    policy, critic, draft = build_trainers(cfg, paths)
    reference = Restartable("reference", lambda: remote(ReferenceActor).remote(
        paths.actor, device=device, threads=t.threads_per_actor, dtype=m.dtype), restarts, t.call_timeout_s)
    reward = Restartable("reward actor", lambda: remote(RewardActor).remote(
        paths.reward, replace(t, reward_fn=paths.reward_fn), dtype=m.dtype), restarts, t.call_timeout_s)
    fleet = RolloutFleet(cfg.generation, paths.actor, paths.draft, m.dtype, cfg.balancer,
                         restarts=restarts, sync_timeout_s=t.sync_timeout_s, call_timeout_s=t.call_timeout_s)
    wait([reference.handle.ready.remote(), reward.handle.ready.remote()], t.call_timeout_s, "actor start-up")
    return RLActors(fleet, policy, critic, reference, reward, draft=draft, restarts=restarts)


def skip_hopeless_profile(cfg: Config, paths: RunPaths, log=print) -> bool:
    """`adaptive` without a profile of this pair here profiles it on first use. When the draft's distillation
    record (DRAFT/distill.json) says drafting cannot pay on any hardware, adaptive could only ever decode plain:
    the run decodes plain from the start (generation.strategy none, so no draft trainer either), with one line.
    True when it did (rollout drafts on auto go off with adaptive; the line says so)."""
    from drafting.calibrate.first_use import profile_needed
    from drafting.policy.verdict import distilled_acceptance, forward_cost, upper_bound

    g = cfg.generation
    if paths.draft is None or not profile_needed(g.strategy, g.calibration):
        return False
    acceptance = distilled_acceptance(paths.draft)
    if acceptance is None:
        return False
    from transformers import AutoConfig

    from drafting.model.head import draft_config

    actor = AutoConfig.from_pretrained(paths.actor)
    bound = upper_bound(acceptance, forward_cost(draft_config(paths.draft, actor)) / forward_cost(actor))
    if bound >= 1.0:
        return False
    log(f"draft verdict: acceptance {acceptance:.2f} per drafted token ({paths.draft}/distill.json): drafting "
        f"cannot pay on any hardware (at most x{bound:.2f}), so adaptive would only decode plain -> this "
        f"run skips the first-use profile and decodes plain (generation.strategy=none); train the draft longer, "
        f"or use another kind of draft (fewer layers, or a head)"
        + ("; rollout drafts (generation.rollout_drafts auto) go off with adaptive" if g.rollout_drafts == "auto"
           else ""), flush=True)
    g.strategy = "none"
    return True


def run(cfg: Config) -> list[dict]:
    """Run the configured RLHF job end to end; returns per-iteration metrics."""
    from trainer.loop import stop
    from trainer.loop.recovery import Restarts

    checked = preflight(cfg)  # a bad input stops here, before Ray starts (or is even imported)
    from trainer.loop.ray_setup import init_ray

    paths = checked.paths
    skip_hopeless_profile(cfg, paths)
    os.environ.setdefault("WANDB_MODE", cfg.tracking.wandb_mode)
    resources = init_ray()
    stop.install()  # again: ray.init sets its own SIGTERM handler
    check_resources(cfg, resources)  # before any model loads
    if memory_needs_ray(cfg):
        check_memory(cfg, *check_models(cfg, paths), *instance_memory(cfg))
    print(f"{len(checked.prompts)} prompts from {paths.train_prompts}; actor {paths.actor}; "
          f"draft {paths.draft or 'none (plain decoding)'}; reward model {paths.reward or 'none'}", flush=True)
    actors = build_actors(cfg, paths, Restarts(cfg.trainer.max_restarts))
    try:
        return train(cfg, actors, checked)
    finally:
        actors.shutdown()


def train(cfg: Config, actors: RLActors, checked) -> list[dict]:
    """The driver loop on built actors (`run` builds them; bench.e2e restarts one set for many runs), from the
    preflight's prompts and tokenizer. When an actor with training state dies, the loop rewinds to the last
    checkpoint (or the run's start) on new trainers and goes on, within trainer.max_restarts."""
    from trainer.core import algorithms as algo
    from trainer.loop.checkpoint import CheckpointManager, driver_state
    from trainer.loop.data import PromptSampler
    from trainer.loop.driver import Driver
    from trainer.loop.recovery import RestartsExhausted
    from trainer.loop.rollout import history_store
    from trainer.loop.tracking import Tracking

    t = cfg.trainer
    history = history_store(cfg.generation)  # rollout drafts' earlier responses per prompt (None: off), the run's
    checkpoints = CheckpointManager(t.output_dir, t.save_every, actors.policy, actors.critic, actors.draft,
                                    keep=t.keep_checkpoints, timeout_s=t.call_timeout_s, history=history)
    sampler = PromptSampler(checked.prompts, cfg.seed, cfg.data.shuffle)
    tokenizer, eval_prompts = checked.tokenizer, checked.eval_prompts
    reward_moments = algo.RunningMoments()
    start, run_id = 0, None
    if t.resume:
        state = checkpoints.restore(sampler, reward_moments)
        start, run_id = state["completed_iterations"], state["wandb_run_id"]
        print(f"resumed from {state['path']} after {start} iterations", flush=True)
    # the run's start is a checkpoint too: a death before the first save rewinds here (trainers from the
    # initial weights, or from the checkpoint resumed)
    origin = json.loads(json.dumps(driver_state(start, sampler, reward_moments, run_id, history)))
    tracking = Tracking(cfg.tracking.project, cfg.tracking.run_name, cfg.to_dict(), cfg.tracking.wandb,
                        cfg.tracking.wandb_mode, t.output_dir, resume_id=run_id)
    rows: dict[int, dict] = {}  # iteration -> its metrics, each iteration once
    try:
        while True:
            driver = Driver(cfg, actors, tokenizer, sampler, tracking, checkpoints, reward_moments, eval_prompts,
                            history_store=history)
            try:
                driver.sync_weights(start)  # instances start from exactly the trainers' weights (resumed ones too)
                driver.fit(start)
                rows.update({row["iteration"]: row for row in driver.history})
                return [rows[k] for k in sorted(rows)]
            except RestartsExhausted:
                raise
            except Exception as error:  # noqa: BLE001 - re-raised unless an actor with training state died
                dead = dead_trainers(actors, error)
                if not dead:
                    raise
                rows.update({row["iteration"]: row for row in driver.history})
                start = rewind(cfg, checked.paths, actors, checkpoints, origin, sampler, reward_moments, dead,
                               driver.iteration if driver.iteration is not None else start)
                for k in [k for k in rows if k >= start]:
                    del rows[k]
    finally:
        tracking.finish()


def dead_trainers(actors: RLActors, error: BaseException) -> dict[str, str]:
    """{name: Ray's reason} of the trainers that died (or stopped answering) behind `error`; empty when the
    error is an actor's own."""
    import ray

    from trainer.loop.recovery import is_death, probe

    if not (is_death(error) or isinstance(error, ray.exceptions.RayError)):
        return {}
    return probe(actors.trainers())


def rewind(cfg: Config, paths: RunPaths, actors: RLActors, checkpoints, origin: dict, sampler, reward_moments,
           dead: dict[str, str], in_progress: int) -> int:
    """New trainers (DeepSpeed's group re-forms only whole), loaded from the newest complete checkpoint or the
    run's start; the next weight push gives the instances their weights. Returns the iteration to go on from."""
    from trainer.loop.checkpoint import load_driver_state
    from trainer.loop.recovery import Restarts

    path = checkpoints.latest(report=True)
    completed = json.loads((path / "driver.json").read_text())["completed_iterations"] if path else \
        origin["completed_iterations"]
    name, reason = next(iter(dead.items()))
    redo = f"iteration {completed}" if in_progress <= completed else f"iterations {completed}-{in_progress}"
    (actors.restarts or Restarts(0)).take(name, reason, f"the trainers restart from {path or 'the run start'}; {redo} to redo")
    actors.shutdown_trainers()
    actors.policy, actors.critic, actors.draft = build_trainers(cfg, paths)
    checkpoints.attach(actors.policy, actors.critic, actors.draft)
    if path is not None:
        checkpoints.restore(sampler, reward_moments, path)
    else:
        load_driver_state(origin, sampler, reward_moments, checkpoints.history)  # (the history as at the start)
    actors.fleet.reset_weight_group()  # new senders: the next push forms the group anew
    return completed
