"""Checks that run before any long work: model paths, vocabularies, reward head, cluster resources.

Each failure is one line naming the config key and the cause.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.schema import TINY, Config, ConfigError


@dataclass
class RunPaths:
    actor: str
    draft: str
    reward: str
    train_prompts: str
    eval_prompts: str | None


def resolve_paths(cfg: Config) -> RunPaths:
    """Map "tiny" entries to the tiny world, building it on first use."""
    m = cfg.model
    paths = {"actor": m.actor, "draft": m.draft, "reward": m.reward, "train_prompts": cfg.data.train_path,
             "eval_prompts": cfg.data.eval_path}
    if TINY in paths.values():
        from trainer.tiny.bootstrap import ensure_tiny_world

        world = ensure_tiny_world()
        tiny = {"actor": world.actor_path, "draft": world.draft_path, "reward": world.reward_path,
                "train_prompts": world.train_prompts, "eval_prompts": world.eval_prompts}
        paths = {k: str(tiny[k]) if v == TINY else v for k, v in paths.items()}
    return RunPaths(**paths)


def _model_config(path: str, key: str):
    from transformers import AutoConfig

    if not Path(path).is_dir():
        raise ConfigError(f"{key}: model directory not found: {path}")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json (not a Hugging Face model directory)")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the key that points at it
        raise ConfigError(f"{key}: cannot read the model config in {path}: {e}") from None


def check_models(cfg: Config, paths: RunPaths) -> None:
    actor = _model_config(paths.actor, "model.actor")
    draft = _model_config(paths.draft, "model.draft")
    reward = _model_config(paths.reward, "model.reward")
    if not any(a.endswith("ForCausalLM") for a in actor.architectures or []):
        raise ConfigError(f"model.actor: {paths.actor} is {actor.architectures}, not a causal LM")
    if not any(a.endswith("ForCausalLM") for a in draft.architectures or []):
        raise ConfigError(f"model.draft: {paths.draft} is {draft.architectures}, not a causal LM")
    if draft.vocab_size != actor.vocab_size:
        raise ConfigError(f"model.draft: vocabulary size {draft.vocab_size} != actor's {actor.vocab_size}; "
                          "speculative decoding needs one shared vocabulary")
    needs_rm = cfg.trainer.rm_weight != 0 or (cfg.trainer.algorithm == "ppo" and cfg.model.critic_init == "reward")
    if needs_rm:
        if not any(a.endswith("ForSequenceClassification") for a in reward.architectures or []):
            raise ConfigError(f"model.reward: {paths.reward} is {reward.architectures}, "
                              "not a sequence-classification (reward) model")
        if getattr(reward, "num_labels", 1) != 1:
            raise ConfigError(f"model.reward: {paths.reward} has {reward.num_labels} labels; a reward model has 1")
    max_pos = getattr(actor, "max_position_embeddings", None)
    if max_pos and cfg.generation.max_len > max_pos:
        raise ConfigError(f"generation.max_len: {cfg.generation.max_len} exceeds the actor's "
                          f"max_position_embeddings={max_pos}")
    if not Path(paths.train_prompts).is_file():
        raise ConfigError(f"data.train_path: prompt file not found: {paths.train_prompts}")
    if paths.eval_prompts is not None and not Path(paths.eval_prompts).is_file():
        raise ConfigError(f"data.eval_path: prompt file not found: {paths.eval_prompts}")


def required_resources(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs the run's actors ask Ray for."""
    g, t = cfg.generation, cfg.trainer
    trainer_ranks = t.world_size * (2 if t.algorithm == "ppo" else 1)  # policy (+ critic for PPO)
    others = 2  # reward + reference
    return {
        "CPU": g.num_instances * g.cpus_per_instance + (trainer_ranks + others) * t.cpus_per_actor,
        "GPU": g.num_instances * g.gpus_per_instance + (trainer_ranks + others) * t.gpus_per_actor,
    }


def check_resources(cfg: Config, available: dict) -> None:
    need = required_resources(cfg)
    for res, amount in need.items():
        have = available.get(res, 0.0)
        if amount > have + 1e-9:
            raise ConfigError(
                f"generation.num_instances={cfg.generation.num_instances} with trainer.world_size="
                f"{cfg.trainer.world_size} needs {amount:g} {res} but the Ray cluster has {have:g}; "
                f"lower them or the per-actor {res.lower()}s (generation.{res.lower()}s_per_instance, "
                f"trainer.{res.lower()}s_per_actor)")
