"""Typed configuration: one dataclass per role, loaded from YAML plus `key.sub=value` overrides.

Every error names the offending key, so a typo in a cluster config fails in the first second,
not after the models have loaded.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
TINY = "tiny"  # a model/data path of "tiny" means the embedded tiny world (built on first use)


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    actor: str = TINY  # HF path of the policy (also the reference and the initial critic trunk)
    # HF path of the draft model; null: generation.strategy none, or adaptive with rollout drafts on (speculating from
    # the rollout alone: generation.rollout_drafts)
    draft: typing.Optional[str] = TINY
    # HF path of an AutoModelForSequenceClassification (num_labels=1); null: no reward model (trainer.rm_weight=0,
    # trainer.reward_fn alone scores the samples)
    reward: typing.Optional[str] = TINY
    critic_init: str = "reward"  # "reward" | "actor": where the critic's weights come from (actor if reward is null)
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"


@dataclass
class PromptFileConfig:
    """One prompt file and how to read its rows: Verl's Parquet rows as they are, or OpenRLHF-style columns."""
    path: typing.Optional[str] = TINY  # JSONL or Parquet; "tiny" = the tiny world's; null (eval) = no evaluation
    prompt_key: str = "prompt"  # a string (used as text) or a list of {role, content} messages (chat template)
    label_key: str = "reward_model.ground_truth"  # the ground truth for trainer.reward_fn; dots reach into a column
    apply_chat_template: bool = False  # render a string prompt as one user message (OpenRLHF's flag)
    size: typing.Optional[int] = None  # only the first N prompts; null = all


@dataclass
class DataConfig:
    train: PromptFileConfig = field(default_factory=PromptFileConfig)
    eval: PromptFileConfig = field(default_factory=PromptFileConfig)  # held-out prompts, scored greedy and sampled
    max_prompt_len: int = 80  # longer prompts are dropped (filter) or cut (truncate)
    overlong: str = "filter"  # "filter" | "truncate"
    shuffle: bool = True


@dataclass
class RolloutDraftsConfig:
    """Rollout drafts' knobs (`drafting.spec.suffix.SuffixConfig`): chains drafted from token matches against the
    sample's own prompt and response, its GRPO group's siblings and earlier epochs' responses to its prompt."""
    min_match: int = 1  # shortest context suffix that may match (vLLM's prompt_lookup_min)
    max_match: int = 8  # longest suffix compared; the longest match wins, equally long ones vote (prompt_lookup_max)
    max_depth: int = 6  # tokens per drafted chain, 1..16 (num_speculative_tokens)
    min_count: int = 1  # the drafted next token must follow at least this many of the matching occurrences
    history_per_prompt: int = 8  # earlier responses kept per prompt (0 = no history): a GRPO group of 8
    history_mb: float = 64.0  # the history's cap in all (tokens as int32), kept by the driver and checkpointed


@dataclass
class GenerationConfig:
    num_instances: int = 2
    strategy: str = "adaptive"  # adaptive | none | chain:k | tree:depth,topk,nodes
    calibration: str = "auto"  # adaptive's step-time model: "auto" (profiled here on first use, cached) or a file
    # first use of "auto": the profile's seconds (null = by device: 120 on CPU, 30 on a GPU; 0 = the full grid)
    # and the strategy that decodes until it lands (none or a static chain:K / tree:D,K,N)
    profile_budget_s: typing.Optional[float] = None
    profile_fallback: str = "none"
    max_slots: int = 64  # live samples per instance; more wait in the queue
    max_len: int = 160  # prompt + response tokens per sample
    max_new_tokens: int = 72
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    gpus_per_instance: float = 0.0
    cpus_per_instance: float = 1.0
    threads_per_instance: int = 1
    memory_gb: typing.Optional[float] = None  # one instance's device memory (GiB); null = measured by the preflight
    # "round_robin": request k to instance k % N (whole GRPO groups dealt round robin when rollout drafts are on, so
    # siblings draft from each other) | "chunk": contiguous slices of the batch (groups together)
    assignment: str = "round_robin"
    # the GPU path (CPU instances ignore these and run eager): the attention kernel over the cache in place
    # ("auto" = Triton on CUDA, drafting.attention), each step's stages as CUDA graphs, torch.compile'd
    # norms / RoPE / activations
    attention: str = "auto"  # "auto" | "sdpa" | "triton"
    cuda_graphs: bool = True
    compile: bool = True
    # K/V memory: "paged" (blocks of kv_block positions from a pool, a sample holding blocks for the tokens it has;
    # a request group's prompt shared; preemption when the pool runs dry) or "dense" (a row of max_len per slot).
    # kv_memory_gb: the pool (null: what dense rows would take on CPU, 90% of the memory free after the weights
    # on a GPU); kv_swap_gb: host memory for preempted samples' K/V (beyond it they are recomputed)
    kv_cache: str = "paged"
    kv_block: int = 16
    kv_memory_gb: typing.Optional[float] = None
    kv_swap_gb: float = 4.0
    # rollout drafts: chains from the rollout itself (the sample's text, its group's siblings, earlier epochs'
    # responses to the prompt), exact under position-keyed sampling. "auto": on with strategy adaptive (a chain is
    # verified only where its predicted acceptance pays, so on costs only the lookups), off with static strategies
    # and none | "on" (with none or a static strategy: every chain found is verified) | "off"
    rollout_drafts: str = "auto"
    rollout: RolloutDraftsConfig = field(default_factory=RolloutDraftsConfig)


@dataclass
class BalancerConfig:
    """The load balancer: moves queued requests and running samples (with their KV) between instances."""
    enabled: bool = False
    interval_s: float = 0.25  # seconds between polls of the instances' loads
    threshold: typing.Union[str, int] = "auto"  # live samples; "auto" = the engine's profiled saturation point
    cooldown_s: float = 0.5  # an instance sits out this long after each order it took part in
    two_stage: bool = True  # false: stop-and-copy (freeze, copy all KV, resume), for comparison
    transfer_timeout_s: float = 5.0  # a KV transfer to a dead or stuck instance fails after this long


@dataclass
class TrainerConfig:
    algorithm: str = "grpo"  # "ppo" | "grpo"
    iterations: int = 10
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 4
    world_size: int = 1  # data-parallel ranks of the policy trainer (and critic)
    zero_stage: int = 1
    micro_batch_size: int = 32
    ppo_epochs: int = 1
    critic_warmup: int = 0  # PPO only: first iterations train only the critic (OpenRLHF's freezing_actor_steps)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    weight_decay: float = 0.0
    max_norm: float = 1.0
    clip_eps: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.01
    kl_estimator: str = "k1"  # k1 | k2 | k3
    use_kl_loss: bool = False  # GRPO style: KL as a loss term instead of inside the reward
    entropy_coef: float = 0.0
    grpo_norm_std: bool = True  # divide GRPO advantages by the group's std (False: Dr. GRPO)
    reward_clip: float = 10.0
    normalize_reward: bool = False
    reward_fn: typing.Optional[str] = None  # "path/to/file.py:function", Verl's compute_score signature
    reward_fn_weight: float = 1.0  # reward = reward_fn_weight * function score + rm_weight * reward model score
    rm_weight: float = 1.0
    save_every: int = 5  # iterations between checkpoints; 0 = never
    keep_checkpoints: int = 0  # the newest K complete checkpoints stay on disk, older ones are deleted; 0 = all
    # restarts per run after an actor dies (stateless roles in place; the trainer group and the draft trainer
    # from the last checkpoint, or the run's start; a dead generation instance is replaced); 0 = stop at a death
    max_restarts: int = 3
    call_timeout_s: float = 1800.0  # the longest wait on one actor call (an update, experience, a save): then stuck
    sync_timeout_s: float = 120.0  # a weight push's collective ops fail after this long (a dead sender's peers)
    eval_every: int = 4  # iterations between greedy evaluations (also before the first and after the last)
    resume: bool = False
    output_dir: str = "runs/tiny"
    gpus_per_actor: float = 0.0  # per trainer/critic rank and per reward/reference actor
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 1


DRAFT_LOSSES = ("kl_topk", "ce_sampled")


@dataclass
class DraftConfig:
    """Online draft adaptation: a draft trainer distils the draft toward the actor on every rollout. Loss, lr and
    steps are the best by accepted tokens per step on the tiny world's drift benchmark (bench/draft_drift.py)."""
    online: bool = True  # on whenever the rollout drafts (generation.strategy is not none)
    loss: str = "kl_topk"  # "kl_topk": forward KL on the actor's top-k + tail | "ce_sampled": CE on sampled tokens
    top_k: int = 8  # actor log-probs per response position handed over by the old-logprob pass (kl_topk)
    lr: float = 3e-4
    steps: int = 16  # optimizer steps per iteration ...
    batch_size: int = 32  # ... each on this many samples of the rollout (16 x 32 = 4 passes over 128 samples)
    # steps are a budget, not a promise: the trainer stops when the policy and critic updates finish, and up to
    # `steps` steps it did not get to carry over to the next iteration
    full_budget: bool = False  # true: all steps every iteration, the loop waits (exactly reproducible runs)
    # kl_topk on a vocabulary over 4x this: the softmax's normaliser from the minibatch's top-k tokens plus this
    # many sampled uniformly (sampled softmax), so a step's LM-head cost stops growing with the vocabulary; 0 = full
    vocab_sample: int = 2048


@dataclass
class TrackingConfig:
    project: str = "rlhfspec"
    run_name: typing.Optional[str] = None
    wandb: bool = True
    wandb_mode: str = "offline"  # "offline" | "online" | "disabled"
    progress: bool = True


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_STRATEGY = re.compile(r"^(adaptive|none|chain:\d+|tree:\d+,\d+,\d+)$")
_REWARD_FN = re.compile(r"^.+\.py(:[A-Za-z_]\w*)?$")
_CHOICES = {
    "model.critic_init": ("reward", "actor"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.overlong": ("filter", "truncate"),
    "generation.assignment": ("round_robin", "chunk"),
    "generation.attention": ("auto", "sdpa", "triton"),
    "generation.kv_cache": ("paged", "dense"),
    "generation.rollout_drafts": ("auto", "on", "off"),
    "trainer.algorithm": ("ppo", "grpo"),
    "trainer.kl_estimator": ("k1", "k2", "k3"),
    "draft.loss": DRAFT_LOSSES,
    "tracking.wandb_mode": ("offline", "online", "disabled"),
}


# keys whose values are words YAML reads as booleans (on/off, yes/no, true/false): kept as the words
_ON_OFF = {"generation.rollout_drafts"}


def adapts_draft(cfg: Config) -> bool:
    """Online draft adaptation runs when draft.online is on, there is a draft model and the rollout drafts at all."""
    return cfg.draft.online and cfg.model.draft is not None and cfg.generation.strategy != "none"


def rollout_drafts_on(gen: GenerationConfig) -> bool:
    """generation.rollout_drafts resolved: auto is on for strategy adaptive, off for static strategies and none."""
    if gen.rollout_drafts == "auto":
        return gen.strategy == "adaptive"
    return gen.rollout_drafts == "on"


def rollout_drafts_why(gen: GenerationConfig) -> str:
    """Why generation.rollout_drafts is on or off, in a few words (the preflight's verdict line)."""
    if gen.rollout_drafts != "auto":
        return "as set"
    if gen.strategy == "adaptive":
        return ("auto, strategy adaptive: a chain is verified only where its predicted acceptance pays, so on costs "
                "only the lookups")
    if gen.strategy == "none":
        return "auto, strategy none: plain decoding; generation.rollout_drafts=on verifies every chain found"
    return (f"auto, strategy {gen.strategy}: a static strategy would verify every chain found, paying or not; "
            f"generation.rollout_drafts=on forces them")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `a.b=value` overrides, build the typed config and validate it."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, prefix + name + ".")
        else:
            values[name] = _coerce(value, kind, prefix + name)
    return cls(**values)


def _coerce(value, kind, key: str):
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Union:  # e.g. balancer.threshold: "auto" or a number
        kinds = typing.get_args(kind)
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-5 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, bool) and key in _ON_OFF:  # YAML reads `on` / `off` as booleans
        return "on" if value else "off"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Reject impossible values; each message names the key."""
    g, t, d = cfg.generation, cfg.trainer, cfg.data
    flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(choices)}")
    positive = ["generation.num_instances", "generation.max_slots", "generation.max_len",
                "generation.max_new_tokens", "generation.threads_per_instance", "data.max_prompt_len",
                "trainer.iterations", "trainer.prompts_per_iteration", "trainer.samples_per_prompt",
                "trainer.world_size", "trainer.micro_batch_size", "trainer.ppo_epochs",
                "trainer.threads_per_actor", "draft.top_k", "draft.steps", "draft.batch_size", "generation.kv_block"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be positive, got {flat[key]}")
    non_negative = ["generation.temperature", "generation.top_k", "generation.gpus_per_instance",
                    "generation.cpus_per_instance", "trainer.actor_lr", "trainer.critic_lr",
                    "trainer.kl_coef", "trainer.save_every", "trainer.gpus_per_actor",
                    "trainer.cpus_per_actor", "trainer.clip_eps", "trainer.value_clip", "trainer.eval_every",
                    "trainer.critic_warmup", "trainer.keep_checkpoints", "trainer.max_restarts", "draft.lr",
                    "draft.vocab_sample", "generation.kv_swap_gb"]
    for key in non_negative:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must not be negative, got {flat[key]}")
    for key in ("trainer.call_timeout_s", "trainer.sync_timeout_s"):
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be positive, got {flat[key]}")
    if g.kv_memory_gb is not None and not g.kv_memory_gb > 0:
        raise ConfigError(f"generation.kv_memory_gb: must be positive (or null), got {g.kv_memory_gb}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p: must be in (0, 1], got {g.top_p}")
    if not _STRATEGY.match(g.strategy):
        raise ConfigError(f"generation.strategy: {g.strategy!r} is not adaptive, none, chain:K or "
                          f"tree:DEPTH,TOPK,NODES")
    if g.profile_fallback == "adaptive" or not _STRATEGY.match(g.profile_fallback):
        raise ConfigError(f"generation.profile_fallback: {g.profile_fallback!r} is not none, chain:K or "
                          f"tree:DEPTH,TOPK,NODES (the strategy that decodes until the profile lands)")
    if g.profile_budget_s is not None and g.profile_budget_s < 0:
        raise ConfigError(f"generation.profile_budget_s: must be >= 0 or null, got {g.profile_budget_s}")
    if g.calibration != "auto" and not Path(g.calibration).expanduser().is_file():
        raise ConfigError(f"generation.calibration: {g.calibration!r} is neither 'auto' nor a calibration file "
                          f"(python -m drafting.profile writes one)")
    if g.max_len <= d.max_prompt_len:
        raise ConfigError(f"generation.max_len: {g.max_len} leaves no room for a response after "
                          f"data.max_prompt_len={d.max_prompt_len}")
    if g.max_new_tokens > g.max_len - d.max_prompt_len:
        raise ConfigError(f"generation.max_new_tokens: {g.max_new_tokens} does not fit in generation.max_len="
                          f"{g.max_len} after data.max_prompt_len={d.max_prompt_len}")
    if not 0 <= t.zero_stage <= 3:
        raise ConfigError(f"trainer.zero_stage: must be 0..3, got {t.zero_stage}")
    if t.algorithm == "grpo" and t.samples_per_prompt < 2:
        raise ConfigError("trainer.samples_per_prompt: GRPO needs at least 2 samples per prompt")
    if t.algorithm == "ppo" and t.critic_warmup >= t.iterations:
        raise ConfigError(f"trainer.critic_warmup: {t.critic_warmup} leaves no policy update in "
                          f"trainer.iterations={t.iterations}")
    if (t.prompts_per_iteration * t.samples_per_prompt) % t.world_size:
        raise ConfigError(f"trainer.world_size: {t.world_size} does not divide the "
                          f"{t.prompts_per_iteration * t.samples_per_prompt} samples of an iteration")
    if not 0 <= t.gamma <= 1 or not 0 <= t.lam <= 1:
        raise ConfigError("trainer.gamma / trainer.lam: must be in [0, 1]")
    if d.train.path is None:
        raise ConfigError("data.train.path: a prompt file is needed")
    for split in ("train", "eval"):
        size = getattr(d, split).size
        if size is not None and size <= 0:
            raise ConfigError(f"data.{split}.size: must be positive or null, got {size}")
    if g.memory_gb is not None and g.memory_gb <= 0:
        raise ConfigError(f"generation.memory_gb: must be positive or null, got {g.memory_gb}")
    if t.reward_fn is not None and not _REWARD_FN.match(t.reward_fn):
        raise ConfigError(f"trainer.reward_fn: {t.reward_fn!r} is not path/to/file.py:function_name")
    if t.reward_fn is None and t.rm_weight == 0:
        raise ConfigError("trainer.rm_weight: 0 and no trainer.reward_fn: nothing would score the samples")
    validate_rollout_drafts(g)
    validate_models(cfg)
    validate_balancer(cfg.balancer)


def validate_rollout_drafts(g: GenerationConfig) -> None:
    """The generation.rollout knobs: the bounds of `drafting.spec.suffix.SuffixConfig.validate`, checked here
    without importing the engine (torch)."""
    r = g.rollout
    for key in ("min_match", "max_depth", "min_count"):
        if getattr(r, key) < 1:
            raise ConfigError(f"generation.rollout.{key}: must be positive, got {getattr(r, key)}")
    if r.max_match < r.min_match:
        raise ConfigError(f"generation.rollout.max_match: {r.max_match} is below generation.rollout.min_match="
                          f"{r.min_match}")
    if r.max_depth > 16:
        raise ConfigError(f"generation.rollout.max_depth: at most 16 tokens per chain, got {r.max_depth}")
    for key in ("history_per_prompt", "history_mb"):
        if getattr(r, key) < 0:
            raise ConfigError(f"generation.rollout.{key}: must not be negative, got {getattr(r, key)}")


def validate_models(cfg: Config) -> None:
    """Model paths: null where no model is needed (a reward function alone, plain decoding), never empty."""
    m = cfg.model
    for key in ("actor", "draft", "reward"):
        if getattr(m, key) == "":
            raise ConfigError(f"model.{key}: empty path" + ("" if key == "actor" else "; null means no model"))
    if m.reward is None and cfg.trainer.rm_weight != 0:
        raise ConfigError(f"model.reward: null (no reward model) needs trainer.rm_weight=0, got "
                          f"trainer.rm_weight={cfg.trainer.rm_weight:g}")
    g = cfg.generation
    if m.draft is None and g.strategy == "adaptive" and not rollout_drafts_on(g):
        raise ConfigError(f"model.draft: null (no draft model) with generation.strategy=adaptive needs rollout drafts "
                          f"(generation.rollout_drafts auto or on: speculating from the rollout alone), got "
                          f"generation.rollout_drafts={g.rollout_drafts}")
    if m.draft is None and g.strategy == "adaptive" and g.profile_fallback != "none":
        raise ConfigError(f"generation.profile_fallback: {g.profile_fallback} drafts with a draft model; with "
                          f"model.draft null (rollout drafts alone) it can only be none")
    if m.draft is None and g.strategy not in ("none", "adaptive"):
        raise ConfigError(f"model.draft: null (no draft model) needs generation.strategy=none, or adaptive with "
                          f"rollout drafts, got generation.strategy={g.strategy}")


def critic_init(cfg: Config) -> str:
    """Where the critic's weights come from: model.critic_init, or the actor when there is no reward model."""
    return "actor" if cfg.model.reward is None else cfg.model.critic_init


def validate_balancer(b: BalancerConfig) -> None:
    if b.threshold != "auto" and (not isinstance(b.threshold, int) or b.threshold < 1):
        raise ConfigError(f"balancer.threshold: want auto or a positive number of live samples, got {b.threshold!r}")
    for key in ("interval_s", "transfer_timeout_s"):
        if not getattr(b, key) > 0:
            raise ConfigError(f"balancer.{key}: must be positive, got {getattr(b, key)}")
    if b.cooldown_s < 0:
        raise ConfigError(f"balancer.cooldown_s: must not be negative, got {b.cooldown_s}")
