"""Wiring for one run: checks first, then actors, then the driver loop. `launch.py` calls `run(cfg)`."""
from __future__ import annotations

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
    reference: object  # ReferenceActor handle
    reward: object  # RewardActor handle
    draft: object | None = None  # DraftTrainer handle when the draft adapts online (draft.online)

    def shutdown(self) -> None:
        import ray

        for group in (self.policy, self.critic):
            if group is not None:
                group.shutdown()
        for handle in [self.reference, self.reward] + ([self.draft] if self.draft is not None else []):
            ray.kill(handle)
        self.fleet.shutdown()


def build_actors(cfg: Config, paths: RunPaths) -> RLActors:
    import ray

    from actors.critic import Critic
    from actors.draft_trainer import DraftTrainer
    from actors.policy_trainer import PolicyTrainer
    from actors.reference import ReferenceActor
    from actors.reward import RewardActor
    from actors.trainer_group import create_trainer_group
    from trainer.loop.rollout import RolloutFleet

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
    remote = lambda cls: ray.remote(cls).options(**per_rank)  # noqa: E731
    reference = remote(ReferenceActor).remote(paths.actor, device=device, threads=t.threads_per_actor, dtype=m.dtype)
    reward = remote(RewardActor).remote(paths.reward, replace(t, reward_fn=paths.reward_fn), dtype=m.dtype)
    draft = None
    if adapts_draft(cfg):
        draft = remote(DraftTrainer).remote(paths.draft, cfg.draft, cfg.generation.temperature, seed=cfg.seed,
                                            device=device, threads=t.threads_per_actor, actor_path=paths.actor)
    fleet = RolloutFleet(cfg.generation, paths.actor, paths.draft, m.dtype, cfg.balancer)
    ray.get([reference.ready.remote(), reward.ready.remote()] + ([] if draft is None else [draft.ready.remote()]))
    return RLActors(fleet, policy, critic, reference, reward, draft=draft)


def skip_hopeless_profile(cfg: Config, paths: RunPaths, log=print) -> bool:
    """`adaptive` without a profile of this pair here profiles it on first use. When the draft's distillation
    record (DRAFT/distill.json) says drafting cannot pay on any hardware, adaptive could only ever decode plain:
    the run decodes plain from the start (generation.strategy none, so no draft trainer either), with one line.
    True when it did."""
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
        f"or use another kind of draft (fewer layers, or a head)", flush=True)
    g.strategy = "none"
    return True


def run(cfg: Config) -> list[dict]:
    """Run the configured RLHF job end to end; returns per-iteration metrics."""
    from trainer.loop import stop

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
    actors = build_actors(cfg, paths)
    try:
        return train(cfg, actors, checked)
    finally:
        actors.shutdown()


def train(cfg: Config, actors: RLActors, checked) -> list[dict]:
    """The driver loop on built actors (`run` builds them; bench.e2e restarts one set for many runs), from the
    preflight's prompts and tokenizer."""
    from trainer.core import algorithms as algo
    from trainer.loop.checkpoint import CheckpointManager
    from trainer.loop.data import PromptSampler
    from trainer.loop.driver import Driver
    from trainer.loop.tracking import Tracking

    checkpoints = CheckpointManager(cfg.trainer.output_dir, cfg.trainer.save_every, actors.policy, actors.critic,
                                    actors.draft)
    sampler = PromptSampler(checked.prompts, cfg.seed, cfg.data.shuffle)
    tokenizer, eval_prompts = checked.tokenizer, checked.eval_prompts
    reward_moments = algo.RunningMoments()
    start, run_id = 0, None
    if cfg.trainer.resume:
        state = checkpoints.restore(sampler, reward_moments)
        start, run_id = state["completed_iterations"], state["wandb_run_id"]
        print(f"resumed from {checkpoints.latest()} after {start} iterations", flush=True)
    tracking = Tracking(cfg.tracking.project, cfg.tracking.run_name, cfg.to_dict(), cfg.tracking.wandb,
                        cfg.tracking.wandb_mode, cfg.trainer.output_dir, resume_id=run_id)
    driver = Driver(cfg, actors, tokenizer, sampler, tracking, checkpoints, reward_moments, eval_prompts)
    try:
        driver.sync_weights(start)  # instances start from exactly the trainers' weights (resumed ones too)
        return driver.fit(start)
    finally:
        tracking.finish()
