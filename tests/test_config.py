"""Config loading: overrides apply, and every bad value stops with one line naming the key."""
import subprocess
import sys

import pytest

from configs.schema import CONFIG_DIR, ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["trainer.actor_lr=2e-6", "generation.num_instances=3", "tracking.run_name=x",
                             "trainer.reward_fn=null", "trainer.rm_weight=1", "data.eval.path=null",
                             "data.train.label_key=reward_model.ground_truth"])
    assert cfg.trainer.actor_lr == 2e-6 and isinstance(cfg.trainer.actor_lr, float)
    assert cfg.generation.num_instances == 3
    assert cfg.tracking.run_name == "x"
    assert cfg.trainer.reward_fn is None
    assert cfg.model.actor == "tiny"
    assert cfg.data.eval.path is None and cfg.data.train.label_key == "reward_model.ground_truth"
    assert cfg.data.eval.label_key == "answer"  # train and eval files are described separately


def test_cluster_example_is_valid():
    cfg = load_config(CONFIG_DIR / "cluster_8b.yaml")
    assert cfg.generation.num_instances == 8 and cfg.trainer.zero_stage == 3
    assert cfg.generation.gpus_per_instance == 1


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "trainer.lrr: unknown key"),
    ("generation.num_instances=-2", "generation.num_instances: must be positive, got -2"),
    ("generation.num_instances=two", "generation.num_instances: expected int, got str 'two'"),
    ("generation.num_instances=true", "generation.num_instances: expected int, got bool"),
    ("generation.max_len=64", "generation.max_len: 64 leaves no room for a response after data.max_prompt_len=80"),
    ("generation.max_new_tokens=500", "generation.max_new_tokens: 500 does not fit"),
    ("generation.strategy=tree:3", "generation.strategy: 'tree:3' is not adaptive, none"),
    ("generation.top_p=1.5", "generation.top_p: must be in (0, 1]"),
    ("trainer.algorithm=dpo", "trainer.algorithm: 'dpo' is not one of ppo, grpo"),
    ("trainer.zero_stage=4", "trainer.zero_stage: must be 0..3"),
    ("trainer.samples_per_prompt=1", "trainer.samples_per_prompt: GRPO needs at least 2"),
    ("nosection.x=1", "nosection: unknown key"),
    ("generation=3", "generation: expected a mapping"),
    ("oops", "override 'oops': expected key.sub=value"),
    ("data.eval.size=0", "data.eval.size: must be positive or null, got 0"),
    ("data.train.path=null", "data.train.path: a prompt file is needed"),
    ("data.train_path=x.jsonl", "data.train_path: unknown key (known: train, eval, "),
    ("trainer.reward_fn=reward", "trainer.reward_fn: 'reward' is not path/to/file.py:function_name"),
    ("trainer.reward_fn=null", "trainer.rm_weight: 0 and no trainer.reward_fn: nothing would score the samples"),
    ("generation.memory_gb=-1", "generation.memory_gb: must be positive or null, got -1.0"),
    ("generation.kv_cache=blocks", "generation.kv_cache: 'blocks' is not one of paged, dense"),
    ("generation.kv_block=0", "generation.kv_block: must be positive, got 0"),
    ("generation.kv_memory_gb=0", "generation.kv_memory_gb: must be positive (or null), got 0.0"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints: must not be negative, got -1"),
    ("trainer.max_restarts=-2", "trainer.max_restarts: must not be negative, got -2"),
    ("trainer.call_timeout_s=0", "trainer.call_timeout_s: must be positive, got 0.0"),
    ("trainer.sync_timeout_s=-1", "trainer.sync_timeout_s: must be positive, got -1.0"),
    ("trainer.max_restarts=many", "trainer.max_restarts: expected int, got str 'many'"),
    ("generation.rollout_drafts=maybe", "generation.rollout_drafts: 'maybe' is not one of auto, on, off"),
    ("generation.rollout_drafts=1", "generation.rollout_drafts: expected str, got int 1"),
    ("generation.rollout.min_match=0", "generation.rollout.min_match: must be positive, got 0"),
    ("generation.rollout.max_match=0", "generation.rollout.max_match: 0 is below generation.rollout.min_match=1"),
    ("generation.rollout.max_depth=17", "generation.rollout.max_depth: at most 16 tokens per chain, got 17"),
    ("generation.rollout.max_depth=0", "generation.rollout.max_depth: must be positive, got 0"),
    ("generation.rollout.min_count=0", "generation.rollout.min_count: must be positive, got 0"),
    ("generation.rollout.history_per_prompt=-1", "generation.rollout.history_per_prompt: must not be negative, got -1"),
    ("generation.rollout.history_mb=-1", "generation.rollout.history_mb: must not be negative, got -1.0"),
    ("generation.rollout.history_mb=lots", "generation.rollout.history_mb: expected float, got str 'lots'"),
    ("generation.rollout.depth=3", "generation.rollout.depth: unknown key (known: min_match, max_match, "),
    ("generation.rollout=3", "generation.rollout: expected a mapping"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message.split(":")[0])
    assert message in str(err.value)


def test_critic_warmup_must_leave_policy_updates():
    with pytest.raises(ConfigError, match="trainer.critic_warmup: 16 leaves no policy update"):
        load_config(None, ["trainer.algorithm=ppo", "trainer.critic_warmup=16", "trainer.iterations=16"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_draft_vocab_mismatch_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from trainer.loop.preflight import RunPaths, check_models

    def save(cls, vocab, name, **kw):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                          pad_token_id=0, **kw)
        cls(cfg).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    paths = RunPaths(actor=save(LlamaForCausalLM, 32, "actor"), draft=save(LlamaForCausalLM, 48, "draft"),
                     reward=save(LlamaForSequenceClassification, 32, "rm", num_labels=1), train_prompts=str(prompts),
                     eval_prompts=None)
    cfg = load_config(None, ["trainer.rm_weight=1.0"])
    with pytest.raises(ConfigError, match=r"model.draft: vocabulary size 48 \(.*/draft\) != the actor's 32"):
        check_models(cfg, paths)
    paths.reward = save(LlamaForSequenceClassification, 48, "rm48", num_labels=1)
    paths.draft = None  # plain decoding: no draft to check
    with pytest.raises(ConfigError, match=r"model.reward: vocabulary size 48 \(.*/rm48\) != the actor's 32; "):
        check_models(cfg, paths)
    paths.draft = paths.actor
    paths.reward = paths.actor  # a causal LM where a reward model belongs
    with pytest.raises(ConfigError, match=r"model.reward: .* not a sequence-classification"):
        check_models(cfg, paths)
    paths.reward = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"model.reward: model directory not found: .*missing"):
        check_models(cfg, paths)


def test_reward_and_draft_may_be_null():
    """A reward function alone (rm_weight 0) needs no reward model; plain decoding needs no draft. Null elsewhere,
    or an empty path, is an error naming the keys."""
    cfg = load_config(None, ["model.reward=null", "model.draft=null", "generation.strategy=none"])
    assert (cfg.model.reward, cfg.model.draft, cfg.trainer.rm_weight) == (None, None, 0.0)
    from configs.schema import critic_init

    assert critic_init(cfg) == "actor" and critic_init(load_config(None, ["model.critic_init=reward"])) == "reward"
    for overrides, message in [
        (["model.reward=null", "trainer.rm_weight=0.5"],
         "model.reward: null (no reward model) needs trainer.rm_weight=0, got trainer.rm_weight=0.5"),
        (["model.draft=null", "generation.strategy=chain:3"],
         "model.draft: null (no draft model) needs generation.strategy=none, or adaptive with rollout drafts, got "
         "generation.strategy=chain:3"),
        (["model.draft=null", "generation.rollout_drafts=off"],
         "model.draft: null (no draft model) with generation.strategy=adaptive needs rollout drafts "
         "(generation.rollout_drafts auto or on: speculating from the rollout alone), got "
         "generation.rollout_drafts=off"),
        (["model.draft=null", "generation.profile_fallback=chain:2"],
         "generation.profile_fallback: chain:2 drafts with a draft model; with model.draft null (rollout drafts "
         "alone) it can only be none"),
        (["model.reward="], "model.reward: empty path; null means no model"),
        (["model.actor=null"], "model.actor: expected str, got NoneType None"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        assert str(err.value) == message


def test_no_draft_model_speculates_from_the_rollout_alone():
    """model.draft null with strategy adaptive: rollout drafts (auto counts as on) are the only drafts; no draft
    trainer then (nothing to adapt)."""
    from configs.schema import adapts_draft

    for drafts in ("auto", "on"):
        cfg = load_config(None, ["model.draft=null", f"generation.rollout_drafts={drafts}"])
        assert cfg.model.draft is None and cfg.generation.strategy == "adaptive" and not adapts_draft(cfg)


def test_real_small_example_is_valid():
    cfg = load_config(CONFIG_DIR / "real_small.yaml")
    assert (cfg.model.reward, cfg.model.draft, cfg.generation.strategy) == (None, None, "none")
    assert cfg.trainer.actor_lr <= 1e-6 and cfg.trainer.rm_weight == 0 and cfg.trainer.algorithm == "grpo"


def test_too_many_instances_for_the_cluster():
    from trainer.loop.preflight import check_resources

    cfg = load_config(None, ["generation.num_instances=40", "generation.cpus_per_instance=1"])
    with pytest.raises(ConfigError, match=r"generation.num_instances=40 .* needs 40.8 CPU but the Ray cluster has 8"):
        check_resources(cfg, {"CPU": 8.0})
    gpu = load_config(CONFIG_DIR / "cluster_8b.yaml")
    with pytest.raises(ConfigError, match=r"needs 27 GPU but the Ray cluster has 0"):
        check_resources(gpu, {"CPU": 1000.0})


def test_launch_reports_bad_config_in_one_line():
    out = subprocess.run([sys.executable, "launch.py", "generation.num_instances=0"], capture_output=True,
                         text=True, cwd=CONFIG_DIR.parent, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "config error: generation.num_instances: must be positive, got 0"


def test_kv_cache_must_fit_the_instance_memory():
    """The engine's dense K/V for max_slots x (max_len + a step's tree nodes), target and draft, plus both models'
    weights: the cluster example fits an 80 GB GPU; 256 slots do not, and the error names the largest values that
    fit."""
    from transformers import LlamaConfig

    from trainer.loop.preflight import check_memory, kv_bytes_per_position, weight_bytes

    # the shapes of Llama-3.1-8B and Llama-3.2-1B (configs only)
    actor = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8)
    draft = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    assert (weight_bytes(actor, 1), weight_bytes(draft, 1)) == (8_030_261_248, 1_235_814_400)  # published counts
    assert (kv_bytes_per_position(actor, 2), kv_bytes_per_position(draft, 2)) == (128 * 1024, 32 * 1024)
    gpu = 80 * 10**9
    dense = ["generation.kv_cache=dense"]
    check_memory(load_config(CONFIG_DIR / "cluster_8b.yaml", dense), actor, draft, gpu, "an 80 GB GPU")
    with pytest.raises(ConfigError) as err:
        check_memory(load_config(CONFIG_DIR / "cluster_8b.yaml", dense + ["generation.max_slots=256"]), actor, draft,
                     gpu, "an 80 GB GPU")
    assert str(err.value) == (
        "generation.max_slots=256 x generation.max_len=3072: K/V 122.5 GiB + weights 17.3 GiB do not fit in "
        "67.1 GiB (90% of 74.5 GiB, an 80 GB GPU); the largest that fit: generation.max_slots=104 at this "
        "max_len, or generation.max_len=1209 at this max_slots")


def test_a_paged_pool_reports_its_capacity_and_must_hold_one_sample():
    """cluster_8b at max_len 16384 on an 80 GB GPU: dense rows hold 19 samples; the paged pool holds the same bytes
    as tokens, so as many samples of max_len and more as they end short. A pool too small for one sample of
    max_len is refused, naming the key."""
    from transformers import LlamaConfig

    from trainer.loop.preflight import check_memory

    actor = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8)
    draft = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    long = ["generation.max_len=16384", "generation.max_new_tokens=15000", "generation.max_slots=256"]
    lines = []
    check_memory(load_config(CONFIG_DIR / "cluster_8b.yaml", long), actor, draft, 80 * 10**9, "an 80 GB GPU",
                 log=lambda line, **kw: lines.append(line))
    assert lines == ["K/V pool (paged, blocks of 16): 49.8 GiB (what the weights leave) = 326,341 tokens = 19 samples "
                     "of max_len 16384, more as they end short (dense rows in the same bytes: 19 slots)"]
    with pytest.raises(ConfigError, match=r"^generation.kv_memory_gb: the K/V pool \(1.0 GiB, generation.kv_memory_gb\) "
                                          r"holds 6553 tokens, fewer than one sample of generation.max_len=16384"):
        check_memory(load_config(CONFIG_DIR / "cluster_8b.yaml", long + ["generation.kv_memory_gb=1"]), actor, draft,
                     80 * 10**9, "an 80 GB GPU")
