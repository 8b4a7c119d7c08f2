"""Checks that run before any long work: model paths and families, vocabularies, reward head, prompt data, the
reward function's dry run, the generation instances' memory (all before Ray starts: `preflight`), then the
cluster's resources.

Each failure is one line naming the config key and the cause.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.schema import (TINY, Config, ConfigError, PromptFileConfig, adapts_draft, critic_init, rollout_drafts_on,
                            rollout_drafts_why)


@dataclass
class RunPaths:
    actor: str
    draft: str | None  # None: plain decoding (generation.strategy=none)
    reward: str | None  # None: the reward function alone scores
    train_prompts: str
    eval_prompts: str | None
    reward_fn: str | None = None  # "/absolute/file.py:name": the reward actor may run in another directory


@dataclass
class Checked:
    """What the preflight read and checked: the run starts from these."""
    paths: RunPaths
    tokenizer: object  # the actor's
    prompts: list  # trainer.data.Prompt
    eval_prompts: list


def preflight(cfg: Config, log=print) -> Checked:
    """Every check that needs no cluster, cheapest first: paths and model configs, the prompt files, the reward
    function's dry run, the K/V memory (unless a GPU has to be asked). A bad input stops here in seconds."""
    paths = resolve_paths(cfg)
    if paths.reward_fn:  # a missing file or function is found before anything heavy loads
        from trainer.core.reward_fn import load_reward_fn

        load_reward_fn(paths.reward_fn)
    actor_config, draft_config = check_models(cfg, paths)
    check_prompts_light(cfg, paths)  # the prompt files' data errors, before torch loads
    check_engine_models(paths, actor_config, draft_config)
    if paths.draft is not None:
        from drafting.model.head import draft_kind

        kind = ("an EAGLE-style draft head (one layer over the actor's features)" if draft_kind(paths.draft) == "head"
                else f"a draft model ({draft_config.num_hidden_layers} layers)")
        online = ("; adapts online (draft.online), from the old policy's features" if draft_kind(paths.draft) == "head"
                  else "; adapts online (draft.online)") if adapts_draft(cfg) else ""
        log(f"model.draft: {kind} at {paths.draft}{online}", flush=True)
    log(rollout_drafts_line(cfg), flush=True)
    if not memory_needs_ray(cfg):
        check_memory(cfg, actor_config, draft_config, *instance_memory(cfg), log=log)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.actor)  # what the run uses: the prompts are tokenized again
    prompts = _load(cfg, cfg.data.train, paths.train_prompts, tokenizer, "data.train")
    eval_prompts = _load(cfg, cfg.data.eval, paths.eval_prompts, tokenizer, "data.eval") if paths.eval_prompts else []
    if paths.reward_fn:  # the user's function on the first batch's rows, before any actor starts
        from trainer.core.reward_fn import dry_run

        n = cfg.trainer.prompts_per_iteration
        log(dry_run(paths.reward_fn, prompts[:n] + eval_prompts[:n]), flush=True)
    return Checked(paths, tokenizer, prompts, eval_prompts)


def rollout_drafts_line(cfg: Config) -> str:
    """The rollout drafts' verdict: on or off, and why (generation.rollout_drafts resolved against the strategy)."""
    g = cfg.generation
    if not rollout_drafts_on(g):
        return f"generation.rollout_drafts: off ({rollout_drafts_why(g)})"
    r = g.rollout
    alone = "; no draft model: speculating from the rollout alone" if cfg.model.draft is None else ""
    history = (f"the last {r.history_per_prompt} responses per prompt (history up to {r.history_mb:g} MiB)"
               if r.history_per_prompt else "no history (generation.rollout.history_per_prompt=0)")
    return (f"generation.rollout_drafts: on ({rollout_drafts_why(g)}); chains of up to {r.max_depth} tokens from the "
            f"sample's text, its group's siblings and {history}{alone}")


def check_prompts_light(cfg: Config, paths: RunPaths) -> bool:
    """Load the prompt files with the light tokenizer (no transformers, no torch): a bad key, type or length stops
    the run in a second or two. False: not checked here (a tokenizer or input only transformers reproduces exactly);
    the full load after the engine checks finds the same errors then."""
    from trainer.loop.light_tokenizer import NotExact, light_tokenizer

    tokenizer = light_tokenizer(paths.actor)
    if tokenizer is None:
        return False
    try:
        _load(cfg, cfg.data.train, paths.train_prompts, tokenizer, "data.train")
        if paths.eval_prompts:
            _load(cfg, cfg.data.eval, paths.eval_prompts, tokenizer, "data.eval")
    except NotExact:
        return False
    return True


def _load(cfg: Config, spec: PromptFileConfig, path: str, tokenizer, what: str) -> list:
    from trainer.loop.data import load_prompts

    label_key = spec.label_key if cfg.trainer.reward_fn else None  # the ground truth only matters to a function
    return load_prompts(path, tokenizer, cfg.data.max_prompt_len, spec.prompt_key, label_key,
                        spec.apply_chat_template, cfg.data.overlong, spec.size, what)


def needs_reward_model(cfg: Config) -> bool:
    """The reward model scores (rm_weight) or gives PPO's critic its weights; otherwise model.reward is unused."""
    t = cfg.trainer
    return t.rm_weight != 0 or (t.algorithm == "ppo" and critic_init(cfg) == "reward")


def resolve_paths(cfg: Config) -> RunPaths:
    """Map "tiny" entries to the tiny world, building it on first use (only then: no path says tiny, no build). An
    unused reward model is not resolved at all: `model.reward: tiny` with rm_weight 0 builds nothing."""
    m = cfg.model
    paths = {"actor": m.actor, "draft": m.draft, "reward": m.reward if needs_reward_model(cfg) else None,
             "train_prompts": cfg.data.train.path, "eval_prompts": cfg.data.eval.path}
    paths = {k: v if v in (None, TINY) else str(Path(v).expanduser()) for k, v in paths.items()}
    if TINY in paths.values():
        from trainer.tiny.bootstrap import ensure_tiny_world

        world = ensure_tiny_world()
        tiny = {"actor": world.actor_path, "draft": world.draft_path, "reward": world.reward_path,
                "train_prompts": world.train_prompts, "eval_prompts": world.eval_prompts}
        paths = {k: str(tiny[k]) if v == TINY else v for k, v in paths.items()}
    reward_fn = None
    if cfg.trainer.reward_fn:
        from trainer.core.reward_fn import split_spec

        file, name = split_spec(cfg.trainer.reward_fn)
        reward_fn = f"{file.resolve()}:{name}"
    return RunPaths(**paths, reward_fn=reward_fn)


@dataclass
class ModelShape:
    """The fields of a model's config.json the checks read, with Hugging Face's defaults. Read as JSON, not with
    AutoConfig, so a bad path or vocabulary stops the run before torch is even imported."""
    model_type: str
    architectures: list
    vocab_size: int
    hidden_size: int = 0
    num_hidden_layers: int = 0
    intermediate_size: int = 0
    num_attention_heads: int = 1
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False  # every family the engine runs defaults to untied
    max_position_embeddings: int | None = None
    num_labels: int = 2  # Hugging Face's default; id2label gives the real count

    @classmethod
    def from_json(cls, raw: dict) -> "ModelShape":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if raw.get(k) is not None}
        if isinstance(raw.get("id2label"), dict):
            known["num_labels"] = len(raw["id2label"])
        shape = cls(**{"architectures": [], **known})
        shape.num_key_value_heads = shape.num_key_value_heads or shape.num_attention_heads
        return shape


def _model_config(path: str, key: str) -> ModelShape:
    import json

    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: model directory not found: {path}")
    if not file.is_file():
        raise ConfigError(f"{key}: {path} has no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(file.read_text())
        return ModelShape.from_json(raw)
    except Exception as e:  # noqa: BLE001 - re-raised with the key that points at it
        raise ConfigError(f"{key}: cannot read the model config in {path}: {' '.join(str(e).split())}") from None


def _check_generation_model(config, path: str, key: str) -> None:
    """The lean engine decodes a few Llama-shaped families only: refuse others here, before any actor starts."""
    from drafting.model.decoder import SUPPORTED

    if config.model_type not in SUPPORTED:
        raise ConfigError(f"{key}: model type {config.model_type!r} ({path}) is not supported by the generation "
                          f"engine (supported: {', '.join(SUPPORTED)})")
    if not any(a.endswith("ForCausalLM") for a in config.architectures or []):
        raise ConfigError(f"{key}: {path} is {config.architectures}, not a causal LM")


def check_models(cfg: Config, paths: RunPaths):
    """Returns the actor's and the draft's HF configs (the memory check sizes their caches; draft None: no draft).
    Reads JSON only (torch loads for a draft head alone); the engine's families: `check_engine_models`."""
    actor = _model_config(paths.actor, "model.actor")
    draft = None
    # a head directory holds drafting.head.CONFIG_FILE; asked without importing drafting (torch) for a model's
    is_head = paths.draft is not None and (Path(paths.draft) / "head.json").is_file()
    if is_head:  # an EAGLE-style head of this actor
        from drafting.model.head import head_config

        try:
            draft = head_config(paths.draft, actor)
        except ValueError as e:
            raise ConfigError(f"model.draft: {e}") from None
        if adapts_draft(cfg) and cfg.draft.loss != "kl_topk":
            raise ConfigError(f"draft.loss: {cfg.draft.loss!r} is a draft model's; a draft head learns online with "
                              "kl_topk (its teacher is the actor's LM head on the old policy's features)")
    elif paths.draft is not None:
        draft = _model_config(paths.draft, "model.draft")
        if draft.vocab_size != actor.vocab_size:
            raise ConfigError(f"model.draft: vocabulary size {draft.vocab_size} ({paths.draft}) != the actor's "
                              f"{actor.vocab_size}; speculative decoding needs one shared vocabulary")
    if needs_reward_model(cfg):
        reward = _model_config(paths.reward, "model.reward")
        if not any(a.endswith("ForSequenceClassification") for a in reward.architectures or []):
            raise ConfigError(f"model.reward: {paths.reward} is {reward.architectures}, "
                              "not a sequence-classification (reward) model")
        if getattr(reward, "num_labels", 1) != 1:
            raise ConfigError(f"model.reward: {paths.reward} has {reward.num_labels} labels; a reward model has 1")
        if reward.vocab_size != actor.vocab_size:  # it scores the actor's token ids as they are
            raise ConfigError(f"model.reward: vocabulary size {reward.vocab_size} ({paths.reward}) != the actor's "
                              f"{actor.vocab_size}; the reward model reads the actor's tokens")
    max_pos = getattr(actor, "max_position_embeddings", None)
    if max_pos and cfg.generation.max_len > max_pos:
        raise ConfigError(f"generation.max_len: {cfg.generation.max_len} exceeds the actor's "
                          f"max_position_embeddings={max_pos}")
    if not Path(paths.train_prompts).is_file():
        raise ConfigError(f"data.train.path: prompt file not found: {paths.train_prompts}")
    if paths.eval_prompts is not None and not Path(paths.eval_prompts).is_file():
        raise ConfigError(f"data.eval.path: prompt file not found: {paths.eval_prompts}")
    return actor, draft


def check_engine_models(paths: RunPaths, actor, draft) -> None:
    """The generation engine takes the actor and a draft model (a head is its own kind). Imports the engine (torch):
    after the cheap checks."""
    from drafting.model.head import is_head_dir

    _check_generation_model(actor, paths.actor, "model.actor")
    if draft is not None and not is_head_dir(paths.draft):
        _check_generation_model(draft, paths.draft, "model.draft")


# ------------------------------------------------------------------------------- generation memory
GiB = 2**30
USABLE = 0.9  # of an instance's memory for weights + K/V; the rest for activations, logits, the CUDA context


def weight_bytes(config, dtype_bytes: int) -> int:
    """Parameters of a Llama-shaped decoder (every family the engine runs) times the bytes per element."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    embed = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    return (embed + layers * layer + h) * dtype_bytes


def kv_bytes_per_position(config, dtype_bytes: int) -> int:
    """K and V of one token in every layer: what one slot's cache costs per position."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def memory_needs_ray(cfg: Config) -> bool:
    """A GPU instance's memory is measured on the cluster; a CPU one's (or a configured figure) right here."""
    return cfg.generation.memory_gb is None and cfg.generation.gpus_per_instance > 0


def instance_memory(cfg: Config) -> tuple[int, str]:
    """Bytes one generation instance may use, and where the figure comes from."""
    g = cfg.generation
    if g.memory_gb is not None:
        return int(g.memory_gb * GiB), "generation.memory_gb"
    if g.gpus_per_instance > 0:
        import ray

        @ray.remote(num_cpus=0)
        def gpu_memory() -> int:
            import torch

            return torch.cuda.get_device_properties(0).total_memory

        total = ray.get(gpu_memory.options(num_gpus=g.gpus_per_instance).remote())
        # the engine runs on one device; a fraction of a GPU gets that fraction of its memory
        share = min(g.gpus_per_instance, 1.0)
        return int(total * share), f"GPU memory x generation.gpus_per_instance={g.gpus_per_instance:g}"
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def check_memory(cfg: Config, actor, draft, memory: int, source: str, log=print) -> None:
    """Weights and K/V must fit in USABLE of the instance's memory. Dense K/V is max_slots x (max_len + scratch + 1)
    positions (scratch: room for a step's tree nodes) of target and draft; a paged pool is kv_memory_gb (by default
    the dense rows' bytes on CPU, what the weights leave on a GPU) and must hold one sample of max_len. Prints the
    pool's capacity."""
    from drafting.runtime.device_stages import scratch_columns

    g = cfg.generation
    extra = scratch_columns(g.strategy) + 1
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype]
    models = [actor] + ([draft] if draft is not None else [])
    weights = sum(weight_bytes(c, dtype_bytes) for c in models)
    per_position = sum(kv_bytes_per_position(c, dtype_bytes) for c in models)
    dense = g.max_slots * (g.max_len + extra) * per_position
    usable = int(USABLE * memory)
    have = f"{_size(usable)} ({USABLE:.0%} of {_size(memory)}, {source})"
    if weights >= usable:
        raise ConfigError(f"generation.gpus_per_instance: the actor and draft weights ({_size(weights)}) "
                          f"alone exceed one instance's {have}")
    if g.kv_cache == "paged":
        return check_pool(g, weights, usable, per_position, extra, dense, have, log)
    if weights + dense <= usable:
        return
    room = usable - weights
    slots, length = room // ((g.max_len + extra) * per_position), room // (g.max_slots * per_position) - extra
    raise ConfigError(f"generation.max_slots={g.max_slots} x generation.max_len={g.max_len}: K/V "
                      f"{_size(dense)} + weights {_size(weights)} do not fit in {have}; "
                      f"the largest that fit: generation.max_slots={slots} at this max_len, or "
                      f"generation.max_len={length} at this max_slots")


def check_pool(g, weights: int, usable: int, per_position: int, extra: int, dense: int, have: str, log) -> None:
    """The paged pool's size, that it fits beside the weights and holds one sample of max_len; one line of it."""
    if g.kv_memory_gb is not None:
        pool, why = int(g.kv_memory_gb * GiB), "generation.kv_memory_gb"
    elif g.gpus_per_instance > 0:
        pool, why = usable - weights, "what the weights leave"
    else:
        pool, why = dense, "the dense rows' bytes"
    if weights + pool > usable:
        raise ConfigError(f"generation.kv_memory_gb: the K/V pool ({_size(pool)}, {why}) + weights {_size(weights)} "
                          f"do not fit in {have}; set generation.kv_memory_gb to at most "
                          f"{(usable - weights) / GiB:.3g} ({(usable - weights) // per_position:,} tokens)")
    tokens = pool // per_position
    if tokens < g.max_len + extra:
        raise ConfigError(f"generation.kv_memory_gb: the K/V pool ({_size(pool)}, {why}) holds {tokens} tokens, fewer "
                          f"than one sample of generation.max_len={g.max_len} (+{extra} for a step's tree)")
    log(f"K/V pool (paged, blocks of {g.kv_block}): {_size(pool)} ({why}) = {tokens:,} tokens = "
        f"{tokens // (g.max_len + extra)} samples of max_len {g.max_len}, more as they end short "
        f"(dense rows in the same bytes: {pool // ((g.max_len + extra) * per_position)} slots)", flush=True)


def required_resources(cfg: Config) -> dict[str, float]:
    """CPUs and GPUs the run's actors ask Ray for."""
    g, t = cfg.generation, cfg.trainer
    trainer_ranks = t.world_size * (2 if t.algorithm == "ppo" else 1)  # policy (+ critic for PPO)
    others = 2 + int(adapts_draft(cfg))  # reward + reference (+ the draft trainer)
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
